"""``serve_fake_comfyui`` and the ``FakeComfyUI`` handle tests drive it with."""

from __future__ import annotations

import logging
import os
import signal
import socket as stdlib_socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app
from PIL import Image

from ._engine import Engine, Settings, Tally
from ._faults import Faults
from ._nodes import NodeRegistry, declared_node
from ._paths import MODEL_FOLDERS, FakePaths
from ._server import CURRENT_CONNECTION, Connection, SocketHub, SystemInfo, build_app

__all__ = ["FakeComfyUI", "serve_fake_comfyui"]

logger = logging.getLogger("comfytrio.testing")

DEFAULT_IDLE_TIMEOUT = 75.0
"""Seconds an idle keep-alive connection is kept open: aiohttp's default, so ComfyUI's."""


class _Generation:
    """One life of the server between a start and a crash (queue and history live here)."""

    def __init__(self, engine: Engine, hub: SocketHub) -> None:
        self.engine = engine
        self.hub = hub
        self.connections: set[Connection] = set()
        self.listen_socket: trio.socket.SocketType | None = None
        self.scope = trio.CancelScope()
        self.listening = trio.Event()
        self.down = False


class FakeComfyUI:
    """A running fake ComfyUI server, as ``serve_fake_comfyui`` reports it.

    It answers like ComfyUI 0.3.64 on ``url`` and writes files under ``root`` (laid out like
    a ComfyUI base directory: ``input/``, ``output/``, ``temp/``, ``models/<folder>/``).
    The methods switch faults on at any time and let a test look inside.
    """

    def __init__(
        self,
        paths: FakePaths,
        *,
        host: str,
        port: int,
        settings: Settings,
        system: SystemInfo,
        startup_delay: float = 0.0,
        exit_on_crash: bool = False,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if not idle_timeout > 0:
            raise ValueError(
                f"idle_timeout must be a positive number of seconds, got {idle_timeout}"
            )
        self.paths = paths
        self.host = host
        self.port = port
        self.settings = settings
        self.system = system
        self.registry = NodeRegistry()
        self.faults = Faults()
        self.tally = Tally()
        self._startup_delay = startup_delay
        self._exit_on_crash = exit_on_crash
        self._generation: _Generation | None = None
        self._restart = trio.Event()
        self._bound = trio.Event()
        self._config = Config()
        self._config.errorlog = logging.getLogger("comfytrio.testing.hypercorn")
        self._config.accesslog = None
        self._config.include_server_header = False
        self._config.keep_alive_timeout = float(idle_timeout)

    # -- where --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def root(self) -> Path:
        """The base directory."""
        return self.paths.base

    @property
    def input_dir(self) -> Path:
        """``input/`` (LoadImage, uploads)."""
        return self.paths.input

    @property
    def output_dir(self) -> Path:
        """``output/`` (SaveImage)."""
        return self.paths.output

    @property
    def temp_dir(self) -> Path:
        """``temp/`` (PreviewImage); emptied at every start."""
        return self.paths.temp

    @property
    def models_dir(self) -> Path:
        """``models/`` (one sub-folder per model type)."""
        return self.paths.models

    # -- knobs --------------------------------------------------------------------------

    @property
    def idle_timeout(self) -> float:
        """Seconds an idle keep-alive connection is kept before the server closes it (75 by
        default, as aiohttp, so ComfyUI, does)."""
        return float(self._config.keep_alive_timeout)

    @property
    def seconds_per_image(self) -> float:
        """Simulated GPU seconds per image a decoder or SaveImage produces."""
        return self.settings.seconds_per_image

    def set_seconds_per_image(self, seconds: float) -> None:
        """Change the simulated GPU time per image (takes effect at the next sleep)."""
        self.settings.seconds_per_image = float(seconds)

    def set_seconds_per_step(self, seconds: float) -> None:
        """Change the simulated time per sampler step and latent (KSampler progress)."""
        self.settings.seconds_per_step = float(seconds)

    def set_node_seconds(self, node: str, seconds: float) -> None:
        """Make every run of ``node`` (an id or a class_type) take ``seconds`` more."""
        self.settings.node_seconds[node] = float(seconds)

    def declare_node(
        self,
        class_type: str,
        *,
        inputs: Mapping[str, Any] | None = None,
        optional: Mapping[str, Any] | None = None,
        outputs: Sequence[str] = (),
        output_names: Sequence[str] | None = None,
        output_node: bool = False,
        category: str = "custom",
        display_name: str | None = None,
        run: Callable[[dict[str, Any]], Any] | None = None,
        seconds: float = 0.0,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        """Make the server know a custom node type (as if its node pack were installed).

        ``inputs``/``optional`` map names to a type (``"MODEL"``), a ComfyUI spec
        (``["INT", {"min": 0}]``) or combo options (``["a", "b"]``); inputs not declared
        (like rgthree's ``lora_1: {on, lora, strength}``) are accepted and passed on.
        ``outputs`` are the return types. By default each output passes on the first input
        of the same type; ``run(inputs)`` (sync or async) may return the outputs instead
        (a tuple, or ``{"result": (...), "ui": {...}}``). ``seconds`` is simulated time per
        run. ``info`` gives a whole ``object_info`` entry instead. Declaring
        ``"SaveImageWebsocket"`` with no inputs adds ComfyUI's bundled websocket-image node.
        """
        self.registry.add(
            declared_node(
                class_type,
                inputs=inputs,
                optional=optional,
                outputs=outputs,
                output_names=output_names,
                output_node=output_node,
                category=category,
                display_name=display_name,
                run=run,
                seconds=seconds,
                info=info,
            )
        )

    def add_model(self, folder: str, name: str, data: bytes = b"fake model weights") -> Path:
        """Put a (dummy) model file in ``models/<folder>/<name>``; loaders see it at once."""
        subs = MODEL_FOLDERS.get(folder, ((folder,), frozenset()))[0] or (folder,)
        path = self.paths.models / subs[0] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def add_input_image(
        self,
        name: str,
        *,
        size: tuple[int, int] = (64, 64),
        color: tuple[int, int, int] = (200, 40, 40),
    ) -> Path:
        """Write a PNG into ``input/`` (``name`` may hold a sub-folder) for LoadImage."""
        path = self.paths.input / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(path, format="PNG")
        return path

    # -- faults -------------------------------------------------------------------------

    def fail_node(
        self,
        node: str,
        *,
        message: str = "Simulated failure (comfytrio fake ComfyUI)",
        exception_type: str = "RuntimeError",
        times: int | None = None,
    ) -> None:
        """Make ``node`` (an id or a class_type) fail with an ``execution_error`` when it runs
        (``times`` runs, or until ``clear_faults``)."""
        self.faults.add_failure(node, message, exception_type, times)

    def crash(self) -> None:
        """Die now, like a killed process: sockets reset (websockets see 1006), then
        connection refused; queue, history and cache are lost. ``restart()`` brings it back."""
        gen = self._generation
        if gen is None or gen.down:
            return
        logger.warning("fake ComfyUI %s: crashing", self.url)
        gen.down = True
        if gen.listen_socket is not None:
            gen.listen_socket.close()
        for connection in list(gen.connections):
            connection.abort(reset=True)
        gen.scope.cancel()
        if self._exit_on_crash:
            os.kill(os.getpid(), signal.SIGKILL)

    def crash_on_node(self, node: str) -> None:
        """Crash when ``node`` (an id or a class_type) starts executing (once)."""
        self.faults.crash_on.add(node)

    def hang(self) -> None:
        """Stop answering: connections are accepted, HTTP never answers, websockets go
        silent, execution pauses. ``unhang()`` resumes everything."""
        self.faults.gate.close()

    def unhang(self) -> None:
        """End a ``hang()``."""
        self.faults.gate.open()

    def drop_websockets(self) -> None:
        """Cut every websocket without a close frame (clients see 1006); HTTP keeps working."""
        gen = self._generation
        if gen is None:
            return
        for connection in list(gen.connections):
            if connection.websocket:
                connection.abort(reset=False)

    def clear_queue(self) -> None:
        """Someone else cleared the queue: pending prompts vanish (no history, no event)."""
        if self._generation is not None and not self._generation.down:
            self._generation.engine.clear_queue()

    def clear_faults(self) -> None:
        """Switch off ``fail_node``/``crash_on_node`` rules and any hang."""
        self.faults.clear()

    async def restart(self, *, startup_delay: float = 0.0) -> None:
        """Start again on the same port after a crash (crashing first if still up), with
        empty queue and history. Returns once the port is bound (and listening when
        ``startup_delay`` is 0)."""
        self.crash()
        self.faults.gate.open()
        self._startup_delay = startup_delay
        self._bound = trio.Event()
        self._restart.set()
        await self._bound.wait()

    # -- looking inside -----------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        """Whether it is listening (not crashed, not still starting)."""
        gen = self._generation
        return gen is not None and not gen.down and gen.listening.is_set()

    async def wait_ready(self) -> None:
        """Until it accepts connections (after a ``startup_delay``)."""
        while True:
            gen = self._generation
            if gen is not None and not gen.down:
                await gen.listening.wait()
                return
            await trio.sleep(0.01)

    @property
    def prompts_received(self) -> list[Any]:
        """Every ``POST /prompt`` body, in order (rejected ones too), across restarts."""
        return self.tally.prompts_received

    @property
    def executed_count(self) -> int:
        """How many prompts the worker finished (success, error or interrupt)."""
        return self.tally.executed_count

    @property
    def executed_nodes(self) -> list[tuple[str, str]]:
        """``(prompt_id, node_id)`` of every node that really ran (not served from cache)."""
        return self.tally.executed_nodes

    @property
    def running_id(self) -> str | None:
        """The prompt executing now."""
        gen = self._generation
        return gen.engine.running_id if gen is not None and not gen.down else None

    def queue_ids(self) -> list[str]:
        """Pending prompt ids, in the order they will run."""
        gen = self._generation
        return gen.engine.queue_ids() if gen is not None and not gen.down else []

    def history(self) -> dict[str, Any]:
        """The history (what ``GET /history`` answers)."""
        gen = self._generation
        return dict(gen.engine.history) if gen is not None and not gen.down else {}

    @property
    def websocket_count(self) -> int:
        """Connected websockets that still receive messages."""
        gen = self._generation
        return len(gen.hub.sockets) if gen is not None and not gen.down else 0

    async def wait_idle(self) -> None:
        """Until nothing is queued or running."""
        gen = self._generation
        if gen is not None and not gen.down:
            await gen.engine.wait_idle()

    # -- serving ------------------------------------------------------------------------

    async def _serve(self, task_status: trio.TaskStatus[FakeComfyUI]) -> None:
        reported = False
        while True:
            self._restart = trio.Event()

            def bound() -> None:
                nonlocal reported
                if not reported:
                    reported = True
                    task_status.started(self)
                self._bound.set()

            await self._run_generation(bound)
            await self._restart.wait()

    async def _run_generation(self, bound: Callable[[], None]) -> None:
        hub = SocketHub()
        engine = Engine(
            self.registry,
            self.paths,
            hub,
            self.settings,
            self.faults,
            self.tally,
            on_crash=self._crash_from_node,
        )
        gen = _Generation(engine, hub)
        asgi: Any = build_app(engine, hub, self.registry, self.paths, self.system, self.faults.gate)
        app = wrap_app(asgi, self._config.wsgi_max_body_size, "asgi")
        context = WorkerContext(None)
        family = stdlib_socket.AF_INET6 if ":" in self.host else stdlib_socket.AF_INET
        sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
        gen.listen_socket = sock
        try:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
            await sock.bind((self.host, self.port))
            self.port = int(sock.getsockname()[1])
            argv = self.system.argv
            for index in range(1, len(argv)):
                if argv[index - 1] == "--port" and argv[index] == "0":
                    argv[index] = str(self.port)
            await trio.to_thread.run_sync(self.paths.create)
            self._generation = gen
            with gen.scope:
                if self._startup_delay > 0:
                    logger.info("fake ComfyUI %s: starting in %g s", self.url, self._startup_delay)
                    bound()
                    await trio.sleep(self._startup_delay)
                sock.listen(128)
                gen.listening.set()
                logger.info("fake ComfyUI listening on %s (root %s)", self.url, self.paths.base)
                if self._startup_delay <= 0:
                    bound()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(engine.run)
                    try:
                        await self._accept(gen, sock, app, context, nursery)
                    finally:
                        gen.down = True
                        sock.close()
                        for connection in list(gen.connections):
                            connection.abort(reset=True)
        finally:
            gen.down = True
            sock.close()

    async def _accept(
        self,
        gen: _Generation,
        sock: trio.socket.SocketType,
        app: Any,
        context: WorkerContext,
        nursery: trio.Nursery,
    ) -> None:
        while True:
            try:
                conn_sock, _ = await sock.accept()
            except (trio.ClosedResourceError, OSError):
                if gen.down or sock.fileno() == -1:
                    await trio.sleep_forever()
                await trio.sleep(0.01)
                continue
            stream = trio.SocketStream(conn_sock)
            nursery.start_soon(self._handle, gen, stream, app, context)

    async def _handle(
        self, gen: _Generation, stream: trio.SocketStream, app: Any, context: WorkerContext
    ) -> None:
        connection = Connection(stream)
        gen.connections.add(connection)
        CURRENT_CONNECTION.set(connection)
        try:
            server = TCPServer(app, self._config, context, {}, cast(Any, stream))
            await server.run()
        finally:
            gen.connections.discard(connection)
            stream.socket.close()

    def _crash_from_node(self) -> None:
        self.faults.crash_on.clear()
        self.crash()


async def serve_fake_comfyui(
    root: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    seconds_per_image: float = 0.0,
    seconds_per_step: float = 0.0,
    startup_delay: float = 0.0,
    cpu: bool = True,
    disable_metadata: bool = False,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    task_status: trio.TaskStatus[FakeComfyUI] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a fake ComfyUI 0.3.64 until cancelled; ``nursery.start`` returns its handle.

    ``root`` is laid out like a ComfyUI base directory (``input/``, ``output/``, ``temp/``,
    ``models/<folder>/`` are created; ``temp/`` is emptied, as ComfyUI does at start).
    ``port=0`` picks a free port (see ``handle.port``); it listens on 127.0.0.1 unless
    ``host`` says otherwise. ``seconds_per_image`` is simulated GPU time per image a
    decoder or SaveImage produces, ``seconds_per_step`` per sampler step and latent.
    ``startup_delay`` keeps the port refusing connections that long after the handle is
    returned. ``cpu=False`` reports a fake CUDA device naming ``CUDA_VISIBLE_DEVICES``.
    ``idle_timeout`` is how many seconds an idle keep-alive connection is kept before the
    server closes it (75, as ComfyUI's aiohttp does; ``handle.idle_timeout``).

    Example::

        async with trio.open_nursery() as nursery:
            fake = await nursery.start(serve_fake_comfyui, tmp_path)
            ...  # talk to fake.url
            nursery.cancel_scope.cancel()
    """
    paths = FakePaths.under(Path(root))
    argv = ["main.py", "--listen", host, "--port", str(port)]
    if cpu:
        argv.insert(1, "--cpu")
    system = SystemInfo(
        argv=argv, cpu=cpu, cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES")
    )
    fake = FakeComfyUI(
        paths,
        host=host,
        port=port,
        settings=Settings(
            seconds_per_image=seconds_per_image,
            seconds_per_step=seconds_per_step,
            disable_metadata=disable_metadata,
        ),
        system=system,
        startup_delay=startup_delay,
        idle_timeout=idle_timeout,
    )
    await run_fake(fake, task_status=task_status)


async def run_fake(
    fake: FakeComfyUI, *, task_status: trio.TaskStatus[FakeComfyUI] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve an already configured handle until cancelled (used by the CLI entry points)."""
    await fake._serve(task_status)
