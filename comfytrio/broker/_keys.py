"""Where the broker keeps what in Redis: one function per key, all under one prefix."""

from __future__ import annotations

import attrs

__all__ = ["GROUP", "TERMINAL", "Keys"]

GROUP = "workers"
"""The consumer group every worker of a pool reads the pool's stream through."""

TERMINAL = frozenset({"succeeded", "canceled", "failed", "expired"})
"""The statuses a job never leaves."""


@attrs.frozen
class Keys:
    """The key names under ``prefix`` (``comfytrio`` by default)."""

    prefix: str
    """What every key starts with (``<prefix>:...``)."""

    def jobs(self, pool: str) -> str:
        """The stream of a pool's jobs (entries hold ``job``: the job id)."""
        return f"{self.prefix}:jobs:{pool}"

    def job(self, job_id: str) -> str:
        """A job's hash."""
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        """A job's event stream (``kind`` and ``data``)."""
        return f"{self.prefix}:events:{job_id}"

    def idem(self, key: str) -> str:
        """An idempotency key (its value: the job id)."""
        return f"{self.prefix}:idem:{key}"

    @property
    def index(self) -> str:
        """The sorted set of every job id by creation time."""
        return f"{self.prefix}:index"

    def dead(self, pool: str) -> str:
        """A pool's dead-letter stream."""
        return f"{self.prefix}:dead:{pool}"

    @property
    def control(self) -> str:
        """The control stream (cancel requests) every worker follows."""
        return f"{self.prefix}:control"

    def worker(self, name: str) -> str:
        """A worker's registry hash (expires unless its heartbeat renews it)."""
        return f"{self.prefix}:worker:{name}"

    @property
    def worker_pattern(self) -> str:
        """The pattern of every worker's registry hash."""
        return f"{self.prefix}:worker:*"
