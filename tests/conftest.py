"""Shared helpers for the fake ComfyUI tests: recordings, workflows, a websocket listener and
a small client (real sockets on 127.0.0.1, no mocks)."""

from __future__ import annotations

import json
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trio_websocket
import trustme

from comfytrio import ComfyAPI, GPUInfo, JobResult, OutputFile
from comfytrio.testing import FakeComfyUI, fast_fault_policy

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
RECORDINGS = TESTS / "recordings"
WORKFLOWS = TESTS / "workflows"


def load_recording(name: str) -> Any:
    """A recording of the real ComfyUI 0.3.64 (``tests/recordings/<name>``)."""
    return json.loads((RECORDINGS / name).read_text())


def load_workflow(name: str) -> dict[str, Any]:
    """An API-format workflow from ``tests/workflows/``."""
    workflow: dict[str, Any] = json.loads((WORKFLOWS / name).read_text())
    return workflow


def empty_to_save(batch: int = 1, prefix: str = "t", color: int = 0) -> dict[str, Any]:
    """The smallest workflow with files: an ``EmptyImage`` batch of 16x16 pictures of one
    ``color``, saved by ``SaveImage`` under ``prefix`` (no model needed)."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": batch, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def sampler_workflow(
    *,
    width: int = 64,
    height: int = 64,
    steps: int = 3,
    seed: int = 1,
    image_output: str | None = "PreviewImage",
) -> dict[str, Any]:
    """Text to image, as ComfyUI's default workflow: checkpoint ``m.safetensors`` ("1", which
    the test adds to its fake), prompt "2", empty latent "3" of ``width`` x ``height``,
    ``KSampler`` "4" (``steps`` steps of euler from ``seed``), then ``VAEDecode`` "5" and
    the ``image_output`` node "6" that takes its image (``PreviewImage``,
    ``SaveImageWebsocket``...). ``image_output=None``: nodes "1" to "4" only, for a test
    that adds its own node after the sampler (its latent is ``["4", 0]``). A new dict each
    call, for the test to change."""
    workflow: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "3": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": width, "height": height, "batch_size": 1},
        },
        "4": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["2", 0],
                "latent_image": ["3", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
    }
    if image_output is not None:
        workflow["5"] = {
            "class_type": "VAEDecode",
            "inputs": {"samples": ["4", 0], "vae": ["1", 2]},
        }
        workflow["6"] = {"class_type": image_output, "inputs": {"images": ["5", 0]}}
    return workflow


async def until(predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """Until ``predicate()`` holds (looked at every 10 ms: the test waits for a state, not
    for a guessed time); fails after ``timeout`` seconds, virtual ones under
    ``autojump_clock``, where the waiting costs no real time."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (states with no event of their own)
            await trio.sleep(0.01)


class WsListener:
    """Collects every message of one websocket (text as JSON, binary as bytes)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: list[Any] = []
        self.closed: trio_websocket.ConnectionClosed | None = None
        self.ws: trio_websocket.WebSocketConnection | None = None
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[WsListener]) -> None:
        # We own the TCP stream: trio-websocket 0.12 does not close it after an abnormal
        # closure (1006), which would leak the socket (a ResourceWarning).
        parts = urlsplit(self.url)
        resource = parts.path + (f"?{parts.query}" if parts.query else "")
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
        try:
            async with trio.open_nursery() as nursery:
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, parts.netloc, resource
                )
                self.ws = ws
                task_status.started(self)
                try:
                    while True:
                        message = await ws.get_message()
                        self.messages.append(
                            json.loads(message) if isinstance(message, str) else message
                        )
                        self._notify()
                except trio_websocket.ConnectionClosed as exc:
                    self.closed = exc
                    self._notify()
                nursery.cancel_scope.cancel()
        finally:
            await stream.aclose()

    def texts(self) -> list[dict[str, Any]]:
        """The JSON messages so far."""
        return [m for m in self.messages if isinstance(m, dict)]

    def types(self) -> list[str]:
        """Message types so far (binary frames as ``binary:<event>``)."""
        return [
            m["type"] if isinstance(m, dict) else f"binary:{int.from_bytes(m[:4], 'big')}"
            for m in self.messages
        ]

    async def wait_for(
        self, predicate: Callable[[Any], bool], *, timeout: float = 10.0, start: int = 0
    ) -> Any:
        """The first message from index ``start`` that matches (waits for it)."""
        with trio.fail_after(timeout):
            index = start
            while True:
                while index < len(self.messages):
                    if predicate(self.messages[index]):
                        return self.messages[index]
                    index += 1
                if self.closed is not None:
                    raise AssertionError(f"websocket closed: {self.closed}")
                await self._changed.wait()

    async def wait_closed(self, *, timeout: float = 10.0) -> int:
        """Until the server ends the connection; the close code (1006: no close frame)."""
        with trio.fail_after(timeout):
            while self.closed is None:
                await self._changed.wait()
        reason = self.closed.reason
        return reason.code if reason is not None else 1006

    async def wait_done(
        self, prompt_id: str, *, timeout: float = 10.0, start: int = 0
    ) -> list[Any]:
        """Messages up to this prompt's ``executing {node: null}`` (the end signal)."""
        await self.wait_for(
            lambda m: (
                isinstance(m, dict)
                and m["type"] == "executing"
                and m["data"].get("node") is None
                and m["data"].get("prompt_id") == prompt_id
            ),
            timeout=timeout,
            start=start,
        )
        return list(self.messages)

    async def send(self, data: Any) -> None:
        """Send a JSON message."""
        assert self.ws is not None
        await self.ws.send_message(json.dumps(data))


