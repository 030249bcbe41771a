"""Crashed, hung and restarted servers, dropped websockets and vanished prompts lose nothing
and hang nothing."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import until
from test_api import alive, free_ports

from comfytrio import (
    ComfyAPI,
    ComfyAPIError,
    ComfyUIInstance,
    GPUInfo,
    JobResult,
    ServerLostError,
)
from comfytrio.testing import FakeComfyUI, fast_fault_policy, lay_out_fake_comfyui_install

FAST = fast_fault_policy()

JOB: dict[str, Any] = {
    "1": {
        "class_type": "PrimitiveString",
        "inputs": {"value": "x"},
        "_meta": {"title": "API - PROMPT"},
    },
    "2": {
        "class_type": "PrimitiveInt",
        "inputs": {"value": 1},
        "_meta": {"title": "API - BATCH SIZE"},
    },
    "3": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": ["2", 0], "color": 3},
    },
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": ["1", 0]}},
}


def params(prefix: str, images: int) -> dict[str, dict[str, Any]]:
    return {
        "prefix": {"type": "string", "value": prefix, "node_mappings": "API - PROMPT"},
        "batch": {
            "type": "integer",
            "value": images,
            "gpu_scale": True,
            "node_mappings": "API - BATCH SIZE",
        },
    }


def check_reported_once(result: JobResult, images: int) -> None:
    assert len(result.outputs) == images
    assert len({o.path for o in result.outputs}) == images  # never the same file twice
    assert all(Path(o.path).is_file() for o in result.outputs)
    indexes = [s.index for s in result.shards]
    assert len(indexes) == len(set(indexes))  # each shard reported once


@pytest.fixture
async def fakes(fake_comfyui_factory: Callable[[], Awaitable[FakeComfyUI]]) -> list[FakeComfyUI]:
    """3 fake servers (the plugin's factory: they stop with the test)."""
    return [await fake_comfyui_factory() for _ in range(3)]


def remote(fakes: list[FakeComfyUI], tmp_path: Path) -> ComfyAPI:
    return ComfyAPI(
        [f.url for f in fakes],
        tmp_path / "models",
        download_dir=tmp_path / "downloads",
        faults=FAST,
    )


# --------------------------------------------------------------------------- our processes


async def test_a_killed_process_is_restarted_and_its_shard_runs_again(tmp_path: Path) -> None:
    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    api = ComfyAPI(
        [ComfyUIInstance(install, p) for p in free_ports(2)],
        tmp_path / "models",
        gpu=GPUInfo(False, 2),
        state_dir=tmp_path / "state",
        faults=FAST,
        env={"COMFYTRIO_FAKE_SECONDS_PER_IMAGE": "0.3"},
        ready_timeout=30,
    )
    async with api:
        victim = api.instances[0]
        assert victim.process is not None
        old_pid = victim.process.pid
        async with trio.open_nursery() as nursery:
            results: list[JobResult] = []

            async def job() -> None:
                results.append(await api.run_workflow(JOB, params=params("k", 4)))

            nursery.start_soon(job)
            # Both shards are inside their servers (our processes: real time, real I/O).
            await until(lambda: all(i.in_flight for i in api.statistics().instances), timeout=15)
            os.kill(old_pid, signal.SIGKILL)
        check_reported_once(results[0], 4)
        assert results[0].ok
        with trio.fail_after(15):
            while victim.state != "ready":
                await victim.wait_state_change()
        assert victim.process.pid != old_pid
        stats = {s.name: s for s in api.statistics().instances}
        assert stats[victim.name].restarts == 1
        assert stats[victim.name].shards_retried == 1
        pids = [i.process.pid for i in api.instances if i.process is not None]
    assert not alive(old_pid)
    assert not any(alive(pid) for pid in pids)


async def test_a_hung_process_is_killed_and_restarted(tmp_path: Path) -> None:
    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    api = ComfyAPI(
        [ComfyUIInstance(install, free_ports(1)[0])],
        tmp_path / "models",
        gpu=GPUInfo(False, 1),
        state_dir=tmp_path / "state",
        faults=FAST,
        ready_timeout=30,
    )
    async with api:
        instance = api.instances[0]
        assert instance.process is not None
        hung_pid = instance.process.pid
        os.kill(hung_pid, signal.SIGSTOP)  # accepts connections, answers nothing
        with trio.fail_after(15):
            while not (instance.restarts == 1 and instance.state == "ready"):
                await instance.wait_state_change()
        assert instance.hangs == 1
        assert not alive(hung_pid)
        result = await api.run_workflow(JOB, params=params("after-hang", 2))
        check_reported_once(result, 2)


# --------------------------------------------------------------------------- remote servers


async def test_a_remote_server_that_restarts_loses_nothing(
    autojump_clock: trio.testing.MockClock, fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    for fake in fakes:
        fake.set_seconds_per_image(2)
    async with remote(fakes, tmp_path) as api, trio.open_nursery() as nursery:
        results: list[JobResult] = []

        async def job() -> None:
            results.append(await api.run_workflow(JOB, params=params("r", 6)))

        nursery.start_soon(job)
        await until(lambda: fakes[0].running_id is not None)
        await fakes[0].restart()  # its queue and history are gone
    check_reported_once(results[0], 6)
    assert results[0].ok


async def test_a_remote_hung_server_takes_no_work_until_it_answers(
    autojump_clock: trio.testing.MockClock, fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    fakes[0].set_seconds_per_image(5)
    async with remote(fakes, tmp_path) as api:
        async with trio.open_nursery() as nursery:
            held: list[JobResult] = []

            async def job() -> None:
                held.append(await api.run_workflow(JOB, params=params("held", 6)))

            nursery.start_soon(job)
            await until(lambda: fakes[0].running_id is not None)  # it holds our prompts
            fakes[0].hang()
        check_reported_once(held[0], 6)  # they were sent elsewhere
        with trio.fail_after(10):
            while api.instances[0].state != "hung":
                await api.instances[0].wait_state_change()
        result = await api.run_workflow(JOB, params=params("h", 3))
        check_reported_once(result, 3)
        assert {o.instance for o in result.outputs} <= {
            api.instances[1].name,
            api.instances[2].name,
        }
        fakes[0].unhang()
        with trio.fail_after(10):
            await api.instances[0].wait_healthy()
        assert api.statistics().instances[0].hangs == 1
        # What it held when it hung was sent elsewhere: it must not run it now.
        assert fakes[0].queue_ids() == []


async def test_prompts_cleared_by_someone_else_run_again(
    autojump_clock: trio.testing.MockClock, fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    fake = fakes[0]
    fake.set_seconds_per_image(3)
    async with remote([fake], tmp_path) as api, trio.open_nursery() as nursery:
        results: list[JobResult] = []
        for i in range(3):
            nursery.start_soon(partial(_collect, results, api, f"c{i}"))
        # One running, one pending inside ComfyUI (two per instance), the third waits here.
        await until(lambda: fake.running_id is not None and len(fake.queue_ids()) == 1)
        fake.clear_queue()
    assert len(results) == 3
    for result in results:
        check_reported_once(result, 1)


async def _collect(results: list[JobResult], api: ComfyAPI, prefix: str) -> None:
    results.append(await api.run_workflow(JOB, params=params(prefix, 1)))


async def test_no_endless_wait_when_every_server_is_gone(
    autojump_clock: trio.testing.MockClock, fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    async with remote(fakes[:1], tmp_path) as api:
        fakes[0].crash()  # and it never comes back
        started = trio.current_time()
        with trio.fail_after(15), pytest.raises(ServerLostError):
            await api.run_workflow(JOB, params=params("gone", 1))
        # Given up after no_instance_timeout (virtual seconds), not at once.
        assert trio.current_time() - started >= FAST.no_instance_timeout


# --------------------------------------------------------------------------- chaos


@pytest.mark.parametrize("seed", [1, 2])
async def test_chaos(
    autojump_clock: trio.testing.MockClock, fakes: list[FakeComfyUI], tmp_path: Path, seed: int
) -> None:
    """Hundreds of shards while servers crash, restart, hang and drop their sockets at
    random (seeded: a failure replays with the same seed), on the virtual clock: the
    seconds below cost no real time."""
    rng = random.Random(seed)
    for fake in fakes:
        fake.set_seconds_per_image(0.04)
    outcomes: dict[int, JobResult | ComfyAPIError] = {}
    actions: list[str] = []

    async def job(i: int) -> None:
        try:
            outcomes[i] = await api.run_workflow(JOB, params=params(f"s{seed}j{i}", 3))
        except ComfyAPIError as exc:  # allowed: a typed error, within the deadline
            outcomes[i] = exc

    async def chaos() -> None:
        while True:
            await trio.sleep(rng.uniform(0.1, 0.3))
            fake = rng.choice(fakes)
            action = rng.choice(["crash", "hang", "drop", "clear"])
            actions.append(action)
            if action == "crash":
                fake.crash()
                await trio.sleep(rng.uniform(0.1, 0.4))
                await fake.restart()
            elif action == "hang":
                fake.hang()
                await trio.sleep(rng.uniform(0.2, 0.8))
                fake.unhang()
            elif action == "drop":
                fake.drop_websockets()
            else:
                fake.clear_queue()

    api = remote(fakes, tmp_path)
    with trio.fail_after(90):
        async with api, trio.open_nursery() as outer:
            outer.start_soon(chaos)
            async with trio.open_nursery() as jobs:
                for i in range(100):  # 300 shards
                    jobs.start_soon(job, i)
            outer.cancel_scope.cancel()
    assert len(outcomes) == 100
    assert len(actions) >= 8, actions  # the jobs ran through the chaos, not before it
    succeeded = [r for r in outcomes.values() if isinstance(r, JobResult)]
    assert len(succeeded) >= 90, {type(e).__name__ for e in outcomes.values()}
    for result in succeeded:
        assert len({o.path for o in result.outputs}) == len(result.outputs)
        assert all(Path(o.path).is_file() for o in result.outputs)
        assert len(result.outputs) == 3 - len(result.failures)  # one image per shard
    paths = [o.path for r in succeeded for o in r.outputs]
    assert len(paths) == len(set(paths))  # no file reported by two jobs or twice


async def test_chaos_on_our_processes_leaves_no_process(tmp_path: Path) -> None:
    """Our ComfyUI processes killed or frozen at random (seeded) while jobs run: every job
    ends, and when the api closes not one process we ever started is left."""
    rng = random.Random(7)
    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    api = ComfyAPI(
        [ComfyUIInstance(install, p) for p in free_ports(3)],
        tmp_path / "models",
        gpu=GPUInfo(False, 3),
        state_dir=tmp_path / "state",
        faults=FAST,
        env={"COMFYTRIO_FAKE_SECONDS_PER_IMAGE": "0.05"},
        ready_timeout=30,
    )
    seen: set[int] = set()
    outcomes: list[JobResult | ComfyAPIError] = []

    async def job(i: int) -> None:
        try:
            outcomes.append(await api.run_workflow(JOB, params=params(f"p{i}", 3)))
        except ComfyAPIError as exc:
            outcomes.append(exc)

    with trio.fail_after(120):
        async with api:
            async with trio.open_nursery() as jobs:
                for i in range(30):
                    jobs.start_soon(job, i)
                for _ in range(4):
                    await trio.sleep(rng.uniform(0.3, 0.8))
                    victim = rng.choice(api.instances)
                    if victim.process is None or victim.state != "ready":
                        continue
                    seen.add(victim.process.pid)
                    os.kill(victim.process.pid, rng.choice([signal.SIGKILL, signal.SIGSTOP]))
            seen.update(i.process.pid for i in api.instances if i.process is not None)
    assert len(outcomes) == 30
    assert sum(isinstance(o, JobResult) for o in outcomes) >= 27
    for outcome in outcomes:
        if isinstance(outcome, JobResult):
            assert all(Path(o.path).is_file() for o in outcome.outputs)
    assert not any(alive(pid) for pid in seen)
