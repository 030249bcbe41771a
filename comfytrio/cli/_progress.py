"""Live progress of a ``ComfyAPI`` for the command line: each instance's state, running
node and sampler steps, and each job's shards done, drawn with rich (or written as plain
lines).

``follow_progress(api, display)`` runs next to the code that uses the api::

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow_progress, api, LiveDisplay(Console(stderr=True)))
        async with api:
            result = await api.run_workflow(workflow)
        nursery.cancel_scope.cancel()

It reads ``api.statistics()`` (instance states, shards per job) a few times a second and
subscribes to every instance's client (``client.subscribe()``) for node and step events. It
never slows a job down: a subscriber that falls behind loses events, prompts never wait.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TextIO

import attrs
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .. import (
    ApiStatistics,
    ComfyAPI,
    ComfyClient,
    ComfyEvent,
    InstanceState,
    NodeProgress,
    NodeStarted,
    PromptFinished,
    PromptStarted,
)

__all__ = [
    "Display",
    "InstanceProgress",
    "JobProgress",
    "LineDisplay",
    "LiveDisplay",
    "ProgressState",
    "follow_progress",
    "node_labels",
]

logger = logging.getLogger("comfytrio.progress")


def node_labels(workflow: Mapping[str, Any]) -> dict[str, str]:
    """Node id -> what to call it on screen: its title, with its class when they differ."""
    labels: dict[str, str] = {}
    for node_id, node in workflow.items():
        if not isinstance(node, Mapping):
            continue
        class_type = str(node.get("class_type", "?"))
        meta = node.get("_meta")
        title = meta.get("title") if isinstance(meta, Mapping) else None
        if isinstance(title, str) and title and title != class_type:
            labels[str(node_id)] = f"{title} ({class_type})"
        else:
            labels[str(node_id)] = class_type
    return labels


@attrs.define
class InstanceProgress:
    """One instance, as the display shows it."""

    name: str
    """The instance's name (``host:port``)."""
    state: str = InstanceState.NEW
    """The instance's state (an ``InstanceState``: ``new``, ``starting``, ``connecting``,
    ``ready``, ``hung``, ``down``, ``failed`` or ``stopped``)."""
    running: str | None = None
    """The prompt running on it now, if we know."""
    node: str | None = None
    """The node running now (its label)."""
    step: int = 0
    """Steps done of the running node (sampler steps)."""
    steps: int = 0
    """Steps in all of the running node (0: it reports none)."""
    in_flight: int = 0
    """Our prompts inside its ComfyUI (running or queued there)."""
    done: int = 0
    """Shards it finished."""
    failed: int = 0
    """Shards that failed on it."""
    restarts: int = 0
    """How often its process was restarted (or it came back after a hang)."""
    retried: int = 0
    """Shards that failed on it and were sent again."""

    @property
    def label(self) -> str:
        """The state in words: ``running`` while it has our prompts, else its state."""
        if self.state == InstanceState.READY and self.in_flight:
            return "running"
        if self.state == InstanceState.READY:
            return "idle"
        return self.state


@attrs.define
class JobProgress:
    """One job, as the display shows it."""

    job_id: str
    """The job."""
    shards: int
    """Its shard count."""
    done: int = 0
    """Shards finished successfully."""
    failed: int = 0
    """Shards failed."""
    queued_at: float = 0.0
    """``trio.current_time()`` when it was queued."""
    finished_at: float | None = None
    """When its last shard ended."""


