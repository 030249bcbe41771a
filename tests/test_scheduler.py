"""Many jobs at once: one queue of shards that every healthy instance pulls from.

The first tests drive a ``Scheduler`` directly: boxes stand for instances, and a workshop
runs each shard for as many seconds as it carries. Every test runs on trio's ``MockClock``
(pytest-trio's ``autojump_clock``): time passes only while every task waits, so a shard of
ten seconds costs none, and ``wait_all_tasks_blocked()`` lets everything that can happen now
happen. The last tests run the same queue through ``ComfyAPI`` against fake servers, on the
same clock.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import pytest
import trio
import trio.testing
from outcome import Error, Outcome, Value
from test_fault_tolerance import JOB, params

from comfytrio import (
    ApiStatistics,
    ComfyAPI,
    ComfyAPIError,
    ComfyUITimeoutError,
    InstanceStatistics,
    JobStatistics,
    ModelNotFoundError,
    ModelRef,
    ServerLostError,
)
from comfytrio._scheduler import Scheduler
from comfytrio._shards import ShardTask
from comfytrio.testing import FakeComfyUI
from comfytrio.testing.pytest_plugin import FakeFactory

Shard = ShardTask[float, str]
"""A shard that takes as many seconds as it carries; its runner returns where it ran."""


@attrs.define(eq=False)
class Box:
    """An instance, as far as the scheduler cares."""

    name: str
    healthy: bool = True
    state: str = "ready"
    restarts: int = 0
    hangs: int = 0
    malformed: int = 0
    _changed: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)

    def set_healthy(self, healthy: bool) -> None:
        """Its health changes (a websocket dropped, a server came back)."""
        self.healthy = healthy
        self._changed.unpark_all()

    async def wait_healthy(self) -> None:
        """Until it is healthy."""
        while not self.healthy:
            await self._changed.park()


class Run(NamedTuple):
    """One attempt of one shard on one box."""

    job: str
    shard: int
    box: str
    at: float
    prompt_id: str


@attrs.define(eq=False)
class Workshop:
    """The runner: a shard takes the seconds it carries, times its box's ``slowness``, and
    returns the box's name; ``trouble`` may name an error to raise instead."""

    slowness: dict[str, float] = attrs.field(factory=dict)
    trouble: Callable[[Box, Shard], BaseException | None] = lambda box, task: None
    runs: list[Run] = attrs.field(factory=list)
    """Every attempt, in the order they started."""
    cancelled: list[str] = attrs.field(factory=list)
    """The jobs of the shards cancelled while they ran."""
    running: collections.Counter[str] = attrs.field(factory=collections.Counter)
    most_at_once: collections.Counter[str] = attrs.field(factory=collections.Counter)

    async def __call__(self, box: Box, task: Shard) -> str:
        self.runs.append(
            Run(task.job_id, task.index, box.name, trio.current_time(), task.prompt_id)
        )
        self.running[box.name] += 1
        self.most_at_once[box.name] = max(self.most_at_once[box.name], self.running[box.name])
        try:
            if (error := self.trouble(box, task)) is not None:
                raise error
            await trio.sleep(task.payload * self.slowness.get(box.name, 1.0))
        except trio.Cancelled:
            self.cancelled.append(task.job_id)
            raise
        finally:
            self.running[box.name] -= 1
        return box.name

    def jobs(self) -> list[str]:
        """The jobs of every attempt, in the order they started."""
        return [run.job for run in self.runs]


def serve(nursery: trio.Nursery, scheduler: Scheduler[Box, float, str], *boxes: Box) -> None:
    """A worker for each box, until the test ends."""
    for box in boxes:
        nursery.start_soon(scheduler.run_worker, box)


def submit(scheduler: Scheduler[Box, float, str], job_id: str, *seconds: float) -> list[Shard]:
    """Queue a job of one shard per entry of ``seconds`` (skipping its turn to be planned)."""
    tasks: list[Shard] = [ShardTask(job_id, index, s) for index, s in enumerate(seconds)]
    scheduler.submit(job_id, tasks)
    return tasks


def error_of(task: Shard) -> BaseException:
    """The error ``task`` ended with."""
    assert isinstance(task.outcome, Error), task.outcome
    return task.outcome.error