class Comfy:
    """A tiny client for one fake server: HTTP via httpx, websockets via trio-websocket."""

    def __init__(self, fake: FakeComfyUI, http: httpx.AsyncClient, nursery: trio.Nursery) -> None:
        self.fake = fake
        self.http = http
        self.nursery = nursery

    @property
    def ws_url(self) -> str:
        return self.fake.url.replace("http://", "ws://") + "/ws"

    async def listen(self, client_id: str | None = "test-client") -> WsListener:
        """Open a websocket (``clientId`` = ``client_id``) that records everything."""
        url = self.ws_url + (f"?clientId={client_id}" if client_id else "")
        listener: WsListener = await self.nursery.start(WsListener(url).run)
        await listener.wait_for(lambda m: isinstance(m, dict) and m["type"] == "status")
        return listener

    async def submit(
        self, prompt: dict[str, Any], *, client_id: str | None = "test-client", **extra: Any
    ) -> httpx.Response:
        """``POST /prompt``."""
        body: dict[str, Any] = {"prompt": prompt, **extra}
        if client_id is not None:
            body["client_id"] = client_id
        return await self.http.post("/prompt", json=body)

    async def run(
        self, prompt: dict[str, Any], listener: WsListener, **extra: Any
    ) -> tuple[str, list[Any], dict[str, Any]]:
        """Submit, wait for the end on ``listener``; (prompt_id, messages of it, history)."""
        start = len(listener.messages)
        response = await self.submit(prompt, **extra)
        assert response.status_code == 200, response.text
        prompt_id = response.json()["prompt_id"]
        await listener.wait_done(prompt_id, start=start)
        history = (await self.http.get(f"/history/{prompt_id}")).json()
        return prompt_id, listener.messages[start:], history[prompt_id]

    async def wait_history(self, prompt_id: str, *, timeout: float = 10.0) -> dict[str, Any]:
        """Poll ``/history/{id}`` until the entry is there."""
        with trio.fail_after(timeout):
            while True:
                answer = (await self.http.get(f"/history/{prompt_id}")).json()
                if answer:
                    entry: dict[str, Any] = answer[prompt_id]
                    return entry
                await trio.sleep(0.02)


@pytest.fixture
async def http_for() -> AsyncIterator[Callable[[FakeComfyUI], httpx.AsyncClient]]:
    """``http_for(fake)``: an httpx client for that server (closed after the test)."""
    clients: list[httpx.AsyncClient] = []

    def make(fake: FakeComfyUI) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=fake.url, timeout=10)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def comfy_for(
    nursery: trio.Nursery, http_for: Callable[[FakeComfyUI], httpx.AsyncClient]
) -> Callable[[FakeComfyUI], Comfy]:
    """``comfy_for(fake)``: a ``Comfy`` client for that server."""
    return lambda fake: Comfy(fake, http_for(fake), nursery)


