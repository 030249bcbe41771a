"""The client for one ComfyUI server: one httpx client and one websocket.

Protocol facts this module is built on (recorded from a real ComfyUI 0.3.64, see
``comfyui-protocol/README.md``):

* We choose every ``prompt_id`` and register it *before* ``POST /prompt``: the server may run a
  small prompt before the POST even returns, and a cancel that lands mid-submit can still
  delete it by id.
* Execution events go only to the websocket whose ``clientId`` is the prompt's ``client_id``,
  so each client uses one websocket and one client id for every prompt it submits, and
  reconnects with that same id.
* A prompt ends with ``executing`` carrying ``node: null`` and its ``prompt_id``; that message
  comes after ``execution_success``/``execution_error``/``execution_interrupted`` and after the
  history entry is written. ``execution_success`` alone is not enough: ``/history/{id}`` can
  still be ``{}`` right after it.
* A pending prompt that is deleted or cleared (by anyone) vanishes without any event, and
  ``/history/{id}`` answers ``{}`` both for "still queued or running" and for "never heard of
  it". So when the socket drops, or a prompt has been silent too long, we ask ``/queue``
  first and ``/history/{id}`` second: ComfyUI writes the history entry before it removes the
  prompt from the running list, so a prompt that is in neither has vanished.
"""

from __future__ import annotations

import functools
import logging
import math
import ssl
import urllib.request
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import attrs
import httpx
import trio

from . import _firewall as firewall
from ._errors import (
    ComfyAPIError,
    ComfyUITimeoutError,
    DownloadError,
    ExecutionError,
    ExecutionInterruptedError,
    PromptVanishedError,
    ServerLostError,
    ServerProtocolError,
    WorkflowError,
    unwrapped,
)
from ._events import (
    ComfyEvent,
    NodeOutput,
    NodeProgress,
    NodesCached,
    NodeStarted,
    PromptFinished,
    PromptStarted,
    PromptStatus,
    QueueStatus,
)
from ._transport import IDEMPOTENT, ComfyTransport
from ._websocket import (
    WebSocket,
    WebSocketClosed,
    WebSocketHandshakeError,
    websocket_handshake,
)

__all__ = [
    "ClientStatistics",
    "ComfyClient",
    "OutputRef",
    "PromptResult",
    "SubmittedPrompt",
    "connect_comfy_client",
    "open_comfy_client",
    "wait_server_ready",
]

logger = logging.getLogger("comfytrio.client")

T = TypeVar("T")

_RESEND = {IDEMPOTENT: True}
"""Marks a POST that may be sent twice (deletes, interrupts): ComfyTransport then resends it
on a new connection when it met one the server had just closed."""

_MAX_WS_MESSAGE = 64 * 1024 * 1024  # execution_error carries the whole prompt; previews are big


@attrs.frozen
class SubmittedPrompt:
    """What ``POST /prompt`` answered for an accepted prompt."""

    prompt_id: str
    """The id we chose for it."""
    number: float
    """Its place in the server's queue (negative for ``front=True``)."""
    node_errors: Mapping[str, Any]
    """Outputs ComfyUI dropped (only non-empty with ``allow_partial=True``)."""


@attrs.frozen
class OutputRef:
    """One file a prompt produced, as the server names it."""

    node_id: str
    """The output node that reported it."""
    filename: str
    """File name."""
    subfolder: str
    """Sub-folder inside the server's output or temp folder."""
    type: str
    """``output``, ``temp`` or ``input``."""


@attrs.frozen
class PromptResult:
    """A prompt that finished successfully."""

    instance: str
    """The server that ran it."""
    prompt_id: str
    """The prompt."""
    outputs: Mapping[str, Mapping[str, Any]]
    """Output node id -> what it produced, as ComfyUI reports it."""
    cached_nodes: tuple[str, ...] = ()
    """Nodes ComfyUI did not run because their result was cached."""

    @property
    def files(self) -> list[OutputRef]:
        """Every file in ``outputs`` (images, and any other list of files a node reports)."""
        return output_files(self.outputs)

    @property
    def fully_cached(self) -> bool:
        """True when every output node was served from ComfyUI's cache (no new file)."""
        return bool(self.outputs) and all(node in self.cached_nodes for node in self.outputs)


def output_files(outputs: Mapping[str, Mapping[str, Any]]) -> list[OutputRef]:
    """Every file in a prompt's outputs (node id -> ComfyUI's ``output`` dict): images, and
    any other list of files a node reports."""
    found: list[OutputRef] = []
    for node_id, output in outputs.items():
        for items in output.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, Mapping) and "filename" in item:
                    found.append(
                        OutputRef(
                            node_id=str(node_id),
                            filename=str(item["filename"]),
                            subfolder=str(item.get("subfolder", "")),
                            type=str(item.get("type", "output")),
                        )
                    )
    return found


@attrs.frozen
class ClientStatistics:
    """A snapshot of one client's state."""

    instance: str
    """The server."""
    connected: bool
    """Whether the websocket is up now."""
    queue_remaining: int
    """The server's last reported queue length (all clients)."""
    in_flight: int
    """Our prompts submitted and not yet finished."""
    reconnects: int
    """How often the websocket was re-established."""
    events_dropped: int
    """Events not delivered to a subscriber whose buffer was full."""
    malformed: int = 0
    """Messages and answers the server sent that ComfyUI never sends."""


@attrs.define(eq=False)
class _Watch:
    """What we know of one prompt while it is in flight."""

    prompt_id: str
    accepted: bool = False  # POST /prompt answered 200
    done: trio.Event = attrs.Factory(trio.Event)
    outputs: dict[str, dict[str, Any]] = attrs.Factory(dict)
    cached: tuple[str, ...] = ()
    error: firewall.ErrorReport | None = None
    interrupted: firewall.ErrorReport | None = None
    started_at: float | None = None  # when it was first seen running (its clock starts)
    running: trio.Event = attrs.Factory(trio.Event)  # set once it runs, or once it ended
    seen: bool = False  # the server sent an event for it: it knows the prompt
    gap: bool = False  # the socket dropped while it was in flight: events may be missing
    last_activity: float = 0.0
    outcome: PromptResult | ComfyAPIError | None = None