# --------------------------------------------------------------------------- the queue


async def test_an_idle_instance_takes_a_shard_the_moment_it_is_queued(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop()
    scheduler = Scheduler(shop)
    serve(nursery, scheduler, Box("a"))
    await trio.testing.wait_all_tasks_blocked()
    start = trio.current_time()
    (task,) = submit(scheduler, "job", 10.0)
    await trio.testing.wait_all_tasks_blocked()
    assert shop.runs == [Run("job", 0, "a", start, task.prompt_id)]
    assert await scheduler.wait("job") == [task]
    assert task.outcome == Value("a")
    assert trio.current_time() == start + 10


async def test_the_shards_of_one_job_spread_over_the_idle_instances(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    scheduler = Scheduler(Workshop())  # each box could hold two: the idle ones come first
    serve(nursery, scheduler, Box("a"), Box("b"), Box("c"))
    await trio.testing.wait_all_tasks_blocked()
    submit(scheduler, "job", 1.0, 1.0, 1.0)
    done = await scheduler.wait("job")
    assert sorted(task.instance or "" for task in done) == ["a", "b", "c"]


async def test_each_instance_runs_at_most_depth_shards_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop()
    scheduler = Scheduler(shop, depth=2)
    serve(nursery, scheduler, Box("a"))
    start = trio.current_time()
    submit(scheduler, "job", 1.0, 1.0, 1.0, 1.0, 1.0)
    await scheduler.wait("job")
    assert shop.most_at_once == {"a": 2}
    assert trio.current_time() == start + 3  # five one-second shards, two at a time


async def test_an_instance_that_finishes_early_takes_the_next_shard(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop(slowness={"slow": 10.0})
    scheduler = Scheduler(shop, depth=1)
    serve(nursery, scheduler, Box("slow"), Box("fast"))
    await trio.testing.wait_all_tasks_blocked()
    for i in range(11):
        submit(scheduler, f"job{i}", 1.0)
    for i in range(11):
        await scheduler.wait(f"job{i}")
    assert collections.Counter(run.box for run in shop.runs) == {"slow": 1, "fast": 10}


async def test_shards_are_served_first_in_first_out(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop()
    scheduler = Scheduler(shop, depth=1)
    for i in range(5):
        submit(scheduler, f"job{i}", 1.0)
    serve(nursery, scheduler, Box("a"))
    await scheduler.wait("job4")
    assert shop.jobs() == ["job0", "job1", "job2", "job3", "job4"]


async def test_an_instance_that_is_not_healthy_takes_no_shard_until_it_is(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop()
    scheduler = Scheduler(shop)
    down, up = Box("down", healthy=False), Box("up")
    serve(nursery, scheduler, down, up)
    submit(scheduler, "job", 1.0, 1.0, 1.0)
    await scheduler.wait("job")
    assert {run.box for run in shop.runs} == {"up"}

    up.set_healthy(False)
    submit(scheduler, "later", 1.0)
    await trio.sleep(3600)  # an hour with no instance to take it
    assert "later" not in shop.jobs()
    down.set_healthy(True)
    await trio.testing.wait_all_tasks_blocked()
    assert shop.runs[-1][:4] == ("later", 0, "down", trio.current_time())  # at once


async def test_a_shard_lost_on_a_server_runs_again_on_another(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    def lost_the_first_time(box: Box, task: Shard) -> BaseException | None:
        return ServerLostError(box.name, "gone") if task.attempts == 1 else None

    shop = Workshop(trouble=lost_the_first_time)
    scheduler = Scheduler(shop, depth=1)
    boxes = [Box("a"), Box("b")]
    serve(nursery, scheduler, *boxes)
    await trio.testing.wait_all_tasks_blocked()
    (task,) = submit(scheduler, "job", 1.0)
    await scheduler.wait("job")
    first, second = shop.runs
    assert second.box != first.box  # not on the server that lost it
    assert task.outcome == Value(second.box)
    assert (task.attempts, task.previous_instances) == (2, (first.box,))
    assert first.prompt_id != second.prompt_id == task.prompt_id  # a new prompt each time
    stats = {s.name: s for s in scheduler.statistics(boxes).instances}
    assert (stats[first.box].shards_failed, stats[first.box].shards_retried) == (1, 1)
    assert stats[second.box].shards_done == 1


async def test_a_lost_shard_is_sent_at_most_max_attempts_times(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop(trouble=lambda box, task: ServerLostError(box.name, "gone"))
    scheduler = Scheduler(shop, max_attempts=3)
    serve(nursery, scheduler, Box("a"))  # the only one: it takes the shard again
    (task,) = submit(scheduler, "job", 1.0)
    await scheduler.wait("job")
    assert len(shop.runs) == task.attempts == 3
    assert isinstance(error_of(task), ServerLostError)


async def test_an_error_that_is_not_retryable_ends_the_shard(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop(trouble=lambda box, task: ComfyUITimeoutError("too slow", instance=box.name))
    scheduler = Scheduler(shop)
    serve(nursery, scheduler, Box("a"), Box("b"))
    (task,) = submit(scheduler, "job", 1.0)
    await scheduler.wait("job")
    assert len(shop.runs) == task.attempts == 1
    assert isinstance(error_of(task), ComfyUITimeoutError)


async def test_a_bug_in_the_runner_fails_its_shard_never_the_scheduler(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    def buggy(box: Box, task: Shard) -> BaseException | None:
        return ValueError("oops") if task.job_id == "bad" else None

    shop = Workshop(trouble=buggy)
    scheduler = Scheduler(shop, depth=1)
    serve(nursery, scheduler, Box("a"))
    (bad,) = submit(scheduler, "bad", 1.0)
    (good,) = submit(scheduler, "good", 1.0)
    with caplog.at_level(logging.ERROR, logger="comfytrio.scheduler"):
        await scheduler.wait("bad")
        await scheduler.wait("good")
    error = error_of(bad)
    assert type(error) is ComfyAPIError
    assert isinstance(error.__cause__, ValueError)
    assert "unexpected error" in caplog.text
    assert good.outcome == Value("a")


async def test_a_job_cancelled_while_queued_never_reaches_a_server(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop()
    scheduler = Scheduler(shop, depth=1)
    serve(nursery, scheduler, Box("a"))
    submit(scheduler, "first", 10.0)
    (second,) = submit(scheduler, "second", 10.0)
    with trio.move_on_after(1):
        await scheduler.wait("second")  # its caller gives up while first runs
    await scheduler.wait("first")
    await trio.testing.wait_all_tasks_blocked()
    assert shop.jobs() == ["first"]
    assert "cancelled" in str(error_of(second))
    assert scheduler.statistics([]).queued_shards == 0


async def test_a_job_cancelled_while_running_cancels_its_shards_before_it_returns(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop()
    scheduler = Scheduler(shop)
    serve(nursery, scheduler, Box("a"))
    (task,) = submit(scheduler, "job", 10.0)
    with trio.move_on_after(1):
        await scheduler.wait("job")
    assert shop.cancelled == ["job"]  # its runner was cancelled before wait gave up
    error = error_of(task)
    assert isinstance(error, ComfyAPIError)
    assert "its job was cancelled" in str(error)


async def test_closing_ends_every_shard_and_drains_the_running_ones(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop()
    scheduler = Scheduler(shop, depth=1)
    serve(nursery, scheduler, Box("a"))
    (running,) = submit(scheduler, "running", 10.0)
    (queued,) = submit(scheduler, "queued", 10.0)
    await trio.testing.wait_all_tasks_blocked()
    scheduler.close()
    await scheduler.wait_drained()
    assert shop.jobs() == ["running"]
    assert shop.cancelled == ["running"]
    assert "closed" in str(error_of(running))
    assert "closed" in str(error_of(queued))
    (late,) = submit(scheduler, "late", 1.0)  # planned while it closed: ends at once
    assert "closed" in str(error_of(late))


async def test_fail_queued_ends_the_waiting_shards_with_its_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(Workshop())  # no instance takes anything
    tasks = submit(scheduler, "job", 1.0, 1.0)
    gone = ServerLostError("all", "no instance")
    assert scheduler.fail_queued(gone) == 2
    assert [error_of(task) for task in tasks] == [gone, gone]
    assert scheduler.statistics([]).queued_shards == 0


async def test_statistics_are_frozen_values_of_each_instance_and_job(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    box = Box("a", restarts=1, hangs=2, malformed=3)
    scheduler = Scheduler(Workshop(), depth=1)
    serve(nursery, scheduler, box)
    start = trio.current_time()
    submit(scheduler, "job", 4.0, 6.0)
    await scheduler.wait("job")
    stats = scheduler.statistics([box])
    assert stats.instances == (InstanceStatistics("a", "ready", 0, 10.0, 2, 0, 0, 1, 2, 3),)
    assert stats.jobs == (JobStatistics("job", 2, 2, 0, start, start, start + 10),)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.queued_shards = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- turns to be planned


@attrs.define(eq=False)
class Planners:
    """Jobs that ask for their turn to be planned, each in a task of its own; each plans
    until the test says how its planning ends."""

    scheduler: Scheduler[Box, float, str]
    nursery: trio.Nursery
    turns: dict[str, float] = attrs.field(factory=dict)
    """When each job got its turn, in that order."""
    refused: dict[str, BaseException] = attrs.field(factory=dict)
    """What each job whose turn or planning failed met."""
    _told: dict[str, trio.Event] = attrs.field(factory=dict)
    _ends: dict[str, Outcome[int]] = attrs.field(factory=dict)
    _scopes: dict[str, trio.CancelScope] = attrs.field(factory=dict)

    async def ask(self, *job_ids: str) -> None:
        """Each job asks for its turn, in this order; return once each waits or plans."""
        for job_id in job_ids:
            self._told[job_id], self._scopes[job_id] = trio.Event(), trio.CancelScope()
            self.nursery.start_soon(self._plan, job_id)
            await trio.testing.wait_all_tasks_blocked()

    async def finish(self, job_id: str, shards: int = 1) -> None:
        """Its planning ends: it submits ``shards`` one-second shards (or will, once its
        turn comes); return once it did what it can."""
        await self._end(job_id, Value(shards))

    async def fail(self, job_id: str) -> None:
        """Its planning fails (a model is missing, say)."""
        await self._end(job_id, Error(ComfyAPIError(f"{job_id}: planning failed")))

    async def cancel(self, job_id: str) -> None:
        """Its caller gives up."""
        self._scopes[job_id].cancel()
        await trio.testing.wait_all_tasks_blocked()

    async def _end(self, job_id: str, end: Outcome[int]) -> None:
        self._ends[job_id] = end
        self._told[job_id].set()
        await trio.testing.wait_all_tasks_blocked()

    async def _plan(self, job_id: str) -> None:
        with self._scopes[job_id]:
            try:
                async with self.scheduler.admit(job_id):
                    self.turns[job_id] = trio.current_time()
                    await self._told[job_id].wait()
                    shards = self._ends[job_id].unwrap()
                    self.scheduler.submit(
                        job_id, [ShardTask(job_id, i, 1.0) for i in range(shards)]
                    )
            except ComfyAPIError as exc:
                self.refused[job_id] = exc


def one_at_a_time(nursery: trio.Nursery, slow_planning: float | None = 2.0) -> Planners:
    """Jobs for a scheduler that plans one shard ahead (``plan_ahead=1``)."""
    return Planners(
        Scheduler(Workshop(), depth=1, plan_ahead=1, slow_planning=slow_planning), nursery
    )


async def test_jobs_wait_their_turn_to_be_planned_first_come_first_served(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    jobs = one_at_a_time(nursery)
    await jobs.ask("a", "b", "c")
    assert list(jobs.turns) == ["a"]  # one shard may be planned ahead: a's
    assert jobs.scheduler.statistics([]).waiting_jobs == 3  # a plans; b and c hold only their call
    await jobs.finish("a")
    assert list(jobs.turns) == ["a"]  # a's shard waits in the queue: that is plan_ahead
    serve(nursery, jobs.scheduler, Box("box"))
    await trio.testing.wait_all_tasks_blocked()
    assert list(jobs.turns) == ["a", "b"]  # the box took a's shard: b's turn
    await jobs.finish("b")
    await jobs.finish("c")  # c is told early: it plans only once its turn comes
    await jobs.scheduler.wait("a")
    await jobs.scheduler.wait("b")
    await trio.testing.wait_all_tasks_blocked()
    assert list(jobs.turns) == ["a", "b", "c"]


async def test_a_job_whose_planning_fails_is_forgotten_and_lets_the_next_one_in(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    jobs = one_at_a_time(nursery)
    await jobs.ask("a", "b")
    await jobs.fail("a")
    assert list(jobs.turns) == ["a", "b"]
    assert list(jobs.refused) == ["a"]
    assert [job.job_id for job in jobs.scheduler.statistics([]).jobs] == ["b"]


async def test_a_job_cancelled_before_its_turn_is_forgotten(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    jobs = one_at_a_time(nursery)
    await jobs.ask("a", "b", "c")
    await jobs.cancel("b")
    assert jobs.scheduler.statistics([]).waiting_jobs == 2  # a plans, c waits
    await jobs.fail("a")
    assert list(jobs.turns) == ["a", "c"]


async def test_closing_ends_the_jobs_waiting_their_turn(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    jobs = one_at_a_time(nursery)
    await jobs.ask("a", "b", "c")
    jobs.scheduler.close()
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(jobs.refused) == ["b", "c"]
    assert all("closed" in str(error) for error in jobs.refused.values())
    assert jobs.scheduler.statistics([]).waiting_jobs == 1  # a: still planning
    await jobs.finish("a")  # its plan is ready, but nothing will take its shard
    (shard,) = await jobs.scheduler.wait("a")
    assert "closed" in str(error_of(shard))


async def test_a_job_slow_to_plan_hands_its_turn_to_the_next(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    shop = Workshop()
    scheduler = Scheduler(shop, depth=1, plan_ahead=1, slow_planning=2)
    serve(nursery, scheduler, Box("box"))
    jobs = Planners(scheduler, nursery)
    start = trio.current_time()
    await jobs.ask("a")  # planned at once; then it waits for its LoRA
    await jobs.ask("b")
    await trio.sleep_until(start + 1.999)
    assert list(jobs.turns) == ["a"]  # a holds the only turn...
    await trio.sleep_until(start + 2)
    await trio.testing.wait_all_tasks_blocked()
    assert jobs.turns == {"a": start, "b": start + 2}  # ...until it is slow
    await jobs.finish("b")
    await scheduler.wait("b")
    assert shop.jobs() == ["b"]  # b's shard ran while a was still planning
    assert scheduler.planning == 0  # a no longer counts; b left

    await jobs.ask("c")  # nothing queued, nothing counting: planned at once
    assert "c" in jobs.turns
    await jobs.finish("a")  # a's plan is ready at last: its leaving uncounts nothing more
    await scheduler.wait("a")
    assert shop.jobs() == ["b", "a"]
    assert scheduler.planning == 1  # c
    await jobs.ask("d")
    assert "d" not in jobs.turns  # c holds the turn...
    await jobs.fail("c")  # ...until its planning fails
    assert "d" in jobs.turns
    assert scheduler.planning == 1  # d


async def test_a_slow_job_that_fails_at_last_keeps_the_count_right(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    jobs = one_at_a_time(nursery)
    await jobs.ask("a", "b")
    await trio.sleep(2.5)
    assert "b" in jobs.turns  # a was slow
    await jobs.fail("a")  # a's download failed in the end
    assert jobs.scheduler.planning == 1  # b still counts; a was uncounted once
    await jobs.ask("c")
    assert "c" not in jobs.turns  # b holds the turn
    await jobs.finish("b")  # b's shard is queued: that is plan_ahead
    assert "c" not in jobs.turns
    serve(nursery, jobs.scheduler, Box("box"))  # the box takes b's shard: c's turn
    await trio.testing.wait_all_tasks_blocked()
    assert "c" in jobs.turns
    assert jobs.scheduler.planning == 1  # c


async def test_a_job_planned_in_time_is_never_uncounted_twice(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    jobs = one_at_a_time(nursery)
    await jobs.ask("a")
    await trio.sleep(1)
    await jobs.finish("a", shards=0)  # planned in time, to no shards: the queue stays empty
    assert jobs.scheduler.planning == 0
    await trio.sleep(10)  # past the slow mark: its timer went with its turn
    assert jobs.scheduler.planning == 0
    await jobs.ask("b")
    await jobs.fail("b")
    await trio.sleep(10)
    assert jobs.scheduler.planning == 0


async def test_slow_planning_none_keeps_strict_turns(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    jobs = one_at_a_time(nursery, slow_planning=None)
    await jobs.ask("a", "b")
    await trio.sleep(1000)
    assert list(jobs.turns) == ["a"]
    with pytest.raises(ValueError, match="slow_planning"):
        Scheduler(Workshop(), slow_planning=0)


# --------------------------------------------------------------------------- through ComfyAPI


def api_for(fakes: list[FakeComfyUI], tmp_path: Path, **kwargs: Any) -> ComfyAPI:
    return ComfyAPI(
        [f.url for f in fakes], tmp_path / "models", download_dir=tmp_path / "downloads", **kwargs
    )


def prefix_of(received: Any) -> str:
    """The prefix of a prompt a fake received: the name of the job that sent it."""
    return str(received["prompt"]["1"]["inputs"]["value"])


@attrs.define(eq=False)
class Callers:
    """Callers of ``execute_workflow``, each in a task of its own, each for a one-image job
    named after it."""

    api: ComfyAPI
    nursery: trio.Nursery
    done: list[str] = attrs.field(factory=list)
    """The jobs that returned, in that order."""
    errors: dict[str, BaseException] = attrs.field(factory=dict)
    """What the others raised."""

    async def call(
        self, *names: str, workflow: dict[str, Any] = JOB, models: Sequence[ModelRef] = ()
    ) -> None:
        """Each job is called, in this order; return once each waits or runs."""
        for name in names:
            self.nursery.start_soon(self._call, name, workflow, models)
            await trio.testing.wait_all_tasks_blocked()

    async def _call(self, name: str, workflow: dict[str, Any], models: Sequence[ModelRef]) -> None:
        try:
            await self.api.execute_workflow(workflow, params=params(name, 1), models=models)
        except ComfyAPIError as exc:
            self.errors[name] = exc
        else:
            self.done.append(name)


@contextlib.asynccontextmanager
async def one_slot(fake: FakeComfyUI, tmp_path: Path) -> AsyncIterator[Callers]:
    """Callers of an api whose one server holds one prompt at a time: the order of the queue
    is all there is. Leaving waits for every call."""
    async with (
        api_for([fake], tmp_path, prompts_per_instance=1) as api,
        trio.open_nursery() as nursery,
    ):
        yield Callers(api, nursery)


async def test_one_job_spreads_over_idle_servers(
    autojump_clock: trio.testing.MockClock, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    fakes = [await fake_comfyui_factory(seconds_per_image=0.2) for _ in range(3)]
    async with api_for(fakes, tmp_path) as api:
        for round_ in range(5):  # each time: one shard per server, none queued twice
            result = await api.run_workflow(JOB, params=params(f"r{round_}", 3))
            assert sorted(o.instance for o in result.outputs) == sorted(
                i.name for i in api.instances
            )


async def test_each_server_holds_at_most_the_configured_prompts(
    autojump_clock: trio.testing.MockClock, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    fakes = [await fake_comfyui_factory(seconds_per_image=0.2) for _ in range(2)]
    most_seen = 0
    async with (
        api_for(fakes, tmp_path, prompts_per_instance=2) as api,
        trio.open_nursery() as nursery,
    ):
        await Callers(api, nursery).call(*(f"d{i}" for i in range(10)))
        while nursery.child_tasks:  # a probe looks at the servers every 50 ms
            await trio.sleep(0.05)
            for fake in fakes:
                on_server = len(fake.queue_ids()) + (fake.running_id is not None)
                most_seen = max(most_seen, on_server)
            assert all(s.in_flight <= 2 for s in api.statistics().instances)
    assert most_seen == 2  # the next prompt always waits inside ComfyUI, never more


async def test_jobs_are_planned_and_served_first_come_first_served(
    autojump_clock: trio.testing.MockClock, fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    fake_comfyui.set_seconds_per_image(0.05)
    names = [f"t{i}" for i in range(6)]
    async with one_slot(fake_comfyui, tmp_path) as callers:
        assert callers.api._scheduler.plan_ahead == 1  # one server, one prompt in it
        await callers.call(*names)
        stats = callers.api.statistics()
        assert stats.queued_shards <= 1  # never more planned ahead than plan_ahead
        assert stats.waiting_jobs >= 3  # the others hold nothing but their call
    assert callers.api.statistics().waiting_jobs == 0
    assert [prefix_of(p) for p in fake_comfyui.prompts_received] == names
    assert callers.done == names


async def test_a_server_that_is_down_gets_no_shard(
    autojump_clock: trio.testing.MockClock, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    down, up = [await fake_comfyui_factory() for _ in range(2)]
    async with api_for([down, up], tmp_path) as api:
        down.crash()
        while api.instances[0].healthy:  # its websocket notices the crash
            await api.instances[0].wait_state_change()
        before = len(down.prompts_received)
        async with trio.open_nursery() as nursery:
            await Callers(api, nursery).call("up0", "up1", "up2", "up3")
    assert len(down.prompts_received) == before
    assert len(up.prompts_received) == 4


async def test_the_api_statistics_are_frozen_values(
    autojump_clock: trio.testing.MockClock, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    fakes = [await fake_comfyui_factory(seconds_per_image=1.0) for _ in range(2)]
    async with api_for(fakes, tmp_path) as api:
        start = trio.current_time()
        result = await api.run_workflow(JOB, params=params("s", 2))
        stats = api.statistics()
    assert isinstance(stats, ApiStatistics)
    (job,) = [j for j in stats.jobs if j.job_id == result.job_id]
    assert (job.shards, job.done, job.failed) == (2, 2, 0)
    assert start <= job.queued_at <= (job.started_at or 0) <= (job.finished_at or 0)
    assert sum(s.shards_done for s in stats.instances) == 2
    assert all(s.busy_time >= 1.0 for s in stats.instances)  # one image each, a second each


async def test_a_job_runs_its_workflow_as_it_was_when_called(
    autojump_clock: trio.testing.MockClock, fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    fake_comfyui.set_seconds_per_image(1.0)
    workflow = {k: dict(v, inputs=dict(v["inputs"])) for k, v in JOB.items()}
    async with one_slot(fake_comfyui, tmp_path) as callers:
        await callers.call("busy", "next")
        await callers.call("late", workflow=workflow)
        assert callers.api.statistics().waiting_jobs == 1  # "late" is not planned yet
        workflow["3"]["inputs"]["width"] = 16  # the caller changes its dict meanwhile
    late = [p["prompt"] for p in fake_comfyui.prompts_received if prefix_of(p) == "late"]
    assert [p["3"]["inputs"]["width"] for p in late] == [8]


async def test_a_bad_param_fails_at_once_even_when_the_job_would_wait(
    autojump_clock: trio.testing.MockClock, fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    fake_comfyui.set_seconds_per_image(2.0)
    async with one_slot(fake_comfyui, tmp_path) as callers:
        await callers.call("b0", "b1", "b2")
        assert callers.api.statistics().waiting_jobs >= 1
        bad = params("bad", 1) | {"oops": {"type": "string", "value": "x", "node_mappings": "Nope"}}
        called = trio.current_time()
        with pytest.raises(ComfyAPIError, match="Nope"):
            await callers.api.execute_workflow(JOB, params=bad)
        assert trio.current_time() == called  # no time passed: it never waited its turn
        callers.nursery.cancel_scope.cancel()


async def test_a_job_whose_planning_fails_lets_the_next_one_in(
    autojump_clock: trio.testing.MockClock, fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    fake_comfyui.set_seconds_per_image(0.1)
    async with one_slot(fake_comfyui, tmp_path) as callers:
        await callers.call("first")
        await callers.call("missing", models=[ModelRef("checkpoints", "no.ckpt")])
        await callers.call("last")
    assert callers.done == ["first", "last"]
    assert [type(e) for e in callers.errors.values()] == [ModelNotFoundError]
    assert callers.api.statistics().waiting_jobs == 0