@pytest.fixture
async def comfy(fake_comfyui: FakeComfyUI, comfy_for: Callable[[FakeComfyUI], Comfy]) -> Comfy:
    """A ``Comfy`` client for the ``fake_comfyui`` fixture's server."""
    return comfy_for(fake_comfyui)


def png_bytes(
    size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (10, 20, 30)
) -> bytes:
    """A small PNG."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    """A port nobody listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive ports nobody listens on right now (for
    ``--port P --instances N``, which uses P..P+N-1): each is bound once to be sure."""
    import socket

    for _ in range(100):
        first = free_port()
        taken = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                taken.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in taken:
                sock.close()
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


class Child:
    """A fake ComfyUI started as a child process (its output collected)."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = trio.Event()
        self.done = trio.Event()

    async def pump(self) -> None:
        try:
            await self._pump()
        finally:
            self._ready.set()
            self.done.set()

    async def _pump(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if "To see the GUI go to: " in line:
                    self.url = line.split("To see the GUI go to: ", 1)[1].strip()
                    self._ready.set()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_ready(self, timeout: float = 20.0) -> str:
        """The URL it printed once ready (fails if it exited first)."""
        with trio.fail_after(timeout):
            await self._ready.wait()
        assert self.url is not None, self.output
        return self.url

    async def wait_exit(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            code = await self.process.wait()
        with trio.fail_after(timeout):
            await self.done.wait()
        return code

    async def stop(self, signum: int = signal.SIGINT, timeout: float = 10.0) -> int:
        """Send ``signum`` and wait for the exit code."""
        self.process.send_signal(signum)
        return await self.wait_exit(timeout)


@pytest.fixture
async def spawn(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Awaitable[Child]]]:
    """``await spawn(cmd, cwd=..., env=...)``: start a child process; killed after the test."""
    children: list[Child] = []

    async def start(
        cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> Child:
        process = await trio.lowlevel.open_process(
            cmd,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        child = Child(process)
        children.append(child)
        nursery.start_soon(child.pump)
        return child

    yield start
    for child in children:
        if child.process.returncode is None:
            child.process.kill()
        with trio.CancelScope(shield=True):
            await child.process.wait()
            with trio.move_on_after(5):
                await child.done.wait()
            if child.process.stdout is not None:
                await child.process.stdout.aclose()


@pytest.fixture
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate for 127.0.0.1 from a CA of our own: (the server's context, a client
    context that trusts that CA). The system's CAs do not know it."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    return server, trusting


@asynccontextmanager
async def api_on_fakes(servers: Sequence[FakeComfyUI], tmp_path: Path) -> AsyncIterator[ComfyAPI]:
    """A ``ComfyAPI`` over these fake servers, every one of them required, no GPU of its own,
    downloads under ``tmp_path/downloads-<number of servers>`` and quick fault handling."""
    async with ComfyAPI(
        [s.url for s in servers],
        gpu=GPUInfo(False, 0),
        download_dir=tmp_path / f"downloads-{len(servers)}",
        faults=fast_fault_policy(),
        ready_timeout=10.0,
        min_instances=len(servers),
    ) as api:
        yield api


def image_pixels(path: str | Path) -> bytes:
    """An image file's size and RGB pixels: what two files must share to be the same image
    (PNG metadata, such as the prompt ComfyUI embeds, left out)."""
    from PIL import Image

    with Image.open(path) as image:
        return f"{image.size}".encode() + image.convert("RGB").tobytes()


def duplicate_images(result: JobResult) -> list[list[OutputFile]]:
    """The groups of a job's output images that hold the same pixels (two or more each)."""
    groups: dict[bytes, list[OutputFile]] = {}
    for output in result.outputs:
        if output.type == "output" and output.path.endswith((".png", ".webp", ".jpg")):
            groups.setdefault(image_pixels(output.path), []).append(output)
    return [group for group in groups.values() if len(group) > 1]


def assert_no_duplicate_images(result: JobResult, *, one_gpu: JobResult | None = None) -> None:
    """No two outputs of a (split) job are the same image.

    ``one_gpu``: the same job run as one shard; images the workflow itself makes alike (an
    ``EmptyImage`` batch is N copies of one colour on one GPU too) are allowed where that run
    has them alike at the same node and batch index, and nowhere else."""
    alike_on_one: set[frozenset[tuple[str, int | None]]] = set()
    if one_gpu is not None:
        alike_on_one = {
            frozenset((o.node_id, o.batch_index) for o in group)
            for group in duplicate_images(one_gpu)
        }
    for group in duplicate_images(result):
        where = frozenset((o.node_id, o.batch_index) for o in group)
        alike_by_nature = len(where) == len(group) and any(where <= a for a in alike_on_one)
        assert alike_by_nature, "the same image more than once: " + ", ".join(
            f"{o.instance} node {o.node_id} #{o.batch_index}" for o in group
        )


# ---------------------------------------------------------------- comfytrio serve


def start_command(log: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m comfytrio ARGS`` (stderr into ``log``); the process and the first line it
    prints (its URL, ``ready``...), within 60 s."""
    with log.open("a") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "comfytrio", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return process, lines.get(timeout=60).strip()
    except queue.Empty:
        process.kill()
        process.wait()
        stdout.close()
        raise AssertionError(f"comfytrio {args[0]} printed nothing in 60 s, log: {log}") from None


def start_serve(state: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """``comfytrio serve`` on a free port; returns the process and its URL."""
    log = state.parent / f"{state.name}.log"
    process, url = start_command(
        log, "serve", "--bind", "127.0.0.1:0", "--print-url", "--serve-dir", str(state), *extra
    )
    if not url.startswith("http://127.0.0.1:"):
        stop_serve(process, expect=None)
        raise AssertionError(f"comfytrio serve failed: {url!r}, log in {log}")
    return process, url


def stop_serve(process: subprocess.Popen[str], *, expect: int | None = 0) -> None:
    """SIGTERM, then wait; the exit code says it stopped cleanly (``expect``; None: any)."""
    process.terminate()
    try:
        code = process.wait(timeout=30)
        assert expect is None or code == expect
    finally:
        if process.stdout is not None:
            process.stdout.close()


def split_batch(batch: int) -> dict[str, Any]:
    """The ``comfytrio`` object of a v2 job that splits model_free.json's batch of ``batch``
    over every server (``gpu_scale`` on ``API - BATCH SIZE``)."""
    return {
        "params": {
            "batch": {
                "type": "integer",
                "value": batch,
                "gpu_scale": True,
                "node_mappings": "API - BATCH SIZE",
            }
        }
    }


def model_free(batch: int = 1) -> dict[str, Any]:
    """The example model-free workflow: an EmptyImage batch saved, and the LoadImage
    picture ("5") inverted ("6") and saved ("7")."""
    workflow: dict[str, Any] = json.loads((WORKFLOWS / "model_free.json").read_text())
    workflow["1"]["inputs"]["value"] = batch
    return workflow


# ---------------------------------------------------------------- Redis (the job broker)


class RedisUrl(str):
    """The URL of a real ``redis-server`` of the test (``redis://127.0.0.1:<port>/0``),
    with ``--appendonly yes`` in its own folder, so a restart keeps its data."""

    process: subprocess.Popen[bytes] | None
    port: int
    folder: Path

    def __new__(cls, port: int, folder: Path) -> RedisUrl:
        url = super().__new__(cls, f"redis://127.0.0.1:{port}/0")
        url.port = port
        url.folder = folder
        url.process = None
        return url

    def start(self) -> None:
        """Start the server; wait until it answers PING (10 s at most)."""
        import socket
        import time

        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"redis-server did not start, see {self.folder}/redis.log")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (Redis writes its append-only file out), then wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    async def restart(self, downtime: float = 0.0) -> None:
        """Stop the server, stay down ``downtime`` seconds, start it again (data kept)."""
        self.stop()
        await trio.sleep(downtime)
        self.start()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[RedisUrl]:
    """A real ``redis-server`` on a free port of 127.0.0.1 (data in ``tmp_path/redis``,
    append-only), stopped after the test; ``await redis_url.restart()`` restarts it."""
    import shutil

    if shutil.which("redis-server") is None:
        if os.environ.get("COMFYTRIO_REQUIRE_REDIS"):  # set by .ci/run, which installs it
            pytest.fail("redis-server is not installed, and COMFYTRIO_REQUIRE_REDIS is set")
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    folder = tmp_path / "redis"
    folder.mkdir()
    url = RedisUrl(free_port(), folder)
    url.start()
    try:
        yield url
    finally:
        url.stop()
