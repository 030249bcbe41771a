"""Splitting work into shards, and the one queue every instance pulls shards from.

Every job's shards go to the back of one FIFO queue. Each healthy instance runs a worker that
keeps up to ``depth`` of our prompts inside its ComfyUI (one running, the next already queued
there, so the GPU never waits for a round trip to us) and takes the next shard the moment a
slot frees. An instance that finishes early simply takes more; an instance that is not ready
takes none. The scheduler knows nothing of workflows: it runs a callable per shard.

Jobs are planned just in time: a job is admitted (``admit``), first come first served, once
fewer than ``plan_ahead`` shards are queued or being planned (by default one more prompt for
every slot of every instance). Until then it waits holding only what its caller passed, so
10,000 waiting jobs cost 10,000 parked calls, not 10,000 plans, uploads and shard records.
A job still planning after ``slow_planning`` seconds (waiting on a LoRA that trickles in, say)
stops counting, so the jobs behind it that need no download are planned and keep the GPUs
busy meanwhile.
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs
import trio

from ._errors import ComfyAPIError, ServerError

__all__ = [
    "ApiStatistics",
    "InstanceStatistics",
    "JobStatistics",
    "Scheduler",
    "ShardTask",
    "distribute",
]

logger = logging.getLogger("comfytrio.scheduler")

_LOOK_AHEAD = 32
"""How far into the queue a worker looks for a shard that was not lost on it before."""


def distribute(total: int, gpu_count: int) -> list[int]:
    """Split ``total`` as evenly as possible over ``gpu_count`` slots, the larger shares first.

    >>> distribute(4, 3)
    [2, 1, 1]
    >>> distribute(6, 3)
    [2, 2, 2]
    >>> distribute(1, 3)
    [1, 0, 0]

    Raises ``ValueError`` when ``gpu_count`` < 1 or ``total`` < 0.
    """
    if gpu_count < 1:
        raise ValueError(f"gpu_count must be at least 1, got {gpu_count}")
    if total < 0:
        raise ValueError(f"total must not be negative, got {total}")
    base, remainder = divmod(total, gpu_count)
    return [base + (1 if i < remainder else 0) for i in range(gpu_count)]


class _Worker(Protocol):
    """What the scheduler needs of an instance."""

    name: str

    @property
    def state(self) -> str:
        """Its ``InstanceState`` (shown in statistics)."""

    @property
    def healthy(self) -> bool:
        """Whether it may take work now."""

    async def wait_healthy(self) -> None:
        """Block until ``healthy`` (return at once if it is)."""


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
class ShardTask:
    """One shard, from the queue to its end."""

    job_id: str
    """Its job."""
    index: int
    """Its index in the job's split."""
    payload: Any
    """What the runner needs (the shard's plan)."""
    prompt_id: str = attrs.field(factory=lambda: str(uuid.uuid4()))
    """Chosen before it is sent, so it can be deleted even mid-submit."""
    enqueued_at: float = attrs.field(factory=trio.current_time)
    """When it entered the queue (``trio.current_time()``)."""
    started_at: float | None = None
    """When an instance took it."""
    finished_at: float | None = None
    """When it ended."""
    instance: str | None = None
    """The instance that took it."""
    outcome: Any = None
    """What the runner returned, or the ComfyAPIError it raised."""
    failed: bool = False
    """True when it failed or was cancelled."""
    cancelled: bool = False
    """True once its job was cancelled."""
    ended: bool = False
    """True once it ended, however (done, failed or cancelled; not while it is retried)."""
    attempts: int = 1
    """How many times it was sent (a lost server or vanished prompt sends it again)."""
    previous_instances: tuple[str, ...] = ()
    """Where earlier attempts were lost."""
    _scope: trio.CancelScope | None = None


@attrs.define(eq=False)
class _Counters:
    in_flight: int = 0
    busy_since: float | None = None
    busy_time: float = 0.0
    done: int = 0
    failed: int = 0
    retried: int = 0


@attrs.define(eq=False)
class _Job:
    job_id: str
    queued_at: float
    tasks: Sequence[ShardTask] = ()
    remaining: int = 0
    """Its shards that have not ended."""
    planning: bool = False
    """Admitted and being planned: counted in ``Scheduler._planning`` until submitted,
    abandoned, or found slow (whichever comes first uncounts it, once)."""
    slow_timer: trio.CancelScope | None = None
    """The scope of the task that uncounts it once its planning is slow."""
    done: trio.Event | None = None
    """Made when it is submitted (a job waiting to be planned holds as little as it can);
    set when its last shard ended."""
    started_at: float | None = None
    finished_at: float | None = None

    def statistics(self) -> JobStatistics:
        return JobStatistics(
            self.job_id,
            len(self.tasks),
            sum(1 for t in self.tasks if t.ended and not t.failed),
            sum(1 for t in self.tasks if t.failed),
            self.queued_at,
            self.started_at,
            self.finished_at,
        )


