"""One ComfyUI server as the orchestrator sees it: maybe a process we own, always a client.

An ``Instance`` is what param-type plugins receive as an ``InstanceTarget``: a local one has
an ``input_dir`` to write into, a remote one takes uploads.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import ssl
from pathlib import Path
from typing import Any

import attrs
import trio

from ._client import ComfyClient, connect_comfy_client
from ._errors import ComfyAPIError
from ._files import atomic_file, output_path, safe_join
from ._process import LaunchSpec, RunningProcess, run_comfyui
from ._rest import wait_server_ready
from ._results import OutputRef

__all__ = ["Instance", "InstanceState"]

logger = logging.getLogger("comfytrio.instance")


class InstanceState(enum.StrEnum):
    """Where an instance is in its life. A ``str``: each member equals its value
    (``InstanceState.READY == "ready"``), so code that compares plain strings keeps working.

    Only ``READY`` takes work, and only while its websocket is up (``Instance.healthy``).
    """

    NEW = "new"
    """Not started (or attached to) yet."""
    STARTING = "starting"
    """Our process is starting, or restarting after it died."""
    CONNECTING = "connecting"
    """A server we did not start, tried (with backoff) until it answers."""
    READY = "ready"
    """It answers: it takes work while its websocket is up."""
    HUNG = "hung"
    """A server we did not start gave no sign of life for ``hang_timeout``: it takes no
    work until it answers again (one of ours is killed and restarted instead)."""
    DOWN = "down"
    """Our process died; it is restarted after a backoff."""
    FAILED = "failed"
    """Given up: our process could not start, or died more than ``max_restarts`` times."""
    STOPPED = "stopped"
    """The api closed (or it stopped being served)."""


class _Started:
    """A task status that calls back: lets a supervisor see each start of a process."""

    def __init__(self, callback: Any) -> None:
        self._callback = callback

    def started(self, value: Any = None) -> None:
        self._callback(value)


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
    _state: InstanceState = attrs.field(default=InstanceState.NEW, alias="state")
    last_error: ComfyAPIError | None = None
    """Why it is not ready, when it could not be started or reached."""
    tried: trio.Event = attrs.Factory(trio.Event)
    """Set once its first start or connection attempt ended, well or not (a server we did
    not start goes on trying in the background after a failed first attempt)."""
    client_options: dict[str, Any] = attrs.field(factory=dict)
    """Keyword arguments for ``connect_comfy_client`` (timeouts)."""
    ssl_context: ssl.SSLContext | None = None
    """Checks an https server's certificate (None: ``default_ssl_context()``)."""
    max_restarts: int = 5
    """How often our process is restarted after it died, before the instance is given up."""
    restart_backoff: float = 1.0
    """Seconds before the first restart; doubled each time (at most 30)."""
    health_interval: float = 5.0
    """Seconds between two health probes."""
    hang_timeout: float = 60.0
    """A server that gave no sign of life (no probe answered, no websocket message) for this
    many seconds is hung."""
    restarts: int = 0
    """How often our process was restarted."""
    hangs: int = 0
    """How often it was found hung."""
    _output_classes: frozenset[str] | None = None
    _changed: trio.lowlevel.ParkingLot = attrs.field(
        factory=trio.lowlevel.ParkingLot, init=False, repr=False
    )

    @property
    def state(self) -> InstanceState:
        """Where it is in its life (``InstanceState``); each change wakes
        ``wait_state_change`` and ``wait_healthy``."""
        return self._state

    @state.setter
    def state(self, value: InstanceState) -> None:
        value = InstanceState(value)
        if value != self._state:
            self._state = value
            self._notify()

    def _notify(self) -> None:
        """Its state or its websocket changed: wake whoever waits on it."""
        self._changed.unpark_all()

    async def wait_state_change(self) -> None:
        """Block until its state changes, or its websocket goes up or down."""
        await self._changed.park()

    async def wait_healthy(self) -> None:
        """Block until it is ``healthy`` (return at once if it is)."""
        while not self.healthy:
            await self._changed.park()

    @property
    def healthy(self) -> bool:
        """Ready, and its websocket is up: it may take work."""
        return (
            self._state is InstanceState.READY and self.client is not None and self.client.connected
        )

    @property
    def malformed(self) -> int:
        """Messages and answers of this server that ComfyUI never sends."""
        return self.client.statistics().malformed if self.client is not None else 0

    @property
    def owned(self) -> bool:
        """True when we started the process."""
        return self.launch is not None

    @property
    def is_local(self) -> bool:
        """True when its input and output folders are on this machine."""
        return self.input_dir is not None and self.output_dir is not None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start (or attach to) the server, connect the client, report ready, then watch its
        health until cancelled: a process of ours that exits is restarted with backoff, a
        server that stops answering is treated as crashed."""
        self.state = InstanceState.STARTING if self.owned else InstanceState.CONNECTING
        try:
            async with trio.open_nursery() as nursery:
                if self.launch is not None:
                    self.process = await nursery.start(self._supervise, self.launch)
                    dirs = self.launch.dirs
                    self.input_dir, self.output_dir = dirs.input, dirs.output
                    self.temp_dir = dirs.temp / "temp"
                    self.client = await self._connect_client(nursery)
                else:
                    await self._attach(nursery)
                try:  # asked now, so the first prompt does not wait for it
                    await self.output_node_classes()
                except ComfyAPIError as exc:
                    logger.warning(
                        "ComfyUI %s: /object_info failed (%s); will ask again", self.name, exc
                    )
                self.state = InstanceState.READY
                self.tried.set()
                task_status.started()
                await self._watch_health()
        finally:
            self.tried.set()
            if self.state not in (InstanceState.DOWN, InstanceState.FAILED):
                self.state = InstanceState.STOPPED
            if self.client is not None:
                with trio.CancelScope(shield=True):
                    await self.client.aclose()

    async def _connect_client(self, nursery: trio.Nursery) -> ComfyClient:
        client = await connect_comfy_client(
            nursery,
            self.url,
            name=self.name,
            ssl_context=self.ssl_context,
            **self.client_options,
        )
        client.add_connection_listener(self._notify)  # a reconnect may make it healthy
        return client

    async def _attach(self, nursery: trio.Nursery) -> None:
        """Connect to a server we did not start, trying until it answers (with backoff, at
        most 30 s apart): a server that is not up yet joins when it is."""
        backoff = 1.0
        reported: str | None = None
        while True:
            try:
                stats = await wait_server_ready(
                    self.url, timeout=min(self.ready_timeout, 2.0), ssl_context=self.ssl_context
                )
                await self._find_local_dirs(stats)
                self.client = await self._connect_client(nursery)
                if reported is not None:
                    logger.warning("ComfyUI %s answers now", self.name)
                return
            except ComfyAPIError as exc:
                self.last_error = exc
                self.tried.set()
                if reported != str(exc):
                    logger.warning(
                        "ComfyUI %s cannot be reached yet (%s); trying again in the background",
                        self.name,
                        exc,
                    )
                reported = str(exc)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _supervise(
        self, spec: LaunchSpec, *, task_status: trio.TaskStatus[RunningProcess]
    ) -> None:
        """Run our process; restart it with backoff when it exits, at most
        ``max_restarts`` times. The first start's failure is raised to the caller."""
        first = True
        backoff = self.restart_backoff
        while True:

            def on_started(process: RunningProcess, first: bool = first) -> None:
                self.process = process
                if first:
                    task_status.started(process)
                else:
                    self.state = InstanceState.READY
                    logger.warning("ComfyUI %s restarted (pid %d)", self.name, process.pid)

            try:
                code = await run_comfyui(spec, task_status=_Started(on_started))
                why = f"its process exited with code {code}"
            except ComfyAPIError as exc:
                if first:
                    raise
                why = f"its restart failed: {exc}"
            first = False
            self.state = InstanceState.DOWN
            logger.error("ComfyUI %s is down: %s", self.name, why)
            if self.client is not None:
                self.client.mark_lost(why)
            if self.restarts >= self.max_restarts:
                self.state = InstanceState.FAILED
                logger.error("ComfyUI %s: giving up after %d restart(s)", self.name, self.restarts)
                return
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            self.restarts += 1
            self.state = InstanceState.STARTING

    async def _watch_health(self) -> None:
        """Watch for signs of life: a ``/system_stats`` probe that answers, or any message
        on its websocket (a GPU busy for minutes still sends progress). A server is hung
        only when it gave neither for ``hang_timeout`` seconds. Ours is then killed (and
        restarted by ``_supervise``); a remote one takes no work until it answers again.

        A failed probe is tried again at once on a new connection: the usual failure is a
        kept-alive connection that the server (or a proxy) closed as we used it, and that
        says nothing about the server."""
        client = self.client
        assert client is not None
        last_answer = trio.current_time()
        while True:
            await trio.sleep(self.health_interval)
            # Probing stops when the server has been silent for hang_timeout, not later, so
            # a hung server is found in hang_timeout whatever the probe interval.
            silent_until = max(last_answer, client.last_message_at) + self.hang_timeout
            failure = await self._probe(client, max(silent_until, trio.current_time() + 1.0))
            now = trio.current_time()
            if failure is None:
                last_answer = now
                if self.state is InstanceState.HUNG:
                    logger.warning("ComfyUI %s answers again", self.name)
                    await client.cancel_abandoned()
                    self.state = InstanceState.READY
                continue
            silent = now - max(last_answer, client.last_message_at)
            if silent < self.hang_timeout:
                logger.info(
                    "ComfyUI %s: health probe failed (%s); last sign of life %.1f s ago",
                    self.name,
                    failure,
                    silent,
                )
                continue
            if self.state is not InstanceState.READY:
                continue
            self.hangs += 1
            why = f"it gave no sign of life for {silent:.0f} s (last probe: {failure})"
            if self.process is not None and self.process.process.returncode is None:
                logger.error("ComfyUI %s: %s: killing it", self.name, why)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            else:
                logger.error("ComfyUI %s: %s: no work goes to it until it answers", self.name, why)
                self.state = InstanceState.HUNG
                client.mark_lost(why)

    async def _probe(self, client: ComfyClient, deadline: float) -> str | None:
        """``GET /system_stats`` by ``deadline``, once more on a new connection if the first
        try failed; None when it answered, else what went wrong."""
        failure = "no answer"
        with trio.move_on_at(deadline):
            try:
                await client.system_stats()
                return None
            except ComfyAPIError as exc:
                failure = str(exc)
            try:
                await client.system_stats(new_connection=True)
                return None
            except ComfyAPIError as exc:
                failure = f"{failure}; then on a new connection: {exc}"
        return failure

    async def _find_local_dirs(self, stats: dict[str, Any]) -> None:
        """For an attached server on this machine, find its folders from its command line."""
        if self.comfyui_path is None:
            return
        install = self.comfyui_path
        argv = [str(a) for a in stats.get("system", {}).get("argv") or []]
        base = Path(_flag(argv, "--base-directory") or install)
        if not base.is_absolute():
            base = install / base

        def folder(flag: str, default: str) -> Path:
            value = _flag(argv, flag)
            path = Path(value) if value else base / default
            return path if path.is_absolute() else install / path

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
        if self.input_dir is not None:  # written atomically: ComfyUI never sees half of it
            async with atomic_file(safe_join(self.input_dir, filename)) as out:
                await out.write(data)
                await out.commit()
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
        """Where an output file is on this machine, if the server's folders are here.

        Raises ``UnsafeNameError`` when the server's names would leave its folder."""
        if ref.type == "output" and self.output_dir is not None:
            root = self.output_dir
        elif ref.type == "temp" and self.temp_dir is not None:
            root = self.temp_dir
        elif ref.type == "input" and self.input_dir is not None:
            root = self.input_dir
        else:
            return None
        return output_path(root, ref.subfolder, ref.filename)
