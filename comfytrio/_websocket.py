"""The client side of a websocket (RFC 6455) on a trio stream, with wsproto for the protocol.

ComfyUI sends one small JSON text message per event (about 16 for a four-node prompt) and
binary previews; we send a first JSON message (``feature_flags``), pongs and a close. wsproto
writes the opening handshake and checks the answer (``101``, ``Upgrade: websocket``,
``Connection: Upgrade``, ``Sec-WebSocket-Accept``); then wsproto's ``FrameProtocol`` (the
parser under its ``Connection``, driven directly: no event objects, a few microseconds less
per message) parses and checks frames (reserved bits, opcodes, masking, the size and ``FIN``
of control frames, UTF-8 of text, close codes) and masks ours. This module adds what wsproto
leaves to its user:

- the bytes that came with the ``101`` handed to the frame parser (h11, which wsproto's
  handshake uses, reads the answer once more to give them);
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
from collections.abc import Sequence
from typing import Any, cast

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode, ParseFailed
from wsproto.utilities import RemoteProtocolError

__all__ = ["WebSocket", "WebSocketClosed", "WebSocketHandshakeError", "websocket_handshake"]

_RECEIVE = 256 * 1024
"""Bytes asked of the stream per read."""

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

_TEXT, _BINARY, _PING, _CLOSE = Opcode.TEXT, Opcode.BINARY, Opcode.PING, Opcode.CLOSE


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
    # wsproto checks the answer; h11 (the parser wsproto uses) reads the same bytes once more
    # to hand over, untouched, what follows the 101: the first frames, for our FrameProtocol.
    try:
        request = client.send(Request(host, resource, extra_headers=extra))
        after = _AfterUpgrade(host, resource)
        await stream.send_all(request)
        while True:
            data = await stream.receive_some(_RECEIVE)
            if not data:
                raise WebSocketHandshakeError(
                    "the server closed the connection during the handshake"
                )
            client.receive_data(cast("bytes", data))  # trio's streams may give a bytearray
            after.receive_data(cast("bytes", data))
            for event in client.events():
                if isinstance(event, AcceptConnection):
                    return WebSocket(stream, after.trailing_data(), max_message_size)
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


class _AfterUpgrade:
    """An h11 client that saw an upgrade request like wsproto's: fed the answer too, it
    gives the bytes after the ``101``."""

    def __init__(self, host: str, resource: str) -> None:
        self._h11 = h11.Connection(h11.CLIENT)
        upgrade = [
            (b"Host", host.encode("idna")),  # as wsproto encodes them
            (b"Connection", b"Upgrade"),
            (b"Upgrade", b"websocket"),
        ]
        self._h11.send(h11.Request(method=b"GET", target=resource.encode("ascii"), headers=upgrade))

    def receive_data(self, data: bytes) -> None:
        self._h11.receive_data(data)

    def trailing_data(self) -> bytes:
        """What came after the ``101`` (wsproto accepted it, so h11 parsed it too)."""
        try:
            while self._h11.next_event() not in (h11.PAUSED, h11.NEED_DATA):
                pass
        except h11.ProtocolError as exc:  # cannot be: wsproto's h11 read the same bytes
            raise WebSocketHandshakeError(f"not a websocket handshake answer: {exc}") from exc
        if self._h11.their_state is not h11.SWITCHED_PROTOCOL:
            raise WebSocketHandshakeError("the 101 answer was not complete")
        return bytes(self._h11.trailing_data[0])


class WebSocket:
    """An open websocket on a stream the caller owns; made by ``websocket_handshake``.

    After the handshake wsproto's ``FrameProtocol`` parses and checks every frame and
    writes ours (masked); this class keeps the connection's state."""

    def __init__(self, stream: trio.abc.Stream, received: bytes, max_size: int) -> None:
        self._stream = stream
        self._proto = FrameProtocol(True, [])
        self._proto.receive_bytes(received)  # frames sent with the 101
        self._frames = self._proto.received_frames()
        self._max = max_size
        self._parts: list[Any] = []  # of the message being reassembled: str or bytes
        self._size = 0
        self._send_lock = trio.Lock()
        self._close_sent = False
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
        while True:
            try:
                frame = next(self._frames, None)
            except ParseFailed as exc:
                raise await self._fail(int(exc.code), str(exc) or "a protocol violation") from exc
            if frame is None:  # all that was read is parsed (that generator has ended)
                await self._fill()
                self._frames = self._proto.received_frames()
                continue
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY:
                data = cast("str | bytes", frame.payload)
                size = self._size + len(data)
                if size > self._max:
                    raise await self._fail(1009, f"a message is larger than {self._max} bytes")
                if not frame.message_finished:
                    self._parts.append(data)
                    self._size = size
                elif self._parts:
                    self._parts.append(data)
                    parts, self._parts, self._size = self._parts, [], 0
                    return "".join(parts) if isinstance(data, str) else b"".join(parts)
                else:
                    return data
            elif opcode is _PING:
                await self._send(self._proto.pong(cast("bytes", frame.payload)))
            elif opcode is _CLOSE:
                code, reason = cast("tuple[int, str]", frame.payload)
                closed = self._end(int(code), reason)
                await self._send_close(code)  # its code, echoed
                raise closed
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
        await self._send(self._proto.send_data(text))

    async def aclose(self, code: int = 1000) -> None:
        """Send a close frame (best effort) unless it ended already; the caller then closes
        the stream."""
        if self.closed is None:
            self.closed = WebSocketClosed(code, "closed by us")
            await self._send_close(code)

    # ------------------------------------------------------------------ internals

    async def _fill(self) -> None:
        """Read from the stream and hand what came to the parser."""
        try:
            data = await self._stream.receive_some(_RECEIVE)
        except _GONE as exc:
            raise self._end(1006, f"the connection broke: {exc!r}") from exc
        if not data:
            raise self._end(1006, "the connection ended without a close frame")
        self._proto.receive_bytes(cast("bytes", data))  # trio's streams may give a bytearray

    async def _fail(self, code: int, reason: str) -> WebSocketClosed:
        """We end it: a close frame with ``code`` (best effort)."""
        closed = self._end(code, reason)
        await self._send_close(code)
        return closed

    def _end(self, code: int, reason: str) -> WebSocketClosed:
        """Record why it ended (the first reason stays) and return it."""
        if self.closed is None:
            self.closed = WebSocketClosed(code, reason)
        return self.closed

    async def _send(self, data: bytes | bytearray) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except _GONE as exc:
                raise self._end(1006, f"the connection broke: {exc!r}") from exc

    async def _send_close(self, code: int) -> None:
        """Send our one close frame, unless it was sent or the connection cannot carry it."""
        if self._close_sent:
            return
        self._close_sent = True
        with contextlib.suppress(WebSocketClosed):
            await self._send(self._proto.close(CloseReason(code) if code in _KNOWN else code))


_KNOWN = frozenset(int(reason) for reason in CloseReason)
