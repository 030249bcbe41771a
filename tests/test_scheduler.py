"""Many jobs at once: one queue that every healthy instance pulls from."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from comfytrio import ApiStatistics, ComfyAPI, ShardTask
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
        ComfyAPI(
            [fakes[1].url], tmp_path / "models", download_dir=tmp_path / "d", prompts_per_instance=1
        ) as api,
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


async def test_a_cancelled_job_never_reaches_a_server() -> None:
    ran: list[str] = []

    async def runner(instance: object, task: ShardTask) -> list[str]:
        ran.append(task.job_id)
        await trio.sleep(1)
        return []

    @attrs.define
    class Box:
        name: str = "box"
        state: str = "ready"
        healthy: bool = True

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
