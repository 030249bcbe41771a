"""Many jobs at once: one queue that every healthy instance pulls from."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from comfytrio import (
    ApiStatistics,
    ComfyAPI,
    ComfyAPIError,
    ModelNotFoundError,
    ModelRef,
    ShardTask,
)
from comfytrio._scheduler import Scheduler
from comfytrio.testing import FakeComfyUI, serve_fake_comfyui

ONE_IMAGE: dict[str, Any] = {
    "1": {
        "class_type": "PrimitiveString",
        "inputs": {"value": "x"},
        "_meta": {"title": "API - PROMPT"},
    },
    "2": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1},
    },
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": ["1", 0]}},
    "4": {
        "class_type": "PrimitiveInt",
        "inputs": {"value": 1},
        "_meta": {"title": "API - BATCH SIZE"},
    },
}


def job_params(prefix: str, images: int = 1) -> dict[str, dict[str, Any]]:
    return {
        "prefix": {"type": "string", "value": prefix, "node_mappings": "API - PROMPT"},
        "batch": {
            "type": "integer",
            "value": images,
            "gpu_scale": True,
            "node_mappings": "API - BATCH SIZE",
        },
    }


@pytest.fixture
async def fakes(fake_comfyui_factory: Callable[[], Awaitable[FakeComfyUI]]) -> list[FakeComfyUI]:
    """2 fake servers (the plugin's factory: they stop with the test)."""
    return [await fake_comfyui_factory() for _ in range(2)]


def one_slot_api(fake: FakeComfyUI, tmp_path: Path) -> ComfyAPI:
    """One server holding one prompt at a time: the order of the queue is all there is."""
    return api_for([fake], tmp_path, prompts_per_instance=1)


def api_for(fakes: list[FakeComfyUI], tmp_path: Path, **kwargs: Any) -> ComfyAPI:
    return ComfyAPI(
        [f.url for f in fakes], tmp_path / "models", download_dir=tmp_path / "downloads", **kwargs
    )


async def test_an_instance_that_finishes_early_takes_the_next_shard(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    slow, fast = fakes
    slow.set_seconds_per_image(1.0)
    fast.set_seconds_per_image(0.01)
    async with api_for(fakes, tmp_path) as api, trio.open_nursery() as nursery:
        for i in range(12):  # one-image jobs: one shard each
            nursery.start_soon(
                partial(api.execute_workflow, ONE_IMAGE, params=job_params(f"job{i}"))
            )
    stats = {s.name: s for s in api.statistics().instances}
    on_slow = stats[slow.url.removeprefix("http://")].shards_done
    on_fast = stats[fast.url.removeprefix("http://")].shards_done
    assert on_slow + on_fast == 12
    assert on_fast >= 9  # the slow one kept at most its 2 slots busy (plus one refill)


async def test_one_job_spreads_over_idle_instances(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        fakes = [await nursery.start(serve_fake_comfyui, tmp_path / f"f{i}") for i in range(3)]
        for fake in fakes:
            fake.set_seconds_per_image(0.2)
        async with api_for(fakes, tmp_path) as api:
            for round_ in range(5):  # each time: one shard per instance, none queued twice
                result = await api.run_workflow(ONE_IMAGE, params=job_params(f"r{round_}", 3))
                assert sorted(o.instance for o in result.outputs) == sorted(
                    i.name for i in api.instances
                )
        nursery.cancel_scope.cancel()


async def test_each_server_holds_at_most_the_configured_prompts(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    for fake in fakes:
        fake.set_seconds_per_image(0.2)
    most_seen = 0
    async with (
        api_for(fakes, tmp_path, prompts_per_instance=2) as api,
        trio.open_nursery() as nursery,
    ):
        for i in range(10):
            nursery.start_soon(partial(api.execute_workflow, ONE_IMAGE, params=job_params(f"d{i}")))
        while True:
            await trio.sleep(0.05)
            for fake in fakes:
                on_server = len(fake.queue_ids()) + (fake.running_id is not None)
                most_seen = max(most_seen, on_server)
            stats = api.statistics()
            assert all(s.in_flight <= 2 for s in stats.instances)
            if not stats.queued_shards and not any(s.in_flight for s in stats.instances):
                break
    assert most_seen == 2  # the next prompt always waits inside ComfyUI, never more


async def test_jobs_are_served_first_in_first_out(fakes: list[FakeComfyUI], tmp_path: Path) -> None:
    fakes[0].crash()  # one server: the order is the queue's alone
    for fake in fakes[1:]:
        fake.set_seconds_per_image(0.05)
    async with (
        one_slot_api(fakes[1], tmp_path) as api,
        trio.open_nursery() as nursery,
    ):
        for i in range(5):
            nursery.start_soon(
                partial(api.execute_workflow, ONE_IMAGE, params=job_params(f"fifo{i}"))
            )
            await trio.sleep(0.01)  # queued in this order
    prompts = [p["prompt"]["1"]["inputs"]["value"] for p in fakes[1].prompts_received]
    assert prompts == [f"fifo{i}" for i in range(5)]


async def test_a_server_that_is_down_gets_no_shard(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    async with api_for(fakes, tmp_path) as api:
        fakes[0].crash()
        with trio.fail_after(10):
            while True:  # its websocket notices the crash
                if not api.instances[0].healthy:
                    break
                await trio.sleep(0.02)
        before = len(fakes[0].prompts_received)
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(
                    partial(api.execute_workflow, ONE_IMAGE, params=job_params(f"up{i}"))
                )
        assert len(fakes[0].prompts_received) == before
        assert len(fakes[1].prompts_received) == 4


async def test_statistics_are_frozen_values(fakes: list[FakeComfyUI], tmp_path: Path) -> None:
    async with api_for(fakes, tmp_path) as api:
        result = await api.run_workflow(ONE_IMAGE, params=job_params("s", images=2))
        stats = api.statistics()
    assert isinstance(stats, ApiStatistics)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.queued_shards = 3  # type: ignore[misc]
    (job,) = [j for j in stats.jobs if j.job_id == result.job_id]
    assert job.shards == 2
    assert job.done == 2
    assert job.queued_at <= (job.started_at or 0) <= (job.finished_at or 0)
    assert sum(s.shards_done for s in stats.instances) == 2
    assert all(s.busy_time > 0 for s in stats.instances)


@attrs.define
class Box:
    """An instance, as far as the scheduler cares."""

    name: str = "box"
    state: str = "ready"
    healthy: bool = True

    async def wait_healthy(self) -> None:
        """A box never changes: healthy now, or never."""
        if not self.healthy:
            await trio.sleep_forever()


async def test_a_cancelled_job_never_reaches_a_server() -> None:
    ran: list[str] = []

    async def runner(instance: object, task: ShardTask) -> list[str]:
        ran.append(task.job_id)
        await trio.sleep(1)
        return []

    scheduler = Scheduler(runner, depth=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.run_worker, Box())
        scheduler.submit("first", [ShardTask("first", 0, None)])
        scheduler.submit("second", [ShardTask("second", 0, None)])
        with trio.move_on_after(0.1):
            await scheduler.wait("second")  # cancelled while still queued
        await scheduler.wait("first")
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert ran == ["first"]
    assert scheduler.statistics([Box()]).queued_shards == 0


async def test_jobs_wait_their_turn_to_be_planned_first_come_first_served(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    fakes[1].set_seconds_per_image(0.05)
    async with (
        one_slot_api(fakes[1], tmp_path) as api,
        trio.open_nursery() as nursery,
    ):
        assert api._scheduler.plan_ahead == 1  # one instance, one prompt in it
        for i in range(6):
            nursery.start_soon(
                partial(api.execute_workflow, ONE_IMAGE, params=job_params(f"turn{i}"))
            )
            await trio.sleep(0.01)  # called in this order
        most_waiting = 0
        while nursery.child_tasks:
            stats = api.statistics()
            assert stats.queued_shards <= 1  # never more planned ahead than plan_ahead
            most_waiting = max(most_waiting, stats.waiting_jobs)
            await trio.sleep(0.01)
    assert most_waiting >= 3  # the others held nothing but their call
    assert api.statistics().waiting_jobs == 0
    prompts = [p["prompt"]["1"]["inputs"]["value"] for p in fakes[1].prompts_received]
    assert prompts == [f"turn{i}" for i in range(6)]


async def test_a_job_runs_its_workflow_as_it_was_when_called(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    fakes[1].set_seconds_per_image(0.3)
    workflow = {k: dict(v, inputs=dict(v["inputs"])) for k, v in ONE_IMAGE.items()}
    async with (
        one_slot_api(fakes[1], tmp_path) as api,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(partial(api.execute_workflow, ONE_IMAGE, params=job_params("busy")))
        await trio.sleep(0.05)
        nursery.start_soon(partial(api.execute_workflow, ONE_IMAGE, params=job_params("next")))
        nursery.start_soon(partial(api.execute_workflow, workflow, params=job_params("late")))
        await trio.sleep(0.05)
        assert api.statistics().waiting_jobs == 1  # "late" is not planned yet
        workflow["2"]["inputs"]["width"] = 16  # the caller changes its dict meanwhile
    late = [
        p["prompt"]
        for p in fakes[1].prompts_received
        if p["prompt"]["1"]["inputs"]["value"] == "late"
    ]
    assert [p["2"]["inputs"]["width"] for p in late] == [8]


async def test_a_bad_param_fails_at_once_even_when_the_job_would_wait(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    fakes[1].set_seconds_per_image(2.0)
    async with (
        one_slot_api(fakes[1], tmp_path) as api,
        trio.open_nursery() as nursery,
    ):
        for i in range(3):
            nursery.start_soon(partial(api.execute_workflow, ONE_IMAGE, params=job_params(f"b{i}")))
        await trio.sleep(0.05)
        bad = job_params("bad") | {
            "oops": {"type": "string", "value": "x", "node_mappings": "Nope"}
        }
        with trio.fail_after(1), pytest.raises(ComfyAPIError, match="Nope"):
            await api.execute_workflow(ONE_IMAGE, params=bad)
        nursery.cancel_scope.cancel()


async def test_a_job_whose_planning_fails_lets_the_next_one_in(
    fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    fakes[1].set_seconds_per_image(0.1)
    errors: list[BaseException] = []
    done: list[str] = []

    async def job(name: str, **kwargs: Any) -> None:
        try:
            await api.execute_workflow(ONE_IMAGE, params=job_params(name), **kwargs)
            done.append(name)
        except ComfyAPIError as exc:
            errors.append(exc)

    with trio.fail_after(10):
        async with (
            one_slot_api(fakes[1], tmp_path) as api,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(job, "first")
            await trio.sleep(0.02)
            nursery.start_soon(partial(job, "missing", models=[ModelRef("checkpoints", "no.ckpt")]))
            await trio.sleep(0.02)
            nursery.start_soon(job, "last")
    assert done == ["first", "last"]
    assert [type(e) for e in errors] == [ModelNotFoundError]
    assert api.statistics().waiting_jobs == 0


async def nothing(instance: object, task: ShardTask) -> list[str]:
    """A runner that runs nothing."""
    return []


async def test_a_job_cancelled_before_its_turn_is_forgotten() -> None:
    scheduler = Scheduler(nothing, depth=1, plan_ahead=1)
    await scheduler.admit("a")  # the queue is empty: planned at once
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.admit, "b")
        await trio.sleep(0.01)
        assert scheduler.statistics([]).waiting_jobs == 2  # a is being planned, b waits
        nursery.cancel_scope.cancel()
    assert scheduler.statistics([]).waiting_jobs == 1
    scheduler.submit("a", [ShardTask("a", 0, None)])
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(0.05) as waited:
            await scheduler.admit("c")  # a's shard is queued: that is plan_ahead
        assert waited.cancelled_caught
        nursery.start_soon(scheduler.run_worker, Box())  # takes a's shard
        with trio.fail_after(1):
            await scheduler.admit("d")
        nursery.cancel_scope.cancel()


async def test_closing_ends_the_jobs_waiting_their_turn() -> None:
    scheduler = Scheduler(nothing, depth=1, plan_ahead=1)
    await scheduler.admit("a")
    failed: list[str] = []

    async def waiting(job_id: str) -> None:
        with pytest.raises(ComfyAPIError, match="closed"):
            await scheduler.admit(job_id)
        failed.append(job_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiting, "b")
        nursery.start_soon(waiting, "c")
        await trio.sleep(0.01)
        scheduler.close()
    assert sorted(failed) == ["b", "c"]
    assert scheduler.statistics([]).waiting_jobs == 1  # a: planned, never submitted


async def test_abandoning_a_job_lets_the_next_one_in() -> None:
    scheduler = Scheduler(nothing, depth=1, plan_ahead=1)
    await scheduler.admit("a")
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:  # ends when b's admit returns
            nursery.start_soon(scheduler.admit, "b")
            await trio.sleep(0.01)
            assert scheduler.statistics([]).waiting_jobs == 2
            scheduler.abandon("a")  # a's planning failed
    assert [j.job_id for j in scheduler.statistics([]).jobs] == ["b"]


# --------------------------------------------------------------------------- slow planning


@attrs.define(eq=False)
class Admissions:
    """Admits jobs in their own tasks and notes when each got its turn."""

    scheduler: Scheduler
    nursery: trio.Nursery
    at: dict[str, float] = attrs.field(factory=dict)

    def start(self, job_id: str) -> None:
        """Ask for ``job_id``'s turn in a task of its own."""
        self.nursery.start_soon(self._admit, job_id)

    async def _admit(self, job_id: str) -> None:
        await self.scheduler.admit(job_id)
        self.at[job_id] = trio.current_time()


async def test_a_job_slow_to_plan_hands_its_turn_to_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ran: list[str] = []

    async def runner(instance: object, task: ShardTask) -> list[str]:
        ran.append(task.job_id)
        return []

    scheduler = Scheduler(runner, depth=1, plan_ahead=1, slow_planning=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.run_worker, Box())
        admissions = Admissions(scheduler, nursery)
        start = trio.current_time()
        await scheduler.admit("a")  # planned at once, then "waits for its LoRA" forever
        admissions.start("b")
        await trio.testing.wait_all_tasks_blocked()
        assert admissions.at == {}  # a holds the only turn
        await trio.sleep(1.9)
        assert admissions.at == {}
        await trio.sleep(0.2)
        assert admissions.at == {"b": start + 2}  # a was slow: b is planned meanwhile
        scheduler.submit("b", [ShardTask("b", 0, None)])
        with trio.fail_after(1):
            await scheduler.wait("b")
        assert ran == ["b"]  # b's shard ran while a was still planning
        assert scheduler._planning == 0  # a no longer counts, b was submitted

        # a's plan is finally ready: its submit uncounts nothing more.
        admissions.start("c")  # nothing queued or counting: planned at once
        await trio.testing.wait_all_tasks_blocked()
        assert "c" in admissions.at
        scheduler.submit("a", [ShardTask("a", 0, None)])
        assert scheduler._planning == 1  # c
        with trio.fail_after(1):
            await scheduler.wait("a")
        assert ran == ["b", "a"]
        admissions.start("d")
        await trio.testing.wait_all_tasks_blocked()
        assert "d" not in admissions.at  # c holds the turn...
        scheduler.abandon("c")  # ...until its planning fails
        await trio.testing.wait_all_tasks_blocked()
        assert "d" in admissions.at
        assert scheduler._planning == 1  # d
        nursery.cancel_scope.cancel()


async def test_a_slow_job_abandoned_at_last_keeps_the_count_right(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(nothing, depth=1, plan_ahead=1, slow_planning=2)
    async with trio.open_nursery() as nursery:
        admissions = Admissions(scheduler, nursery)
        await scheduler.admit("a")
        admissions.start("b")
        await trio.sleep(2.5)
        assert "b" in admissions.at  # a was slow
        scheduler.abandon("a")  # a's download failed in the end
        assert scheduler._planning == 1  # b still counts; a was uncounted once
        admissions.start("c")
        await trio.testing.wait_all_tasks_blocked()
        assert "c" not in admissions.at  # b holds the turn
        scheduler.submit("b", [ShardTask("b", 0, None)])  # queued: that is plan_ahead
        await trio.testing.wait_all_tasks_blocked()
        assert "c" not in admissions.at
        nursery.start_soon(scheduler.run_worker, Box())  # takes b's shard: c's turn
        await trio.testing.wait_all_tasks_blocked()
        assert "c" in admissions.at
        assert scheduler._planning == 1  # c
        nursery.cancel_scope.cancel()


async def test_a_job_planned_in_time_is_never_uncounted_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(nothing, depth=1, plan_ahead=1, slow_planning=2)
    await scheduler.admit("a")
    await trio.sleep(1)
    scheduler.submit("a", [])  # planned in time (to no shards: the queue stays empty)
    assert scheduler._planning == 0
    await trio.sleep(10)  # past the slow mark: its timer was cancelled with the submit
    assert scheduler._planning == 0
    await scheduler.admit("b")
    scheduler.abandon("b")
    await trio.sleep(10)
    assert scheduler._planning == 0


async def test_slow_planning_none_keeps_strict_turns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(nothing, depth=1, plan_ahead=1, slow_planning=None)
    await scheduler.admit("a")
    with trio.move_on_after(1000) as waited:
        await scheduler.admit("b")
    assert waited.cancelled_caught
    with pytest.raises(ValueError, match="slow_planning"):
        Scheduler(nothing, slow_planning=0)
