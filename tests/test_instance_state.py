"""Instance states: a ``StrEnum``, and every change signalled, so nothing polls for them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attrs
import trio
import trio.testing

from comfytrio import ComfyAPI, FaultPolicy, GPUInfo, InstanceState, ServerLostError
from comfytrio._client import ComfyClient
from comfytrio._instance import Instance
from comfytrio._scheduler import Scheduler
from comfytrio._shards import ShardTask
from comfytrio.testing import FakeComfyUI


@attrs.define
class Line:
    """A client, as far as an instance's health cares: a websocket up or down."""

    connected: bool = True
    listeners: list[Callable[[], None]] = attrs.Factory(list)

    def add_connection_listener(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)

    def set(self, up: bool) -> None:
        self.connected = up
        for callback in self.listeners:
            callback()


def instance_on(line: Line, index: int = 0, state: InstanceState = InstanceState.NEW) -> Instance:
    """An instance whose client is ``line`` (wired as ``Instance`` wires a real one)."""
    instance = Instance(index, f"i{index}", f"http://i{index}", state=state)
    instance.client = cast(ComfyClient, line)
    line.add_connection_listener(instance._notify)
    return instance


def test_states_equal_the_old_strings() -> None:
    old = ["new", "starting", "connecting", "ready", "hung", "down", "failed", "stopped"]
    assert [s.value for s in InstanceState] == old
    for state, text in zip(InstanceState, old, strict=True):
        assert state == text
        assert str(state) == text
        assert f"{state}" == text
        assert InstanceState(text) is state
    assert Instance(0, "a", "http://a").state == "new"


async def test_a_state_change_wakes_its_waiters() -> None:
    line = Line()
    instance = instance_on(line)
    woken: list[InstanceState] = []

    async def waiter() -> None:
        await instance.wait_state_change()
        woken.append(instance.state)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        instance.state = InstanceState.NEW  # no change: nobody wakes
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        instance.state = InstanceState.READY
    assert woken == ["ready"]


async def test_wait_healthy_needs_ready_and_the_websocket_up() -> None:
    line = Line(connected=False)
    instance = instance_on(line, state=InstanceState.CONNECTING)
    done = False

    async def waiter() -> None:
        nonlocal done
        await instance.wait_healthy()
        done = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        instance.state = InstanceState.READY
        await trio.testing.wait_all_tasks_blocked()
        assert not done  # its websocket is still down
        line.set(True)  # the reconnect wakes it
        await trio.testing.wait_all_tasks_blocked()
        assert done


async def test_a_worker_takes_a_queued_shard_the_moment_its_instance_is_healthy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    line = Line()
    instance = instance_on(line, state=InstanceState.STARTING)
    started: list[float] = []

    async def runner(worker: Instance, task: ShardTask[None, list[str]]) -> list[str]:
        started.append(trio.current_time())
        await trio.sleep_forever()
        return []

    scheduler = Scheduler(runner, depth=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.run_worker, instance)
        scheduler.submit("job", [ShardTask("job", 0, None)])
        await trio.sleep(5)  # it waits, not ready
        assert started == []
        now = trio.current_time()
        instance.state = InstanceState.READY
        await trio.testing.wait_all_tasks_blocked()
        assert started == [now]  # at once: no virtual time passed
        nursery.cancel_scope.cancel()


def capacity_api(tmp_path: Path, limit: float) -> ComfyAPI:
    return ComfyAPI(
        ["http://a", "http://b"],
        tmp_path / "models",
        gpu=GPUInfo(False, 0),
        faults=FaultPolicy(no_instance_timeout=limit),
    )


async def test_queued_shards_fail_no_instance_timeout_after_the_last_instance_went(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    api = capacity_api(tmp_path, 30.0)
    lines = [Line(), Line()]
    api.instances = [instance_on(line, i, InstanceState.READY) for i, line in enumerate(lines)]
    # No payload: these never run, they wait in the queue and fail there.
    tasks: list[ShardTask[Any, Any]] = [ShardTask("job", i, None) for i in range(2)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api._watch_capacity)
        api._scheduler.submit("job", tasks[:1])  # no worker: it stays queued
        await trio.sleep(100)
        api.instances[0].state = InstanceState.DOWN
        await trio.sleep(100)  # the other one still takes work
        assert not tasks[0].ended
        lines[1].set(False)  # the last one goes: its websocket drops
        gone = trio.current_time()
        await trio.sleep(20)
        lines[1].set(True)  # back for a while: the count starts again
        await trio.sleep(1)
        api.instances[1].state = InstanceState.HUNG
        gone = trio.current_time()
        await trio.sleep(29.999)
        assert not tasks[0].ended
        await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()
        assert tasks[0].ended
        assert isinstance(tasks[0].error, ServerLostError)
        assert "i0=down, i1=hung" in str(tasks[0].error)
        assert trio.current_time() - gone == 30.0
        # Still none: a shard queued (or sent back) now fails at once.
        api._scheduler.submit("job2", tasks[1:])
        await trio.testing.wait_all_tasks_blocked()
        assert tasks[1].ended
        assert isinstance(tasks[1].error, ServerLostError)
        # One is back: shards wait for it again.
        api.instances[0].state = InstanceState.READY
        late: ShardTask[Any, Any] = ShardTask("job3", 0, None)
        api._scheduler.submit("job3", [late])
        await trio.sleep(1000)
        assert not late.ended
        nursery.cancel_scope.cancel()


async def test_a_dropped_websocket_and_its_reconnect_are_signalled(
    fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    async with ComfyAPI(
        [fake_comfyui.url], tmp_path / "models", download_dir=tmp_path / "dl"
    ) as api:
        instance = api.instances[0]
        assert instance.healthy
        with trio.fail_after(10):
            fake_comfyui.drop_websockets()
            await instance.wait_state_change()
            assert not instance.healthy
            assert instance.state == "ready"
            await instance.wait_healthy()  # its client reconnects
        assert instance.healthy
