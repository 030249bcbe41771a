"""The client for one server, over real sockets against the fake ComfyUI 0.3.64 (the calls
that differ between ComfyUI versions, cancel and reconcile, run against every version in
tests/test_client_dialects.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio
from conftest import empty_to_save

import comfytrio._files
from comfytrio import (
    ComfyClient,
    ComfyUITimeoutError,
    ExecutionError,
    ExecutionInterruptedError,
    NodeOutput,
    NodeStarted,
    OutputRef,
    PromptFinished,
    PromptVanishedError,
    ServerLostError,
    WorkflowError,
    open_comfy_client,
)
from comfytrio._http import HttpClient
from comfytrio.testing import FakeComfyUI, serve_fake_comfyui

WORKFLOWS = Path(__file__).parent / "workflows"


async def wait_queue_empty(client: ComfyClient) -> None:
    """Until the server runs and holds none of our prompts (interrupts are cooperative)."""
    with trio.fail_after(3):
        while True:
            if not await client.queued_prompt_ids():
                return
            await trio.sleep(0.02)


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeComfyUI]:
    async with trio.open_nursery() as nursery:
        server: FakeComfyUI = await nursery.start(serve_fake_comfyui, tmp_path / "comfy")
        yield server
        nursery.cancel_scope.cancel()


@pytest.fixture
async def client(fake: FakeComfyUI) -> AsyncIterator[ComfyClient]:
    async with open_comfy_client(fake.url, silence_timeout=0.5, reconnect_timeout=2) as c:
        yield c


async def test_run_returns_the_files_the_server_wrote(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    result = await client.run(empty_to_save(batch=2, prefix="sub/dir/pic"))
    names = [(f.subfolder, f.filename, f.type) for f in result.files]
    assert names == [
        ("sub/dir", "pic_00001_.png", "output"),
        ("sub/dir", "pic_00002_.png", "output"),
    ]
    for ref in result.files:
        assert (Path(fake.output_dir) / ref.subfolder / ref.filename).is_file()
    assert not result.fully_cached


async def test_model_free_workflow_with_uploaded_picture(client: ComfyClient) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), "blue").save(buffer, format="PNG")
    name = await client.upload_image("example.png", buffer.getvalue())
    assert name == "example.png"
    workflow = json.loads((WORKFLOWS / "model_free.json").read_text())
    result = await client.run(workflow)
    by_node = {ref.node_id: ref for ref in result.files}
    assert set(by_node) == {"4", "7"}
    assert len([r for r in result.files if r.node_id == "4"]) == 4


async def test_we_choose_the_prompt_id(fake: FakeComfyUI, client: ComfyClient) -> None:
    submitted = await client.submit(empty_to_save(), prompt_id="my-own-id")
    assert submitted.prompt_id == "my-own-id"
    result = await client.wait("my-own-id")
    assert result.prompt_id == "my-own-id"
    assert await client.history("my-own-id") is not None


async def test_identical_resubmit_is_served_from_cache(client: ComfyClient) -> None:
    first = await client.run(empty_to_save(prefix="c"))
    again = await client.run(empty_to_save(prefix="c"))
    assert again.fully_cached
    assert [f.filename for f in again.files] == [f.filename for f in first.files]


async def test_validation_error_names_node_and_input(client: ComfyClient) -> None:
    workflow = empty_to_save()
    workflow["1"]["inputs"]["width"] = 99999
    with pytest.raises(WorkflowError) as info:
        await client.run(workflow)
    err = info.value
    assert err.status_code == 400
    assert err.error["type"] == "prompt_outputs_failed_validation"
    assert err.node_errors["1"]["errors"][0]["type"] == "value_bigger_than_max"
    assert "node 1 (EmptyImage), input 'width'" in str(err)
    assert client.statistics().in_flight == 0


async def test_unknown_class_type(client: ComfyClient) -> None:
    workflow = empty_to_save()
    workflow["1"]["class_type"] = "NoSuchNode"
    with pytest.raises(WorkflowError, match="NoSuchNode does not exist") as info:
        await client.submit(workflow)
    assert info.value.error["type"] == "invalid_prompt"


async def test_dropped_outputs_are_an_error_and_the_prompt_is_removed(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    workflow = empty_to_save(prefix="ok")
    workflow["3"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 0, "color": 0},
    }
    workflow["4"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["3", 0], "filename_prefix": "bad"},
    }
    with pytest.raises(WorkflowError) as info:
        await client.submit(workflow)
    assert info.value.partial
    assert info.value.status_code == 200
    assert "3" in info.value.node_errors
    await wait_queue_empty(client)


async def test_execution_error_carries_node_and_exception(client: ComfyClient) -> None:
    workflow = {
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": 0}},
        "2": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": ["1", 0], "color": 0},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "z"}},
    }
    with pytest.raises(ExecutionError) as info:
        await client.run(workflow)
    err = info.value
    assert err.prompt_id
    assert err.node_id is not None
    assert err.node_type in {"EmptyImage", "SaveImage"}
    assert err.exception_type


async def test_interrupt_by_someone_else(fake: FakeComfyUI, client: ComfyClient) -> None:
    fake.set_seconds_per_image(2.0)
    async with trio.open_nursery() as nursery:

        async def interrupt_soon() -> None:
            await trio.sleep(0.3)
            await client.interrupt()  # global, as another user would

        nursery.start_soon(interrupt_soon)
        with pytest.raises(ExecutionInterruptedError):
            await client.run(empty_to_save())


async def test_events_arrive_through_a_subscription(client: ComfyClient) -> None:
    async with client.subscribe() as events:
        result = await client.run(empty_to_save(batch=1, prefix="ev"))
        seen: list[object] = []
        while True:
            event = events.receive_nowait()
            seen.append(event)
            if isinstance(event, PromptFinished):
                break
    mine = [e for e in seen if getattr(e, "prompt_id", None) == result.prompt_id]
    assert any(isinstance(e, NodeStarted) for e in mine)
    assert any(isinstance(e, NodeOutput) and e.node_id == "2" for e in mine)
    assert isinstance(mine[-1], PromptFinished)
    assert mine[-1].status == "success"


async def test_download_writes_the_file_atomically(client: ComfyClient, tmp_path: Path) -> None:
    result = await client.run(empty_to_save(prefix="dl"))
    ref = result.files[0]
    dest = await client.download(ref, tmp_path / "got" / "x.png")
    assert dest.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in dest.parent.iterdir()] == ["x.png"]


async def test_a_download_may_take_the_longest_name_a_file_system_allows(
    client: ComfyClient, tmp_path: Path
) -> None:
    # The temp file has a short name of its own: one derived from dest's would be too long.
    result = await client.run(empty_to_save(prefix="long"))
    dest = await client.download(result.files[0], tmp_path / "got" / ("x" * 251 + ".png"))
    assert dest.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


async def test_a_large_download_is_written_in_pieces(
    fake: FakeComfyUI, client: ComfyClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(comfytrio._files, "SPILL_BYTES", 64)
    result = await client.run(empty_to_save(prefix="big"))
    ref = result.files[0]
    dest = await client.download(ref, tmp_path / "got" / "x.png")
    assert dest.read_bytes() == (fake.output_dir / ref.subfolder / ref.filename).read_bytes()
    assert len(dest.read_bytes()) > 3 * 64  # written in several pieces
    assert [p.name for p in dest.parent.iterdir()] == ["x.png"]


@pytest.mark.parametrize("spill", [100, 8 * 1024 * 1024])
async def test_a_download_cut_mid_body_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spill: int
) -> None:
    monkeypatch.setattr(comfytrio._files, "SPILL_BYTES", spill)

    async def half_a_file(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 400)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, half_a_file, 0, host="127.0.0.1"))
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with HttpClient(url) as http:
            client = ComfyClient(url=url, name="cut", client_id="c", http=http)
            with pytest.raises(ServerLostError, match="GET /view"):
                await client.download(OutputRef("9", "x.png", "", "output"), tmp_path / "x.png")
        nursery.cancel_scope.cancel()
    assert list(tmp_path.iterdir()) == []


async def test_a_post_prompt_keeps_the_client_s_settings_and_a_timeout_is_server_lost() -> None:
    received: list[bytes] = []

    async def silent(stream: trio.SocketStream) -> None:
        received.append(await stream.receive_some(65536))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with HttpClient(url, timeout=0.2, headers={"X-Team": "render"}) as http:
            client = ComfyClient(url=url, name="quiet", client_id="c", http=http)
            with trio.fail_after(5), pytest.raises(ServerLostError, match="HTTPTimeout"):
                await client.submit({"1": {"class_type": "EmptyImage", "inputs": {}}})
        nursery.cancel_scope.cancel()
    head, _, body = received[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /prompt HTTP/1.1")
    assert b"X-Team: render" in head  # the client's headers
    assert json.loads(body)["client_id"] == "c"


async def test_every_request_of_a_client_goes_through_its_http_client(
    fake: FakeComfyUI, tmp_path: Path
) -> None:
    async with open_comfy_client(fake.url) as comfy:
        assert isinstance(comfy.http, HttpClient)
        (ref,) = (await comfy.run(empty_to_save())).files
        await comfy.download(ref, tmp_path / "x.png")
        await comfy.cancel_prompt("gone")
        stats = comfy.http.statistics()
        assert stats.opened == 1  # one kept-alive connection for all of them
        assert stats.reused >= 3


async def test_requests_and_the_websocket_go_through_the_proxy_of_the_environment(
    fake: FakeComfyUI, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bytes] = []

    async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(65536):
                await sink.send_all(data)

    async def proxy(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        seen.append(head.split(b"\r\n", 1)[0])
        if head.startswith(b"CONNECT "):  # the websocket's tunnel
            host, port = head.split(b" ")[1].decode().rsplit(":", 1)
            upstream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            async with upstream, trio.open_nursery() as tunnel:
                tunnel.start_soon(pipe, stream, upstream)
                await pipe(upstream, stream)
                tunnel.cancel_scope.cancel()
            return
        body = b'{"system": {"comfyui_version": "via proxy"}}'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with open_comfy_client(fake.url) as comfy:
            assert comfy.connected  # through the tunnel
            stats = await comfy.system_stats()
        nursery.cancel_scope.cancel()
    assert stats["system"]["comfyui_version"] == "via proxy"
    authority = fake.url.removeprefix("http://").encode()
    assert seen == [
        b"CONNECT %s HTTP/1.1" % authority,
        f"GET {fake.url}/system_stats HTTP/1.1".encode(),
    ]


async def test_models_and_system_stats(fake: FakeComfyUI, client: ComfyClient) -> None:
    (Path(fake.models_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
    (Path(fake.models_dir) / "checkpoints" / "sd.safetensors").write_bytes(b"x")
    assert await client.list_models("checkpoints") == ["sd.safetensors"]
    stats = await client.system_stats()
    assert "comfyui_version" in stats["system"]


async def test_unreachable_server_is_server_lost() -> None:
    with pytest.raises(ServerLostError, match="cannot connect"):
        async with open_comfy_client("http://127.0.0.1:9"):
            pass


async def test_server_crash_mid_prompt_is_server_lost(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    fake.set_seconds_per_image(5.0)
    submitted = await client.submit(empty_to_save())
    await trio.sleep(0.2)
    fake.crash()
    with trio.fail_after(10), pytest.raises(ServerLostError) as info:
        await client.wait(submitted.prompt_id)
    assert info.value.prompt_id == submitted.prompt_id
    assert not client.statistics().connected


async def test_restart_that_forgot_the_prompt_is_vanished(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    fake.set_seconds_per_image(5.0)
    submitted = await client.submit(empty_to_save())
    await trio.sleep(0.2)
    await fake.restart()  # queue and history are lost, as with a real restart
    with trio.fail_after(10), pytest.raises(PromptVanishedError):
        await client.wait(submitted.prompt_id)
    assert client.statistics().reconnects == 1


async def test_queue_cleared_by_someone_else(fake: FakeComfyUI, client: ComfyClient) -> None:
    fake.set_seconds_per_image(1.0)
    running = await client.submit(empty_to_save(prefix="r"))
    pending = await client.submit(empty_to_save(prefix="p"))
    await trio.sleep(0.1)
    fake.clear_queue()
    with trio.fail_after(5), pytest.raises(PromptVanishedError):
        await client.wait(pending.prompt_id)
    assert (await client.wait(running.prompt_id)).files


async def test_hung_server_times_out_and_cancel_is_bounded(
    fake: FakeComfyUI, client: ComfyClient
) -> None:
    client.cancel_timeout = 0.5
    fake.hang()
    with trio.fail_after(5), pytest.raises((ComfyUITimeoutError, ServerLostError)):
        await client.run(empty_to_save(), timeout=0.5)
    fake.unhang()
