"""The floor: the minimal client with hand-written HTTP/1.1; prints a JSON result.

Like ``minimal_client.py`` (one websocket per server, prompt ids chosen up front,
least-loaded dispatch, at most ``--depth`` prompts per server, no downloads, nothing else),
but ``POST /prompt`` is written by hand on one keep-alive trio socket per server (one request
at a time on it; a new connection when the server says ``Connection: close``), and the
websocket is read with comfytrio's own reader (``comfytrio/_websocket.py``), so this row
shows what a Python trio client costs here with no HTTP library at all.

    .venv/bin/python bench/minimal_raw_client.py --urls http://127.0.0.1:8188

Usually started by ``bench/compare.py`` (library ``minimal-raw``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _passes import run_passes
from _workload import (
    JobRecord,
    RunnerResult,
    add_runner_arguments,
    emit,
    inject,
    maxrss_kib,
    prefix_for,
    workflow,
)

from comfytrio._websocket import WebSocket, websocket_handshake


class _Server:
    """One server: a keep-alive socket for POSTs, a websocket, the prompts we wait for."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.netloc = parts.netloc
        self.client_id = uuid.uuid4().hex
        self.in_flight = 0
        self.done: dict[str, trio.Event] = {}
        self.files: dict[str, list[str]] = {}
        self.errors: dict[str, str] = {}
        self._http: trio.SocketStream | None = None
        self._http_lock = trio.Lock()

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """One request on the keep-alive socket; (status, body)."""
        data = json.dumps(body).encode()
        request = (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (path.encode(), self.netloc.encode(), len(data))
        ) + data
        async with self._http_lock:
            if self._http is None:
                self._http = await trio.open_tcp_stream(self.host, self.port)
            stream = self._http
            await stream.send_all(request)
            buffer = b""
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise RuntimeError(f"{self.netloc}: connection closed mid-response")
                buffer += chunk
            head = buffer[:end].split(b"\r\n")
            rest = buffer[end + 4 :]
            headers = dict(line.lower().split(b":", 1) for line in head[1:])
            length = int(headers[b"content-length"])
            while len(rest) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise RuntimeError(f"{self.netloc}: connection closed mid-body")
                rest += chunk
            if headers.get(b"connection", b"").strip() == b"close":
                await stream.aclose()
                self._http = None
            return int(head[0].split(b" ")[1]), rest

    async def read(self, ws: WebSocket) -> None:
        while True:
            msg = json.loads(await ws.receive_text())
            data = msg.get("data") or {}
            prompt_id = data.get("prompt_id")
            if prompt_id not in self.done:
                continue
            kind = msg["type"]
            if kind == "executed":
                images = (data.get("output") or {}).get("images") or []
                self.files[prompt_id].extend(i["filename"] for i in images)
            elif kind == "execution_error":
                self.errors[prompt_id] = str(data.get("exception_message"))
            elif kind == "executing" and data.get("node") is None:
                self.done[prompt_id].set()

    async def run(self, prompt: dict[str, Any]) -> list[str]:
        prompt_id = str(uuid.uuid4())
        event = self.done[prompt_id] = trio.Event()
        self.files[prompt_id] = []
        self.in_flight += 1
        try:
            status, answer = await self.post(
                "/prompt", {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
            )
            if status != 200:
                raise RuntimeError(f"{self.netloc}: HTTP {status}: {answer[:300]!r}")
            await event.wait()
            if prompt_id in self.errors:
                raise RuntimeError(f"{self.netloc}: {self.errors.pop(prompt_id)}")
            return self.files[prompt_id]
        finally:
            self.in_flight -= 1
            del self.done[prompt_id]
            self.files.pop(prompt_id, None)


async def _run(args: argparse.Namespace) -> RunnerResult:
    rss_start = maxrss_kib()
    servers = [_Server(u) for u in args.urls.split(",") if u]
    images: int = args.images_per_job
    streams: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        for server in servers:
            stream = await trio.open_tcp_stream(server.host, server.port)
            streams.append(stream)
            ws = await websocket_handshake(
                stream, server.netloc, f"/ws?clientId={server.client_id}", max_message_size=2**26
            )
            nursery.start_soon(server.read, ws)

        depth: int = args.depth
        slots = trio.Semaphore(len(servers) * depth if depth > 0 else 2**31 - 1)

        async def one(phase: str, index: int) -> JobRecord:
            prefix = prefix_for(args.tag, phase, index)
            t0 = time.perf_counter()
            error, files = None, 0
            async with slots:  # a free slot means the least-loaded server has one
                server = min(servers, key=lambda s: s.in_flight)
                try:
                    files = len(await server.run(inject(workflow(index), prefix, images)))
                except Exception as exc:
                    error = repr(exc)
            return JobRecord(
                prefix=prefix, wall_s=time.perf_counter() - t0, files=files, error=error
            )

        result = await run_passes(
            "minimal-raw",
            one,
            warmup=args.warmup,
            latency_jobs=args.latency_jobs,
            jobs=args.jobs,
            rss_start=rss_start,
        )
        nursery.cancel_scope.cancel()
    for server in servers:
        if server._http is not None:
            await server._http.aclose()
    for stream in streams:
        await stream.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", required=True, help="comma-separated server URLs")
    parser.add_argument(
        "--depth", type=int, default=2, help="prompts in flight per server (default 2; 0: no limit)"
    )
    add_runner_arguments(parser)
    emit(trio.run(_run, parser.parse_args()))


if __name__ == "__main__":
    main()