class ProgressState:
    """What a display shows, updated from ``api.statistics()`` snapshots and client events.

    Pure bookkeeping: no I/O, no clock (``now`` is passed in), so it is easy to test.
    """

    def __init__(self, names: Iterable[str], labels: Mapping[str, str] | None = None) -> None:
        self.instances: dict[str, InstanceProgress] = {n: InstanceProgress(n) for n in names}
        """Every instance, in the api's order."""
        self.jobs: dict[str, JobProgress] = {}
        """Every job seen, in the order they appeared."""
        self.labels: dict[str, str] = dict(labels or {})
        """Node id -> label (``node_labels(workflow)``)."""
        self.queued_shards = 0
        """Shards waiting for a free instance."""
        self.now = 0.0
        """The time of the last update (``trio.current_time()``)."""

    def _instance(self, name: str) -> InstanceProgress:
        if name not in self.instances:
            self.instances[name] = InstanceProgress(name)
        return self.instances[name]

    def update(self, stats: ApiStatistics, now: float) -> None:
        """Take in a statistics snapshot."""
        self.now = now
        self.queued_shards = stats.queued_shards
        for row in stats.instances:
            view = self._instance(row.name)
            view.state = row.state
            view.in_flight = row.in_flight
            view.done = row.shards_done
            view.failed = row.shards_failed
            # Fault-handling counters; older snapshots lack them.
            view.restarts = int(getattr(row, "restarts", 0)) + int(getattr(row, "hangs", 0))
            view.retried = int(getattr(row, "shards_retried", 0))
            if not row.in_flight:
                view.running, view.node, view.step, view.steps = None, None, 0, 0
        for job in stats.jobs:
            view_job = self.jobs.get(job.job_id)
            if view_job is None:
                view_job = self.jobs[job.job_id] = JobProgress(
                    job.job_id, job.shards, queued_at=job.queued_at
                )
            view_job.shards = job.shards
            view_job.done = job.done
            view_job.failed = job.failed
            view_job.finished_at = job.finished_at

    def handle(self, event: ComfyEvent) -> None:
        """Take in one event of an instance's client."""
        view = self._instance(event.instance)
        if isinstance(event, PromptStarted):
            view.running, view.node, view.step, view.steps = event.prompt_id, None, 0, 0
        elif isinstance(event, NodeStarted):
            view.running = event.prompt_id
            view.node = self.labels.get(event.node_id, event.node_id)
            view.step, view.steps = 0, 0
        elif isinstance(event, NodeProgress):
            view.running = event.prompt_id
            view.node = self.labels.get(event.node_id, event.node_id)
            view.step, view.steps = event.value, event.max
        elif isinstance(event, PromptFinished) and event.prompt_id == view.running:
            view.running, view.node, view.step, view.steps = None, None, 0, 0

    @property
    def all_ready(self) -> bool:
        """True when every instance answered (and none is down)."""
        return bool(self.instances) and all(
            v.state == InstanceState.READY for v in self.instances.values()
        )


class Display(Protocol):
    """Where progress goes: ``LiveDisplay`` (rich, for a terminal) or ``LineDisplay``."""

    def show(self, state: ProgressState) -> None:
        """Show the state now (called a few times a second)."""

    def close(self, state: ProgressState) -> None:
        """Show the final state and release the terminal."""


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"
    )


