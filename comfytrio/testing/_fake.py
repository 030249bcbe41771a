"""``serve_fake_comfyui`` and the ``FakeComfyUI`` handle tests drive it with.

The handle is assembled from parts: ``_fake_serving`` (the port, crashes and restarts),
``_fake_faults`` (fault switches), ``_fake_hostile`` (hostile switches); this module adds
the knobs, custom nodes, files, and what a test can look at.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Unpack

import trio
from PIL import Image

from ._engine_state import Settings
from ._fake_faults import FaultControls
from ._fake_hostile import HostileControls
from ._fake_serving import DEFAULT_IDLE_TIMEOUT
from ._nodes_custom import NodeDeclaration, declared_node
from ._paths import MODEL_FOLDERS, FakePaths
from ._profiles import DEFAULT_COMFYUI_VERSION, profile_for
from ._server_system import SystemInfo

__all__ = ["DEFAULT_IDLE_TIMEOUT", "FakeComfyUI", "run_fake", "serve_fake_comfyui"]


class FakeComfyUI(FaultControls, HostileControls):
    """A running fake ComfyUI server, as ``serve_fake_comfyui`` reports it.

    It answers like ComfyUI 0.3.64 (or the ``comfyui_version`` it was started with) on
    ``url`` and writes files under ``root`` (laid out like
    a ComfyUI base directory: ``input_dir``, ``output_dir``, ``temp_dir``, ``models_dir``
    with one folder per model type). The methods switch faults on at any time and let a
    test look inside.
    """

    # -- knobs --------------------------------------------------------------------------

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

    @property
    def previews(self) -> bool:
        """Whether the samplers send latent previews (a JPEG binary frame per step, as a
        real ComfyUI started with ``--preview-method`` does); settable at any time."""
        return self.settings.previews

    @previews.setter
    def previews(self, on: bool) -> None:
        self.settings.previews = bool(on)

    @property
    def comfyui_version(self) -> str:
        """The ComfyUI version it speaks as (``serve_fake_comfyui(comfyui_version=...)``)."""
        return self.profile.version

    def set_node_seconds(self, node: str, seconds: float) -> None:
        """Make every run of ``node`` (an id or a class_type) take ``seconds`` more."""
        self.settings.node_seconds[node] = float(seconds)

    def declare_node(self, class_type: str, **declaration: Unpack[NodeDeclaration]) -> None:
        """Make the server know a custom node type (as if its node pack were installed).

        ``inputs``/``optional`` map names to a type (``"MODEL"``), a ComfyUI spec
        (``["INT", {"min": 0}]``) or combo options (``["a", "b"]``); inputs not declared
        (like rgthree's ``lora_1: {on, lora, strength}``) are accepted and passed on.
        ``outputs`` are the return types (``output_names`` their names); ``output_node``,
        ``category`` and ``display_name`` are as in ComfyUI. By default each output passes
        on the first input of the same type; ``run(inputs)`` (sync or async) may return the
        outputs instead (a tuple, or ``{"result": (...), "ui": {...}}``). ``seconds`` is
        simulated time per run. ``info`` gives a whole ``object_info`` entry instead.
        ComfyUI's bundled ``SaveImageWebsocket`` is there from the start, as in a stock
        install; declaring it with no inputs puts that one back.
        """
        self.registry.add(declared_node(class_type, declaration))

    # -- files ----------------------------------------------------------------------------

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

    # -- looking inside -----------------------------------------------------------------

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
        gen = self._live()
        return gen.engine.running_id if gen is not None else None

    def queue_ids(self) -> list[str]:
        """Pending prompt ids, in the order they will run."""
        gen = self._live()
        return gen.engine.queue_ids() if gen is not None else []

    def history(self) -> dict[str, Any]:
        """The history (what ``GET /history`` answers)."""
        gen = self._live()
        return dict(gen.engine.history.entries) if gen is not None else {}

    @property
    def websocket_count(self) -> int:
        """Connected websockets that still receive messages."""
        gen = self._live()
        return len(gen.hub.sockets) if gen is not None else 0

    async def wait_websocket_count(self, count: int) -> None:
        """Until exactly ``count`` websockets are connected (``0``: every client is gone)."""
        while self.websocket_count != count:
            gen = self._live()
            if gen is None:
                await self.wait_ready()
                continue
            await gen.hub.wait_changed()

    async def wait_idle(self) -> None:
        """Until nothing is queued or running."""
        gen = self._live()
        if gen is not None:
            await gen.engine.wait_idle()


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
    previews: bool = False,
    comfyui_version: str = DEFAULT_COMFYUI_VERSION,
    task_status: trio.TaskStatus[FakeComfyUI] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a fake ComfyUI until cancelled; ``nursery.start`` returns its handle.

    ``root`` is laid out like a ComfyUI base directory (``input/``, ``output/``, ``temp/``,
    ``models/<folder>/`` are created; ``temp/`` is emptied, as ComfyUI does at start).
    ``port=0`` picks a free port (see ``handle.port``); it listens on 127.0.0.1 unless
    ``host`` says otherwise. ``seconds_per_image`` is simulated GPU time per image a
    decoder or SaveImage produces, ``seconds_per_step`` per sampler step and latent.
    ``startup_delay`` keeps the port refusing connections that long after the handle is
    returned. ``cpu=False`` reports a fake CUDA device naming ``CUDA_VISIBLE_DEVICES``.
    ``idle_timeout`` is how many seconds an idle keep-alive connection is kept before the
    server closes it (75, as ComfyUI's aiohttp does; ``handle.idle_timeout``).
    ``previews=True`` makes the samplers send latent previews (``handle.previews``).
    ``comfyui_version`` is the version it speaks as: ``"0.3.64"`` (the recorded one, the
    default) or ``"0.38.1"`` (adds the ``/api/jobs`` routes and later shapes; see
    ``COMFYUI_VERSIONS``); another value is a ``ValueError``.

    Example::

        async with trio.open_nursery() as nursery:
            fake = await nursery.start(serve_fake_comfyui, tmp_path)
            ...  # talk to fake.url
            nursery.cancel_scope.cancel()
    """
    profile = profile_for(comfyui_version)
    argv = ["main.py", "--listen", host, "--port", str(port)]
    if cpu:
        argv.insert(1, "--cpu")
    fake = FakeComfyUI(
        FakePaths.under(Path(root)),
        host=host,
        port=port,
        settings=Settings(
            seconds_per_image,
            seconds_per_step,
            disable_metadata=disable_metadata,
            previews=previews,
        ),
        system=SystemInfo(argv, cpu, os.environ.get("CUDA_VISIBLE_DEVICES")),
        startup_delay=startup_delay,
        idle_timeout=idle_timeout,
        profile=profile,
    )
    await run_fake(fake, task_status=task_status)


async def run_fake(
    fake: FakeComfyUI, *, task_status: trio.TaskStatus[FakeComfyUI] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve an already configured handle until cancelled (used by the CLI entry points)."""
    await fake._serve(task_status)
