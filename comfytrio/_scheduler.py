"""The one queue every instance pulls shards from.

Every job's shards go to the back of one FIFO queue. Each healthy instance runs a worker that
keeps up to ``depth`` of our prompts inside its ComfyUI (one running, the next already queued
there, so the GPU never waits for a round trip to us) and takes the next shard the moment a
slot frees. An instance that finishes early simply takes more; an instance that is not ready
takes none. The scheduler knows nothing of workflows: it calls a ``ShardRunner`` per shard
and keeps what it returned or raised as the shard's outcome (``_shards.py``).

Jobs are planned just in time: ``async with scheduler.admit(job_id):`` waits the job's turn
while ``plan_ahead`` shards are queued or being planned (``_admission.py``); only jobs
submitted since have a record here.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

import attrs
import trio
from outcome import Error, Outcome, Value, acapture

from ._admission import Admission, Turn, closed_error
from ._errors import ComfyAPIError, ServerError
from ._shards import P, R, ShardRunner, ShardTask, Worker, distribute
from ._statistics import ApiStatistics, Counters, InstanceStatistics, JobStatistics

__all__ = [
    # The package and the hookspecs import these from here.
    "ApiStatistics",
    "InstanceStatistics",
    "JobStatistics",
    "Scheduler",
    "distribute",
]

logger = logging.getLogger("comfytrio.scheduler")

W = TypeVar("W", bound=Worker)

_LOOK_AHEAD = 32
"""How far into the queue a worker looks for a shard that was not lost on it before."""


@attrs.define(eq=False)
class _Job(Generic[P, R]):
    """A submitted job: its shards, and when it started and ended."""

    job_id: str
    queued_at: float
    tasks: Sequence[ShardTask[P, R]] = ()
    remaining: int = 0
    """Its shards that have not ended."""
    done: trio.Event = attrs.Factory(trio.Event)
    """Set when its last shard ended."""
    started_at: float | None = None
    finished_at: float | None = None

    def statistics(self) -> JobStatistics:
        return JobStatistics(
            self.job_id,
            len(self.tasks),
            sum(1 for t in self.tasks if isinstance(t.outcome, Value)),
            sum(1 for t in self.tasks if isinstance(t.outcome, Error)),
            self.queued_at,
            self.started_at,
            self.finished_at,
        )


class Scheduler(Generic[W, P, R]):
    """One FIFO queue of ``ShardTask[P, R]``; one worker per instance ``W`` pulls from it and
    runs each shard with ``runner``.

    ``depth``: shards each instance runs at once. ``max_attempts``: how often a shard lost
    on a server (a retryable ``ServerError``) is sent, in all. ``keep_finished``: finished
    jobs kept for ``statistics``. ``plan_ahead``: how many shards may be queued or being
    planned before the next job waits to be admitted (None: ``depth`` x the number of
    workers, so every instance could take one more prompt before planning has to catch
    up). ``slow_planning``: seconds after which a job still being planned stops counting
    (its turn goes to the next waiting job, so one slow download does not idle the GPUs);
    None: never. ``on_end``: called (in the scheduler's task: it must not block) with each
    attempt that ended, its outcome, and whether the shard runs again (True: the attempt
    was lost, a new one follows; False: the shard ended so, however: done, failed,
    cancelled, or dropped from the queue); an exception it raises is logged.
    """

    def __init__(
        self,
        runner: ShardRunner[W, P, R],
        *,
        depth: int = 2,
        max_attempts: int = 3,
        keep_finished: int = 100,
        plan_ahead: int | None = None,
        slow_planning: float | None = 2.0,
        on_end: Callable[[ShardTask[P, R], Outcome[R], bool], None] | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if plan_ahead is not None and plan_ahead < 1:
            raise ValueError(f"plan_ahead must be at least 1, got {plan_ahead}")
        self._runner = runner
        self._on_end = on_end
        self._admission = Admission(self._room, slow_planning=slow_planning)
        self.depth = depth
        """Shards each instance runs at once."""
        self.max_attempts = max_attempts
        """How often a lost shard is sent, in all."""
        self._plan_ahead = plan_ahead
        self._closed = False
        self._queue: collections.deque[ShardTask[P, R]] = collections.deque()
        self._idle_lot = trio.lowlevel.ParkingLot()  # workers with no prompt in flight
        self._busy_lot = trio.lowlevel.ParkingLot()  # workers with a free second slot
        self._reserved = 0  # idle workers woken for new shards that have not taken yet
        self._queued_lot = trio.lowlevel.ParkingLot()  # wait_queued: until a shard waits
        self._counters: dict[str, Counters] = {}
        self._workers: dict[str, W] = {}
        self._jobs: dict[str, _Job[P, R]] = {}
        self._finished: collections.deque[JobStatistics] = collections.deque(maxlen=keep_finished)
        self._running = 0  # shards being run (or cleaning up) now
        self._drained = trio.Event()  # set once closed and no shard runs

    # ------------------------------------------------------------------ jobs

    @property
    def plan_ahead(self) -> int:
        """Shards that may be queued or being planned before a new job waits to be admitted."""
        if self._plan_ahead is not None:
            return self._plan_ahead
        return self.depth * max(1, len(self._workers))

    def _room(self) -> int:
        """How many shards may be planned now."""
        return self.plan_ahead - len(self._queue)

    @property
    def planning(self) -> int:
        """Jobs admitted and being planned now (those found slow no longer count)."""
        return self._admission.planning

    def admit(self, job_id: str) -> Turn:
        """``async with scheduler.admit(job_id):`` waits the job's turn (first come first
        served) to be planned: until fewer than ``plan_ahead`` shards are queued or being
        planned. Plan the job inside the block, and ``submit`` its shards as its last step.

        Leaving the block gives the turn back; a job that leaves it without submitting (its
        planning failed, it was cancelled) is forgotten. Entering raises ``ComfyAPIError``
        when the scheduler is closed, before or while the job waits.
        """
        return self._admission.turn(job_id)

    def submit(self, job_id: str, tasks: Sequence[ShardTask[P, R]]) -> None:
        """Queue a job's shards behind every shard already waiting (inside its ``admit``
        block, or without one: then it skips its turn)."""
        turn = self._admission.inside(job_id)
        queued_at = turn.asked_at if turn is not None else trio.current_time()
        job = self._jobs[job_id] = _Job(job_id, queued_at, tasks, len(tasks))
        if not tasks:
            job.done.set()
        if self._closed:  # planned while the api closed: nothing will take its shards
            for task in tasks:
                self._end(task, Error(closed_error()))
            return
        self._queue.extend(tasks)
        self._wake(len(tasks))

    async def wait(self, job_id: str) -> list[ShardTask[P, R]]:
        """Until every shard of the submitted job ended; return them in index order, each
        with its ``outcome``.

        If the caller is cancelled, the job's queued shards are dropped and its running ones
        cancelled (their prompts deleted or interrupted on the servers) before the
        cancellation goes on.
        """
        job = self._jobs[job_id]
        done = job.done
        try:
            await done.wait()
        except BaseException:
            self.cancel(job_id)
            with trio.CancelScope(shield=True):
                await done.wait()
            raise
        finally:
            if self._jobs.pop(job_id, None) is not None:
                job.finished_at = trio.current_time()
                self._finished.append(job.statistics())
        return sorted(job.tasks, key=lambda t: t.index)

    def _end(self, task: ShardTask[P, R], result: Outcome[R]) -> None:
        """``task`` ended with ``result``; its job is done with its last one."""
        task.outcome = result
        self._notify(task, result, retrying=False)
        job = self._jobs.get(task.job_id)
        if job is not None:
            job.remaining -= 1
            if job.remaining == 0:
                job.done.set()

    def _notify(self, task: ShardTask[P, R], result: Outcome[R], *, retrying: bool) -> None:
        """Tell ``on_end`` how an attempt of ``task`` ended (before a retry changes it)."""
        if self._on_end is None:
            return
        try:
            self._on_end(task, result, retrying)
        except Exception:
            logger.exception("job %s: shard %d: on_end failed", task.job_id, task.index)

    def cancel(self, job_id: str) -> None:
        """Drop the job's queued shards and cancel its running ones; each ends with a
        ``ComfyAPIError``."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        mine = set(job.tasks)
        self._queue = collections.deque(t for t in self._queue if t not in mine)
        for task in job.tasks:
            task.cancelled = True
            if task.scope is not None:
                task.scope.cancel()
            elif not task.ended:
                self._end(task, Error(ComfyAPIError("its job was cancelled")))
        self._admission.let_in()

    # ------------------------------------------------------------------ workers

    def _wake(self, count: int) -> None:
        """Wake workers for ``count`` new shards: idle ones first, so the shards of one job
        spread over idle GPUs instead of queueing twice on one; busy ones for the rest."""
        self._queued_lot.unpark_all()
        woken = len(self._idle_lot.unpark(count=count))
        self._reserved += woken
        if count > woken:
            self._busy_lot.unpark(count=count - woken)

    async def run_worker(self, instance: W) -> None:
        """Feed ``instance`` from the queue until cancelled, ``depth`` prompts at a time."""
        self._workers[instance.name] = instance
        counters = self._counters.setdefault(instance.name, Counters())
        slots = trio.Semaphore(self.depth)
        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()
                task = await self._take(instance, counters)
                counters.took()
                nursery.start_soon(self._run, instance, task, slots, counters)

    async def _take(self, instance: W, counters: Counters) -> ShardTask[P, R]:
        """The next shard for ``instance``. An idle instance takes any waiting shard; a busy
        one (filling its second slot) only what the idle ones just woken will not take."""
        while True:
            if not instance.healthy:
                if self._queue:
                    self._wake(1)  # hand the wake-up on to a worker that can take it
                await instance.wait_healthy()
                continue
            idle = counters.in_flight == 0
            spare = len(self._queue) - (0 if idle else self._reserved)
            if spare > 0:
                task = self._pop_for(instance)
                if task is not None:
                    self._admission.let_in()
                    return task
                self._wake(1)  # what waits was lost here: another instance takes it
            if idle:
                await self._idle_lot.park()
                self._reserved -= 1
            else:
                await self._busy_lot.park()

    def _pop_for(self, instance: W) -> ShardTask[P, R] | None:
        """The first queued shard for ``instance``: one that was lost on it before goes to
        another healthy instance if there is one (the first ``_LOOK_AHEAD`` are looked at)."""
        if instance.name not in self._queue[0].previous_instances:  # the usual case
            return self._queue.popleft()
        others = any(w.healthy for name, w in self._workers.items() if name != instance.name)
        for i, task in enumerate(self._queue):
            if i >= _LOOK_AHEAD:
                break
            if not others or instance.name not in task.previous_instances:
                del self._queue[i]
                return task
        return None

    async def _run(
        self, instance: W, task: ShardTask[P, R], slots: trio.Semaphore, counters: Counters
    ) -> None:
        if task.ended:  # its job was cancelled, or the api closed, since it was taken
            self._release(slots, counters)
            return
        self._running += 1
        task.started_at, task.instance = trio.current_time(), instance.name
        job = self._jobs.get(task.job_id)
        if job is not None and job.started_at is None:
            job.started_at = task.started_at
        # What it ends with if this task itself is cancelled: the run is ending.
        result: Outcome[R] = Error(closed_error())
        try:
            result = await self._attempt(instance, task)
        finally:
            task.finished_at = trio.current_time()
            if isinstance(result, Error):
                counters.failed += 1
            else:
                counters.done += 1
            if (lost := self._lost(task, result)) is not None:
                counters.retried += 1
                self._notify(task, result, retrying=True)
                self._requeue(task, lost)
            else:
                self._end(task, result)
            self._release(slots, counters)
            self._running -= 1
            if self._closed and not self._running:
                self._drained.set()

    async def _attempt(self, instance: W, task: ShardTask[P, R]) -> Outcome[R]:
        """Run ``task`` once on ``instance``: what the runner returned, or the
        ``ComfyAPIError`` it raised, or why it was cancelled. Exceptions that are not
        ``ComfyAPIError`` become one (a bug in the runner ends its shard, never the api)."""
        with trio.CancelScope() as scope:
            task.scope = scope
            try:
                result = await acapture(self._runner, instance, task)
            finally:
                task.scope = None
            if isinstance(result, Value) or isinstance(result.error, ComfyAPIError):
                return result
            if not isinstance(result.error, Exception):
                result.unwrap()  # Cancelled, KeyboardInterrupt: not the shard's to keep
            logger.error(
                "job %s: shard %d on %s: unexpected error",
                task.job_id,
                task.index,
                instance.name,
                exc_info=result.error,
            )
            error = ComfyAPIError(f"shard {task.index} on {instance.name}: {result.error!r}")
            error.__cause__ = result.error
            return Error(error)
        # The scope caught its own cancellation: its job was cancelled, or the api closed.
        return Error(closed_error() if self._closed else ComfyAPIError("its job was cancelled"))

    def _release(self, slots: trio.Semaphore, counters: Counters) -> None:
        counters.released()
        if counters.in_flight == 0:
            self._busy_lot.unpark_all()  # a parked worker may be idle now: let it look again
        slots.release()

    def _lost(self, task: ShardTask[P, R], result: Outcome[R]) -> ServerError | None:
        """The retryable error ``task`` ended with, when it is to run again elsewhere (its
        server went away or sent garbage, its prompt vanished): it produced nothing we
        reported, and its old prompt id is never accepted again."""
        if not isinstance(result, Error) or not isinstance(result.error, ServerError):
            return None
        again = not task.cancelled and not self._closed and task.attempts < self.max_attempts
        return result.error if result.error.retryable and again else None

    def _requeue(self, task: ShardTask[P, R], error: ServerError) -> None:
        logger.warning(
            "job %s: shard %d lost on %s (%s); running it again",
            task.job_id,
            task.index,
            task.instance,
            error,
        )
        task.retry()
        self._queue.appendleft(task)  # it was first in line once: it goes first again
        self._wake(1)

    # ------------------------------------------------------------------ the api's end

    def fail_queued(self, error: ComfyAPIError) -> int:
        """End every shard still waiting in the queue with ``error``; return how many."""
        failed = 0
        while self._queue:
            self._end(self._queue.popleft(), Error(error))
            failed += 1
        self._admission.let_in()
        return failed

    async def wait_queued(self) -> None:
        """Block until a shard waits in the queue (return at once if one does)."""
        while not self._queue:
            await self._queued_lot.park()

    async def wait_drained(self) -> None:
        """After ``close``: until every shard that was running has ended (its prompt removed
        from its server: so the clients must stay open until then)."""
        await self._drained.wait()

    def close(self) -> None:
        """The api is closing: every job still waiting ends with an error (those waiting to
        be planned too), and the running shards are cancelled."""
        self._closed = True
        if not self._running:
            self._drained.set()
        self._queue.clear()
        self._admission.close()
        for job in list(self._jobs.values()):
            for task in job.tasks:
                if task.scope is not None:
                    task.scope.cancel()
                elif not task.ended:
                    self._end(task, Error(closed_error()))

    def statistics(self, instances: Iterable[W]) -> ApiStatistics:
        """A frozen snapshot of instances, jobs and the queue."""
        now = trio.current_time()
        rows = (self._counters.get(i.name, Counters()).snapshot(i, now) for i in instances)
        waiting = [t for t in self._admission.turns() if t.name not in self._jobs]
        jobs = [j.statistics() for j in self._jobs.values()]
        jobs += (JobStatistics(t.name, 0, 0, 0, t.asked_at, None, None) for t in waiting)
        jobs += self._finished
        return ApiStatistics(tuple(rows), tuple(jobs), len(self._queue), len(waiting))
