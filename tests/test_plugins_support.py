"""What the plugin tests share: a real HTTP server on 127.0.0.1, instance targets, helpers.

The server is a few lines of HTTP/1.1 over ``trio.serve_tcp`` (port 0), so a test can make it
slow, cut a body short, stream without a length, or record uploads. The tests at the bottom
pin its behaviour.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from PIL import Image

import comfytrio
from comfytrio import LoRARef, ModelRef

WORKFLOWS = Path(__file__).parent / "workflows"


def load_workflow(name: str) -> dict[str, Any]:
    """One of the example workflows of ``tests/workflows`` (API format)."""
    loaded: dict[str, Any] = json.loads((WORKFLOWS / f"{name}.json").read_text())
    return loaded


def png(color: str = "red", size: tuple[int, int] = (4, 4)) -> bytes:
    """A small real PNG."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def safetensors_bytes(values: int = 1024, *, header_size: int | None = None) -> bytes:
    """A small file in the safetensors layout, as the ``safetensors`` library writes (and
    reads) it: an 8-byte little-endian header size, a JSON header padded with spaces (to a
    multiple of 8, or to ``header_size``), then the bytes of one F32 tensor of ``values``
    zeros."""
    tensor = {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}
    header = json.dumps(
        {"__metadata__": {"format": "pt"}, "lora_unet.weight": tensor}, separators=(",", ":")
    ).encode()
    padded = len(header) + (-len(header) % 8) if header_size is None else header_size
    assert padded >= len(header), f"a header of {len(header)} bytes does not fit {padded}"
    header = header.ljust(padded, b" ")
    return len(header).to_bytes(8, "little") + header + bytes(4 * values)


# --------------------------------------------------------------------------- HTTP server


def local_client() -> httpx.AsyncClient:
    """An HTTP client for the servers on 127.0.0.1 (plain http: no TLS context to build,
    which saves 40 ms a client)."""
    return httpx.AsyncClient(verify=False)


@attrs.frozen
class Request:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@attrs.define
class Route:
    """How the server answers one path."""

    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    delay: float = 0.0
    """Seconds to wait before answering (so concurrent callers overlap)."""
    drop_after: int | None = None
    """Announce the full length, send this many bytes, then close the connection."""
    chunked: bool = False
    """Send the body chunked, with no Content-Length."""
    handler: Callable[[Request], Awaitable[Route]] | None = None
    """Compute the answer from the request instead."""
    headers: dict[str, str] = attrs.field(factory=dict)
    """More response headers (``Location`` for a redirect)."""


