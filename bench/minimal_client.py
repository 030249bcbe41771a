"""The minimal hand-written client the benchmark holds comfytrio to; prints a JSON result.

Raw HTTP (httpx) plus one websocket per server (trio-websocket), one ``client_id`` per server,
every ``prompt_id`` chosen by us and registered before ``POST /prompt``, each job sent whole to
the least-loaded server (fewest prompts in flight), at most ``--depth`` prompts per server at a
time (default 2: one running, one queued behind it; 0 = send every job at once). Nothing else:
no retries, no reconnects, no reconciliation, and no downloads unless ``--download DIR``
(then each output is fetched with ``GET /view`` and written to DIR, as a client that returns
files must; otherwise it returns the servers' file names).

    .venv/bin/python bench/minimal_client.py --urls http://127.0.0.1:8188,http://127.0.0.1:8189

Usually started by ``bench/compare.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_websocket

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


class MinimalServer:
    """One server: its websocket client id, the prompts we wait for, and how we talk to it
    (httpx and trio-websocket here; ``minimal_raw_client.py`` overrides the transport)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.in_flight = 0
        self.done: dict[str, trio.Event] = {}
        self.files: dict[str, list[dict[str, str]]] = {}
        self.errors: dict[str, str] = {}
        self.http: httpx.AsyncClient | None = None
        self.download_dir: Path | None = None

    # ------------------------------------------------------------------ transport

    async def connect(self, nursery: trio.Nursery) -> None:
        """Open the HTTP client and the websocket (read in ``nursery``)."""
        self.http = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(600.0))
        ws_url = f"ws{self.url.removeprefix('http')}/ws?clientId={self.client_id}"
        ws = await trio_websocket.connect_websocket_url(
            nursery, ws_url, max_message_size=64 * 1024 * 1024
        )

        async def read() -> None:
            while True:
                message = await ws.get_message()
                if isinstance(message, str):
                    self.handle(message)

        nursery.start_soon(read)

    async def post_prompt(self, body: dict[str, Any]) -> tuple[int, str]:
        """``POST /prompt``; (status, body text)."""
        assert self.http is not None
        r = await self.http.post("/prompt", json=body)
        return r.status_code, r.text

    async def view(self, image: dict[str, str]) -> bytes:
        """``GET /view`` of one output."""
        assert self.http is not None
        r = await self.http.get("/view", params=image)
        if r.status_code != 200:
            raise RuntimeError(f"{self.url}: GET /view answered HTTP {r.status_code}")
        return r.content

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    # ------------------------------------------------------------------ prompts

    def handle(self, message: str) -> None:
        """One websocket text message."""
        msg = json.loads(message)
        data = msg.get("data") or {}
        prompt_id = data.get("prompt_id")
        if prompt_id not in self.done:
            return
        kind = msg["type"]
        if kind == "executed":
            images = (data.get("output") or {}).get("images") or []
            self.files[prompt_id].extend(
                {"filename": i["filename"], "subfolder": i["subfolder"], "type": i["type"]}
                for i in images
            )
        elif kind == "execution_error":
            self.errors[prompt_id] = str(data.get("exception_message"))
        elif kind == "executing" and data.get("node") is None:
            self.done[prompt_id].set()

    async def run(self, prompt: dict[str, Any]) -> list[str]:
        """Run one prompt here; its files (names, or paths in ``download_dir``)."""
        prompt_id = str(uuid.uuid4())
        event = self.done[prompt_id] = trio.Event()
        self.files[prompt_id] = []
        self.in_flight += 1
        try:
            status, text = await self.post_prompt(
                {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
            )
            if status != 200:
                raise RuntimeError(f"{self.url}: HTTP {status}: {text[:300]}")
            await event.wait()
            if prompt_id in self.errors:
                raise RuntimeError(f"{self.url}: {self.errors.pop(prompt_id)}")
            if self.download_dir is None:
                return [image["filename"] for image in self.files[prompt_id]]
            paths = []
            for image in self.files[prompt_id]:
                path = self.download_dir / f"{prompt_id}-{Path(image['filename']).name}"
                path.write_bytes(await self.view(image))  # small files: written in place
                paths.append(str(path))
            return paths
        finally:
            self.in_flight -= 1
            del self.done[prompt_id]
            self.files.pop(prompt_id, None)


async def run_minimal(
    library: str, args: argparse.Namespace, make_server: Callable[[str], MinimalServer]
) -> RunnerResult:
    """The measuring passes with least-loaded dispatch over one server object per URL."""
    rss_start = maxrss_kib()
    servers = [make_server(u) for u in args.urls.split(",") if u]
    if args.download:
        await trio.Path(args.download).mkdir(parents=True, exist_ok=True)
        for server in servers:
            server.download_dir = Path(args.download)
    images: int = args.images_per_job
    async with trio.open_nursery() as nursery:
        for server in servers:
            await server.connect(nursery)

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
            library,
            one,
            warmup=args.warmup,
            latency_jobs=args.latency_jobs,
            jobs=args.jobs,
            rss_start=rss_start,
        )
        nursery.cancel_scope.cancel()
    for server in servers:
        await server.aclose()
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", required=True, help="comma-separated server URLs")
    parser.add_argument(
        "--depth", type=int, default=2, help="prompts in flight per server (default 2; 0: no limit)"
    )
    parser.add_argument(
        "--download", default="", metavar="DIR", help="fetch every output into DIR (GET /view)"
    )
    add_runner_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    emit(trio.run(run_minimal, "minimal-dl" if args.download else "minimal", args, MinimalServer))


if __name__ == "__main__":
    main()
