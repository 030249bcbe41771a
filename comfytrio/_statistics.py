"""What ``ComfyAPI.statistics()`` returns: frozen snapshots of the instances, the jobs and the
queue, and the per-instance counters the scheduler keeps for them."""

from __future__ import annotations

import attrs
import trio

from ._shards import Worker

__all__ = ["ApiStatistics", "InstanceStatistics", "JobStatistics"]


@attrs.frozen
class InstanceStatistics:
    """One instance, as the scheduler sees it."""

    name: str
    """The instance."""
    state: str
    """Its ``InstanceState`` (``new``, ``starting``, ``connecting``, ``ready``, ``hung``,
    ``down``, ``failed`` or ``stopped``)."""
    in_flight: int
    """Our prompts inside its ComfyUI now (running or queued there)."""
    busy_time: float
    """Seconds during which it had at least one of our prompts."""
    shards_done: int
    """Shards it finished successfully."""
    shards_failed: int
    """Shard attempts that failed on it (retried ones included)."""
    shards_retried: int
    """Shards lost on it (server gone, prompt vanished) and sent again."""
    restarts: int
    """How often we restarted its process."""
    hangs: int
    """How often it was found not answering."""
    malformed: int = 0
    """Messages and answers it sent that ComfyUI never sends (each ignored, or the end of
    the prompt it belonged to)."""


@attrs.frozen
class JobStatistics:
    """One job, as the scheduler sees it."""

    job_id: str
    """The job."""
    shards: int
    """Its shard count (0 until it is planned)."""
    done: int
    """Shards finished successfully."""
    failed: int
    """Shards failed (or cancelled)."""
    queued_at: float
    """``trio.current_time()`` when its shards were queued."""
    started_at: float | None
    """When its first shard was sent to a server."""
    finished_at: float | None
    """When its last shard ended."""


@attrs.frozen
class ApiStatistics:
    """A snapshot of the whole api: ``ComfyAPI.statistics()``."""

    instances: tuple[InstanceStatistics, ...]
    """Every instance."""
    jobs: tuple[JobStatistics, ...]
    """Jobs running now, then the most recent finished ones."""
    queued_shards: int
    """Shards waiting for a free instance."""
    waiting_jobs: int = 0
    """Jobs not in the queue yet: waiting their turn to be planned, or being planned."""


@attrs.define(eq=False)
class Counters:
    """What the scheduler counts for one instance."""

    in_flight: int = 0
    """Shards it runs now."""
    busy_since: float | None = None
    """Since when it has had at least one (None: idle)."""
    busy_time: float = 0.0
    """Seconds it was busy before ``busy_since``."""
    done: int = 0
    """Shard attempts that succeeded on it."""
    failed: int = 0
    """Shard attempts that failed on it."""
    retried: int = 0
    """Shards lost on it and sent again."""

    def took(self) -> None:
        """It took a shard."""
        self.in_flight += 1
        if self.busy_since is None:
            self.busy_since = trio.current_time()

    def released(self) -> None:
        """A shard it took is over (ended, retried, or dropped before it ran)."""
        self.in_flight -= 1
        if self.in_flight == 0 and self.busy_since is not None:
            self.busy_time += trio.current_time() - self.busy_since
            self.busy_since = None

    def snapshot(self, instance: Worker, now: float) -> InstanceStatistics:
        """``instance`` and these counters, frozen at ``now``."""
        busy = self.busy_time + (now - self.busy_since if self.busy_since is not None else 0.0)
        return InstanceStatistics(
            instance.name,
            instance.state,
            self.in_flight,
            busy,
            self.done,
            self.failed,
            self.retried,
            instance.restarts,
            instance.hangs,
            instance.malformed,
        )
