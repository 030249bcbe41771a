"""The client half of RFC 6455 that reading ComfyUI's event stream needs, on a trio stream.

ComfyUI sends one small JSON text message per event (about 16 for a four-node prompt) and
binary previews; we send nothing but pongs and a close. A general websocket library costs
more CPU per message than the rest of a prompt's handling together (a reader task, a memory
channel, a generic frame parser), so this module does only what the event stream needs:

- the opening handshake (``Sec-WebSocket-Accept`` checked, no extensions, no subprotocol);
- frames parsed straight out of one receive buffer, many per ``receive_some``;
- fragmented messages reassembled, bounded by ``max_message_size``;
- pings answered, a close answered and reported, binary messages skipped.

The caller owns the stream (opens and closes it); ``WebSocketClosed`` reports every way the
connection can end, including a stream that just stops (code 1006).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import struct

import trio

__all__ = ["WebSocket", "WebSocketClosed", "WebSocketHandshakeError", "websocket_handshake"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEADER = 64 * 1024
_RECEIVE = 256 * 1024

_CONTINUATION, _TEXT, _BINARY = 0x0, 0x1, 0x2
_CLOSE, _PING, _PONG = 0x8, 0x9, 0xA
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class WebSocketHandshakeError(Exception):
    """The server did not accept the websocket (not ``101``, or a wrong accept key)."""


class WebSocketClosed(Exception):
    """The connection ended: ``code`` 1006 when it ended without a close frame."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"websocket closed ({code}{': ' + reason if reason else ''})")


async def websocket_handshake(
    stream: trio.abc.Stream, host: str, resource: str, *, max_message_size: int
) -> WebSocket:
    """Upgrade ``stream`` (already connected to ``host``) to a websocket on ``resource``."""
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(
        b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (resource.encode(), host.encode(), key)
    )
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > _MAX_HEADER:
            raise WebSocketHandshakeError("the handshake answer has no end of headers")
        data = await stream.receive_some(_RECEIVE)
        if not data:
            raise WebSocketHandshakeError("the server closed the connection during the handshake")
        buffer += data
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = head[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise WebSocketHandshakeError(f"the server answered {head[0]!r}, not 101")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    expected = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != expected:
        raise WebSocketHandshakeError("the server's Sec-WebSocket-Accept does not match our key")
    return WebSocket(stream, bytes(buffer[end + 4 :]), max_message_size)


class WebSocket:
    """An open websocket on a stream the caller owns; made by ``websocket_handshake``."""

    def __init__(self, stream: trio.abc.Stream, pending: bytes, max_message_size: int) -> None:
        self._stream = stream
        self._buffer = bytearray(pending)
        self._pos = 0
        self._max = max_message_size
        self._fragments: list[bytes] = []
        self._fragment_size = 0
        self._fragment_opcode = _TEXT
        self.closed: WebSocketClosed | None = None
        """Why it ended, once it did."""

    async def receive_text(self) -> str:
        """The next text message (binary ones are skipped).

        Raises ``WebSocketClosed`` when the server closes (after answering its close frame),
        when the stream ends, or when a message is larger than ``max_message_size`` (1009) or
        breaks the protocol (1002); ``trio.BrokenResourceError`` and ``OSError`` as the
        stream raises them.
        """
        if self.closed is not None:
            raise self.closed
        while True:
            message = self._next_message()
            if message is None:
                await self._fill()
            elif isinstance(message, str):
                return message
            else:
                await self._answer_control(*message)

    async def aclose(self, code: int = 1000) -> None:
        """Send a close frame (best effort); the caller then closes the stream."""
        if self.closed is None:
            self.closed = WebSocketClosed(code, "closed by us")
            with contextlib.suppress(*_GONE):
                await self._send(_CLOSE, struct.pack("!H", code))

    # ------------------------------------------------------------------ frames

    def _next_message(self) -> str | tuple[int, bytes] | None:
        """Parse frames from the buffer: a text message, a control frame to answer, or None
        when more bytes are needed."""
        buffer, pos = self._buffer, self._pos
        while True:
            available = len(buffer) - pos
            if available < 2:
                break
            first, second = buffer[pos], buffer[pos + 1]
            if first & 0x70:  # no extension was agreed, so no RSV bit may be set
                raise self._fail(1002, "a frame with reserved bits set")
            length = second & 0x7F
            header = 2
            if length == 126:
                if available < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if available < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                header = 10
            mask = b""
            if second & 0x80:  # servers must not mask; unmask anyway
                mask = bytes(buffer[pos + header : pos + header + 4])
                header += 4
            opcode = first & 0x0F
            if length > self._max or self._fragment_size + length > self._max:
                raise self._fail(1009, f"a message is larger than {self._max} bytes")
            if available < header + length:
                break
            payload = bytes(buffer[pos + header : pos + header + length])
            pos += header + length
            self._pos = pos
            if mask:
                payload = _unmask(payload, mask)
            if opcode >= _CLOSE:
                # RFC 6455 5.5: control frames are short and never fragmented; answering a
                # longer ping would need a frame we cannot (and must not) send.
                if length > 125 or not first & 0x80 or opcode > _PONG:
                    raise self._fail(1002, f"a bad control frame (opcode {opcode}, {length} bytes)")
                return opcode, payload
            final = bool(first & 0x80)
            if opcode == _CONTINUATION:
                if not self._fragments:
                    raise self._fail(1002, "a continuation frame without a first frame")
            elif opcode in (_TEXT, _BINARY):
                if self._fragments:
                    raise self._fail(1002, "a new message before the last one ended")
                self._fragment_opcode = opcode
            else:
                raise self._fail(1002, f"unknown opcode {opcode}")
            if not final:
                self._fragments.append(payload)
                self._fragment_size += len(payload)
                continue
            if self._fragments:
                self._fragments.append(payload)
                payload = b"".join(self._fragments)
                self._fragments, self._fragment_size = [], 0
            if self._fragment_opcode == _TEXT:
                try:
                    return payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise self._fail(1007, "a text message is not UTF-8") from None
        if pos > 0 and pos * 2 >= len(buffer):
            del buffer[:pos]
            self._pos = 0
        return None

    async def _fill(self) -> None:
        if self.closed is not None:
            raise self.closed
        data = await self._stream.receive_some(_RECEIVE)
        if not data:
            raise self._fail(1006, "the connection ended without a close frame")
        self._buffer += data

    async def _answer_control(self, opcode: int, payload: bytes) -> None:
        if opcode == _PING:
            await self._send(_PONG, payload)
        elif opcode == _CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            reason = payload[2:].decode("utf-8", "replace")
            if self.closed is None:
                with contextlib.suppress(*_GONE):
                    await self._send(_CLOSE, payload[:2])
            raise self._fail(code, reason)

    def _fail(self, code: int, reason: str) -> WebSocketClosed:
        self.closed = WebSocketClosed(code, reason)
        return self.closed

    async def _send(self, opcode: int, payload: bytes) -> None:
        """One masked frame (clients must mask); payloads here are control-sized."""
        mask = os.urandom(4)
        await self._stream.send_all(
            bytes((0x80 | opcode, 0x80 | len(payload))) + mask + _unmask(payload, mask)
        )


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``mask`` (the same both ways)."""
    if not payload:
        return payload
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )
