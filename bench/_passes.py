"""The measuring passes shared by the trio runners (comfytrio and the minimal client).

Kept apart from ``_workload.py``, which the seed runner imports inside its own venv (no trio).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import trio
from _workload import JobRecord, RunnerResult, maxrss_kib

OneJob = Callable[[str, int], Awaitable[JobRecord]]
"""Runs job ``index`` of pass ``phase`` and records it."""


async def run_passes(
    library: str, one: OneJob, *, warmup: int, latency_jobs: int, jobs: int, rss_start: int
) -> RunnerResult:
    """Warm-up jobs, then ``latency_jobs`` one at a time, then ``jobs`` all at once (timed:
    makespan and CPU of this process)."""
    warm = [await one("warm", i) for i in range(warmup)]
    sequential = [await one("seq", i) for i in range(latency_jobs)]
    rss_before = maxrss_kib()
    concurrent: list[JobRecord | None] = [None] * jobs

    async def store(index: int) -> None:
        concurrent[index] = await one("conc", index)

    cpu0, t0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(jobs):
            nursery.start_soon(store, i)
    makespan, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return RunnerResult(
        library=library,
        warmup=warm,
        sequential=sequential,
        concurrent=[r for r in concurrent if r is not None],
        makespan_s=makespan,
        cpu_s=cpu,
        rss_start_kib=rss_start,
        rss_before_kib=rss_before,
        rss_peak_kib=maxrss_kib(),
    )
