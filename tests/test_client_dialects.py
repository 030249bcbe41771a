"""The client against both versions the fake ComfyUI speaks (``COMFYUI_VERSIONS``): the same
calls work on each, the later server's ``/api/jobs`` is found (never assumed) and used to look
prompts up and to cancel them, the classic server keeps ``/queue``, ``/history`` and
``/interrupt``."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from conftest import empty_to_save, sampler_workflow, until

from comfytrio import (
    ComfyClient,
    ComfyEvent,
    ComfyUITimeoutError,
    NodeActivity,
    PromptFinished,
    PromptVanishedError,
    WorkflowError,
    open_comfy_client,
)
from comfytrio.testing import COMFYUI_VERSIONS, FakeComfyUI

Factory = Callable[..., Awaitable[FakeComfyUI]]
LATER = "0.38.1"


def record(fake: FakeComfyUI, route: str, method: str = "POST") -> list[Any]:
    """The answers the fake gives to ``method route`` from now on (left as they are;
    ``route`` without its ``/api`` prefix, which the fake's rules match either way)."""
    seen: list[Any] = []

    def note(body: bytes) -> None:
        seen.append(json.loads(body) if body else None)

    fake.corrupt_answers(route, body=note, method=method)
    return seen


async def wait_queue_empty(client: ComfyClient) -> None:
    with trio.fail_after(3):
        while await client.queued_prompt_ids():  # noqa: ASYNC110 (a server's state)
            await trio.sleep(0.02)


@pytest.fixture(params=COMFYUI_VERSIONS)
async def fake(request: pytest.FixtureRequest, fake_comfyui_factory: Factory) -> FakeComfyUI:
    """A fake ComfyUI of each version."""
    return await fake_comfyui_factory(comfyui_version=request.param)


@pytest.fixture
async def client(fake: FakeComfyUI) -> AsyncIterator[ComfyClient]:
    async with open_comfy_client(fake.url, silence_timeout=0.5, reconnect_timeout=2) as c:
        yield c


def later(fake: FakeComfyUI) -> bool:
    return fake.comfyui_version == LATER


# -- the same calls on every version ------------------------------------------------------------


async def test_run_with_our_uuid_prompt_ids(fake: FakeComfyUI, client: ComfyClient) -> None:
    result = await client.run(empty_to_save(batch=2))
    assert str(uuid.UUID(result.prompt_id)) == result.prompt_id  # canonical, lower case
    assert len(result.files) == 2
    assert client.statistics().jobs_api is None  # not asked yet: nothing needed it
    assert await client.detect_jobs_api() is later(fake)
    assert client.statistics().jobs_api is later(fake)


async def test_an_id_of_the_caller_that_is_no_uuid(fake: FakeComfyUI, client: ComfyClient) -> None:
    if later(fake):
        with pytest.raises(WorkflowError, match="prompt_id"):
            await client.submit(empty_to_save(), prompt_id="my-own-id")
    else:
        assert (await client.submit(empty_to_save(), prompt_id="my-own-id")).prompt_id
        await client.wait("my-own-id")


async def test_cancelled_caller_leaves_nothing_on_the_server(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    jobs_cancels = record(fake, "/jobs/{job_id}/cancel")
    interrupts = record(fake, "/interrupt")
    fake.set_seconds_per_image(5.0)
    async with trio.open_nursery() as nursery:
        for i in range(3):  # one runs, two wait in the server's queue
            nursery.start_soon(client.run, empty_to_save(prefix=f"p{i}"))
        await trio.sleep(0.3)
        assert len(await client.queued_prompt_ids()) == 3
        nursery.cancel_scope.cancel()
    await wait_queue_empty(client)
    assert client.statistics().in_flight == 0
    if later(fake):
        assert sorted(a["cancelled"] for a in jobs_cancels) == [True, True, True]
        assert interrupts == []
    else:
        assert jobs_cancels == []
        assert len(interrupts) == 3


async def test_timeout_interrupts_the_prompt(fake: FakeComfyUI, client: ComfyClient) -> None:
    fake.set_seconds_per_image(5.0)
    with pytest.raises(ComfyUITimeoutError):
        await client.run(empty_to_save(), timeout=0.3)
    await wait_queue_empty(client)


async def test_dropped_websocket_loses_nothing(fake: FakeComfyUI, client: ComfyClient) -> None:
    lookups = record(fake, "/jobs/{job_id}", method="GET")
    fake.set_seconds_per_image(0.5)
    submitted = await client.submit(empty_to_save(batch=2, prefix="drop"))
    await trio.sleep(0.2)
    fake.drop_websockets()  # the prompt ends while we are reconnecting
    with trio.fail_after(10):
        result = await client.wait(submitted.prompt_id)
    assert [f.filename for f in result.files] == ["drop_00001_.png", "drop_00002_.png"]
    assert client.statistics().reconnects == 1
    assert bool(lookups) is later(fake)  # reconciled through /api/jobs/{id} where it is
    assert (await client.run(empty_to_save(prefix="after"))).files  # the socket works again


async def test_prompt_deleted_by_someone_else_vanishes(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    fake.set_seconds_per_image(1.0)
    running = await client.submit(empty_to_save(prefix="a"))
    pending = await client.submit(empty_to_save(prefix="b"))
    await client.delete_from_queue([pending.prompt_id])  # as another client would
    with trio.fail_after(5), pytest.raises(PromptVanishedError):
        await client.wait(pending.prompt_id)
    assert (await client.wait(running.prompt_id)).files


# -- the later version ------------------------------------------------------------------------


@pytest.fixture
async def later_fake(fake_comfyui_factory: Factory) -> FakeComfyUI:
    return await fake_comfyui_factory(comfyui_version=LATER)


async def test_cancel_through_the_jobs_api_stops_the_prompt(later_fake: FakeComfyUI) -> None:
    fake = later_fake
    answers = record(fake, "/jobs/{job_id}/cancel")
    classic = record(fake, "/queue") + record(fake, "/interrupt")
    fake.set_seconds_per_image(5.0)
    async with open_comfy_client(fake.url) as client:
        submitted = await client.submit(empty_to_save())
        await until(lambda: fake.running_id == submitted.prompt_id)
        await client.cancel_prompt(submitted.prompt_id)
        assert answers == [{"cancelled": True}]  # the fake saw the cancel, and did it
        with trio.fail_after(5):
            while await client.job_status(submitted.prompt_id) != "cancelled":  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert fake.running_id is None
        assert client.statistics().jobs_api is True
    assert classic == []


async def test_a_later_server_s_activity_becomes_events(later_fake: FakeComfyUI) -> None:
    later_fake.add_model("checkpoints", "m.safetensors")
    workflow = sampler_workflow(width=16, height=16, steps=2)
    seen: list[ComfyEvent] = []
    async with open_comfy_client(later_fake.url) as client, client.subscribe() as events:
        result = await client.run(workflow)
        while not (seen and isinstance(seen[-1], PromptFinished)):
            seen.append(events.receive_nowait())
    activity = [(e.node_id, e.activity) for e in seen if isinstance(e, NodeActivity)]
    assert activity == [("4", "loading"), ("4", None)]
    assert all(e.prompt_id == result.prompt_id for e in seen if isinstance(e, NodeActivity))


async def test_a_jobs_route_that_is_not_comfyui_s_is_the_classic_dialect(
    later_fake: FakeComfyUI,
) -> None:
    # A proxy's page where /api/jobs would be: the client keeps /queue and /history.
    later_fake.corrupt_answers("/jobs", body="<html>hello</html>", method="GET")
    async with open_comfy_client(later_fake.url) as client:
        assert await client.detect_jobs_api() is False
        assert client.statistics().jobs_api is False
        assert (await client.run(empty_to_save())).files
