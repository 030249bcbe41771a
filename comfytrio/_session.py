"""The websocket session of one client: connect, read, reconnect with backoff, decode each
message, and pass it on: to the prompt state machine (``_prompts.py``), and as events
(``_events.py``) to every subscriber.

Every websocket use of a client is here (``Session._open`` and ``Session._read``). The
websocket's stream comes from ``_http.open_stream``: through the proxy of the environment (a
``CONNECT`` tunnel) and TLS, as the client's HTTP requests.

Protocol facts it is built on (recorded from a real ComfyUI 0.3.64, see
``comfyui-protocol/README.md``):

* Execution events go only to the websocket whose ``clientId`` is the prompt's ``client_id``,
  so each client uses one websocket and one client id for every prompt it submits, and
  reconnects with that same id.
* Events sent while the socket was down are lost: after a reconnect every prompt in flight
  is reconciled (``/queue``, then ``/history``), and so is a prompt silent for
  ``silence_timeout`` seconds. A server unreachable for ``reconnect_timeout`` seconds loses
  its prompts (they run elsewhere), and those are removed from it once it is back.
* A message ComfyUI never sends (checked by ``_firewall``) is counted and logged, and ends
  the prompt it names; it never ends the session.
* Our first message announces ``supports_preview_metadata`` (``_frames.FEATURE_FLAGS``):
  servers that know it send images as type 4 frames naming node and prompt (and answer
  with their own ``feature_flags``); older ones ignore it and send type 1 frames. Binary
  frames are decoded by ``_frames`` and handed to the prompt they belong to; a frame of an
  unknown event type is counted (``frames_skipped``) and skipped.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import trio

from . import _firewall as firewall
from . import _frames as frames
from ._errors import ServerLostError
from ._events import ComfyEvent, QueueStatus
from ._http import HTTPError, open_stream
from ._prompts import Prompts, Watch
from ._websocket import (
    WebSocket,
    WebSocketClosed,
    WebSocketHandshakeError,
    websocket_handshake,
)

__all__ = ["Session"]

logger = logging.getLogger("comfytrio.client")

_MAX_WS_MESSAGE = 64 * 1024 * 1024  # execution_error carries the whole prompt; previews are big


def _ws_resource(base_url: str, client_id: str) -> str:
    """The request target of the websocket of ``client_id`` on the server at ``base_url``."""
    path = urlsplit(base_url).path.rstrip("/") + "/ws"
    return urlunsplit(("", "", path, f"clientId={client_id}", ""))


@attrs.define(eq=False)
class Session:
    """One websocket to one server, kept up for as long as ``run`` runs.

    ``reconcile`` and ``cancel_abandoned`` are the client's: what to do, over HTTP, for
    prompts whose events may be lost, and for prompts given up on. The session starts them
    in its own nursery.
    """

    url: str
    """Base URL of the server."""
    client_id: str
    """The ``clientId`` of the socket (every prompt of the client carries it)."""
    name: str
    """The server's name, for logs and events."""
    prompts: Prompts = attrs.field(repr=False)
    """The client's prompts in flight: each message goes there."""
    reconcile: Callable[[list[Watch]], Awaitable[None]] = attrs.field(repr=False)
    """Settles, from ``/queue`` and ``/history``, prompts whose events we may have missed."""
    cancel_abandoned: Callable[[], Awaitable[None]] = attrs.field(repr=False)
    """Removes from the server the prompts given up on."""
    ssl_context: ssl.SSLContext | None = None
    """Checks an https server's certificate (None: ``default_ssl_context()``)."""

    connected: bool = attrs.field(default=False, init=False)
    """Whether the websocket is up now."""
    queue_remaining: int = attrs.field(default=0, init=False)
    """The server's last reported queue length (all clients)."""
    reconnects: int = attrs.field(default=0, init=False)
    """How often the websocket was re-established."""
    dropped: int = attrs.field(default=0, init=False)
    """Events not delivered to a subscriber whose buffer was full."""
    malformed_count: int = attrs.field(default=0, init=False)
    """Messages the server sent that ComfyUI never sends."""
    frames_skipped: int = attrs.field(default=0, init=False)
    """Binary frames of an event type we do not read."""
    preview_metadata: bool = attrs.field(default=False, init=False)
    """The server's ``feature_flags`` answer has ``supports_preview_metadata``."""
    last_message_at: float = attrs.field(default=-math.inf, init=False)
    """``trio.current_time()`` when the websocket last brought a message."""
    _connected_event: trio.Event = attrs.field(factory=trio.Event, init=False)
    _listeners: list[Callable[[], None]] = attrs.field(factory=list, init=False)
    _subscribers: list[trio.MemorySendChannel[ComfyEvent]] = attrs.field(factory=list, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    # ------------------------------------------------------------------ connection

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the websocket: connect, read, reconnect with backoff, reconcile after a drop,
        and watch for silent prompts. Started once the first connection is up; raises
        ``ServerLostError`` when that first connection fails."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            first = True
            down_since: float | None = None
            backoff = 0.05
            while True:
                try:
                    async with self._open() as ws:
                        self._set_connected(True)
                        if first:
                            first = False
                            nursery.start_soon(self._watch_silence)
                            task_status.started()
                        else:
                            self.reconnects += 1
                            logger.warning("%s: websocket reconnected", self.name)
                            nursery.start_soon(self.reconcile, list(self.prompts.watches.values()))
                            nursery.start_soon(self.cancel_abandoned)
                        down_since = None
                        backoff = 0.05
                        await self._read(ws)
                except (
                    HTTPError,
                    OSError,
                    trio.TooSlowError,
                    trio.BrokenResourceError,
                    WebSocketHandshakeError,
                    WebSocketClosed,
                ) as exc:
                    if first:
                        why = exc.message if isinstance(exc, HTTPError) else exc.__cause__ or exc
                        raise ServerLostError(self.name, f"cannot connect: {why}") from exc
                    logger.warning("%s: websocket lost (%r)", self.name, exc)
                if self.connected:
                    self._set_connected(False)
                    self.prompts.disconnected()
                now = trio.current_time()
                if down_since is None:
                    down_since = now
                elif now - down_since > self.prompts.reconnect_timeout:
                    self.prompts.fail_all(
                        f"unreachable for more than {self.prompts.reconnect_timeout:g} s"
                    )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[WebSocket]:
        """One websocket connection (``_websocket.py``) on a stream we always close: TCP,
        through the environment's proxy if one applies, TLS for https (``open_stream``)."""
        host = urlsplit(self.url).netloc.rpartition("@")[2]
        resource = _ws_resource(self.url, self.client_id)
        stream = await open_stream(self.url, ssl_context=self.ssl_context, connect_timeout=10)
        try:
            with trio.fail_after(10):
                ws = await websocket_handshake(
                    stream, host, resource, max_message_size=_MAX_WS_MESSAGE
                )
                await ws.send_text(frames.FEATURE_FLAGS)
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                    await ws.aclose()
        finally:
            await trio.aclose_forcefully(stream)

    def close(self) -> None:
        """Stop the session's task and close every subscription."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        for send in self._subscribers:
            send.close()
        self._subscribers.clear()
        self._subscribers_changed()

    async def wait_connected(self) -> None:
        """Block until the websocket is up."""
        await self._connected_event.wait()

    def add_connection_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` each time the websocket goes up or down."""
        self._listeners.append(callback)

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        if up:
            self._connected_event.set()
        else:
            self._connected_event = trio.Event()
        for callback in self._listeners:
            callback()

    async def _watch_silence(self) -> None:
        """Reconcile prompts we have heard nothing about for ``silence_timeout`` seconds."""
        period = max(min(self.prompts.silence_timeout / 2, 5.0), 0.01)
        while True:
            await trio.sleep(period)
            if not self.connected:
                continue
            silent = self.prompts.silent(trio.current_time())
            if silent:
                await self.reconcile(silent)

    # ------------------------------------------------------------------ messages

    async def _read(self, ws: WebSocket) -> None:
        while True:
            message = await ws.receive()
            now = self.last_message_at = trio.current_time()  # a preview is a sign of life too
            if isinstance(message, bytes):
                self._frame(message, now)
                continue
            text = message
            prompt_id: str | None = None
            try:
                kind, data = firewall.message(text)
                raw_id = data.get("prompt_id")
                prompt_id = raw_id if isinstance(raw_id, str) else None
                self._handle(kind, data, now)
            except firewall.Malformed as exc:
                self.malformed(str(exc), prompt_id)
            except Exception as exc:  # a bug of ours must not let one server end the api
                logger.exception("%s: could not handle a message %.200r", self.name, text)
                self.malformed(f"a message we could not handle ({exc!r})", prompt_id)

    def _frame(self, data: bytes, now: float) -> None:
        """Act on one binary frame: decoded, checked, handed to its prompt."""
        prompt_id: str | None = None
        try:
            frame = frames.decode(data)
            owner = self.prompts.owner(frame)
            if owner is None:
                return  # another client's prompt (text frames go to every socket)
            watch, node = owner
            prompt_id = watch.prompt_id
            self.prompts.frame(watch, node, frame, now)
        except frames.Unknown as exc:
            self.frames_skipped += 1
            logger.debug("%s: skipping %s", self.name, exc)
        except firewall.Malformed as exc:
            self.malformed(str(exc), prompt_id)
        except Exception as exc:  # a bug of ours must not let one server end the api
            logger.exception("%s: could not handle a binary frame", self.name)
            self.malformed(f"a binary frame we could not handle ({exc!r})", prompt_id)

    def _handle(self, kind: str, data: dict[str, Any], now: float) -> None:
        """Act on one checked message; ``firewall.Malformed`` for what ComfyUI never sends."""
        if kind == "feature_flags":
            self.preview_metadata = data.get("supports_preview_metadata") is True
            return
        if kind == "status":
            self.queue_remaining = firewall.queue_remaining(data)
            if self._subscribers:
                self._publish(QueueStatus(self.name, self.queue_remaining))
            return
        unsure = self.prompts.message(kind, data, now)
        if unsure is not None and self._nursery is not None:
            self._nursery.start_soon(self.reconcile, [unsure])

    def malformed(self, detail: str, prompt_id: str | None) -> None:
        """News ComfyUI never sends: counted, logged, and the end of its prompt (which then
        runs elsewhere, and is removed from this server)."""
        self.malformed_count += 1
        watch = self.prompts.get(prompt_id)
        if watch is None:
            logger.warning("%s: ignoring a malformed message: %s", self.name, detail)
            return
        logger.warning("%s: prompt %s: malformed message: %s", self.name, prompt_id, detail)
        if self.prompts.malformed(watch, detail) and self._nursery is not None:
            self._nursery.start_soon(self.cancel_abandoned)

    # ------------------------------------------------------------------ subscribers

    @asynccontextmanager
    async def subscribe(self, buffer: int) -> AsyncIterator[trio.MemoryReceiveChannel[ComfyEvent]]:
        """A channel of every event while the block runs (see ``ComfyClient.subscribe``)."""
        send, receive = trio.open_memory_channel[ComfyEvent](buffer)
        self._subscribers.append(send)
        self._subscribers_changed()
        try:
            async with receive:
                yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
                self._subscribers_changed()
            send.close()

    def _subscribers_changed(self) -> None:
        # The prompt machine makes events only while someone listens.
        self.prompts.emit = self._publish if self._subscribers else None

    def _publish(self, event: ComfyEvent) -> None:
        for send in self._subscribers:
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
