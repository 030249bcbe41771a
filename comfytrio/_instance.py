"""One ComfyUI server as the orchestrator sees it: maybe a process we own, always a client.

An ``Instance`` is what param-type plugins receive as an ``InstanceTarget``: a local one has
an ``input_dir`` to write into, a remote one takes uploads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs
import trio

from ._client import ComfyClient, OutputRef, connect_comfy_client, wait_server_ready
from ._process import LaunchSpec, RunningProcess, run_comfyui

__all__ = ["Instance"]

logger = logging.getLogger("comfytrio.instance")


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


@attrs.define(eq=False)
class Instance:
    """One server: its name, URL, folders we can reach, client, and process (if ours)."""

    index: int
    """Position among the api's instances."""
    name: str
    """Short name for logs, errors and results."""
    url: str
    """Base URL."""
    launch: LaunchSpec | None = None
    """How we start it; None when we attach to a running server."""
    comfyui_path: Path | None = None
    """The install folder of an attached local server (to find its folders)."""
    ready_timeout: float = 120.0
    """Seconds to wait for it to answer."""
    input_dir: Path | None = None
    """Its input folder, when it is on this machine."""
    output_dir: Path | None = None
    """Its output folder, when it is on this machine."""
    temp_dir: Path | None = None
    """Its temp folder (``temp/temp`` inside ``--temp-directory``), when on this machine."""
    client: ComfyClient | None = None
    """The client, once connected."""
    process: RunningProcess | None = None
    """Our process, once started."""
    state: str = "new"
    """``new``, ``starting``, ``ready``, ``down`` or ``stopped``."""
    _output_classes: frozenset[str] | None = None

    @property
    def healthy(self) -> bool:
        """Ready, and its websocket is up: it may take work."""
        return (
            self.state == "ready" and self.client is not None and self.client.statistics().connected
        )

    @property
    def owned(self) -> bool:
        """True when we started the process."""
        return self.launch is not None

    @property
    def is_local(self) -> bool:
        """True when its input and output folders are on this machine."""
        return self.input_dir is not None and self.output_dir is not None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start (or attach to) the server, connect the client, report ready, run until
        cancelled."""
        self.state = "starting"
        try:
            async with trio.open_nursery() as nursery:
                if self.launch is not None:
                    self.process = await nursery.start(self._run_process, self.launch)
                    dirs = self.launch.dirs
                    self.input_dir, self.output_dir = dirs.input, dirs.output
                    self.temp_dir = dirs.temp / "temp"
                else:
                    stats = await wait_server_ready(self.url, timeout=self.ready_timeout)
                    await self._find_local_dirs(stats)
                self.client = await connect_comfy_client(nursery, self.url, name=self.name)
                self.state = "ready"
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.state = "stopped" if self.state != "down" else "down"
            if self.client is not None:
                with trio.CancelScope(shield=True):
                    await self.client.aclose()

    async def _run_process(
        self, spec: LaunchSpec, *, task_status: trio.TaskStatus[RunningProcess]
    ) -> None:
        code = await run_comfyui(spec, task_status=task_status)
        self.state = "down"
        if self.client is not None:
            self.client.mark_lost(f"its process exited with code {code}")

    async def _find_local_dirs(self, stats: dict[str, Any]) -> None:
        """For an attached server on this machine, find its folders from its command line."""
        if self.comfyui_path is None:
            return
        argv = [str(a) for a in stats.get("system", {}).get("argv") or []]
        base = Path(_flag(argv, "--base-directory") or self.comfyui_path)
        if not base.is_absolute():
            base = self.comfyui_path / base

        def folder(flag: str, default: str) -> Path:
            value = _flag(argv, flag)
            path = Path(value) if value else base / default
            return path if path.is_absolute() else self.comfyui_path / path  # type: ignore[operator]

        input_dir, output_dir = (
            folder("--input-directory", "input"),
            folder("--output-directory", "output"),
        )
        if await trio.Path(output_dir).is_dir():
            self.input_dir, self.output_dir = input_dir, output_dir
            self.temp_dir = folder("--temp-directory", "temp") / "temp"

    # ------------------------------------------------------------------ InstanceTarget

    def _require_client(self) -> ComfyClient:
        if self.client is None:
            raise RuntimeError(f"instance {self.name} is not connected")
        return self.client

    async def upload_image(self, filename: str, data: bytes) -> str:
        """Put an input image where this server's LoadImage finds it; return its name."""
        if self.input_dir is not None:
            await trio.Path(self.input_dir).mkdir(parents=True, exist_ok=True)
            await trio.Path(self.input_dir / filename).write_bytes(data)
            return filename
        return await self._require_client().upload_image(filename, data)

    async def list_models(self, folder: str) -> list[str]:
        """The model files this server sees in ``folder``."""
        return await self._require_client().list_models(folder)

    # ------------------------------------------------------------------ outputs

    async def output_node_classes(self) -> frozenset[str]:
        """The node classes this server marks as output nodes (asked once)."""
        if self._output_classes is None:
            info = await self._require_client().object_info()
            self._output_classes = frozenset(
                name
                for name, spec in info.items()
                if isinstance(spec, dict) and spec.get("output_node")
            )
        return self._output_classes

    def local_path(self, ref: OutputRef) -> Path | None:
        """Where an output file is on this machine, if the server's folders are here."""
        if ref.type == "output" and self.output_dir is not None:
            root = self.output_dir
        elif ref.type == "temp" and self.temp_dir is not None:
            root = self.temp_dir
        elif ref.type == "input" and self.input_dir is not None:
            root = self.input_dir
        else:
            return None
        return root / ref.subfolder / ref.filename if ref.subfolder else root / ref.filename
