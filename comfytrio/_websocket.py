"""The client side of a websocket (RFC 6455) on a trio stream, with wsproto for the protocol.

ComfyUI sends one small JSON text message per event (about 16 for a four-node prompt) and
binary previews; we send a first JSON message (``feature_flags``), pongs and a close. wsproto
writes the opening handshake and checks the answer (``101``, ``Upgrade: websocket``,
``Connection: Upgrade``, ``Sec-WebSocket-Accept``), parses and checks frames (reserved bits,
opcodes, masking, the size and ``FIN`` of control frames, UTF-8 of text, close codes) and
masks ours. This module adds what wsproto leaves to its user:

- many frames parsed out of each ``receive_some``, no background task;
- fragmented messages joined, bounded by ``max_message_size`` (close ``1009``);
- pings answered, a close answered and reported;
- ``WebSocketClosed`` for every way the connection ends: the server's close (its code), a
  protocol violation the server committed (``1002``, or ``1007`` for bad UTF-8: we close
  with that code), a stream that just stops or breaks (``1006``).

The caller owns the stream (opens and closes it); one task receives at a time.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

__all__ = ["WebSocket", "WebSocketClosed", "WebSocketHandshakeError", "websocket_handshake"]

_RECEIVE = 256 * 1024
"""Bytes asked of the stream per read."""

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class WebSocketHandshakeError(Exception):
    """The server did not accept the websocket: not ``101``, a wrong ``Sec-WebSocket-Accept``,
    a missing ``Upgrade``, or the connection ended first."""


class WebSocketClosed(Exception):
    """The connection ended: ``code`` is the close code (1006 when it ended without a close
    frame), ``reason`` says why."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"websocket closed ({code}{': ' + reason if reason else ''})")


async def websocket_handshake(
    stream: trio.abc.Stream,
    host: str,
    resource: str,
    *,
    max_message_size: int,
    headers: Sequence[tuple[str, str]] = (),
) -> WebSocket:
    """Upgrade ``stream`` (already connected to ``host``, the ``Host`` header) to a websocket
    on ``resource`` (path and query), sending ``headers`` too. Messages longer than
    ``max_message_size`` (bytes, or characters of text) are refused. Raises
    ``WebSocketHandshakeError``."""
    client = WSConnection(ConnectionType.CLIENT)
    extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    try:
        await stream.send_all(client.send(Request(host, resource, extra_headers=extra)))
        while True:
            data = await stream.receive_some(_RECEIVE)
            if not data:
                raise WebSocketHandshakeError(
                    "the server closed the connection during the handshake"
                )
            client.receive_data(cast("bytes", data))  # trio's streams may give a bytearray
            for event in client.events():
                if isinstance(event, AcceptConnection):
                    connection = client.connection
                    assert connection is not None  # wsproto made it with AcceptConnection
                    return WebSocket(stream, connection, max_message_size)
                if isinstance(event, RejectConnection):
                    raise WebSocketHandshakeError(
                        f"the server answered HTTP {event.status_code}, not 101"
                    )
    except RemoteProtocolError as exc:
        detail = f"{exc} ({exc.__context__})" if exc.__context__ else str(exc)
        raise WebSocketHandshakeError(f"not a websocket handshake answer: {detail}") from exc
    except _GONE as exc:
        raise WebSocketHandshakeError(
            f"the connection broke during the handshake: {exc!r}"
        ) from exc


class WebSocket:
    """An open websocket on a stream the caller owns; made by ``websocket_handshake``."""

    def __init__(self, stream: trio.abc.Stream, connection: Connection, max_size: int) -> None:
        self._stream = stream
        self._connection = connection
        self._max = max_size
        self._events: deque[Event] = deque(connection.events())  # frames sent with the 101
        self._parts: list[Any] = []  # of the message being reassembled: str or bytes
        self._size = 0
        self._send_lock = trio.Lock()
        self.closed: WebSocketClosed | None = None
        """Why it ended, once it did."""

    async def receive(self) -> str | bytes:
        """The next message: ``str`` for a text one, ``bytes`` for a binary one.

        Raises ``WebSocketClosed`` when the server closes (after answering its close frame),
        when the stream ends or breaks (1006), when a message is larger than
        ``max_message_size`` (1009) or the server breaks the protocol (1002, 1007).
        """
        if self.closed is not None:
            raise self.closed
        events = self._events
        while True:
            if not events:
                await self._fill()
                continue
            event = events.popleft()
            if isinstance(event, (TextMessage, BytesMessage)):
                data = event.data
                size = self._size + len(data)
                if size > self._max:
                    raise await self._fail(1009, f"a message is larger than {self._max} bytes")
                if not event.message_finished:
                    self._parts.append(data)
                    self._size = size
                elif self._parts:
                    self._parts.append(data)
                    parts, self._parts, self._size = self._parts, [], 0
                    return "".join(parts) if isinstance(data, str) else b"".join(parts)
                else:
                    return data if isinstance(data, str) else bytes(data)  # no copy of bytes
            elif isinstance(event, Ping):
                await self._send(event.response())
            elif isinstance(event, CloseConnection):
                raise await self._closed_by(event)
            # Pong: nothing to do

    async def receive_text(self) -> str:
        """The next text message (binary ones are skipped); raises as ``receive``."""
        while True:
            message = await self.receive()
            if isinstance(message, str):
                return message

    async def send_text(self, text: str) -> None:
        """Send a text message; ``WebSocketClosed`` once the connection ended."""
        if self.closed is not None:
            raise self.closed
        await self._send(TextMessage(text))

    async def aclose(self, code: int = 1000) -> None:
        """Send a close frame (best effort) unless it ended already; the caller then closes
        the stream."""
        if self.closed is None:
            self.closed = WebSocketClosed(code, "closed by us")
            await self._send_quietly(CloseConnection(code))

    # ------------------------------------------------------------------ internals

    async def _fill(self) -> None:
        """Read from the stream and parse what came."""
        try:
            data = await self._stream.receive_some(_RECEIVE)
        except _GONE as exc:
            raise self._end(1006, f"the connection broke: {exc!r}") from exc
        if not data:
            raise self._end(1006, "the connection ended without a close frame")
        self._connection.receive_data(cast("bytes", data))
        self._events.extend(self._connection.events())

    async def _closed_by(self, event: CloseConnection) -> WebSocketClosed:
        """The server's close frame (answered), or wsproto's verdict on a frame it sent."""
        if self._connection.state is ConnectionState.REMOTE_CLOSING:
            closed = self._end(int(event.code), event.reason or "")
            await self._send_quietly(CloseConnection(event.code))  # its code, echoed
            return closed
        return await self._fail(int(event.code), event.reason or "a protocol violation")

    async def _fail(self, code: int, reason: str) -> WebSocketClosed:
        """We end it: a close frame with ``code`` (best effort)."""
        closed = self._end(code, reason)
        await self._send_quietly(CloseConnection(code))
        return closed

    def _end(self, code: int, reason: str) -> WebSocketClosed:
        """Record why it ended (the first reason stays) and return it."""
        if self.closed is None:
            self.closed = WebSocketClosed(code, reason)
        return self.closed

    async def _send(self, event: Event) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(self._connection.send(event))
            except _GONE as exc:
                raise self._end(1006, f"the connection broke: {exc!r}") from exc

    async def _send_quietly(self, event: CloseConnection) -> None:
        """Send a close frame, unless the connection cannot carry one any more."""
        with contextlib.suppress(WebSocketClosed, LocalProtocolError):
            await self._send(event)
