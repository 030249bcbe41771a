"""The api's instances as a group: started all at once until ``min_instances`` are ready, and
watched so that no shard waits forever when none of them can take work."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from ._errors import ComfyAPIError, ComfyUITimeoutError, ServerLostError, unwrapped
from ._instance import Instance, InstanceState
from ._scheduler import Scheduler
from ._shards import P, R

__all__ = ["start_all", "watch_capacity"]

logger = logging.getLogger("comfytrio")


async def start_all(
    instances: Sequence[Instance], nursery: trio.Nursery, *, need: int, ready_timeout: float
) -> None:
    """Start (or connect to) every instance at once; return once each has had its first try
    (our processes started or failed, the other servers answered or not) and at least
    ``need`` are ready. Servers that did not answer go on connecting in ``nursery`` and take
    work when they are ready.

    Raises the first startup error (the others in ``other_errors``) as soon as too few
    instances are left to reach ``need``, and ``ComfyUITimeoutError`` when they are not
    ready in ``ready_timeout`` seconds.
    """
    need = min(need, len(instances))
    ready: list[Instance] = []
    failed: list[ComfyAPIError] = []
    settled = trio.Event()

    async def start(instance: Instance) -> None:
        try:
            with unwrapped(ComfyAPIError):
                await nursery.start(instance.serve)
        except ComfyAPIError as exc:  # our process could not start
            instance.last_error, instance.state = exc, InstanceState.FAILED
            failed.append(exc)
            logger.error("ComfyUI %s could not be started: %s", instance.name, exc)
        else:
            ready.append(instance)
        if len(ready) >= need or len(instances) - len(failed) < need:
            settled.set()

    for instance in instances:
        nursery.start_soon(start, instance)
    # Our processes time out by themselves after ready_timeout; a little more for them.
    with trio.move_on_after(ready_timeout + 5.0):
        for instance in instances:  # so a job's split counts every server up now
            await instance.tried.wait()
        await settled.wait()
    if len(ready) >= need:
        waiting = [i.name for i in instances if i not in ready and i.state != InstanceState.FAILED]
        logger.info(
            "%d ComfyUI instance(s) ready%s",
            len(ready),
            f"; still starting or connecting: {', '.join(waiting)}" if waiting else "",
        )
        return
    if failed and len(instances) - len(failed) < need:
        failed[0].other_errors = list(failed[1:])
        raise failed[0]
    late = [i for i in instances if i not in ready]
    raise ComfyUITimeoutError(
        f"{len(ready)} of the {need} ComfyUI instance(s) needed were ready after "
        f"{ready_timeout:g} s; " + "; ".join(f"{i.name}: {i.last_error or i.state}" for i in late),
        instance=late[0].name,
        timeout=ready_timeout,
    )


async def watch_capacity(
    instances: Sequence[Instance], scheduler: Scheduler[Instance, P, R], limit: float
) -> None:
    """Fail the queued shards when no instance could take them for ``limit`` seconds, so no
    job waits forever on servers that are all gone; then fail each shard queued until one
    can again. Woken by the instances' state changes and the queue, never by a timer of its
    own."""
    while True:
        await _wait_none_healthy(instances)
        with trio.move_on_after(limit):
            await _wait_some_healthy(instances)
            continue
        while not any(i.healthy for i in instances):
            states = ", ".join(f"{i.name}={i.state}" for i in instances)
            why = f"no ComfyUI instance has been able to take work for {limit:g} s"
            count = scheduler.fail_queued(ServerLostError("all", f"{why} (states: {states})"))
            if count:
                logger.error("failed %d queued shard(s): no healthy instance", count)
            await _first_of(lambda: _wait_some_healthy(instances), scheduler.wait_queued)


async def _wait_none_healthy(instances: Sequence[Instance]) -> None:
    """Until no instance is healthy. Waiting on each healthy one in turn is enough: the one
    waited on is healthy, so the last to go is always one waited on."""
    while healthy := [i for i in instances if i.healthy]:
        while healthy[0].healthy:
            await healthy[0].wait_state_change()


async def _wait_some_healthy(instances: Sequence[Instance]) -> None:
    """Until some instance is healthy (at once if one is)."""
    await _first_of(*(i.wait_healthy for i in instances))


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Run every wait at once; return when the first returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:

        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)
