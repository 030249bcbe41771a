"""The HTTP and websocket side of the fake ComfyUI: a Starlette app served by Hypercorn.

Routes, status codes, content types and bodies follow the recordings of ComfyUI 0.3.64
(``01_idle_gets.json`` ... ``18_...``); every route also answers under ``/api``. Errors a real
server turns into aiohttp's bare 500 (a body that is not JSON, ``"prompt"`` being a list)
get the same ``500 Internal Server Error`` text here.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import math
import mimetypes
import os
import socket as stdlib_socket
import struct
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import trio
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from ._engine import Engine, _member
from ._faults import AnswerRule, Gate, Hostility, RawBytes, WsMessage, encode_ws_message
from ._nodes import NodeRegistry
from ._paths import FakePaths, disk_work

__all__ = ["COMFYUI_VERSION", "Connection", "SocketHub", "SystemInfo", "build_app"]

logger = logging.getLogger("comfytrio.testing")

COMFYUI_VERSION = "0.3.64"
"""The ComfyUI version the fake imitates (the one recorded)."""

MAX_UPLOAD_SIZE = 100 * 1024 * 1024
_SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE}
_ERROR_500 = "500 Internal Server Error\n\nServer got itself in trouble"
_FORCE_DOWNLOAD = {
    "text/html",
    "text/html-sandboxed",
    "application/xhtml+xml",
    "text/javascript",
    "text/css",
}

CURRENT_CONNECTION: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "comfytrio_fake_connection", default=None
)


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
        """Queue one message for ``targets``."""
        if not targets:
            return
        if isinstance(event, int):
            frame: str | bytes = struct.pack(">I", event) + bytes(data)
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
        targets = self._targets(sid)
        frame = encode_ws_message(message)
        for client in targets:
            client.queue(frame)
        return len(targets)

    def send_raw(self, data: bytes, sid: str | None) -> int:
        """Queue bytes to write onto the sockets' streams as they are (hostile mode)."""
        targets = self._targets(sid)
        for client in targets:
            client.queue(RawBytes(bytes(data)))
        return len(targets)

    def supports_preview_metadata(self, sid: str | None) -> bool:
        """Whether ``sid`` sent ``{"supports_preview_metadata": true}`` first."""
        client = self.sockets.get(sid) if sid is not None else None
        return client is not None and client.feature_flags.get("supports_preview_metadata") is True


@dataclass
class SystemInfo:
    """What ``/system_stats`` reports besides memory."""

    argv: list[str] = field(default_factory=lambda: ["main.py"])
    cpu: bool = True
    cuda_visible_devices: str | None = None

    def stats(self) -> dict[str, Any]:
        """The ``GET /system_stats`` body."""
        ram_total, ram_free = _ram()
        if self.cpu:
            device = {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": ram_total,
                "vram_free": ram_free,
                "torch_vram_total": ram_total,
                "torch_vram_free": ram_free,
            }
        else:
            visible = self.cuda_visible_devices
            label = (
                f"CUDA_VISIBLE_DEVICES={visible}"
                if visible is not None
                else ("CUDA_VISIBLE_DEVICES unset")
            )
            vram = 24 * 1024**3
            device = {
                "name": f"cuda:0 fake ({label})",
                "type": "cuda",
                "index": 0,
                "vram_total": vram,
                "vram_free": vram - 512 * 1024**2,
                "torch_vram_total": 0,
                "torch_vram_free": 0,
            }
        return {
            "system": {
                "os": os.name,
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": COMFYUI_VERSION,
                "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.95",
                "required_templates_version": "0.1.95",
                "python_version": sys.version,
                "pytorch_version": "0.0.0+comfytrio.fake",
                "embedded_python": False,
                "argv": list(self.argv),
            },
            "devices": [device],
        }


def _ram() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3, 8 * 1024**3


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(data), status_code=status, media_type="application/json; charset=utf-8"
    )


def _empty(status: int = 200) -> Response:
    return Response(status_code=status)


Endpoint = Callable[[Request], Awaitable[Response]]


def _aiohttp_errors(endpoint: Endpoint) -> Endpoint:
    """Answer any exception like aiohttp does: a bare 500 text."""

    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception:
            logger.info(
                "fake ComfyUI: %s %s -> 500", request.method, request.url.path, exc_info=True
            )
            return PlainTextResponse(_ERROR_500, status_code=500)

    return wrapper


