"""Long prompts, idle connections and unreachable servers, on trio's MockClock: a 10-minute
prompt takes milliseconds, and nothing about it is taken for a hang."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import free_port, load_workflow
from test_fault_tolerance import JOB, params

from comfytrio import (
    ComfyAPI,
    ComfyAPIError,
    ComfyUITimeoutError,
    DownloadError,
    ExecutionError,
    FaultPolicy,
    GPUInfo,
    ModelNotFoundError,
    ModelRef,
    RemoteComfyUI,
)
from comfytrio.testing import FakeComfyUI
from comfytrio.testing.pytest_plugin import FakeFactory


def api_on(urls: list[str], tmp_path: Path, **kwargs: Any) -> ComfyAPI:
    return ComfyAPI(
        [RemoteComfyUI(url) for url in urls],
        tmp_path / "models",
        gpu=GPUInfo(False, 0),
        download_dir=tmp_path / "downloads",
        **kwargs,
    )


async def test_a_ten_minute_prompt_is_not_a_hang(
    autojump_clock: trio.testing.MockClock, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    fake = await fake_comfyui_factory(seconds_per_image=600.0)
    api = api_on([fake.url], tmp_path, faults=FaultPolicy(health_interval=5.0, hang_timeout=60.0))
    async with api:
        start = trio.current_time()
        result = await api.run_workflow(JOB, params=params("long", 1))
        took = trio.current_time() - start
        stats = api.statistics()
    assert len(result.outputs) == 1
    assert Path(result.outputs[0].path).is_file()
    assert took >= 600
    assert stats.instances[0].hangs == 0
    assert stats.instances[0].shards_retried == 0


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Proxy:
    """A TCP proxy in front of one server that breaks chosen requests the way the network
    between a client and a real server does: a kept-alive connection closed as a request
    arrives, an answer lost on the way back, a reverse proxy's error page, an endless body."""

    def __init__(self, upstream: FakeComfyUI) -> None:
        self.upstream = upstream
        self.port = 0
        self.drop_before_prompt = 0
        """The next N ``POST /prompt`` meet a closed connection and never reach the server."""
        self.drop_after_prompt = 0
        """The next N reach the server, but their answers are lost."""
        self.refuse_probes = False
        """``GET /system_stats`` is answered 502 by the proxy."""
        self.view_body: Callable[[trio.SocketStream], Awaitable[None]] | None = None
        """Answers ``GET /view`` instead of the server."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[Proxy]) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self)

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream.port)
        async with client, upstream, trio.open_nursery() as nursery:
            lose_answer = trio.Event()
            down = trio.CancelScope()
            nursery.start_soon(self._down, upstream, client, lose_answer, nursery, down)
            with contextlib.suppress(*_GONE):
                async for chunk in client:
                    if chunk.startswith(b"POST /prompt") and self.drop_before_prompt:
                        self.drop_before_prompt -= 1
                        break
                    if chunk.startswith(b"POST /prompt") and self.drop_after_prompt:
                        self.drop_after_prompt -= 1
                        lose_answer.set()
                    elif chunk.startswith(b"GET /system_stats") and self.refuse_probes:
                        await client.send_all(
                            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 11\r\n\r\nBad Gateway"
                        )
                        continue
                    elif chunk.startswith(b"GET /view") and self.view_body is not None:
                        down.cancel()  # the server's connection may close meanwhile
                        await self.view_body(client)
                        break
                    await upstream.send_all(chunk)
            nursery.cancel_scope.cancel()

    async def _down(
        self,
        upstream: trio.SocketStream,
        client: trio.SocketStream,
        lose_answer: trio.Event,
        nursery: trio.Nursery,
        scope: trio.CancelScope,
    ) -> None:
        with scope, contextlib.suppress(*_GONE):
            async for chunk in upstream:
                if lose_answer.is_set():  # the server answered; the client never hears it
                    break
                await client.send_all(chunk)
            nursery.cancel_scope.cancel()


@pytest.fixture
async def proxy_for(nursery: trio.Nursery) -> Callable[[FakeComfyUI], Awaitable[Proxy]]:
    async def start(fake: FakeComfyUI) -> Proxy:
        proxy: Proxy = await nursery.start(Proxy(fake).serve)
        return proxy

    return start


async def test_a_prompt_that_met_a_closed_connection_is_sent_again(
    autojump_clock: trio.testing.MockClock,
    fake_comfyui: FakeComfyUI,
    proxy_for: Callable[[FakeComfyUI], Awaitable[Proxy]],
    tmp_path: Path,
) -> None:
    proxy = await proxy_for(fake_comfyui)
    proxy.drop_before_prompt = 1
    async with api_on([proxy.url], tmp_path) as api:
        result = await api.run_workflow(JOB, params=params("again", 2))
        stats = api.statistics()
    assert len(result.outputs) == 2
    assert len(fake_comfyui.prompts_received) == 1  # the first never arrived
    assert (stats.instances[0].shards_retried, stats.instances[0].hangs) == (0, 0)


async def test_a_prompt_whose_answer_was_lost_runs_once(
    autojump_clock: trio.testing.MockClock,
    fake_comfyui: FakeComfyUI,
    proxy_for: Callable[[FakeComfyUI], Awaitable[Proxy]],
    tmp_path: Path,
) -> None:
    fake_comfyui.set_seconds_per_image(30.0)
    proxy = await proxy_for(fake_comfyui)
    proxy.drop_after_prompt = 1
    async with api_on([proxy.url], tmp_path) as api:
        result = await api.run_workflow(JOB, params=params("once", 2))
    assert len(result.outputs) == 2
    assert len(fake_comfyui.prompts_received) == 1  # looked up by its id, not sent again
    assert fake_comfyui.executed_count == 1


async def test_a_server_that_reports_progress_is_alive_though_its_probes_fail(
    autojump_clock: trio.testing.MockClock,
    fake_comfyui: FakeComfyUI,
    proxy_for: Callable[[FakeComfyUI], Awaitable[Proxy]],
    tmp_path: Path,
) -> None:
    fake_comfyui.add_model("checkpoints", "juggernaut_xl.safetensors")
    fake_comfyui.add_model("loras", "detail_enhancer.safetensors")
    fake_comfyui.set_seconds_per_step(20.0)  # 30 steps: 10 minutes, progress every 20 s
    proxy = await proxy_for(fake_comfyui)
    faults = FaultPolicy(health_interval=5.0, hang_timeout=60.0)
    async with api_on([proxy.url], tmp_path, faults=faults) as api:
        proxy.refuse_probes = True  # a reverse proxy's error page, from now on
        workflow = load_workflow("sdxl_txt2img.json")
        result = await api.run_workflow(
            workflow,
            params={"steps": {"type": "integer", "value": 30, "node_mappings": "API - STEP"}},
        )
        assert len(result.outputs) == 1
        assert api.statistics().instances[0].hangs == 0
        # Once it is quiet, the failing probes are all there is: hung in hang_timeout.
        client = api.instances[0].client
        assert client is not None
        while api.instances[0].state != "hung":
            await api.instances[0].wait_state_change()
        assert 60.0 <= trio.current_time() - client.last_message_at <= 62.0
        proxy.refuse_probes = False
        while api.instances[0].state != "ready":
            await api.instances[0].wait_state_change()
        assert api.statistics().instances[0].hangs == 1


async def test_servers_closing_idle_connections_after_1_s_lose_no_job(
    autojump_clock: trio.testing.MockClock, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    fakes = [await fake_comfyui_factory(idle_timeout=1.0, seconds_per_image=3.0) for _ in range(2)]
    faults = FaultPolicy(health_interval=1.0, hang_timeout=10.0)
    async with api_on([f.url for f in fakes], tmp_path, faults=faults) as api:
        results = []
        for n in range(3):
            results.append(await api.run_workflow(JOB, params=params(f"job{n}", 4)))
            await trio.sleep(6.0)  # idle: every kept-alive connection is closed by now
        stats = api.statistics()
    assert [len(r.outputs) for r in results] == [4, 4, 4]
    assert all(Path(o.path).is_file() for r in results for o in r.outputs)
    assert [(i.hangs, i.restarts, i.shards_retried, i.shards_failed) for i in stats.instances] == [
        (0, 0, 0, 0)
    ] * 2


async def test_an_unreachable_server_does_not_stop_the_others_and_joins_later(
    autojump_clock: trio.testing.MockClock, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> None:
    fakes = [await fake_comfyui_factory() for _ in range(2)]
    late_port = free_port()
    urls = [fakes[0].url, f"http://127.0.0.1:{late_port}", fakes[1].url]
    async with api_on(urls, tmp_path, ready_timeout=30.0) as api:
        assert [i.state for i in api.instances] == ["ready", "connecting", "ready"]
        result = await api.run_workflow(JOB, params=params("two", 4))
        assert {o.instance for o in result.outputs} == {
            api.instances[0].name,
            api.instances[2].name,
        }
        late = await fake_comfyui_factory(port=late_port)
        await api.instances[1].wait_healthy()
        result = await api.run_workflow(JOB, params=params("three", 3))
        assert {o.instance for o in result.outputs} == {i.name for i in api.instances}
    assert len(late.prompts_received) == 1


async def test_too_few_servers_reachable_is_a_timeout_naming_each(
    autojump_clock: trio.testing.MockClock, fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    api = api_on([fake_comfyui.url, nowhere], tmp_path, ready_timeout=20.0, min_instances=2)
    with pytest.raises(ComfyUITimeoutError) as info:
        async with api:
            pytest.fail("must not start with one server of the two needed")
    message = str(info.value)
    assert "1 of the 2 ComfyUI instance(s) needed were ready after 20 s" in message
    assert nowhere.removeprefix("http://") in message


async def trickle(client: trio.SocketStream) -> None:
    """An answer to ``GET /view`` that never ends: one byte a second."""
    await client.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while True:
        await client.send_all(b"1\r\nx\r\n")
        await trio.sleep(1.0)


async def flood(client: trio.SocketStream) -> None:
    """An answer to ``GET /view`` that never ends, as fast as it can be read."""
    await client.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while True:
        await client.send_all(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (trickle, ComfyUITimeoutError, "not downloaded in 120 s"),
        (flood, DownloadError, "over the 1048576-byte cap"),
    ],
)
async def test_an_endless_output_fails_its_shard_in_time_with_no_partial_file(
    autojump_clock: trio.testing.MockClock,
    fake_comfyui: FakeComfyUI,
    proxy_for: Callable[[FakeComfyUI], Awaitable[Proxy]],
    tmp_path: Path,
    body: Callable[[trio.SocketStream], Awaitable[None]],
    error: type[Exception],
    words: str,
) -> None:
    proxy = await proxy_for(fake_comfyui)
    proxy.view_body = body
    api = api_on([proxy.url], tmp_path, execution_timeout=120.0, max_output_bytes=1 << 20)
    async with api:
        started = trio.current_time()
        with pytest.raises(error, match=words):
            await api.run_workflow(JOB, params=params("endless", 1))
        assert trio.current_time() - started < 150.0  # the shard's 120 s, and little more
    assert [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()] == []


async def test_a_failed_shard_keeps_the_files_written_before_the_failure(
    fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    workflow = dict(JOB)
    workflow["5"] = {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}}
    workflow["6"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["5", 0], "filename_prefix": "never"},
    }
    fake_comfyui.fail_node("ImageInvert", message="CUDA out of memory")
    async with api_on([fake_comfyui.url], tmp_path) as api:
        with pytest.raises(ExecutionError) as info:
            await api.run_workflow(workflow, params=params("kept", 2))
    error = info.value
    assert (error.node_id, error.node_type) == ("5", "ImageInvert")
    assert [o.node_id for o in error.outputs] == ["4", "4"]
    assert all(Path(o.path).is_file() and o.prompt_id == error.prompt_id for o in error.outputs)


async def test_closing_the_api_removes_the_running_prompts_from_their_servers(
    autojump_clock: trio.testing.MockClock, fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    fake_comfyui.set_seconds_per_image(600.0)
    errors: list[BaseException] = []

    async def job(api: ComfyAPI) -> None:
        try:
            await api.run_workflow(JOB, params=params("closed", 2))
        except ComfyAPIError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery, api_on([fake_comfyui.url], tmp_path) as api:
        nursery.start_soon(job, api)
        while fake_comfyui.running_id is None:  # noqa: ASYNC110
            await trio.sleep(1.0)
    assert [type(e) for e in errors] == [ComfyAPIError]
    assert "closed" in str(errors[0])
    await fake_comfyui.wait_idle()  # interrupted: nothing runs on, nothing waits
    assert idle(fake_comfyui)


def idle(fake: FakeComfyUI) -> bool:
    """Nothing runs on ``fake`` and nothing waits in its queue."""
    return fake.running_id is None and not fake.queue_ids()


async def test_remote_servers_need_no_models_folder(
    fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    fake_comfyui.add_model("checkpoints", "juggernaut_xl.safetensors")
    api = ComfyAPI([fake_comfyui.url], gpu=GPUInfo(False, 0), download_dir=tmp_path / "out")
    assert api.models_path is None
    async with api:
        result = await api.run_workflow(
            JOB,
            params=params("remote", 1),
            models=[ModelRef("checkpoints", "juggernaut_xl.safetensors")],
        )
        with pytest.raises(ModelNotFoundError, match=r"checkpoints/missing\.safetensors"):
            await api.run_workflow(
                JOB,
                params=params("remote", 1),
                models=[ModelRef("checkpoints", "missing.safetensors")],
            )
    assert len(result.outputs) == 1