Runner = Callable[[Any, ShardTask], Awaitable[Any]]
"""Runs one shard on one instance; returns its outputs or raises ComfyAPIError."""


class Scheduler:
    """One FIFO queue of shards; one worker per instance pulls from it.

    ``plan_ahead``: how many shards may be queued or being planned before the next job waits
    to be admitted (None: ``depth`` x the number of workers, so every instance could take one
    more prompt before planning has to catch up).
    ``slow_planning``: seconds after which a job still being planned stops counting (its turn
    goes to the next waiting job, so one slow download does not idle the GPUs); None: never.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        depth: int = 2,
        max_attempts: int = 3,
        keep_finished: int = 100,
        plan_ahead: int | None = None,
        slow_planning: float | None = 2.0,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if plan_ahead is not None and plan_ahead < 1:
            raise ValueError(f"plan_ahead must be at least 1, got {plan_ahead}")
        if slow_planning is not None and not slow_planning > 0:
            raise ValueError(f"slow_planning must be positive seconds, got {slow_planning}")
        self._runner = runner
        self.slow_planning = slow_planning
        """Seconds of planning after which a job stops holding back the next (None: never)."""
        self.depth = depth
        self.max_attempts = max_attempts
        self._plan_ahead = plan_ahead
        self._closed = False
        self._admission = trio.lowlevel.ParkingLot()  # jobs waiting to be planned, in order
        self._planning = 0  # jobs admitted, not submitted yet, and not found slow
        self._queue: collections.deque[ShardTask] = collections.deque()
        self._idle_lot = trio.lowlevel.ParkingLot()  # workers with no prompt in flight
        self._busy_lot = trio.lowlevel.ParkingLot()  # workers with a free second slot
        self._reserved = 0  # idle workers woken for new shards that have not taken yet
        self._queued_lot = trio.lowlevel.ParkingLot()  # wait_queued: until a shard waits
        self._counters: dict[str, _Counters] = {}
        self._workers: dict[str, _Worker] = {}
        self._jobs: dict[str, _Job] = {}
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

    async def admit(self, job_id: str) -> None:
        """Register a job and wait its turn (first come first served) to be planned: until
        fewer than ``plan_ahead`` shards are queued or being planned. Then plan it and
        ``submit`` its shards, or ``abandon`` it if planning fails.

        Raises ``ComfyAPIError`` when the scheduler is closed (before or while waiting).
        Cancelled while waiting, the job is forgotten.
        """
        if self._closed:
            raise ComfyAPIError("the ComfyAPI was closed")
        job = self._jobs[job_id] = _Job(job_id, trio.current_time())
        if self._admission or len(self._queue) + self._planning >= self.plan_ahead:
            try:
                await self._admission.park()  # _admit() counts us in _planning as it wakes us
            except BaseException:
                del self._jobs[job_id]
                raise
        else:
            self._planning += 1
        job.planning = True
        if self._closed:
            self.abandon(job_id)
            raise ComfyAPIError("the ComfyAPI was closed")
        if self.slow_planning is not None:
            # The caller plans in its own task once we return: a task of trio's own times
            # it, so no task of ours has to poll (it is cancelled when the job is submitted
            # or abandoned, and with the run).
            job.slow_timer = trio.CancelScope()
            trio.lowlevel.spawn_system_task(
                self._time_planning,
                job,
                job.slow_timer,
                self.slow_planning,
                name=f"comfytrio planning timer {job_id}",
            )

    async def _time_planning(self, job: _Job, scope: trio.CancelScope, seconds: float) -> None:
        """After ``seconds`` of planning, ``job`` stops counting in ``_planning``."""
        with scope:
            await trio.sleep(seconds)
            if job.planning and self._jobs.get(job.job_id) is job:
                logger.info(
                    "job %s: still planning after %g s; planning the next job meanwhile",
                    job.job_id,
                    seconds,
                )
                self._uncount(job)
                self._admit()

    def _uncount(self, job: _Job) -> None:
        """``job`` no longer counts in ``_planning`` (submitted, abandoned or slow): the one
        decrement that matches the increment that admitted it."""
        if job.slow_timer is not None:
            job.slow_timer.cancel()
            job.slow_timer = None
        if job.planning:
            job.planning = False
            self._planning -= 1

    def abandon(self, job_id: str) -> None:
        """An admitted job will not be submitted (its planning failed): forget it and let
        the next one in."""
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self._uncount(job)
        self._admit()

    def _admit(self) -> None:
        """Wake waiting jobs, in order, while the queue and the jobs being planned are short
        of ``plan_ahead``."""
        while self._admission and len(self._queue) + self._planning < self.plan_ahead:
            self._admission.unpark()
            self._planning += 1

    def submit(self, job_id: str, tasks: list[ShardTask]) -> None:
        """Queue a job's shards behind every shard already waiting (an admitted job, or a
        new one: then it skips admission)."""
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _Job(job_id, trio.current_time())
        self._uncount(job)
        job.tasks = tasks
        job.remaining = len(tasks)
        job.done = trio.Event()
        if not tasks:
            job.done.set()
        if self._closed:  # planned while the api closed: nothing will take its shards
            for task in tasks:
                task.outcome, task.failed = ComfyAPIError("the ComfyAPI was closed"), True
                self._end(task)
            return
        self._queue.extend(tasks)
        self._wake(len(tasks))
        self._admit()

    async def wait(self, job_id: str) -> list[ShardTask]:
        """Until every shard of the job ended; return them in index order.

        If the caller is cancelled, the job's queued shards are dropped and its running ones
        cancelled (their prompts deleted or interrupted on the servers) before the
        cancellation goes on.
        """
        job = self._jobs[job_id]
        done = job.done
        if done is None:
            raise RuntimeError(f"job {job_id} was not submitted")
        try:
            await done.wait()
        except BaseException:
            self.cancel(job_id)
            with trio.CancelScope(shield=True):
                await done.wait()
            raise
        finally:
            self._forget(job)
        return sorted(job.tasks, key=lambda t: t.index)

    def _end(self, task: ShardTask) -> None:
        """``task`` ended (done, failed or cancelled); its job is done with its last one."""
        task.ended = True
        job = self._jobs.get(task.job_id)
        if job is not None:
            job.remaining -= 1
            if job.remaining == 0 and job.done is not None:
                job.done.set()

    def cancel(self, job_id: str) -> None:
        """Drop the job's queued shards and cancel its running ones."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        mine = {id(t) for t in job.tasks}
        self._queue = collections.deque(t for t in self._queue if id(t) not in mine)
        for task in job.tasks:
            task.cancelled = True
            if task._scope is not None:
                task._scope.cancel()
            elif not task.ended:
                task.failed = True
                self._end(task)
        self._admit()

    def _forget(self, job: _Job) -> None:
        if self._jobs.pop(job.job_id, None) is not None:
            job.finished_at = trio.current_time()
            self._finished.append(job.statistics())

    # ------------------------------------------------------------------ workers

    def wake(self) -> None:
        """Tell every parked worker to look again."""
        self._reserved += len(self._idle_lot.unpark_all())
        self._busy_lot.unpark_all()

    def _wake(self, count: int) -> None:
        """Wake workers for ``count`` new shards: idle ones first, so the shards of one job
        spread over idle GPUs instead of queueing twice on one; busy ones for the rest."""
        self._queued_lot.unpark_all()
        woken = len(self._idle_lot.unpark(count=count))
        self._reserved += woken
        if count > woken:
            self._busy_lot.unpark(count=count - woken)

    async def run_worker(self, instance: _Worker) -> None:
        """Feed ``instance`` from the queue until cancelled, ``depth`` prompts at a time."""
        self._workers[instance.name] = instance
        counters = self._counters.setdefault(instance.name, _Counters())
        slots = trio.Semaphore(self.depth)
        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()
                task = await self._take(instance, counters)
                counters.in_flight += 1
                if counters.busy_since is None:
                    counters.busy_since = trio.current_time()
                nursery.start_soon(self._run, instance, task, slots, counters)

    async def _take(self, instance: _Worker, counters: _Counters) -> ShardTask:
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
                    self._admit()
                    return task
                self._wake(1)  # what waits was lost here: another instance takes it
            if idle:
                await self._idle_lot.park()
                self._reserved -= 1
            else:
                await self._busy_lot.park()

    def _pop_for(self, instance: _Worker) -> ShardTask | None:
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
        self, instance: _Worker, task: ShardTask, slots: trio.Semaphore, counters: _Counters
    ) -> None:
        if task.cancelled:  # its job was cancelled between the queue and here
            self._release(slots, counters)
            return
        self._running += 1
        now = trio.current_time()
        task.started_at, task.instance = now, instance.name
        job = self._jobs.get(task.job_id)
        if job is not None and job.started_at is None:
            job.started_at = now
        try:
            with trio.CancelScope() as scope:
                task._scope = scope
                try:
                    task.outcome, task.failed = await self._runner(instance, task), False
                except ComfyAPIError as exc:
                    task.outcome, task.failed = exc, True
                except Exception as exc:  # a bug: it ends this shard, never the api
                    logger.exception(
                        "job %s: shard %d on %s: unexpected error",
                        task.job_id,
                        task.index,
                        instance.name,
                    )
                    error = ComfyAPIError(f"shard {task.index} on {instance.name}: {exc!r}")
                    error.__cause__ = exc
                    task.outcome, task.failed = error, True
            if scope.cancelled_caught:  # its job was cancelled, or the api closed
                why = "the ComfyAPI was closed" if self._closed else "its job was cancelled"
                task.outcome, task.failed = ComfyAPIError(why), True
        finally:
            task._scope = None
            task.finished_at = trio.current_time()
            if task.failed:
                counters.failed += 1
            else:
                counters.done += 1
            if self._should_retry(task):
                counters.retried += 1
                self._requeue(task)
            else:
                self._end(task)
            self._release(slots, counters)
            self._running -= 1
            if self._closed and not self._running:
                self._drained.set()

    def _release(self, slots: trio.Semaphore, counters: _Counters) -> None:
        counters.in_flight -= 1
        if counters.in_flight == 0:
            if counters.busy_since is not None:
                counters.busy_time += trio.current_time() - counters.busy_since
                counters.busy_since = None
            self._busy_lot.unpark_all()  # a parked worker may be idle now: let it look again
        slots.release()

    def _should_retry(self, task: ShardTask) -> bool:
        """A shard whose error is retryable (its server went away or sent garbage, its
        prompt vanished) runs again elsewhere: it produced nothing we reported, and its old
        prompt id is never accepted again."""
        return (
            task.failed
            and not task.cancelled
            and not self._closed
            and isinstance(task.outcome, ServerError)
            and task.outcome.retryable
            and task.attempts < self.max_attempts
        )

    def _requeue(self, task: ShardTask) -> None:
        logger.warning(
            "job %s: shard %d lost on %s (%s); running it again",
            task.job_id,
            task.index,
            task.instance,
            task.outcome,
        )
        task.attempts += 1
        task.previous_instances += (task.instance or "",)
        task.prompt_id = str(uuid.uuid4())
        task.instance = task.started_at = task.finished_at = None
        task.outcome, task.failed = None, False
        self._queue.appendleft(task)  # it was first in line once: it goes first again
        self._wake(1)

    def fail_queued(self, error: ComfyAPIError) -> int:
        """End every shard still waiting in the queue with ``error``; return how many."""
        failed = 0
        while self._queue:
            task = self._queue.popleft()
            task.outcome, task.failed = error, True
            self._end(task)
            failed += 1
        self._admit()
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
        be planned too)."""
        self._closed = True
        if not self._running:
            self._drained.set()
        self._queue.clear()
        self._planning += len(self._admission.unpark_all())  # each abandons itself
        for job in list(self._jobs.values()):
            for task in job.tasks:
                if not task.ended:
                    if task._scope is not None:
                        task._scope.cancel()
                    else:
                        task.outcome, task.failed = ComfyAPIError("the ComfyAPI was closed"), True
                        self._end(task)

    # ------------------------------------------------------------------ statistics

    def statistics(self, instances: Iterable[_Worker]) -> ApiStatistics:
        """A frozen snapshot of instances, jobs and the queue."""
        now = trio.current_time()
        rows = []
        for instance in instances:
            c = self._counters.get(instance.name, _Counters())
            busy = c.busy_time + (now - c.busy_since if c.busy_since is not None else 0.0)
            rows.append(
                InstanceStatistics(
                    instance.name,
                    instance.state,
                    c.in_flight,
                    busy,
                    c.done,
                    c.failed,
                    c.retried,
                    getattr(instance, "restarts", 0),
                    getattr(instance, "hangs", 0),
                    getattr(instance, "malformed", 0),
                )
            )
        jobs = tuple(j.statistics() for j in self._jobs.values()) + tuple(self._finished)
        waiting = sum(1 for j in self._jobs.values() if j.done is None)
        return ApiStatistics(tuple(rows), jobs, len(self._queue), waiting)
