"""Faults switched on at any time: failing nodes, crashes, hangs, slow starts, dropped sockets."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import Comfy, load_workflow

from comfytrio.testing import FakeComfyUI


def tiny(color: int = 0) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "f"}},
    }


async def test_fail_node_by_class_and_by_id(comfy: Comfy) -> None:
    listener = await comfy.listen()
    comfy.fake.fail_node(
        "SaveImage", message="CUDA out of memory", exception_type="torch.OutOfMemoryError", times=1
    )
    _, messages, entry = await comfy.run(tiny(1), listener)
    error = next(m for m in messages if m["type"] == "execution_error")["data"]
    assert error["node_id"] == "2"
    assert error["node_type"] == "SaveImage"
    assert error["exception_type"] == "torch.OutOfMemoryError"
    assert error["exception_message"] == "CUDA out of memory\n"
    assert error["executed"] == ["1"]
    assert set(error["current_inputs"]) == {"images", "filename_prefix", "prompt", "extra_pnginfo"}
    assert entry["status"]["status_str"] == "error"
    assert entry["outputs"] == {}
    assert [m["type"] for m in messages][-3:] == ["execution_error", "status", "executing"]
    _, _, entry = await comfy.run(tiny(1), listener)  # times=1: the next run succeeds
    assert entry["status"]["status_str"] == "success"
    comfy.fake.fail_node("1")
    _, _, entry = await comfy.run(tiny(2), listener)
    assert entry["status"]["messages"][-1][1]["node_id"] == "1"
    comfy.fake.clear_faults()
    _, _, entry = await comfy.run(tiny(2), listener)
    assert entry["status"]["status_str"] == "success"


async def _refused(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as fresh:
        with pytest.raises(httpx.ConnectError):
            await fresh.get("/system_stats")


async def test_crash_mid_prompt_then_restart(comfy: Comfy) -> None:
    listener = await comfy.listen()
    comfy.fake.set_seconds_per_image(5)
    prompt_id = (await comfy.submit(tiny(3))).json()["prompt_id"]
    await comfy.submit(tiny(4))
    await listener.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] == "2")
    half_sent = socket.create_connection(("127.0.0.1", comfy.fake.port))
    half_sent.sendall(b"GET /system_stats HTTP/1.1\r\nHost: x\r\n")
    await trio.testing.wait_all_tasks_blocked()  # the server has accepted it, and reads
    comfy.fake.crash()
    assert await listener.wait_closed() == 1006
    half_sent.settimeout(2)
    with contextlib.suppress(ConnectionResetError):  # an RST, or an EOF: never an answer
        assert half_sent.recv(100) == b""
    half_sent.close()
    await _refused(comfy.fake.url)
    assert not comfy.fake.is_up
    port = comfy.fake.port
    await comfy.fake.restart()
    assert comfy.fake.port == port
    async with httpx.AsyncClient(base_url=comfy.fake.url) as fresh:
        assert (await fresh.get(f"/history/{prompt_id}")).json() == {}
        assert (await fresh.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
    comfy.fake.set_seconds_per_image(0)
    again = await comfy.listen()
    _, _, entry = await comfy.run(tiny(5), again)
    assert entry["status"]["status_str"] == "success"


async def test_crash_on_node(autojump_clock: trio.testing.MockClock, comfy: Comfy) -> None:
    comfy.fake.add_model("checkpoints", "juggernaut_xl.safetensors")
    comfy.fake.add_model("loras", "detail_enhancer.safetensors")
    comfy.fake.crash_on_node("KSampler")
    comfy.fake.set_node_seconds("4", 0.1)  # let the POST answer get out before the crash
    listener = await comfy.listen()
    await comfy.submit(load_workflow("sdxl_txt2img.json"))
    assert await listener.wait_closed() == 1006
    ran = [node for _, node in comfy.fake.executed_nodes]
    assert "6" in ran  # the text encoders ran, the sampler never finished
    assert "3" not in ran
    await _refused(comfy.fake.url)
    await comfy.fake.restart()
    listener = await comfy.listen()
    _, _, entry = await comfy.run(load_workflow("sdxl_txt2img.json"), listener)
    assert entry["status"]["status_str"] == "success"  # the crash fault fired once


async def test_hang_and_unhang(autojump_clock: trio.testing.MockClock, comfy: Comfy) -> None:
    listener = await comfy.listen()
    comfy.fake.hang()
    answered: list[int] = []

    async def ask() -> None:
        answered.append((await comfy.http.get("/system_stats")).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        with trio.move_on_after(5):  # virtual seconds: nothing moves while hung
            await listener.wait_for(lambda m: m["type"] != "status", start=1)
        assert answered == []
        with socket.create_connection(("127.0.0.1", comfy.fake.port), timeout=1):
            pass  # still accepts connections
        comfy.fake.unhang()
    assert answered == [200]


async def test_hang_pauses_execution_and_websockets(
    autojump_clock: trio.testing.MockClock, comfy: Comfy
) -> None:
    listener = await comfy.listen()
    comfy.fake.set_node_seconds("1", 2)
    prompt_id = (await comfy.submit(tiny(7))).json()["prompt_id"]
    await listener.wait_for(lambda m: m["type"] == "execution_start")
    comfy.fake.hang()
    await trio.testing.wait_all_tasks_blocked()  # a frame already being sent may still arrive
    seen = len(listener.messages)
    await trio.sleep(8)  # virtual: four times the node's time, and nothing comes
    assert len(listener.messages) == seen
    assert comfy.fake.history() == {}
    comfy.fake.unhang()
    await listener.wait_done(prompt_id)


async def test_slow_start(
    autojump_clock: trio.testing.MockClock,
    fake_comfyui_factory: Callable[..., Awaitable[FakeComfyUI]],
) -> None:
    started = trio.current_time()
    fake = await fake_comfyui_factory(startup_delay=5)
    assert fake.port != 0
    await _refused(fake.url)
    await fake.wait_ready()
    assert trio.current_time() - started >= 5
    async with httpx.AsyncClient(base_url=fake.url) as http:
        assert (await http.get("/system_stats")).status_code == 200
    restarted = trio.current_time()
    await fake.restart(startup_delay=3)
    await _refused(fake.url)
    await fake.wait_ready()
    assert fake.is_up
    assert trio.current_time() - restarted >= 3


async def test_drop_websockets_keeps_http(
    autojump_clock: trio.testing.MockClock, comfy: Comfy
) -> None:
    first = await comfy.listen("dropped")
    other = await comfy.listen("other")
    comfy.fake.set_node_seconds("1", 3)
    prompt_id = (await comfy.submit(tiny(8), client_id="dropped")).json()["prompt_id"]
    await first.wait_for(lambda m: m["type"] == "execution_start")
    comfy.fake.drop_websockets()
    assert await first.wait_closed() == 1006
    assert await other.wait_closed() == 1006
    assert (await comfy.http.get("/prompt")).status_code == 200
    back = await comfy.listen("dropped")
    await back.wait_done(prompt_id)
    assert comfy.fake.websocket_count == 1
