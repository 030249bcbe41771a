"""The serving half of the ``FakeComfyUI`` handle: one port, and the generations of the
server on it (Hypercorn's trio worker serving the app of ``_server``).

A generation lives from a start to a crash: its engine (queue, cache, history), websocket
hub and TCP connections die with it; ``restart`` starts the next one on the same port. What
outlives a crash (folders, node types, knobs, faults, tally, the ComfyUI version it speaks
as) is held by the handle itself.
"""

from __future__ import annotations

import logging
import os
import signal
import socket as stdlib_socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from ._engine import Engine
from ._engine_state import Settings, Tally
from ._faults import Faults
from ._nodes import NodeRegistry
from ._paths import FakePaths
from ._profiles import DEFAULT_COMFYUI_VERSION, ComfyProfile, profile_for
from ._server import build_app
from ._server_system import SystemInfo
from ._server_ws import CURRENT_CONNECTION, Connection, SocketHub

__all__ = ["DEFAULT_IDLE_TIMEOUT", "Generation", "ServedFake"]

logger = logging.getLogger("comfytrio.testing")

DEFAULT_IDLE_TIMEOUT = 75.0
"""Seconds an idle keep-alive connection is kept open: aiohttp's default, so ComfyUI's."""


class Generation:
    """One life of the server between a start and a crash (queue and history live here)."""

    def __init__(self, engine: Engine, hub: SocketHub) -> None:
        self.engine = engine
        self.hub = hub
        self.connections: set[Connection] = set()
        self.listen_socket: trio.socket.SocketType | None = None
        self.scope = trio.CancelScope()
        self.listening = trio.Event()
        self.down = False

    def cut(self, *, websockets_only: bool = False) -> None:
        """Close its connections without a goodbye: every one reset (a crash), or only the
        websockets', closed (clients see 1006)."""
        for connection in list(self.connections):
            if not websockets_only:
                connection.abort(reset=True)
            elif connection.websocket:
                connection.abort(reset=False)


class ServedFake:
    """A fake ComfyUI on one port: what it keeps across crashes, and its generations.

    ``FakeComfyUI`` is this plus the switches a test flips; see there.
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
        profile: ComfyProfile | None = None,
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
        self.profile = profile or profile_for(DEFAULT_COMFYUI_VERSION)
        """The ComfyUI version it speaks as."""
        system.version = self.profile.version
        self.registry = NodeRegistry()
        self.faults = Faults()
        self.tally = Tally()
        self.root: Path = paths.base
        """The base directory."""
        self.input_dir: Path = paths.input
        """``input/`` (LoadImage, uploads)."""
        self.output_dir: Path = paths.output
        """``output/`` (SaveImage)."""
        self.temp_dir: Path = paths.temp
        """``temp/`` (PreviewImage); emptied at every start."""
        self.models_dir: Path = paths.models
        """``models/`` (one sub-folder per model type)."""
        self._startup_delay = startup_delay
        self._exit_on_crash = exit_on_crash
        self._generation: Generation | None = None
        self._restart = trio.Event()
        self._bound = trio.Event()
        self._config = Config()
        self._config.errorlog = logging.getLogger("comfytrio.testing.hypercorn")
        self._config.accesslog = None
        self._config.include_server_header = False
        self._config.keep_alive_timeout = float(idle_timeout)

    @property
    def url(self) -> str:
        """``http://host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def idle_timeout(self) -> float:
        """Seconds an idle keep-alive connection is kept before the server closes it (75 by
        default, as aiohttp, so ComfyUI, does)."""
        return float(self._config.keep_alive_timeout)

    def _live(self) -> Generation | None:
        """The generation serving now (None while crashed or not started)."""
        gen = self._generation
        return gen if gen is not None and not gen.down else None

    # -- life and death ---------------------------------------------------------------------

    def crash(self) -> None:
        """Die now, like a killed process: sockets reset (websockets see 1006), then
        connection refused; queue, history and cache are lost. ``restart()`` brings it back."""
        gen = self._live()
        if gen is None:
            return
        logger.warning("fake ComfyUI %s: crashing", self.url)
        gen.down = True
        if gen.listen_socket is not None:
            gen.listen_socket.close()
        gen.cut()
        gen.scope.cancel()
        if self._exit_on_crash:
            os.kill(os.getpid(), signal.SIGKILL)

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

    @property
    def is_up(self) -> bool:
        """Whether it is listening (not crashed, not still starting)."""
        gen = self._live()
        return gen is not None and gen.listening.is_set()

    async def wait_ready(self) -> None:
        """Until it accepts connections (after a ``startup_delay``)."""
        while True:
            gen = self._live()
            if gen is not None:
                await gen.listening.wait()
                return
            await trio.sleep(0.01)

    def _crash_from_node(self) -> None:
        self.faults.crash_on.clear()
        self.crash()

    # -- serving ------------------------------------------------------------------------------

    async def _serve(self, task_status: trio.TaskStatus[Any]) -> None:
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
        hub = SocketHub(self.faults.hostile)
        engine = Engine(self, hub, on_crash=self._crash_from_node)
        gen = Generation(engine, hub)
        asgi: Any = build_app(engine, hub, self.system)
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
                        gen.cut()
        finally:
            gen.down = True
            sock.close()

    async def _accept(
        self,
        gen: Generation,
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
        self, gen: Generation, stream: trio.SocketStream, app: Any, context: WorkerContext
    ) -> None:
        connection = Connection(stream)
        gen.connections.add(connection)
        CURRENT_CONNECTION.set(connection)
        try:
            server = TCPServer(app, self._config, context, {}, cast(Any, stream))
            connection.send_lock = server.send_lock
            await server.run()
        finally:
            gen.connections.discard(connection)
            stream.socket.close()