def render(state: ProgressState) -> RenderableType:
    """The state as a rich table of instances plus one line per job."""
    table = Table(box=None, pad_edge=False, show_edge=False, expand=False)
    table.add_column("instance", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("shards", justify="right", no_wrap=True)
    table.add_column("node", overflow="ellipsis", max_width=40)
    table.add_column("steps", no_wrap=True)
    styles = {
        "running": "green",
        "idle": "cyan",
        InstanceState.STARTING: "yellow",
        InstanceState.CONNECTING: "yellow",
        InstanceState.DOWN: "red",
        InstanceState.HUNG: "red",
        InstanceState.FAILED: "red",
    }
    for view in state.instances.values():
        label = view.label
        shards = Text(str(view.done))
        if view.failed:
            shards.append(f" ({view.failed} failed)", style="red")
        if view.retried:
            shards.append(f" ({view.retried} retried)", style="yellow")
        if view.restarts:
            shards.append(f" ({view.restarts} restarts)", style="yellow")
        steps: RenderableType = Text("")
        if view.steps:
            steps = Table.grid(padding=(0, 1))
            steps.add_row(
                ProgressBar(total=view.steps, completed=view.step, width=20),
                Text(f"{view.step}/{view.steps}"),
            )
        table.add_row(
            view.name,
            Text(label, style=styles.get(label, "")),
            shards,
            view.node or "",
            steps,
        )
    lines: list[RenderableType] = [table]
    for job in state.jobs.values():
        end = job.finished_at if job.finished_at is not None else state.now
        text = Text(f"job {job.job_id}: {job.done}/{job.shards} shard(s) done")
        if job.failed:
            text.append(f", {job.failed} failed", style="red")
        text.append(f" · {_duration(max(0.0, end - job.queued_at))}")
        lines.append(text)
    if state.queued_shards:
        lines.append(Text(f"{state.queued_shards} shard(s) waiting for an instance"))
    return Group(*lines)


class LiveDisplay:
    """A rich live table on ``console`` (redrawn in place; no thread: we refresh it)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        """Where it draws (stderr, so stdout stays for results)."""
        self._live = Live(
            console=console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._started = False

    def show(self, state: ProgressState) -> None:
        """Redraw."""
        if not self._started:
            self._live.start()
            self._started = True
        self._live.update(render(state), refresh=True)

    def close(self, state: ProgressState) -> None:
        """Draw the last state and leave it on screen."""
        self.show(state)
        self._live.stop()


class LineDisplay:
    """Plain lines on ``stream`` when something changes: an instance's state, a new job, a
    shard done. For logs and pipes, where a live table would be noise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        """Where lines go (stderr)."""
        self._states: dict[str, str] = {}
        self._jobs: dict[str, tuple[int, int]] = {}
        self._ready_said = False

    def _say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def show(self, state: ProgressState) -> None:
        """Write what changed since the last call."""
        for view in state.instances.values():
            previous = self._states.get(view.name)
            if view.state != previous:
                self._states[view.name] = view.state
                if view.state not in (InstanceState.NEW, InstanceState.STOPPED):
                    self._say(f"{view.name}: {view.state}")
        if state.all_ready and not self._ready_said:
            self._ready_said = True
            self._say(f"{len(state.instances)} instance(s) ready")
        for job in state.jobs.values():
            counts = (job.done, job.failed)
            if job.job_id not in self._jobs:
                self._say(f"job {job.job_id}: {job.shards} shard(s) running")
                self._jobs[job.job_id] = (0, 0)
            if counts != self._jobs[job.job_id]:
                self._jobs[job.job_id] = counts
                text = f"job {job.job_id}: {job.done}/{job.shards} shard(s) done"
                self._say(text + (f", {job.failed} failed" if job.failed else ""))

    def close(self, state: ProgressState) -> None:
        """Write the last changes."""
        self.show(state)


async def _follow_client(client: ComfyClient, state: ProgressState) -> None:
    async with client.subscribe() as events:
        async for event in events:
            state.handle(event)


async def follow_progress(
    api: ComfyAPI,
    display: Display,
    *,
    workflow: Mapping[str, Any] | None = None,
    interval: float = 0.1,
    task_status: trio.TaskStatus[ProgressState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Show the progress of ``api`` on ``display`` every ``interval`` seconds until cancelled,
    then draw the final state once more.

    Start it before or after entering ``async with api``: instances that are still starting
    show as such, and the client of each instance is followed as soon as it exists (again
    after a restart). ``workflow`` names the nodes (by title) instead of by id.
    """
    state = ProgressState((i.name for i in api.instances), node_labels(workflow or {}))
    followed: list[ComfyClient] = []
    task_status.started(state)
    try:
        async with trio.open_nursery() as nursery:
            while True:
                for instance in api.instances:
                    client = instance.client
                    if client is not None and not any(client is c for c in followed):
                        followed.append(client)
                        nursery.start_soon(_follow_client, client, state)
                state.update(api.statistics(), trio.current_time())
                display.show(state)
                await trio.sleep(interval)
    finally:
        try:
            state.update(api.statistics(), trio.current_time())
        except Exception:  # a half-closed api must not hide the job's own outcome
            logger.debug("last statistics snapshot failed", exc_info=True)
        display.close(state)