@attrs.define(eq=False)
class HttpServer:
    """A tiny HTTP/1.1 server on 127.0.0.1: ``routes`` by path, every request recorded."""

    port: int = 0
    routes: dict[str, Route] = attrs.field(factory=dict)
    requests: list[Request] = attrs.field(factory=list)
    scheme: str = "http"

    def url(self, path: str) -> str:
        """The URL of ``path`` on this server."""
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        """How many requests asked for ``path``."""
        return sum(1 for r in self.requests if r.path == path)

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        # The client may go away mid-answer (it refused a body, or was cancelled).
        with contextlib.suppress(trio.BrokenResourceError):
            await self._serve_requests(stream)

    async def _serve_requests(self, stream: trio.abc.Stream) -> None:
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                length = int(headers.get("content-length", "0"))
                while len(buffer) < length:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buffer += chunk
                body, buffer = buffer[:length], buffer[length:]
                request = Request(method, target.split("?", 1)[0], headers, body)
                self.requests.append(request)
                route = self.routes.get(request.path, Route(b"not found", status=404))
                if route.handler is not None:
                    route = await route.handler(request)
                if route.delay:
                    await trio.sleep(route.delay)
                if not await self._answer(stream, route):
                    return

    async def _answer(self, stream: trio.abc.Stream, route: Route) -> bool:
        status = f"HTTP/1.1 {route.status} X\r\nContent-Type: {route.content_type}\r\n"
        status += "".join(f"{name}: {value}\r\n" for name, value in route.headers.items())
        if route.chunked:
            await stream.send_all(f"{status}Transfer-Encoding: chunked\r\n\r\n".encode())
            for start in range(0, len(route.body), 1000):
                piece = route.body[start : start + 1000]
                await stream.send_all(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await stream.send_all(b"0\r\n\r\n")
            return True
        await stream.send_all(f"{status}Content-Length: {len(route.body)}\r\n\r\n".encode())
        if route.drop_after is not None:
            await stream.send_all(route.body[: route.drop_after])
            return False  # close mid-body
        await stream.send_all(route.body)
        return True


async def start_http_server(
    nursery: trio.Nursery,
    routes: Mapping[str, Route] | None = None,
    *,
    tls: ssl.SSLContext | None = None,
) -> HttpServer:
    """Start an ``HttpServer`` on 127.0.0.1 (a free port) in ``nursery``; with ``tls`` (a
    server context: the ``tls`` fixture's first one), it serves https."""
    server = HttpServer(routes=dict(routes or {}), scheme="http" if tls is None else "https")
    if tls is None:
        listeners = await nursery.start(
            partial(trio.serve_tcp, server._serve_connection, 0, host="127.0.0.1")
        )
        server.port = listeners[0].socket.getsockname()[1]
        return server
    listeners = await nursery.start(
        partial(
            trio.serve_ssl_over_tcp,
            server._serve_connection,
            0,
            tls,
            host="127.0.0.1",
            https_compatible=True,
        )
    )
    server.port = listeners[0].transport_listener.socket.getsockname()[1]
    return server


# --------------------------------------------------------------------------- targets


@attrs.define(eq=False)
class LocalTarget:
    """An instance on this machine: files go into its ``input_dir``."""

    name: str
    input_dir: Path | None

    async def upload_image(self, filename: str, data: bytes) -> str:
        raise AssertionError("a local target gets its files written, never uploaded")

    async def list_models(self, folder: str) -> list[str]:
        raise AssertionError("a local target's models are checked on disk")


@attrs.define(eq=False)
class RemoteTarget:
    """A remote instance: uploads with ``POST /upload/image``, lists ``GET /models/x``."""

    name: str
    base_url: str
    http: httpx.AsyncClient
    input_dir: Path | None = None

    async def upload_image(self, filename: str, data: bytes) -> str:
        response = await self.http.post(
            f"{self.base_url}/upload/image",
            files={"image": (filename, data, "application/octet-stream")},
            data={"overwrite": "true", "type": "input"},
        )
        response.raise_for_status()
        return str(response.json()["name"])

    async def list_models(self, folder: str) -> list[str]:
        response = await self.http.get(f"{self.base_url}/models/{folder}")
        return list(response.json()) if response.status_code == 200 else []


@attrs.define(eq=False)
class FakeComfyUploads:
    """The ``/upload/image`` and ``/models/{folder}`` routes of a ComfyUI, recorded."""

    models: dict[str, list[str]] = attrs.field(factory=dict)
    uploads: list[tuple[str, bytes]] = attrs.field(factory=list)

    async def upload(self, request: Request) -> Route:
        match = re.search(rb'name="image"; filename="([^"]+)"\r\n[^\r]*\r\n\r\n', request.body)
        assert match, request.body[:200]
        start = match.end()
        end = request.body.index(b"\r\n--", start)
        filename = match[1].decode()
        self.uploads.append((filename, request.body[start:end]))
        answer = {"name": filename, "subfolder": "", "type": "input"}
        return Route(json.dumps(answer).encode(), content_type="application/json")

    def routes(self) -> dict[str, Route]:
        """The routes to give ``start_http_server``."""
        found = {"/upload/image": Route(handler=self.upload)}
        for folder, names in self.models.items():
            found[f"/models/{folder}"] = Route(json.dumps(names).encode())
        return found


# --------------------------------------------------------------------------- planning


async def plan(
    plugins: comfytrio.Plugins,
    workflow: Mapping[str, Any],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    models: Sequence[ModelRef] = (),
    loras: Sequence[LoRARef] = (),
    targets: Sequence[Any] = (),
    shard_count: int = 1,
    models_path: Path | None = None,
    seed: int | None = None,
    http: httpx.AsyncClient | None = None,
) -> comfytrio.JobPlan:
    """``plan_job`` with defaults for what a test does not care about."""
    if http is None:
        async with local_client() as own:
            return await plan(
                plugins,
                workflow,
                params,
                models=models,
                loras=loras,
                targets=targets,
                shard_count=shard_count,
                models_path=models_path,
                seed=seed,
                http=own,
            )
    return await comfytrio.plan_job(
        plugins,
        workflow,
        params=params or {},
        models=models,
        loras=loras,
        targets=targets,
        shard_count=shard_count,
        models_path=models_path,
        http=http,
        seed=seed,
    )


def std_plugins(**kwargs: Any) -> comfytrio.Plugins:
    """A manager with only the standard plugin, registered by hand (no entry points)."""
    import comfytrio_std

    plugins = comfytrio.make_plugin_manager(entrypoints=False, **kwargs)
    plugins.register(comfytrio_std, "std")
    return plugins


# --------------------------------------------------------------------------- tests


async def test_the_server_answers_streams_and_records(nursery: trio.Nursery) -> None:
    server = await start_http_server(
        nursery, {"/a": Route(b"hello"), "/b": Route(b"x" * 2500, chunked=True)}
    )
    async with local_client() as http:
        assert (await http.get(server.url("/a"))).content == b"hello"
        assert (await http.get(server.url("/b"))).content == b"x" * 2500
        assert (await http.get(server.url("/nope"))).status_code == 404
    assert [r.path for r in server.requests] == ["/a", "/b", "/nope"]


async def test_the_server_can_cut_a_body_short(nursery: trio.Nursery) -> None:
    server = await start_http_server(nursery, {"/cut": Route(b"y" * 10_000, drop_after=100)})
    async with local_client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(server.url("/cut"))


async def test_the_server_sends_extra_headers_and_can_serve_https(
    nursery: trio.Nursery, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    routes = {"/r": Route(status=302, headers={"Location": "/a"}), "/a": Route(b"here")}
    server = await start_http_server(nursery, routes, tls=tls[0])
    assert server.url("/r").startswith("https://127.0.0.1:")
    async with httpx.AsyncClient(verify=tls[1]) as http:
        answer = await http.get(server.url("/r"))
        assert (answer.status_code, answer.headers["location"]) == (302, "/a")
        assert (await http.get(server.url("/r"), follow_redirects=True)).content == b"here"


def test_safetensors_bytes_have_the_safetensors_layout() -> None:
    body = safetensors_bytes(10)
    size = int.from_bytes(body[:8], "little")
    assert size % 8 == 0
    header = json.loads(body[8 : 8 + size])
    assert header["lora_unet.weight"]["data_offsets"] == [0, 40]
    assert len(body) == 8 + size + 40
    assert safetensors_bytes(10, header_size=0x13C)[:2] == b"\x3c\x01"  # '<' first
