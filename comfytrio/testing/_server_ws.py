"""The websocket side of the fake: ``/ws`` sessions, the hub that sends the engine's
messages to them by ``clientId``, and the TCP connections under them (which faults cut and
hostile mode writes raw bytes onto).

As in ComfyUI 0.3.64, a socket gets ``status`` (with its ``sid``) first, then
``executing`` of the running node if it belongs to the running prompt's client; a first
message ``{"type": "feature_flags", ...}`` is answered with the server's feature flags.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import socket as stdlib_socket
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio
from starlette.websockets import WebSocket

from ._engine import Engine
from ._faults import Gate, Hostility, RawBytes, WsMessage, encode_ws_message
from ._frames import frame as binary_frame
from ._server_system import SERVER_FEATURES

__all__ = ["CURRENT_CONNECTION", "Connection", "SocketEndpoint", "SocketHub"]

logger = logging.getLogger("comfytrio.testing")

CURRENT_CONNECTION: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "comfytrio_fake_connection", default=None
)
"""The connection the current request came on (set by the accept loop)."""


class Connection:
    """One accepted TCP connection (so faults can cut it without any goodbye)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.websocket = False
        self.send_lock: trio.Lock | None = None
        """Hypercorn's lock around writes to ``stream`` (set once it serves the connection)."""

    async def write_raw(self, data: bytes) -> None:
        """Write ``data`` onto the stream between two of Hypercorn's writes (hostile mode)."""
        if self.send_lock is None:
            await self.stream.send_all(data)
        else:
            async with self.send_lock:
                await self.stream.send_all(data)

    def abort(self, *, reset: bool) -> None:
        """Close the socket now; ``reset`` makes the peer see a connection reset (RST)."""
        sock = self.stream.socket
        if reset:
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        sock.close()


class _WsClient:
    def __init__(self, sid: str, connection: Connection | None = None) -> None:
        self.sid = sid
        self.connection = connection
        self.feature_flags: dict[str, Any] = {}
        self.outbox, self.inbox = trio.open_memory_channel[str | bytes | RawBytes](math.inf)

    def queue(self, frame: str | bytes | RawBytes) -> None:
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self.outbox.send_nowait(frame)


class SocketHub:
    """The websockets by ``clientId``; a newer socket with the same id replaces the older.

    ``hostile`` rules (``send_ws_after``) may add or replace messages as they are sent.
    """

    def __init__(self, hostile: Hostility | None = None) -> None:
        self.sockets: dict[str, _WsClient] = {}
        self.hostile = hostile
        self._changed = trio.Event()

    def changed(self) -> None:
        """A socket came or went (wakes ``wait_changed``)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Until a socket comes or goes."""
        await self._changed.wait()

    def _targets(self, sid: str | None) -> list[_WsClient]:
        if sid is None:
            return list(self.sockets.values())
        target = self.sockets.get(sid)
        return [target] if target is not None else []

    def send(self, event: str | int, data: Any, sid: str | None) -> None:
        """Queue a message for ``sid`` (dropped if unknown), or for everyone when None."""
        self.deliver(event, data, self._targets(sid))

    def deliver(self, event: str | int, data: Any, targets: list[_WsClient]) -> None:
        """Queue one message for ``targets`` (an int ``event`` is a binary frame's type)."""
        if not targets:
            return
        if isinstance(event, int):
            frame: str | bytes = binary_frame(event, bytes(data))
        else:
            frame = json.dumps({"type": event, "data": data})
        frames: list[str | bytes | RawBytes] = [frame]
        if self.hostile is not None:
            frames = self.hostile.rewrite(event, data, frame)
        for client in targets:
            for each in frames:
                client.queue(each)

    def send_message(self, message: WsMessage, sid: str | None) -> int:
        """Queue any message (hostile mode), as it is; how many sockets it goes to."""
        return self._queue_all(encode_ws_message(message), sid)

    def send_raw(self, data: bytes, sid: str | None) -> int:
        """Queue bytes to write onto the sockets' streams as they are (hostile mode)."""
        return self._queue_all(RawBytes(bytes(data)), sid)

    def _queue_all(self, frame: str | bytes | RawBytes, sid: str | None) -> int:
        targets = self._targets(sid)
        for client in targets:
            client.queue(frame)
        return len(targets)

    def supports_preview_metadata(self, sid: str | None) -> bool:
        """Whether ``sid`` sent ``{"supports_preview_metadata": true}`` first."""
        client = self.sockets.get(sid) if sid is not None else None
        return client is not None and client.feature_flags.get("supports_preview_metadata") is True


@dataclass
class SocketEndpoint:
    """``GET /ws`` of one server generation."""

    engine: Engine
    hub: SocketHub
    gate: Gate

    async def serve(self, websocket: WebSocket) -> None:
        """One websocket session, until either side closes it."""
        connection = CURRENT_CONNECTION.get()
        if connection is not None:
            connection.websocket = True
        await self.gate.wait_open()
        await websocket.accept()
        sid = websocket.query_params.get("clientId", "")
        if sid:
            self.hub.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        client = _WsClient(sid, connection)
        self.hub.sockets[sid] = client
        self.hub.changed()
        try:
            self.hub.deliver("status", {"status": self.engine.queue_info(), "sid": sid}, [client])
            executor = self.engine.executor
            if executor.client_id == sid and executor.last_node_id is not None:
                self.hub.deliver("executing", {"node": executor.last_node_id}, [client])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, websocket, client, nursery.cancel_scope)
                await self._receiver(websocket, client)
                nursery.cancel_scope.cancel()
        finally:
            if self.hub.sockets.get(sid) is client:
                del self.hub.sockets[sid]
                self.hub.changed()
            client.outbox.close()

    async def _sender(
        self, websocket: WebSocket, client: _WsClient, scope: trio.CancelScope
    ) -> None:
        try:
            async for frame in client.inbox:
                await self.gate.wait_open()
                if isinstance(frame, RawBytes):
                    if client.connection is not None:
                        await client.connection.write_raw(frame.data)
                elif isinstance(frame, bytes):
                    await websocket.send_bytes(frame)
                else:
                    await websocket.send_text(frame)
        except Exception:
            logger.debug("fake ComfyUI: websocket %s gone", client.sid, exc_info=True)
        scope.cancel()

    async def _receiver(self, websocket: WebSocket, client: _WsClient) -> None:
        first = True
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                continue
            try:
                data = json.loads(text)
                if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                    flags = data.get("data", {})
                    client.feature_flags = dict(flags) if isinstance(flags, Mapping) else {}
                    self.hub.deliver("feature_flags", SERVER_FEATURES, [client])
                first = False
            except ValueError:
                logger.info("fake ComfyUI: invalid JSON from websocket %s", client.sid)