def _ws_url(base_url: str, client_id: str) -> str:
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + "/ws"
    return urlunsplit((scheme, parts.netloc, path, f"clientId={client_id}", ""))


def _instance_name(base_url: str) -> str:
    parts = urlsplit(base_url)
    return parts.netloc + parts.path.rstrip("/")


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client: building one per client loads the CA bundle each
    time (seconds of CPU for a few dozen servers)."""
    return ssl.create_default_context()


@contextmanager
def _transport_errors(instance: str, what: str) -> Iterator[None]:
    """Turn httpx transport failures into ServerLostError naming the server and the call."""
    try:
        yield
    except httpx.TransportError as exc:
        raise ServerLostError(instance, f"{what} failed: {exc!r}") from exc


async def wait_server_ready(
    url: str,
    *,
    timeout: float = 120.0,
    http: httpx.AsyncClient | None = None,
    interval: float = 0.1,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Poll ``GET /system_stats`` until it answers 200; return its JSON. ``ssl_context``
    checks an https server's certificate when ``http`` is not given (default: the system's
    CAs).

    Raises ``ComfyUITimeoutError`` when it did not answer in ``timeout`` seconds.
    """
    owned = http is None
    client = http or httpx.AsyncClient(
        timeout=httpx.Timeout(5.0), verify=ssl_context or tls_context()
    )
    last: str = "no answer"
    try:
        with trio.move_on_after(timeout):
            while True:
                try:
                    r = await client.get(url.rstrip("/") + "/system_stats")
                    if r.status_code == 200:
                        return firewall.system_stats(firewall.loads(r.content, "/system_stats"))
                    last = f"HTTP {r.status_code}"
                except firewall.Malformed as exc:  # not ComfyUI (yet): a proxy's page, say
                    last = str(exc)
                except httpx.TransportError as exc:
                    last = repr(exc)
                await trio.sleep(interval)
                interval = min(interval * 1.5, 1.0)
    finally:
        if owned:
            await client.aclose()
    raise ComfyUITimeoutError(
        f"ComfyUI at {url} was not ready after {timeout:g} s (last: {last})",
        instance=_instance_name(url),
        timeout=timeout,
    )


@attrs.define(eq=False)
class ComfyClient:
    """A connection to one ComfyUI server: HTTP calls plus one websocket for events.

    Make one with ``open_comfy_client()`` (or ``connect_comfy_client()`` to run it in your own
    nursery). Every prompt is submitted with this client's ``client_id`` so its events come
    to our socket.
    """

    url: str
    """Base URL of the server, e.g. ``http://127.0.0.1:8188``."""
    name: str
    """A short name for messages and events (``host:port`` by default)."""
    client_id: str
    """The websocket ``clientId`` every prompt of this client carries."""
    http: httpx.AsyncClient
    """The one HTTP client for this server."""
    silence_timeout: float = 30.0
    """After this many seconds without news of a prompt, ask ``/queue`` and ``/history``."""
    reconnect_timeout: float = 30.0
    """How long the websocket may stay down before in-flight prompts fail with
    ``ServerLostError``."""
    cancel_timeout: float = 5.0
    """At most this long is spent removing a cancelled or timed-out prompt from the server."""
    ssl_context: ssl.SSLContext | None = None
    """Checks an https server's certificate on the websocket (None: the system's CAs)."""
    direct: ComfyTransport | None = attrs.field(default=None, repr=False)
    """The ``ComfyTransport`` under ``http``, when this client made ``http`` itself and no
    proxy applies: the requests every job makes (``POST /prompt``, ``GET /view``) then go to
    it directly, without httpx's client layer (half a millisecond of CPU per request here).
    None: every request goes through ``http``."""

    _watches: dict[str, _Watch] = attrs.field(factory=dict, init=False)
    _subscribers: list[trio.MemorySendChannel[ComfyEvent]] = attrs.field(factory=list, init=False)
    _connected: bool = attrs.field(default=False, init=False)
    _connected_event: trio.Event = attrs.field(factory=trio.Event, init=False)
    _connection_listeners: list[Callable[[], None]] = attrs.field(factory=list, init=False)
    _queue_remaining: int = attrs.field(default=0, init=False)
    _reconnects: int = attrs.field(default=0, init=False)
    _dropped: int = attrs.field(default=0, init=False)
    _abandoned: set[str] = attrs.field(factory=set, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _ws: WebSocket | None = attrs.field(default=None, init=False)
    _last_message_at: float = attrs.field(default=-math.inf, init=False)
    _malformed_count: int = attrs.field(default=0, init=False)

    # ------------------------------------------------------------------ lifecycle

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the websocket: connect, read, reconnect with backoff, reconcile after a drop.
        Raises ``ServerLostError`` (itself, not in a group) when the first connection fails."""
        with unwrapped(ServerLostError):
            await self._serve_in_nursery(task_status)

    async def _serve_in_nursery(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            first = True
            down_since: float | None = None
            backoff = 0.05
            while True:
                try:
                    async with self._open_websocket() as ws:
                        self._ws = ws
                        self._connected = True
                        self._connected_event.set()
                        self._connection_changed()
                        if first:
                            first = False
                            nursery.start_soon(self._watch_silence)
                            task_status.started()
                        else:
                            self._reconnects += 1
                            logger.warning("%s: websocket reconnected", self.name)
                            nursery.start_soon(self._reconcile, list(self._watches.values()))
                            nursery.start_soon(self.cancel_abandoned)
                        down_since = None
                        backoff = 0.05
                        await self._read(ws)
                except (
                    OSError,
                    trio.TooSlowError,
                    trio.BrokenResourceError,
                    WebSocketHandshakeError,
                    WebSocketClosed,
                ) as exc:
                    if first:
                        why = exc.__cause__ or exc
                        raise ServerLostError(self.name, f"cannot connect: {why}") from exc
                    logger.warning("%s: websocket lost (%r)", self.name, exc)
                self._ws = None
                if self._connected:
                    self._connected = False
                    self._connected_event = trio.Event()
                    self._connection_changed()
                    for watch in self._watches.values():
                        watch.gap = True
                now = trio.current_time()
                if down_since is None:
                    down_since = now
                elif now - down_since > self.reconnect_timeout:
                    self._fail_all_in_flight(
                        f"unreachable for more than {self.reconnect_timeout:g} s"
                    )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    @asynccontextmanager
    async def _open_websocket(self) -> AsyncIterator[WebSocket]:
        """One websocket connection (``_websocket.py``) on a TCP stream we always close."""
        parts = urlsplit(self.url)
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        resource = _ws_url(self.url, self.client_id).split(parts.netloc, 1)[1]
        with trio.fail_after(10):
            tcp = await trio.open_tcp_stream(parts.hostname or "", port)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
        try:
            with trio.fail_after(10):
                if secure:
                    stream = trio.SSLStream(
                        tcp, self.ssl_context or tls_context(), server_hostname=parts.hostname
                    )
                ws = await websocket_handshake(
                    stream, parts.netloc, resource, max_message_size=_MAX_WS_MESSAGE
                )
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                    await ws.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def aclose(self) -> None:
        """Stop the websocket task and close every subscription and the HTTP client."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        for send in self._subscribers:
            send.close()
        self._subscribers.clear()
        await self.http.aclose()

    @property
    def connected(self) -> bool:
        """Whether the websocket is up now."""
        return self._connected

    async def wait_connected(self) -> None:
        """Block until the websocket is up."""
        await self._connected_event.wait()

    def add_connection_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` each time the websocket goes up or down (``connected``
        changes). It runs in the client's task, so it must return quickly and not block."""
        self._connection_listeners.append(callback)

    def _connection_changed(self) -> None:
        for callback in self._connection_listeners:
            callback()

    def statistics(self) -> ClientStatistics:
        """A frozen snapshot of this client's state."""
        return ClientStatistics(
            instance=self.name,
            connected=self._connected,
            queue_remaining=self._queue_remaining,
            in_flight=sum(1 for w in self._watches.values() if w.accepted),
            reconnects=self._reconnects,
            events_dropped=self._dropped,
            malformed=self._malformed_count,
        )

    # ------------------------------------------------------------------ events

    @asynccontextmanager
    async def subscribe(
        self, *, buffer: int = 1000
    ) -> AsyncIterator[trio.MemoryReceiveChannel[ComfyEvent]]:
        """Receive every event of this server while the block runs::

            async with client.subscribe() as events:
                async for event in events:
                    ...

        Events for a subscriber whose buffer is full are dropped (and counted in
        ``statistics().events_dropped``); prompts never wait for a slow subscriber.
        """
        send, receive = trio.open_memory_channel[ComfyEvent](buffer)
        self._subscribers.append(send)
        try:
            async with receive:
                yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()

    def _publish(self, event: ComfyEvent) -> None:
        for send in self._subscribers:
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                self._dropped += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    @property
    def last_message_at(self) -> float:
        """``trio.current_time()`` when the websocket last brought a message (-inf before
        the first): a server that sends progress is alive, however slowly it answers HTTP."""
        return self._last_message_at

    async def _read(self, ws: WebSocket) -> None:
        while True:
            text = await ws.receive_text()  # binary previews are skipped there
            self._last_message_at = trio.current_time()
            prompt_id: str | None = None
            try:
                kind, data = firewall.message(text)
                raw_id = data.get("prompt_id")
                prompt_id = raw_id if isinstance(raw_id, str) else None
                self._handle(kind, data)
            except firewall.Malformed as exc:
                self._malformed(str(exc), prompt_id)
            except Exception as exc:  # a bug of ours must not let one server end the api
                logger.exception("%s: could not handle a message %.200r", self.name, text)
                self._malformed(f"a message we could not handle ({exc!r})", prompt_id)

    def _malformed(self, detail: str, prompt_id: str | None) -> None:
        """A message ComfyUI never sends: counted, logged, and the end of its prompt (which
        then runs elsewhere, and is removed from this server)."""
        self._malformed_count += 1
        watch = self._watches.get(prompt_id) if prompt_id is not None else None
        if watch is None:
            logger.warning("%s: ignoring a malformed message: %s", self.name, detail)
            return
        logger.warning("%s: prompt %s: malformed message: %s", self.name, prompt_id, detail)
        if watch.accepted and not watch.done.is_set():
            self._abandoned.add(watch.prompt_id)
            if self._nursery is not None:
                self._nursery.start_soon(self.cancel_abandoned)
        self._settle(
            watch, ServerProtocolError(self.name, detail, prompt_id=watch.prompt_id), "error"
        )

    def _handle(self, kind: str, data: dict[str, Any]) -> None:
        """Act on one checked message; ``firewall.Malformed`` for what ComfyUI never sends."""
        if kind == "status":
            self._queue_remaining = firewall.queue_remaining(data)
            if self._subscribers:
                self._publish(QueueStatus(self.name, self._queue_remaining))
            return
        prompt_id = data.get("prompt_id")
        watch = self._watches.get(prompt_id) if isinstance(prompt_id, str) else None
        if watch is None or prompt_id is None:
            return  # another client's prompt, or a message of no prompt
        watch.last_activity = trio.current_time()
        watch.seen = True
        if watch.started_at is None:  # any event of a prompt means it runs
            self._mark_running(watch)
        subscribed = bool(self._subscribers)
        if kind == "executing":
            node = data.get("node")
            if node is None:
                self._finish_from_events(watch)
            else:
                node = firewall.node_id(node)
                if subscribed:
                    self._publish(NodeStarted(self.name, prompt_id, node))
        elif kind == "progress":
            node = firewall.node_id(data.get("node"))
            value = firewall.number(data.get("value", 0), "progress value")
            top = firewall.number(data.get("max", 0), "progress max")
            if subscribed:
                self._publish(NodeProgress(self.name, prompt_id, node, int(value), int(top)))
        elif kind == "executed":
            node = firewall.node_id(data.get("node"))
            output = firewall.output(data.get("output", {}), node)
            watch.outputs[node] = output
            if subscribed:
                self._publish(NodeOutput(self.name, prompt_id, node, output))
        elif kind == "execution_start":
            if subscribed:
                self._publish(PromptStarted(self.name, prompt_id))
        elif kind == "execution_cached":
            watch.cached = firewall.cached_nodes(data.get("nodes"))
            if subscribed:
                self._publish(NodesCached(self.name, prompt_id, watch.cached))
        elif kind == "execution_error":
            watch.error = firewall.error_report(data)
        elif kind == "execution_interrupted":
            watch.interrupted = firewall.error_report(data)

    # ------------------------------------------------------------------ outcomes

    @staticmethod
    def _mark_running(watch: _Watch) -> None:
        watch.started_at = trio.current_time()
        watch.running.set()

    def _settle(
        self, watch: _Watch, outcome: PromptResult | ComfyAPIError, status: PromptStatus
    ) -> None:
        if watch.done.is_set():
            return
        watch.outcome = outcome
        watch.done.set()
        watch.running.set()
        if self._subscribers:
            self._publish(PromptFinished(self.name, watch.prompt_id, status))

    def _finish_from_events(self, watch: _Watch) -> None:
        if watch.gap and watch.error is None and watch.interrupted is None:
            # The socket dropped while it ran: some `executed` events may be lost.
            if self._nursery is not None:
                self._nursery.start_soon(self._reconcile, [watch])
            return
        self._settle_from(watch, watch.error, watch.interrupted, watch.outputs, watch.cached)

    def _settle_from(
        self,
        watch: _Watch,
        error: firewall.ErrorReport | None,
        interrupted: firewall.ErrorReport | None,
        outputs: dict[str, dict[str, Any]],
        cached: tuple[str, ...],
    ) -> None:
        if error is not None:
            self._settle(
                watch,
                ExecutionError(
                    instance=self.name,
                    prompt_id=watch.prompt_id,
                    node_id=error.node_id,
                    node_type=error.node_type,
                    exception_type=error.exception_type,
                    exception_message=error.exception_message,
                    traceback=error.traceback,
                    node_outputs=outputs,
                ),
                "error",
            )
        elif interrupted is not None:
            self._settle(
                watch,
                ExecutionInterruptedError(
                    instance=self.name,
                    prompt_id=watch.prompt_id,
                    node_id=interrupted.node_id,
                    node_type=interrupted.node_type,
                    exception_type="interrupted",
                    node_outputs=outputs,
                ),
                "interrupted",
            )
        else:
            result = PromptResult(self.name, watch.prompt_id, outputs, cached)
            self._settle(watch, result, "success")

    def _settle_from_history(self, watch: _Watch, entry: dict[str, Any]) -> None:
        try:
            error, interrupted, outputs, cached = firewall.history_entry(entry)
        except firewall.Malformed as exc:
            self._malformed(f"/history: {exc}", watch.prompt_id)
            return
        self._settle_from(watch, error, interrupted, outputs, cached)

    def mark_lost(self, why: str) -> None:
        """Fail every prompt in flight with ``ServerLostError`` (e.g. our process exited)."""
        self._fail_all_in_flight(why)

    def _fail_all_in_flight(self, why: str) -> None:
        for watch in list(self._watches.values()):
            if watch.accepted and not watch.done.is_set():
                self._abandoned.add(watch.prompt_id)
                self._settle(
                    watch, ServerLostError(self.name, why, prompt_id=watch.prompt_id), "lost"
                )

    async def _watch_silence(self) -> None:
        """Reconcile prompts we have heard nothing about for ``silence_timeout`` seconds."""
        period = max(min(self.silence_timeout / 2, 5.0), 0.01)
        while True:
            await trio.sleep(period)
            if not self._connected:
                continue
            now = trio.current_time()
            silent = [
                w
                for w in self._watches.values()
                if w.accepted
                and not w.done.is_set()
                and now - w.last_activity > self.silence_timeout
            ]
            if silent:
                await self._reconcile(silent)

    async def _reconcile(self, watches: list[_Watch]) -> None:
        """Settle, from ``/queue`` and ``/history``, prompts whose events we may have missed."""
        watches = [w for w in watches if w.accepted and not w.done.is_set()]
        if not watches:
            return
        try:
            running, pending = firewall.queue_ids(await self.queue())
        except (ServerLostError, ServerProtocolError) as exc:
            self._reconcile_failed(watches, exc)
            return
        for watch in watches:
            if watch.done.is_set():
                continue
            if watch.prompt_id in running and watch.started_at is None:
                self._mark_running(watch)  # its start event was missed
            if watch.prompt_id in running or watch.prompt_id in pending:
                watch.last_activity = trio.current_time()
                continue
            try:
                entry = await self.history(watch.prompt_id)
            except ServerProtocolError as exc:  # this prompt's own history is malformed
                self._settle(watch, exc, "error")
                self._abandoned.add(watch.prompt_id)
                continue
            except ServerLostError as exc:
                self._reconcile_failed([watch], exc)
                continue
            if watch.done.is_set():
                continue
            if entry is not None:
                self._settle_from_history(watch, entry)
            else:
                logger.warning("%s: prompt %s vanished", self.name, watch.prompt_id)
                self._settle(watch, PromptVanishedError(self.name, watch.prompt_id), "vanished")

    def _reconcile_failed(self, watches: list[_Watch], exc: ComfyAPIError) -> None:
        """The server cannot say where silent prompts are: try again later, but a prompt
        silent for ``silence_timeout`` + ``reconnect_timeout`` seconds is given up (it runs
        elsewhere, and is removed from this server once it answers again), as when the
        websocket stays down that long."""
        logger.warning("%s: cannot reconcile yet: %s", self.name, exc)
        limit = self.silence_timeout + self.reconnect_timeout
        now = trio.current_time()
        for watch in watches:
            silent = now - watch.last_activity
            if silent > limit and not watch.done.is_set():
                self._abandoned.add(watch.prompt_id)
                why = f"prompt silent for {silent:.0f} s, and the server cannot say where it is"
                self._settle(
                    watch,
                    ServerLostError(self.name, f"{why} ({exc})", prompt_id=watch.prompt_id),
                    "lost",
                )

    # ------------------------------------------------------------------ prompts

    async def submit(
        self,
        workflow: Mapping[str, Any],
        *,
        prompt_id: str | None = None,
        front: bool = False,
        extra_data: Mapping[str, Any] | None = None,
        allow_partial: bool = False,
    ) -> SubmittedPrompt:
        """Queue ``workflow`` (API format) on the server; return once it is accepted.

        The prompt id is ours (a new UUID unless given) and is watched before the request
        leaves, so no event can be missed. Raises ``WorkflowError`` when ComfyUI rejects the
        workflow, and also when it accepts it but drops some outputs (200 with
        ``node_errors``; the prompt is then removed again) unless ``allow_partial`` is True.
        Raises ``ServerLostError`` when the server cannot be reached.
        """
        prompt_id = prompt_id or str(uuid.uuid4())
        if prompt_id in self._watches:
            raise ValueError(f"prompt id {prompt_id} is already in flight on {self.name}")
        watch = _Watch(prompt_id, last_activity=trio.current_time())
        self._watches[prompt_id] = watch
        body: dict[str, Any] = {
            "prompt": workflow,
            "client_id": self.client_id,
            "prompt_id": prompt_id,
        }
        if front:
            body["front"] = True
        if extra_data:
            body["extra_data"] = dict(extra_data)
        try:
            status, answer = await self._post_prompt(watch, body)
            if status != 200:
                raise _refused(answer, status, self.name, prompt_id)
            try:
                number, node_errors = firewall.prompt_answer(answer)
            except firewall.Malformed as exc:
                self._abandoned.add(prompt_id)  # it may be queued there: removed in time
                raise self._protocol_error(str(exc), prompt_id) from None
            if node_errors and not allow_partial:
                await self._cancel_shielded(prompt_id)
                raise WorkflowError(
                    {
                        "type": "outputs_dropped",
                        "message": "ComfyUI accepted the prompt but dropped invalid outputs",
                    },
                    node_errors,
                    status_code=200,
                    instance=self.name,
                    prompt_id=prompt_id,
                )
        except BaseException:
            self._watches.pop(prompt_id, None)
            raise
        watch.accepted = True
        watch.last_activity = trio.current_time()
        logger.debug("%s: queued prompt %s (number %s)", self.name, prompt_id, number)
        return SubmittedPrompt(prompt_id, number, node_errors)

    async def _post_prompt(self, watch: _Watch, body: Mapping[str, Any]) -> tuple[int, Any]:
        """``POST /prompt``: its status and answer. A POST that failed after it may have
        reached the server (the connection broke, or closed as an idle keep-alive one) is
        looked up by its id, and sent once more only when the server has never heard of it,
        so a prompt never runs twice. Raises ``ServerLostError`` when the server cannot be
        reached or the outcome stays unknown (then the id is removed from the server once it
        answers again)."""
        prompt_id = watch.prompt_id
        try:
            return await self._send_prompt(body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent
            raise ServerLostError(self.name, f"POST /prompt failed: {exc!r}") from exc
        except httpx.TransportError as exc:
            first = exc
        logger.info(
            "%s: POST /prompt of %s failed (%r): looking it up", self.name, prompt_id, first
        )
        try:
            known = watch.seen or await self._knows_prompt(prompt_id)
        except ServerLostError as exc:
            self._abandoned.add(prompt_id)
            raise ServerLostError(
                self.name,
                f"POST /prompt failed ({first!r}) and the server cannot say if it "
                f"has the prompt ({exc.message})",
                prompt_id=prompt_id,
            ) from first
        if known:
            return 200, {"prompt_id": prompt_id, "number": 0, "node_errors": {}}
        if isinstance(first, httpx.TimeoutException):
            # It may still be validating our request: sending it again could run it twice.
            self._abandoned.add(prompt_id)
            raise ServerLostError(
                self.name, f"POST /prompt got no answer: {first!r}", prompt_id=prompt_id
            ) from first
        try:
            return await self._send_prompt(body)
        except httpx.TransportError as exc:
            self._abandoned.add(prompt_id)
            raise ServerLostError(
                self.name,
                f"POST /prompt failed twice: {first!r}, then {exc!r}",
                prompt_id=prompt_id,
            ) from exc

    async def _send_prompt(self, body: Mapping[str, Any]) -> tuple[int, Any]:
        async with self._stream("POST", "/prompt", json_body=body) as r:
            await r.aread()
        return r.status_code, _json_or_text(r)

    async def _knows_prompt(self, prompt_id: str) -> bool:
        """Whether the server has the prompt: queued, running or finished."""
        if prompt_id in await self.queued_prompt_ids():
            return True
        return await self.history(prompt_id) is not None

    async def wait(self, prompt_id: str, *, timeout: float = math.inf) -> PromptResult:
        """Wait for a submitted prompt to end and return its outputs.

        ``timeout`` counts from the moment the prompt starts to run on the server (its first
        event): time spent waiting in the server's queue, behind other prompts, is not the
        prompt's own.

        Raises ``ExecutionError`` (a node failed), ``ExecutionInterruptedError``,
        ``PromptVanishedError`` (it left the queue without running), ``ServerLostError``, or
        ``ComfyUITimeoutError`` when it ran for ``timeout`` seconds (the prompt is then
        removed from the server: deleted if pending, interrupted if running).
        """
        watch = self._watches.get(prompt_id)
        if watch is None:
            raise KeyError(f"prompt {prompt_id} is not in flight on {self.name}")
        try:
            await watch.running.wait()
            with trio.move_on_at((watch.started_at or trio.current_time()) + timeout):
                await watch.done.wait()
            if not watch.done.is_set():
                await self._cancel_shielded(prompt_id)
                raise ComfyUITimeoutError(
                    f"ComfyUI {self.name}: prompt {prompt_id} ran for {timeout:g} s without "
                    "finishing (it was interrupted)",
                    instance=self.name,
                    prompt_id=prompt_id,
                    timeout=timeout,
                )
        finally:
            self._watches.pop(prompt_id, None)
        outcome = watch.outcome
        if isinstance(outcome, PromptResult):
            return outcome
        assert outcome is not None
        raise outcome

    async def run(
        self,
        workflow: Mapping[str, Any],
        *,
        prompt_id: str | None = None,
        timeout: float = math.inf,
        front: bool = False,
        extra_data: Mapping[str, Any] | None = None,
    ) -> PromptResult:
        """Submit ``workflow`` and wait for its outputs (``submit`` then ``wait``). ``timeout``
        bounds the submission, then the prompt's run, counted from when it starts to run
        (time in the server's queue is not counted: see ``wait``).

        If the caller is cancelled, the prompt is deleted from the queue or interrupted on
        the server before the cancellation goes on, so it keeps no GPU busy.
        """
        prompt_id = prompt_id or str(uuid.uuid4())
        deadline = trio.current_time() + timeout
        finished = False
        try:
            with trio.move_on_at(deadline) as submitting:
                await self.submit(workflow, prompt_id=prompt_id, front=front, extra_data=extra_data)
            if submitting.cancelled_caught:
                await self._cancel_shielded(prompt_id)  # the POST may have landed
                raise ComfyUITimeoutError(
                    f"ComfyUI {self.name}: prompt {prompt_id} could not be submitted in "
                    f"{timeout:g} s",
                    instance=self.name,
                    prompt_id=prompt_id,
                    timeout=timeout,
                )
            result = await self.wait(prompt_id, timeout=timeout)
            finished = True
            return result
        except ComfyAPIError:
            finished = True
            raise
        finally:
            if not finished:
                await self._cancel_shielded(prompt_id)

    async def cancel_abandoned(self) -> None:
        """Remove from the server the prompts we gave up on while it was unreachable (they
        were sent again elsewhere), so a server that comes back does not run them too."""
        abandoned, self._abandoned = self._abandoned, set()
        for prompt_id in abandoned:
            await self._cancel_shielded(prompt_id)
        if abandoned:
            logger.info("%s: removed %d abandoned prompt(s)", self.name, len(abandoned))

    async def _cancel_shielded(self, prompt_id: str) -> None:
        """``cancel_prompt`` even while our caller is being cancelled, bounded in time so a
        hung server cannot hold the caller forever."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + self.cancel_timeout):
            await self.cancel_prompt(prompt_id)

    async def cancel_prompt(self, prompt_id: str) -> None:
        """Remove a prompt from the server: delete it if pending, interrupt it if running.

        Deleting first and interrupting second leaves no gap: a prompt that was pending is
        gone, one that already ran is hit by the targeted interrupt (a no-op for an id that
        is not running). Never raises for a server that is gone.
        """
        try:
            if self.http.is_closed:
                raise ServerLostError(self.name, "the client is closed")
            with _transport_errors(self.name, "POST /queue"):
                await self.http.post("/queue", json={"delete": [prompt_id]}, extensions=_RESEND)
            with _transport_errors(self.name, "POST /interrupt"):
                await self.http.post(
                    "/interrupt", json={"prompt_id": prompt_id}, extensions=_RESEND
                )
        except ServerLostError as exc:
            logger.warning("%s: could not cancel prompt %s: %s", self.name, prompt_id, exc)
        watch = self._watches.get(prompt_id)
        if watch is not None and watch.outcome is None:
            self._settle(
                watch,
                ExecutionInterruptedError(
                    instance=self.name,
                    prompt_id=prompt_id,
                    node_id=None,
                    node_type=None,
                ),
                "cancelled",
            )
        logger.debug("%s: cancelled prompt %s", self.name, prompt_id)

    # ------------------------------------------------------------------ plain HTTP calls

    async def _get_json(self, path: str, check: Callable[[Any], T]) -> T:
        """``GET path``, its JSON answer passed through ``check`` (a firewall function).
        ``ServerLostError`` for an HTTP error (a proxy's 502, say), ``ServerProtocolError``
        for an answer ComfyUI never gives."""
        with _transport_errors(self.name, f"GET {path}"):
            r = await self.http.get(path)
        if r.status_code != 200:
            raise ServerLostError(self.name, f"GET {path} answered HTTP {r.status_code}")
        try:
            return check(firewall.loads(r.content, f"the answer of GET {path}"))
        except firewall.Malformed as exc:
            raise self._protocol_error(str(exc)) from None

    def _protocol_error(self, detail: str, prompt_id: str | None = None) -> ServerProtocolError:
        """An answer ComfyUI never gives: counted, and the error for the call that got it."""
        self._malformed_count += 1
        logger.warning("%s: malformed answer: %s", self.name, detail)
        return ServerProtocolError(self.name, detail, prompt_id=prompt_id)

    async def system_stats(self) -> dict[str, Any]:
        """``GET /system_stats``: versions, devices, memory."""
        return await self._get_json("/system_stats", firewall.system_stats)

    async def object_info(self) -> dict[str, Any]:
        """``GET /object_info``: every node class the server knows, with its inputs."""
        return await self._get_json("/object_info", firewall.object_info)

    async def list_models(self, folder: str) -> list[str]:
        """``GET /models/{folder}``: the model files the server sees (empty for an unknown
        folder)."""
        with _transport_errors(self.name, f"GET /models/{folder}"):
            r = await self.http.get(f"/models/{folder}")
        if r.status_code == 404:
            return []
        if r.status_code != 200:
            raise ServerLostError(self.name, f"GET /models/{folder} answered HTTP {r.status_code}")
        try:
            return firewall.model_names(firewall.loads(r.content, f"GET /models/{folder}"))
        except firewall.Malformed as exc:
            raise self._protocol_error(str(exc)) from None

    async def queue(self) -> dict[str, Any]:
        """``GET /queue``: ``queue_running`` and ``queue_pending``."""
        return await self._get_json("/queue", firewall.queue_answer)

    async def queued_prompt_ids(self) -> set[str]:
        """The ids of every prompt running or pending on the server."""
        running, pending = firewall.queue_ids(await self.queue())
        return running | pending

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """``GET /history/{id}``: the entry of a finished prompt, or None."""
        answer = await self._get_json(f"/history/{prompt_id}", firewall.history_answer)
        return answer.get(prompt_id)

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: stop the running prompt (only if it is ``prompt_id``, when
        given)."""
        body = {"prompt_id": prompt_id} if prompt_id else {}
        with _transport_errors(self.name, "POST /interrupt"):
            await self.http.post("/interrupt", json=body, extensions=_RESEND)

    async def delete_from_queue(self, prompt_ids: list[str]) -> None:
        """``POST /queue {"delete": ids}``: remove pending prompts."""
        with _transport_errors(self.name, "POST /queue"):
            await self.http.post("/queue", json={"delete": prompt_ids}, extensions=_RESEND)

    async def free(self, *, unload_models: bool = False, free_memory: bool = True) -> None:
        """``POST /free``: drop cached results (and models), so the next prompt runs anew."""
        with _transport_errors(self.name, "POST /free"):
            await self.http.post(
                "/free",
                json={"unload_models": unload_models, "free_memory": free_memory},
                extensions=_RESEND,
            )

    async def upload_image(
        self,
        filename: str,
        data: bytes,
        *,
        subfolder: str = "",
        overwrite: bool = True,
        type: str = "input",
    ) -> str:
        """``POST /upload/image``; return the name to put into ``LoadImage.inputs.image``
        (``subfolder/name`` when a sub-folder is used)."""
        with _transport_errors(self.name, "POST /upload/image"):
            r = await self.http.post(
                "/upload/image",
                files={"image": (filename, data, "application/octet-stream")},
                data={
                    "overwrite": "true" if overwrite else "false",
                    "type": type,
                    "subfolder": subfolder,
                },
            )
        if r.status_code != 200:
            raise ComfyAPIError(
                f"ComfyUI {self.name}: upload of {filename!r} refused (HTTP {r.status_code})"
            )
        try:
            name, sub = firewall.upload_answer(firewall.loads(r.content, "POST /upload/image"))
        except firewall.Malformed as exc:
            raise self._protocol_error(str(exc)) from None
        return f"{sub}/{name}" if sub else name

    @asynccontextmanager
    async def _stream(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A response whose body is read as it is consumed: from ``direct`` when set (with
        ``http``'s headers and timeouts), else through ``http``."""
        if self.direct is None:
            async with self.http.stream(method, path, json=json_body, params=params) as r:
                yield r
            return
        request = httpx.Request(
            method,
            self.url + path,
            params=params,
            json=json_body,
            headers=self.http.headers,
            extensions={"timeout": self.http.timeout.as_dict()},
        )
        response = await self.direct.handle_async_request(request)
        response.request = request
        try:
            yield response
        finally:
            await response.aclose()

    async def download(self, ref: OutputRef, dest: Path, *, max_bytes: int | None = None) -> Path:
        """``GET /view`` an output into ``dest``, atomically (a partial file never stays).

        The body is kept in memory up to ``_DOWNLOAD_SPILL`` bytes, so a usual image costs one
        worker-thread call (folder, write, rename) instead of one per step and chunk. A body
        over ``max_bytes`` (None: no cap) is refused. Bound it in time with a cancel scope.
        Raises ``ServerLostError`` when the server fails mid-body, ``DownloadError`` when the
        file cannot be written (disk full, no permission) or is over the cap,
        ``ComfyAPIError`` for an HTTP error.
        """
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        pending = bytearray()
        file: BinaryIO | None = None
        try:
            with _transport_errors(self.name, "GET /view"):
                async with self._stream("GET", "/view", params=params) as r:
                    if r.status_code != 200:
                        raise ComfyAPIError(
                            f"ComfyUI {self.name}: GET /view of {ref.subfolder}/{ref.filename} "
                            f"answered HTTP {r.status_code}"
                        )
                    size = 0
                    async with _chunks(r) as chunks:
                        async for chunk in chunks:
                            size += len(chunk)
                            if max_bytes is not None and size > max_bytes:
                                url = httpx.URL(f"{self.url}/view", params=params)
                                raise DownloadError(
                                    str(url), f"the output is over the {max_bytes}-byte cap"
                                )
                            pending += chunk
                            if len(pending) >= _DOWNLOAD_SPILL:
                                with _write_errors(self.url, params, dest):
                                    file = await trio.to_thread.run_sync(_spill, file, tmp, pending)
                                pending.clear()
            with _write_errors(self.url, params, dest):
                await trio.to_thread.run_sync(_finish_download, file, tmp, dest, pending)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_discard_download, file, tmp)
            raise
        return dest


@contextmanager
def _write_errors(base_url: str, params: Mapping[str, str], dest: Path) -> Iterator[None]:
    """A local file error while saving a download is the job's error, not the api's."""
    try:
        yield
    except OSError as exc:
        url = httpx.URL(f"{base_url}/view", params=dict(params))
        raise DownloadError(str(url), f"cannot write {dest}: {exc}") from exc


def _chunks(response: httpx.Response) -> aclosing[AsyncGenerator[bytes, None]]:
    # aiter_bytes() is an async generator: closed here when we stop early (over the cap),
    # not finalized, unclosed, by the GC.
    return aclosing(cast("AsyncGenerator[bytes, None]", response.aiter_bytes()))


_DOWNLOAD_SPILL = 8 * 1024 * 1024
"""Download bodies up to this size stay in memory until they are written in one go."""


def _spill(file: BinaryIO | None, tmp: Path, data: bytearray) -> BinaryIO:
    """Append ``data`` to the partial file (created with its folder on first use)."""
    if file is None:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        file = tmp.open("wb")
    file.write(data)
    return file


def _finish_download(file: BinaryIO | None, tmp: Path, dest: Path, data: bytearray) -> None:
    """Write the rest, close, and move the partial file into place."""
    file = _spill(file, tmp, data)
    file.close()
    tmp.replace(dest)


def _discard_download(file: BinaryIO | None, tmp: Path) -> None:
    """Close and remove the partial file, if there is one (never raises: the error that
    got us here is the one to report)."""
    try:
        if file is not None:
            file.close()
        tmp.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not remove the partial download %s: %s", tmp, exc)


def _json_or_text(r: httpx.Response) -> Any:
    try:
        return firewall.loads(r.content, "the answer")
    except firewall.Malformed:
        return r.text


def _refused(
    answer: Any, status: int, instance: str, prompt_id: str
) -> WorkflowError | ServerLostError:
    """The error for a ``POST /prompt`` that was not accepted: ComfyUI's own refusal
    (``WorkflowError``), or a gateway's error page (``ServerLostError``: try elsewhere)."""
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        node_errors = answer.get("node_errors")
        return WorkflowError(
            answer["error"],
            node_errors if isinstance(node_errors, dict) else {},
            status_code=status,
            instance=instance,
            prompt_id=prompt_id,
        )
    text = str(answer).strip()[:500] if answer else ""
    if status >= 500:
        return ServerLostError(
            instance, f"POST /prompt answered HTTP {status}: {text[:120]}", prompt_id=prompt_id
        )
    return WorkflowError(
        {"type": "http_error", "message": f"HTTP {status}", "details": text},
        {},
        status_code=status,
        instance=instance,
        prompt_id=prompt_id,
    )


async def connect_comfy_client(
    nursery: trio.Nursery,
    url: str,
    *,
    name: str | None = None,
    client_id: str | None = None,
    http: httpx.AsyncClient | None = None,
    silence_timeout: float = 30.0,
    reconnect_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> ComfyClient:
    """Connect to the server at ``url`` with its websocket task running in ``nursery``.

    The advanced form of ``open_comfy_client()``: the caller owns the nursery and must call
    ``await client.aclose()``. ``ssl_context`` checks an https server's certificate (for the
    websocket, and for HTTP unless ``http`` is given); default: the system's CAs. Without
    ``http``, requests go through ``ComfyTransport`` (HTTP/1.1 written for ComfyUI's server,
    under an ``httpx.AsyncClient``). Raises ``ServerLostError`` when the websocket cannot be
    opened.
    """
    base = url.rstrip("/")
    direct: ComfyTransport | None = None
    if http is None:
        timeout = httpx.Timeout(60.0, connect=10.0)
        if urllib.request.getproxies():
            # httpx reads HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY only when it makes
            # its own transports: then it routes each request as its environment says.
            http = httpx.AsyncClient(
                base_url=base, timeout=timeout, verify=ssl_context or tls_context()
            )
        else:
            transport = ComfyTransport(ssl_context=ssl_context or tls_context(), max_idle=16)
            http = httpx.AsyncClient(base_url=base, timeout=timeout, transport=transport)
            direct = transport
    client = ComfyClient(
        url=base,
        name=name or _instance_name(base),
        client_id=client_id or uuid.uuid4().hex,
        http=http,
        silence_timeout=silence_timeout,
        reconnect_timeout=reconnect_timeout,
        ssl_context=ssl_context,
        direct=direct,
    )
    try:
        await nursery.start(client._serve)
    except BaseException:
        await client.http.aclose()
        raise
    return client


@asynccontextmanager
async def open_comfy_client(
    url: str,
    *,
    name: str | None = None,
    client_id: str | None = None,
    silence_timeout: float = 30.0,
    reconnect_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ComfyClient]:
    """Open a client for the ComfyUI server at ``url`` (its websocket is up on entry)::

        async with open_comfy_client("http://127.0.0.1:8188") as client:
            result = await client.run(workflow)

    ``ssl_context`` checks an https server's certificate (default: the system's CAs).
    Raises ``ServerLostError`` when the server cannot be reached.
    """
    with unwrapped():
        async with trio.open_nursery() as nursery:
            client = await connect_comfy_client(
                nursery,
                url,
                name=name,
                client_id=client_id,
                silence_timeout=silence_timeout,
                reconnect_timeout=reconnect_timeout,
                ssl_context=ssl_context,
            )
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