class _Routes:
    """The endpoints of one server generation (bound to its engine)."""

    def __init__(
        self,
        engine: Engine,
        hub: SocketHub,
        registry: NodeRegistry,
        paths: FakePaths,
        system: SystemInfo,
        gate: Gate,
    ) -> None:
        self.engine = engine
        self.hub = hub
        self.registry = registry
        self.paths = paths
        self.system = system
        self.gate = gate

    # GET

    async def system_stats(self, request: Request) -> Response:
        return _json(self.system.stats())

    async def features(self, request: Request) -> Response:
        return _json(_SERVER_FEATURES)

    async def get_prompt(self, request: Request) -> Response:
        return _json(self.engine.queue_info())

    async def object_info(self, request: Request) -> Response:
        info = await disk_work(self.registry.object_info, self.paths)
        return _json(info)

    async def object_info_node(self, request: Request) -> Response:
        name = request.path_params["node_class"]
        node = self.registry.get(name)
        if node is None:
            return _json({})
        return _json({name: await disk_work(node.object_info, self.paths)})

    async def models(self, request: Request) -> Response:
        return _json(self.paths.model_folder_names())

    async def models_folder(self, request: Request) -> Response:
        files = await disk_work(self.paths.list_models, request.path_params["folder"])
        if files is None:
            return _empty(404)
        return _json(files)

    async def history(self, request: Request) -> Response:
        max_items = request.query_params.get("max_items")
        offset = request.query_params.get("offset")
        return _json(
            self.engine.get_history(
                int(max_items) if max_items is not None else None,
                int(offset) if offset is not None else -1,
            )
        )

    async def history_item(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]
        entry = self.engine.history.get(prompt_id)
        return _json({prompt_id: entry} if entry is not None else {})

    async def get_queue(self, request: Request) -> Response:
        return _json(self.engine.queue_snapshot())

    async def view(self, request: Request) -> Response:
        query = request.query_params
        if "filename" not in query:
            return _empty(404)
        found = await disk_work(_view, self.paths, dict(query))
        if isinstance(found, int):
            return _empty(found)
        body, content_type, name = found
        return Response(
            body, media_type=content_type, headers={"Content-Disposition": f'filename="{name}"'}
        )

    # POST

    async def post_prompt(self, request: Request) -> Response:
        body = await request.json()
        status, answer = self.engine.post_prompt(body)
        return _json(answer, status)

    async def post_queue(self, request: Request) -> Response:
        body = await request.json()
        if _member(body, "clear", False):
            self.engine.clear_queue()
        if "delete" in body:
            for prompt_id in body["delete"]:
                self.engine.delete_queued(prompt_id)
        return _empty()

    async def interrupt(self, request: Request) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        self.engine.interrupt(body.get("prompt_id"))
        return _empty()

    async def free(self, request: Request) -> Response:
        body = await request.json()
        unload = body.get("unload_models", False)
        free_memory = body.get("free_memory", False)
        if unload:
            self.engine.set_flag("unload_models", unload)
        if free_memory:
            self.engine.set_flag("free_memory", free_memory)
        return _empty()

    async def post_history(self, request: Request) -> Response:
        body = await request.json()
        if _member(body, "clear", False):
            self.engine.history.clear()
        if "delete" in body:
            for prompt_id in body["delete"]:
                self.engine.history.pop(prompt_id, None)
        return _empty()

    async def upload_image(self, request: Request) -> Response:
        async with request.form() as form:
            image = form.get("image")
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            if self.paths.directory_by_type(fields.get("type") or "input") is None:
                raise UnboundLocalError("cannot access local variable 'type_dir'")
            if image is None or image == "":
                return _empty(400)
            if not isinstance(image, UploadFile):
                raise TypeError("'str' object has no attribute 'file'")
            data = await image.read()
            filename = image.filename or ""
        answer = await disk_work(_store_upload, self.paths, filename, data, fields)
        if isinstance(answer, int):
            return _empty(answer)
        return _json(answer)

    # websocket

    async def websocket(self, websocket: WebSocket) -> None:
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
            if self.engine.client_id == sid and self.engine.last_node_id is not None:
                self.hub.deliver("executing", {"node": self.engine.last_node_id}, [client])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ws_sender, websocket, client, nursery.cancel_scope)
                await self._ws_receiver(websocket, client)
                nursery.cancel_scope.cancel()
        finally:
            if self.hub.sockets.get(sid) is client:
                del self.hub.sockets[sid]
                self.hub.changed()
            client.outbox.close()

    async def _ws_sender(
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

    async def _ws_receiver(self, websocket: WebSocket, client: _WsClient) -> None:
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
                    self.hub.deliver("feature_flags", _SERVER_FEATURES, [client])
                first = False
            except ValueError:
                logger.info("fake ComfyUI: invalid JSON from websocket %s", client.sid)

    def routes(self) -> list[BaseRoute]:
        get = [
            ("/system_stats", self.system_stats),
            ("/features", self.features),
            ("/prompt", self.get_prompt),
            ("/object_info", self.object_info),
            ("/object_info/{node_class}", self.object_info_node),
            ("/models", self.models),
            ("/models/{folder}", self.models_folder),
            ("/history", self.history),
            ("/history/{prompt_id}", self.history_item),
            ("/queue", self.get_queue),
            ("/view", self.view),
        ]
        post = [
            ("/prompt", self.post_prompt),
            ("/queue", self.post_queue),
            ("/interrupt", self.interrupt),
            ("/free", self.free),
            ("/history", self.post_history),
            ("/upload/image", self.upload_image),
        ]
        routes: list[BaseRoute] = [WebSocketRoute("/ws", self.websocket)]
        routes += [Route(p, _aiohttp_errors(e), methods=["GET"]) for p, e in get]
        routes += [Route(p, _aiohttp_errors(e), methods=["POST"]) for p, e in post]
        return routes


def _view(paths: FakePaths, query: dict[str, str]) -> int | tuple[bytes, str, str]:
    """``GET /view``: (body, content type, file name) or an error status."""
    filename, folder = paths.annotated(query["filename"])
    if not filename or filename[0] == "/" or ".." in filename:
        return 400
    if folder is None:
        folder = paths.directory_by_type(query.get("type", "output"))
    if folder is None:
        return 400
    root = Path(os.path.abspath(folder))
    if "subfolder" in query:
        full = root / query["subfolder"]
        if not paths.inside(root, full):
            return 403
        root = full
    name = os.path.basename(filename)
    file = root / name
    if not file.is_file():
        return 404
    channel = query.get("channel")
    if "preview" in query:
        info = query["preview"].split(";")
        fmt = info[0]
        if fmt not in ("webp", "jpeg") or "a" in (channel or ""):
            fmt = "webp"
        quality = int(info[-1]) if info[-1].isdigit() else 90
        with Image.open(file) as img:
            out = img.convert("RGB") if fmt == "jpeg" or channel == "rgb" else img
            buffer = BytesIO()
            out.save(buffer, format=fmt, quality=quality)
        return buffer.getvalue(), f"image/{fmt}", name
    if channel in ("rgb", "a"):
        with Image.open(file) as img:
            if channel == "rgb":
                out = img.convert("RGB")
            else:
                alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
                out = Image.new("RGBA", img.size)
                out.putalpha(alpha)
            buffer = BytesIO()
            out.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png", name
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if content_type in _FORCE_DOWNLOAD:
        content_type = "application/octet-stream"
    return file.read_bytes(), content_type, name


def _store_upload(
    paths: FakePaths, filename: str, data: bytes, fields: dict[str, str]
) -> int | dict[str, str]:
    """``POST /upload/image``: the answer, or 400 (traversal, no file name)."""
    kind = fields.get("type") or "input"
    folder = paths.directory_by_type(kind)
    if folder is None:
        raise UnboundLocalError("cannot access local variable 'type_dir'")
    if not filename:
        return 400
    root = os.path.abspath(folder)
    subfolder = fields.get("subfolder", "")
    target_dir = os.path.join(root, os.path.normpath(subfolder))
    target = os.path.abspath(os.path.join(target_dir, filename))
    if os.path.commonpath((root, target)) != root:
        return 400
    os.makedirs(target_dir, exist_ok=True)
    overwrite = fields.get("overwrite")
    if overwrite not in ("true", "1"):
        stem, ext = os.path.splitext(filename)
        counter = 1
        while os.path.exists(target):
            if _same_bytes(target, data):
                return {"name": filename, "subfolder": subfolder, "type": kind}
            filename = f"{stem} ({counter}){ext}"
            target = os.path.join(target_dir, filename)
            counter += 1
    Path(target).write_bytes(data)
    return {"name": filename, "subfolder": subfolder, "type": kind}


def _same_bytes(path: str, data: bytes) -> bool:
    existing = Path(path).read_bytes()
    return hashlib.sha256(existing).digest() == hashlib.sha256(data).digest()


class _Gatekeeper:
    """ASGI middleware: HTTP requests wait while the server hangs; marks websockets."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.gate.wait_open()
        await self.app(scope, receive, send)


class _HostileAnswers:
    """ASGI middleware: requests a ``corrupt_answers`` rule takes get its answer instead."""

    def __init__(self, app: ASGIApp, hostile: Hostility, gate: Gate) -> None:
        self.app = app
        self.hostile = hostile
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule: AnswerRule | None = None
        if scope["type"] in ("http", "websocket") and self.hostile.answer_rules:
            method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
            rule = self.hostile.answer_rule_for(method, scope["path"])
        if rule is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.gate.wait_open()
            self.hostile.used(rule)
            await _refuse_websocket(rule, send)
        elif rule.body is not None:
            self.hostile.used(rule)
            await _drain(receive)
            await _send_answer(send, rule.status or 200, [], rule.content_type, rule.body)
        else:
            await self._transform(rule, scope, receive, send)

    async def _transform(
        self, rule: AnswerRule, scope: Scope, receive: Receive, send: Send
    ) -> None:
        assert rule.transform is not None
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
            else:
                await send(message)

        await self.app(scope, receive, capture)
        real = b"".join(chunks)
        new = rule.transform(real)
        headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
        if new is None:
            await send(
                {"type": "http.response.start", "status": start["status"], "headers": headers}
            )
            await send({"type": "http.response.body", "body": real})
            return
        self.hostile.used(rule)
        body = new.encode() if isinstance(new, str) else new
        await _send_answer(send, rule.status or start["status"], headers, rule.content_type, body)


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send_answer(
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]],
    content_type: str | None,
    body: bytes,
) -> None:
    drop = {b"content-length"} | ({b"content-type"} if content_type is not None else set())
    kept = [(k, v) for k, v in headers if k.lower() not in drop]
    if content_type is not None or not headers:
        kept.append((b"content-type", (content_type or "application/json; charset=utf-8").encode()))
    if status in (204, 304):
        body = b""  # HTTP/1.1 answers with these codes have no body
    else:
        kept.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": body})


async def _refuse_websocket(rule: AnswerRule, send: Send) -> None:
    body = rule.body or b""
    headers = [
        (b"content-type", (rule.content_type or "text/html; charset=utf-8").encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send(
        {"type": "websocket.http.response.start", "status": rule.status or 200, "headers": headers}
    )
    await send({"type": "websocket.http.response.body", "body": body})


async def _not_found(request: Request, exc: Exception) -> Response:
    code = exc.status_code if isinstance(exc, HTTPException) else 500
    text = {404: "Not Found", 405: "Method Not Allowed"}.get(code, "Error")
    return PlainTextResponse(f"{code}: {text}", status_code=code)


def build_app(
    engine: Engine,
    hub: SocketHub,
    registry: NodeRegistry,
    paths: FakePaths,
    system: SystemInfo,
    gate: Gate,
    hostile: Hostility | None = None,
) -> ASGIApp:
    """The ASGI app of one server generation (``hostile``: the ``corrupt_answers`` rules)."""
    routes = _Routes(engine, hub, registry, paths, system, gate).routes()
    app: ASGIApp = Starlette(
        routes=[*routes, Mount("/api", routes=routes)],
        exception_handlers={404: _not_found, 405: _not_found},
    )
    if hostile is not None:
        app = _HostileAnswers(app, hostile, gate)
    return _Gatekeeper(app, gate)
