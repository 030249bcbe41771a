"""``serve_fake_comfyui`` and the ``FakeComfyUI`` handle tests drive it with."""

from __future__ import annotations

import json
import logging
import os
import re
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
from ._faults import AnswerRule, AnswerTransform, Faults, WsMaker, WsMessage, websocket_frame
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
        """Switch off ``fail_node``/``crash_on_node`` rules, any hang, and every hostile
        switch (``corrupt_answers``, ``corrupt_history``, ``send_ws_after``,
        ``drop_ws_messages``)."""
        self.faults.clear()

    # -- hostile mode: what a real ComfyUI never sends ----------------------------------

    def send_ws(self, message: WsMessage, *, to: str | None = None) -> int:
        """Push ``message`` now to every connected websocket, or to the one whose
        ``clientId`` is ``to``; returns how many sockets it goes to.

        A ``str`` is sent as one text frame exactly as given (``'{"type": "status", "data":
        {"status": {"exec_info": {"queue_remaining": Infinity}}}}'``, or not JSON at all),
        ``bytes`` as one binary frame, anything else JSON-encoded (``{"type": "progress",
        "data": "boom"}``; ``float("nan")`` is written ``NaN``). It follows the messages
        already queued for each socket, and waits like them while the server hangs.
        """
        gen = self._generation
        if gen is None or gen.down:
            return 0
        return gen.hub.send_message(message, to)

    def send_ws_after(
        self,
        event: str | int,
        message: WsMessage | WsMaker,
        *,
        replace: bool = False,
        times: int | None = 1,
    ) -> None:
        """Each time the server sends a message of type ``event`` (``"executed"``; an int
        for a binary event), send ``message`` right after it to the same sockets, or instead
        of it with ``replace=True``: ``times`` times (None: until ``clear_faults``).

        ``message`` is as for ``send_ws``, or a function of the real message's ``data``
        that makes it (so it can name the prompt that runs: ``lambda d: {"type":
        "executed", "data": {"prompt_id": d["prompt_id"], "node": "9", "output": []}}``);
        a function that returns None leaves that message alone, uncounted.
        """
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 (or None), got {times}")
        self.faults.hostile.add_ws_rule(event, message, replace, times)

    def drop_ws_messages(self, event: str | int, *, times: int | None = 1) -> None:
        """Never send the next ``times`` messages of type ``event`` (None: none until
        ``clear_faults``), as if the server forgot them: ``"executing"`` takes away the end
        signal ``{"node": null}`` too, so clients must ask ``/queue`` and ``/history``."""
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 (or None), got {times}")
        self.faults.hostile.add_ws_drop(event, times)

    def send_ws_frame(
        self,
        opcode: int,
        payload: bytes = b"",
        *,
        fin: bool = True,
        rsv: int = 0,
        mask: bytes | None = None,
        to: str | None = None,
    ) -> int:
        """Write one websocket frame exactly as given, unchecked, onto every websocket's
        connection (or ``to``'s): control frames (8-10) longer than 125 bytes or not
        final, unknown opcodes (3-7, 11-15), reserved bits, a text frame (1) that is not
        UTF-8, a lone continuation (0), a masked frame. Returns how many sockets."""
        return self.send_ws_bytes(
            websocket_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask), to=to
        )

    def ping_ws(self, payload: bytes = b"", *, to: str | None = None) -> int:
        """Send a ping frame with ``payload``, of any length (126-255 bytes makes the oversized
        control frame RFC 6455 forbids). ASGI gives an app no way to ping, so the frame is
        written raw onto the connection, between two of Hypercorn's writes. Returns how many
        sockets."""
        return self.send_ws_frame(0x9, payload, to=to)

    def send_ws_bytes(self, data: bytes, *, to: str | None = None) -> int:
        """Write ``data`` onto every websocket's TCP stream (or ``to``'s) as it is, between
        two frames: half a frame, a frame header promising more than follows, noise.
        Returns how many sockets."""
        gen = self._generation
        if gen is None or gen.down:
            return 0
        return gen.hub.send_raw(data, to)

    @property
    def hostile_hits(self) -> int:
        """How many messages and answers the hostile switches (``send_ws_after``,
        ``drop_ws_messages``, ``corrupt_answers``, ``corrupt_history``) have changed so far:
        a test can check that its garbage was delivered."""
        return self.faults.hostile.hits

    @property
    def websocket_client_ids(self) -> list[str]:
        """The ``clientId`` of every connected websocket (for ``to=``)."""
        gen = self._generation
        return list(gen.hub.sockets) if gen is not None and not gen.down else []

    def corrupt_answers(
        self,
        route: str,
        *,
        body: bytes | str | AnswerTransform,
        status: int | None = None,
        content_type: str | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer the next ``times`` requests of ``route`` (None: all, until
        ``clear_faults``) with ``body`` instead of the real answer.

        ``route`` is a path (``"/prompt"``, ``"/history/abc"``) or a route template whose
        ``{name}`` parts match any one segment (``"/history/{prompt_id}"``); ``/api/...``
        is the same route; ``method`` (``"GET"``, ``"POST"``) narrows it. A fixed ``body``
        (bytes, or str sent as UTF-8) is the whole answer, with ``status`` (200) and
        ``content_type`` (``application/json; charset=utf-8``), and the request never
        reaches the server (no prompt is queued). A function of the real body makes the
        new body from it: the request is served, then its answer rewritten (``status``
        and ``content_type`` default to the real ones; returning None leaves that answer
        alone, uncounted). ``"/ws"`` refuses websocket handshakes with this answer
        instead (a fixed body only; HTML by default).
        """
        if not route.startswith("/"):
            raise ValueError(f"a route starts with '/', got {route!r}")
        if status is not None and not 200 <= status <= 599:
            raise ValueError(f"status must be 200-599, got {status}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 (or None), got {times}")
        fixed: bytes | None = None
        transform: AnswerTransform | None = None
        if isinstance(body, str):
            fixed = body.encode()
        elif isinstance(body, bytes):
            fixed = body
        else:
            transform = body
        if transform is not None and route.rstrip("/").endswith("/ws"):
            raise ValueError("a websocket handshake is refused with a fixed body")
        self.faults.hostile.answer_rules.append(
            AnswerRule(
                route,
                method.upper() if method is not None else None,
                fixed,
                transform,
                status,
                content_type,
                times,
            )
        )

    def corrupt_history(
        self,
        entry: Any,
        *,
        prompt_id: str | None = None,
        times: int | None = None,
    ) -> None:
        """Once a prompt (``prompt_id``, or any) has run, ``GET /history`` and
        ``GET /history/{id}`` report ``entry`` as its history entry instead of the real one
        (JSON-encoded: ``{"outputs": "boom"}``, a list, NaN...), in the real outer shape
        ``{prompt_id: entry}``. ``entry`` may be a function of the real entry (a dict) that
        makes it. ``times`` answers (None: until ``clear_faults``); answers that hold no
        such prompt are left alone and not counted."""

        def rewrite(real: bytes) -> bytes | None:
            try:
                answer = json.loads(real)
            except ValueError:
                return None
            if not isinstance(answer, dict):
                return None
            hit = False
            for key in list(answer):
                if prompt_id is None or key == prompt_id:
                    answer[key] = entry(answer[key]) if callable(entry) else entry
                    hit = True
            return json.dumps(answer).encode() if hit else None

        self.corrupt_answers("/history", body=rewrite, method="GET", times=times)
        # One rule (one budget of ``times``) for both routes.
        self.faults.hostile.answer_rules[-1].pattern = re.compile(r"/history(?:/[^/]+)?")

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

    async def wait_websocket_count(self, count: int) -> None:
        """Until exactly ``count`` websockets are connected (``0``: every client is gone)."""
        while self.websocket_count != count:
            gen = self._generation
            if gen is None or gen.down:
                await self.wait_ready()
                continue
            await gen.hub.wait_changed()

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
        hub = SocketHub(self.faults.hostile)
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
        asgi: Any = build_app(
            engine,
            hub,
            self.registry,
            self.paths,
            self.system,
            self.faults.gate,
            hostile=self.faults.hostile,
        )
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
            connection.send_lock = server.send_lock
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
