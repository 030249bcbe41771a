"""``ComfyAPI.reattach``: a prompt posted by someone else (a process that was restarted,
say) is found on its server, waited for by polling, and its outputs collected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import empty_to_save, until

from comfytrio import (
    ComfyAPI,
    ComfyUITimeoutError,
    ExecutionError,
    ExecutionInterruptedError,
    PromptVanishedError,
    ServerLostError,
    open_comfy_client,
    shard_prompt_id,
)
from comfytrio.testing import FakeComfyUI

PROMPT = "0b6e4c1a-9f3d-4e2b-8a17-5c9d2e7f4a01"
OTHER = "7d2f9a4c-1b8e-4c6d-9e3a-2f5b8c1d6e02"


@pytest.fixture
def io_clock() -> trio.testing.MockClock:
    """A virtual clock that jumps once every task has been blocked for 20 ms of real time
    (a cancel's requests still reach the fakes before its deadline passes)."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def post(fake: FakeComfyUI, workflow: dict[str, Any], prompt_id: str) -> None:
    """Post ``workflow`` as ``prompt_id`` with a client of its own, as a front end that
    was killed since would have."""
    async with open_comfy_client(fake.url) as client:
        await client.submit(workflow, prompt_id=prompt_id)


async def test_a_prompt_posted_elsewhere_is_found_and_collected_when_it_ends(
    autojump_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    slow = comfy_fakes[1]
    slow.set_node_seconds("EmptyImage", 20)
    await post(slow, empty_to_save(batch=2, prefix="back"), PROMPT)
    started = trio.current_time()
    outputs = await comfy_api.reattach(PROMPT)  # no url: every ready server is asked
    assert trio.current_time() - started >= 19  # it waited for the prompt to end
    assert len(outputs.files) == 2
    assert {f.prompt_id for f in outputs.files} == {PROMPT}
    assert {f.instance for f in outputs.files} == {comfy_api.instances[1].name}
    assert [f.filename for f in outputs.files] == ["back_00001_.png", "back_00002_.png"]
    for file in outputs.files:
        assert Path(file.path).is_file()
        assert Path(file.path).is_relative_to(comfy_api.download_dir / PROMPT)
    assert outputs.values == []


async def test_the_server_named_by_url_is_asked_first(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    await post(comfy_fakes[1], empty_to_save(prefix="first"), PROMPT)
    await comfy_fakes[1].wait_idle()
    outputs = await comfy_api.reattach(PROMPT, url=comfy_fakes[1].url + "/")
    assert [f.instance for f in outputs.files] == [comfy_api.instances[1].name]


async def test_a_shard_of_a_finished_job_is_found_by_its_prompt_id(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    result = await comfy_api.run_workflow(empty_to_save(batch=3), job_id="done", max_shards=1)
    (report,) = result.shards
    assert report.prompt_id == shard_prompt_id("done", 0, 1)
    url = next(i.url for i in comfy_api.instances if i.name == report.instance)
    outputs = await comfy_api.reattach(report.prompt_id, url=url)
    assert [f.filename for f in outputs.files] == [o.filename for o in result.outputs]


async def test_an_unknown_prompt_is_refused(comfy_api: ComfyAPI) -> None:
    with pytest.raises(PromptVanishedError) as caught:
        await comfy_api.reattach(PROMPT)
    assert caught.value.prompt_id == PROMPT
    assert caught.value.instance == comfy_api.instances[0].name


async def test_a_server_that_cannot_say_is_not_a_vanished_prompt(
    autojump_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    comfy_fakes[1].crash()  # it may still hold the prompt when it comes back
    with pytest.raises(ServerLostError) as caught:
        await comfy_api.reattach(PROMPT, url=comfy_fakes[1].url)
    assert caught.value.prompt_id == PROMPT
    assert caught.value.instance == comfy_api.instances[1].name


@pytest.mark.parametrize("bad", ["", "..", "a/b", "x?y", "x" * 129])
async def test_a_malformed_prompt_id_is_refused(comfy_api: ComfyAPI, bad: str) -> None:
    with pytest.raises(ValueError, match="prompt_id"):
        await comfy_api.reattach(bad)


async def test_a_failed_prompt_raises_its_execution_error(
    autojump_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    fake = comfy_fakes[0]
    fake.fail_node("SaveImage", message="CUDA out of memory")
    fake.set_node_seconds("EmptyImage", 5)
    await post(fake, empty_to_save(), PROMPT)
    with pytest.raises(ExecutionError) as caught:
        await comfy_api.reattach(PROMPT, url=fake.url)
    error = caught.value
    assert not isinstance(error, ExecutionInterruptedError)
    assert (error.instance, error.prompt_id) == (comfy_api.instances[0].name, PROMPT)
    assert (error.node_id, error.node_type) == ("2", "SaveImage")
    assert "CUDA out of memory" in error.exception_message


@pytest.mark.comfy_api(comfyui_version="0.38.1")
async def test_on_a_server_with_the_jobs_api(
    autojump_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    fake = comfy_fakes[1]
    fake.set_node_seconds("EmptyImage", 10)
    await post(fake, empty_to_save(batch=2, prefix="jobs"), PROMPT)
    outputs = await comfy_api.reattach(PROMPT, url=fake.url)
    assert len(outputs.files) == 2
    client = comfy_api.instances[1].client
    assert client is not None
    assert client.jobs_api is True
    with pytest.raises(PromptVanishedError):
        await comfy_api.reattach(OTHER)


async def test_past_its_timeout_the_prompt_is_interrupted(
    io_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    fake = comfy_fakes[0]
    fake.set_node_seconds("EmptyImage", 30)
    await post(fake, empty_to_save(), PROMPT)
    started = trio.current_time()
    with pytest.raises(ComfyUITimeoutError) as caught:
        await comfy_api.reattach(PROMPT, url=fake.url, timeout=3)
    assert 3 <= trio.current_time() - started < 10
    assert (caught.value.prompt_id, caught.value.timeout) == (PROMPT, 3)
    await fake.wait_idle()
    assert trio.current_time() - started < 30  # interrupted, not run to its end
    status = fake.history()[PROMPT]["status"]
    assert status["status_str"] == "error"
    assert fake.queue_ids() == []


async def test_a_cancelled_reattach_interrupts_its_running_prompt(
    io_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    fake = comfy_fakes[0]
    fake.set_node_seconds("EmptyImage", 30)
    await post(fake, empty_to_save(), PROMPT)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(comfy_api.reattach, PROMPT)
        await until(lambda: fake.running_id == PROMPT)
        await trio.sleep(0.5)  # it polls now
        nursery.cancel_scope.cancel()
    assert fake.running_id is None or fake.running_id != PROMPT
    await fake.wait_idle()
    assert trio.current_time() - started < 30
    messages = [m[0] for m in fake.history()[PROMPT]["status"]["messages"]]
    assert "execution_interrupted" in messages


async def test_a_cancelled_reattach_deletes_its_queued_prompt(
    io_clock: trio.testing.MockClock, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    fake = comfy_fakes[0]
    fake.set_node_seconds("EmptyImage", 5)
    await post(fake, empty_to_save(prefix="ahead"), OTHER)  # runs first
    await post(fake, empty_to_save(prefix="queued"), PROMPT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(comfy_api.reattach, PROMPT)
        await until(lambda: fake.running_id == OTHER and fake.queue_ids() == [PROMPT])
        await trio.sleep(0.5)  # it polls now
        nursery.cancel_scope.cancel()
    assert PROMPT not in fake.queue_ids()
    await fake.wait_idle()
    assert PROMPT not in fake.history()  # it never ran
    assert OTHER in fake.history()  # someone else's prompt runs on
