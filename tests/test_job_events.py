"""A job's life as events (``run_workflow(events=...)``), the caller's job id, deterministic
prompt ids and ``max_shards``."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing
from conftest import until

from comfytrio import (
    ComfyAPI,
    JobEvent,
    JobPlanned,
    JobResult,
    ServerLostError,
    ShardFailed,
    ShardFinished,
    ShardSubmitted,
    shard_prompt_id,
)
from comfytrio.testing import FakeComfyUI

WORKFLOW: dict[str, Any] = {
    "1": {"class_type": "PrimitiveInt", "inputs": {"value": 1}, "_meta": {"title": "Batch"}},
    "2": {
        "class_type": "EmptyImage",
        "inputs": {"width": 16, "height": 16, "batch_size": ["1", 0], "color": 0},
    },
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ev"}},
}


def batch(images: int) -> dict[str, dict[str, Any]]:
    return {
        "batch": {"type": "integer", "value": images, "gpu_scale": True, "node_mappings": "Batch"}
    }


def drain(receive: trio.MemoryReceiveChannel[JobEvent]) -> list[JobEvent]:
    events: list[JobEvent] = []
    while True:
        try:
            events.append(receive.receive_nowait())
        except trio.WouldBlock:
            return events


def of_shard(events: list[JobEvent], index: int) -> list[JobEvent]:
    return [e for e in events if getattr(e, "index", None) == index]


async def test_a_two_shard_job_tells_its_life_in_order(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    send, receive = trio.open_memory_channel[JobEvent](100)
    result = await comfy_api.run_workflow(WORKFLOW, params=batch(4), job_id="job-a", events=send)
    events = drain(receive)
    assert result.job_id == "job-a"
    assert events[0] == JobPlanned("job-a", 2, result.split, result.seed)
    assert len(events) == 5
    urls = {i.name: i.url for i in comfy_api.instances}
    assert set(urls.values()) == {f.url for f in comfy_fakes}
    files: list[Any] = []
    for index in (0, 1):
        submitted, finished = of_shard(events, index)
        assert isinstance(submitted, ShardSubmitted)
        assert isinstance(finished, ShardFinished)
        prompt_id = shard_prompt_id("job-a", index, 1)
        assert submitted == ShardSubmitted(
            "job-a", index, 1, submitted.instance, urls[submitted.instance], prompt_id
        )
        assert (finished.prompt_id, finished.attempt, finished.instance) == (
            prompt_id,
            1,
            submitted.instance,
        )
        assert len(finished.files) == 2
        assert {f.prompt_id for f in finished.files} == {prompt_id}
        files += finished.files
        (report,) = [s for s in result.shards if s.index == index]
        assert report.prompt_id == prompt_id
    assert sorted(files, key=lambda f: f.path) == sorted(result.outputs, key=lambda f: f.path)
    assert {s.instance for s in events if isinstance(s, ShardSubmitted)} == set(urls)
    assert "job-a" in {j.job_id for j in comfy_api.statistics().jobs}
    # The prompts on the servers carry the ids: found again by whoever knows the job id.
    received = {p for f in comfy_fakes for p in f.history()}
    assert received == {shard_prompt_id("job-a", i, 1) for i in (0, 1)}


async def test_a_shard_finished_is_told_before_the_job_ends(
    autojump_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    comfy_fakes[1].set_node_seconds("EmptyImage", 30)
    send, receive = trio.open_memory_channel[JobEvent](100)
    results: list[JobResult] = []
    async with trio.open_nursery() as nursery:

        async def job() -> None:
            results.append(await comfy_api.run_workflow(WORKFLOW, params=batch(2), events=send))

        nursery.start_soon(job)
        event = None
        async for event in receive:
            if isinstance(event, ShardFinished):
                break
        assert isinstance(event, ShardFinished)
        assert event.instance == comfy_api.instances[0].name
        assert not results  # the other shard still runs
    (result,) = results
    assert set(event.files) <= set(result.outputs)


async def test_a_lost_shard_fails_then_runs_again_with_the_next_prompt_id(
    autojump_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    comfy_fakes[0].crash_on_node("SaveImage")  # dies mid-prompt, and stays down
    send, receive = trio.open_memory_channel[JobEvent](100)
    result = await comfy_api.run_workflow(WORKFLOW, params=batch(4), job_id="crash", events=send)
    assert result.ok
    assert len(result.outputs) == 4
    events = drain(receive)
    (failed,) = [e for e in events if isinstance(e, ShardFailed)]
    assert failed.retrying
    assert isinstance(failed.error, ServerLostError)
    assert failed.attempt == 1
    assert failed.instance == comfy_api.instances[0].name
    assert failed.prompt_id == shard_prompt_id("crash", failed.index, 1)
    kinds = [
        (type(e).__name__, getattr(e, "attempt", None)) for e in of_shard(events, failed.index)
    ]
    assert kinds == [
        ("ShardSubmitted", 1),
        ("ShardFailed", 1),
        ("ShardSubmitted", 2),
        ("ShardFinished", 2),
    ]
    again = of_shard(events, failed.index)[2]
    assert isinstance(again, ShardSubmitted)
    assert again.prompt_id == shard_prompt_id("crash", failed.index, 2)
    assert again.instance == comfy_api.instances[1].name
    assert again.url == comfy_fakes[1].url


async def test_a_shard_that_fails_for_good_is_told_once(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    comfy_fakes[0].fail_node("SaveImage")
    send, receive = trio.open_memory_channel[JobEvent](100)
    result = await comfy_api.run_workflow(WORKFLOW, params=batch(2), events=send)
    (failure,) = result.failures
    (failed,) = [e for e in drain(receive) if isinstance(e, ShardFailed)]
    assert not failed.retrying
    assert failed.error is failure.error
    assert (failed.index, failed.prompt_id) == (failure.index, failure.prompt_id)


async def test_a_full_or_closed_channel_does_not_hurt_the_job(
    comfy_api: ComfyAPI, caplog: pytest.LogCaptureFixture
) -> None:
    full, _receive_full = trio.open_memory_channel[JobEvent](0)  # nobody receives
    closed, _receive_closed = trio.open_memory_channel[JobEvent](10)
    closed.close()
    with caplog.at_level(logging.WARNING, logger="comfytrio"):
        first = await comfy_api.run_workflow(WORKFLOW, params=batch(2), events=full)
        second = await comfy_api.run_workflow(WORKFLOW, params=batch(2), events=closed)
    assert len(first.outputs) == len(second.outputs) == 2
    assert "event channel full" in caplog.text
    assert "event channel closed" in caplog.text
    with pytest.raises(trio.WouldBlock):  # still open: the caller owns it
        full.send_nowait(JobPlanned("x", 1, "single", 0))


async def test_one_shard_at_most_runs_the_whole_batch_on_one_server(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    send, receive = trio.open_memory_channel[JobEvent](100)
    result = await comfy_api.run_workflow(WORKFLOW, params=batch(4), max_shards=1, events=send)
    (shard,) = result.shards
    assert shard.scaled == {"batch": 4}
    assert len(result.outputs) == 4
    assert sum(len(f.prompts_received) for f in comfy_fakes) == 1
    assert drain(receive)[0] == JobPlanned(result.job_id, 1, result.split, result.seed)
    # More than there are servers: one per server.
    wide = await comfy_api.run_workflow(WORKFLOW, params=batch(4), max_shards=5)
    assert len(wide.shards) == 2
    paths = await comfy_api.execute_workflow(WORKFLOW, params=batch(3), max_shards=1)
    assert len(paths) == 3


async def test_the_dry_run_honours_max_shards(comfy_api: ComfyAPI) -> None:
    report = await comfy_api.check_workflow(WORKFLOW, params=batch(4), max_shards=1)
    assert report.ok, report.problems
    (shard,) = report.shards
    assert shard.scaled == {"batch": 4}
    with pytest.raises(ValueError, match="max_shards"):
        await comfy_api.check_workflow(WORKFLOW, params=batch(4), max_shards=0)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
async def test_max_shards_below_one_is_refused(comfy_api: ComfyAPI, bad: Any) -> None:
    with pytest.raises(ValueError, match="max_shards"):
        await comfy_api.run_workflow(WORKFLOW, params=batch(2), max_shards=bad)


async def test_a_job_id_already_running_is_refused(
    autojump_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    for fake in comfy_fakes:
        fake.set_node_seconds("EmptyImage", 20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: comfy_api.run_workflow(WORKFLOW, job_id="dup"))
        await until(lambda: any(f.running_id is not None for f in comfy_fakes))
        with pytest.raises(ValueError, match="already running"):
            await comfy_api.run_workflow(WORKFLOW, job_id="dup")
        other = await comfy_api.run_workflow(WORKFLOW, job_id="other", max_shards=1)
        assert other.job_id == "other"


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../up", "x" * 129, "sp ace"])
async def test_a_malformed_job_id_is_refused(comfy_api: ComfyAPI, bad: str) -> None:
    with pytest.raises(ValueError, match="job_id"):
        await comfy_api.run_workflow(WORKFLOW, job_id=bad)


def test_prompt_ids_are_deterministic_and_distinct() -> None:
    ids = {shard_prompt_id(job, i, a) for job in ("j1", "j2") for i in range(3) for a in (1, 2)}
    assert len(ids) == 12
    assert shard_prompt_id("j1", 0, 1) == shard_prompt_id("j1", 0, 1)
