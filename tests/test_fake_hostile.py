"""The fake's hostile mode: answers and websocket messages a real ComfyUI never sends, seen by
independent clients (httpx, trio-websocket, and a raw websocket that shows the bytes)."""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import Comfy
from test_fake_faults import tiny

from comfytrio.testing import FakeComfyUI

Frame = tuple[bool, int, int, bytes]
"""(fin, rsv, opcode, payload) of one frame read off the wire."""


class RawWebSocket:
    """A websocket client that does the handshake itself and then shows every frame as it
    arrived, unchecked (so frames a real server never sends can be seen as they were)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def handshake(self, resource: str) -> bytes:
        """Send the upgrade request; the answer's head (status line and headers)."""
        key = base64.b64encode(os.urandom(16))
        await self.stream.send_all(
            b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (resource.encode(), key)
        )
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        return head

    async def _fill(self) -> None:
        with trio.fail_after(10):
            data = await self.stream.receive_some(65536)
        if not data:
            raise AssertionError("the server closed the connection")
        self.buffer += data

    async def read_bytes(self, count: int) -> bytes:
        """Exactly the next ``count`` bytes."""
        while len(self.buffer) < count:
            await self._fill()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    async def frame(self) -> Frame:
        """The next frame, unchecked."""
        first, second = await self.read_bytes(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self.read_bytes(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.read_bytes(8), "big")
        mask = await self.read_bytes(4) if second & 0x80 else b""
        payload = await self.read_bytes(length)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(first & 0x80), (first >> 4) & 7, first & 0x0F, payload

    async def text(self) -> str:
        """The payload of the next frame, which must be a whole text frame."""
        fin, rsv, opcode, payload = await self.frame()
        assert (fin, rsv, opcode) == (True, 0, 0x1)
        return payload.decode()


@pytest.fixture
async def raw_ws(fake_comfyui: FakeComfyUI) -> AsyncIterator[RawWebSocket]:
    """A raw websocket on ``/ws?clientId=raw``, past its first ``status`` message."""
    stream = await trio.open_tcp_stream("127.0.0.1", fake_comfyui.port)
    async with stream:
        ws = RawWebSocket(stream)
        head = await ws.handshake("/ws?clientId=raw")
        assert head.startswith(b"HTTP/1.1 101")
        assert json.loads(await ws.text())["type"] == "status"
        yield ws


# --------------------------------------------------------------------------- send_ws


async def test_send_ws_pushes_malformed_json_to_every_socket(comfy: Comfy) -> None:
    first = await comfy.listen("first")
    second = await comfy.listen("second")
    assert comfy.fake.send_ws({"type": "progress", "data": "boom"}) == 2
    for listener in (first, second):
        message = await listener.wait_for(lambda m: m["type"] == "progress")
        assert message == {"type": "progress", "data": "boom"}


async def test_send_ws_to_one_client(comfy: Comfy) -> None:
    first = await comfy.listen("first")
    second = await comfy.listen("second")
    assert sorted(comfy.fake.websocket_client_ids) == ["first", "second"]
    assert comfy.fake.send_ws({"type": "execution_cached", "data": {"nodes": 5}}, to="second") == 1
    assert comfy.fake.send_ws({"type": "x"}, to="nobody") == 0
    message = await second.wait_for(lambda m: m["type"] == "execution_cached")
    assert message["data"]["nodes"] == 5
    comfy.fake.send_ws({"type": "marker", "data": {}}, to="first")
    await first.wait_for(lambda m: m["type"] == "marker")
    assert "execution_cached" not in first.types()


async def test_send_ws_raw_text_is_sent_as_it_is(
    fake_comfyui: FakeComfyUI, raw_ws: RawWebSocket
) -> None:
    infinity = '{"type":"status","data":{"status":{"exec_info":{"queue_remaining":Infinity}}}}'
    fake_comfyui.send_ws(infinity)
    fake_comfyui.send_ws("<html>not json</html>")
    fake_comfyui.send_ws({"type": "progress", "data": {"value": math.nan}})
    assert await raw_ws.text() == infinity
    assert await raw_ws.text() == "<html>not json</html>"
    assert await raw_ws.text() == '{"type": "progress", "data": {"value": NaN}}'


async def test_send_ws_bytes_is_a_binary_frame(
    fake_comfyui: FakeComfyUI, raw_ws: RawWebSocket
) -> None:
    fake_comfyui.send_ws(b"\x00\x00\x00\x01")  # a preview event with no image
    assert await raw_ws.frame() == (True, 0, 0x2, b"\x00\x00\x00\x01")


async def test_send_ws_for_the_running_prompt(
    autojump_clock: trio.testing.MockClock, comfy: Comfy
) -> None:
    listener = await comfy.listen()
    comfy.fake.set_node_seconds("1", 3)
    prompt_id = (await comfy.submit(tiny(1))).json()["prompt_id"]
    await listener.wait_for(lambda m: m["type"] == "execution_start")
    assert comfy.fake.running_id == prompt_id
    comfy.fake.send_ws(
        {
            "type": "executed",
            "data": {
                "prompt_id": comfy.fake.running_id,
                "node": "2",
                "output": {"images": [{"filename": "a\x00b.png", "subfolder": "", "type": "x"}]},
            },
        }
    )
    messages = await listener.wait_done(prompt_id)
    executed = [m["data"] for m in messages if m["type"] == "executed"]
    assert executed[0]["output"]["images"][0]["filename"] == "a\x00b.png"
    assert len(executed) == 2  # the forged one, then the real one


# --------------------------------------------------------------------------- send_ws_after


async def test_send_ws_after_replaces_a_real_message(comfy: Comfy) -> None:
    listener = await comfy.listen()
    comfy.fake.send_ws_after(
        "executed",
        lambda data: {"type": "executed", "data": {**data, "output": ["not", "a", "dict"]}},
        replace=True,
    )
    prompt_id, messages, entry = await comfy.run(tiny(2), listener)
    executed = [m["data"] for m in messages if m["type"] == "executed"]
    assert executed == [
        {"node": "2", "display_node": "2", "output": ["not", "a", "dict"], "prompt_id": prompt_id}
    ]
    assert entry["outputs"]["2"]["images"]  # only the message lies; history is right
    _, messages, _ = await comfy.run(tiny(3), listener)  # times=1: once
    assert isinstance(next(m for m in messages if m["type"] == "executed")["data"]["output"], dict)


async def test_send_ws_after_adds_and_counts_only_what_it_sends(comfy: Comfy) -> None:
    listener = await comfy.listen()
    seen: list[Any] = []

    def forge(data: Any) -> Any:
        seen.append(data)
        if data.get("node") is None:
            return None  # leave the end signal alone (uncounted)
        return {"type": "progress", "data": {"prompt_id": data["prompt_id"], "value": "x"}}

    comfy.fake.send_ws_after("executing", forge, times=2)
    prompt_id, messages, _ = await comfy.run(tiny(4), listener)
    types = [m["type"] for m in messages]
    assert types.count("progress") == 2
    assert types[types.index("executing") + 1] == "progress"  # right after the real one
    assert not comfy.fake.faults.hostile.ws_rules  # used up
    assert all(d["prompt_id"] == prompt_id for d in seen)


async def test_send_ws_after_until_cleared(comfy: Comfy) -> None:
    listener = await comfy.listen()
    comfy.fake.send_ws_after("execution_success", '{"type": "garbage"}', times=None)
    for color in (5, 6):
        _, messages, _ = await comfy.run(tiny(color), listener)
        types = [m["type"] for m in messages]
        assert types[types.index("execution_success") + 1] == "garbage"
    comfy.fake.clear_faults()
    _, messages, _ = await comfy.run(tiny(7), listener)
    assert "garbage" not in [m["type"] for m in messages]


async def test_send_ws_after_the_first_status(fake_comfyui: FakeComfyUI, comfy: Comfy) -> None:
    fake_comfyui.send_ws_after("status", {"type": "status", "data": {"status": None}}, times=1)
    listener = await comfy.listen()
    message = await listener.wait_for(lambda m: m["data"] == {"status": None})
    assert listener.messages.index(message) == 1


async def test_drop_ws_messages_forgets_the_end_signal(comfy: Comfy) -> None:
    listener = await comfy.listen()
    hits = comfy.fake.hostile_hits
    comfy.fake.drop_ws_messages("executing", times=None)
    prompt_id = (await comfy.submit(tiny(12))).json()["prompt_id"]
    entry = await comfy.wait_history(prompt_id)
    assert entry["status"]["status_str"] == "success"  # it ran; only the messages are gone
    comfy.fake.send_ws({"type": "marker"}, to="test-client")
    await listener.wait_for(lambda m: m["type"] == "marker")
    types = listener.types()
    assert "execution_success" in types
    assert "executing" not in types
    assert comfy.fake.hostile_hits - hits == 3  # two nodes, and the end signal
    comfy.fake.clear_faults()
    _, messages, _ = await comfy.run(tiny(13), listener)
    assert "executing" in [m["type"] for m in messages]


# --------------------------------------------------------------------------- raw frames


async def test_ping_ws_sends_an_oversized_ping(
    fake_comfyui: FakeComfyUI, raw_ws: RawWebSocket
) -> None:
    payload = bytes(range(200))
    assert fake_comfyui.ping_ws(payload) == 1
    assert await raw_ws.frame() == (True, 0, 0x9, payload)
    fake_comfyui.send_ws({"type": "after"})  # the connection goes on
    assert json.loads(await raw_ws.text()) == {"type": "after"}


async def test_send_ws_frame_unchecked(fake_comfyui: FakeComfyUI, raw_ws: RawWebSocket) -> None:
    fake_comfyui.send_ws_frame(0x1, b"\xff\xfe not utf-8")
    fake_comfyui.send_ws_frame(0x0, b"lone continuation")
    fake_comfyui.send_ws_frame(0x5, b"", rsv=3)
    fake_comfyui.send_ws_frame(0x8, b"", fin=False)
    assert await raw_ws.frame() == (True, 0, 0x1, b"\xff\xfe not utf-8")
    assert await raw_ws.frame() == (True, 0, 0x0, b"lone continuation")
    assert await raw_ws.frame() == (True, 3, 0x5, b"")
    assert await raw_ws.frame() == (False, 0, 0x8, b"")


async def test_send_ws_frame_masked_and_long(
    fake_comfyui: FakeComfyUI, raw_ws: RawWebSocket
) -> None:
    long = b"x" * 70000
    fake_comfyui.send_ws_frame(0x2, long)
    fake_comfyui.send_ws_frame(0x1, b"hello", mask=b"\x01\x02\x03\x04")
    assert await raw_ws.frame() == (True, 0, 0x2, long)
    assert await raw_ws.read_bytes(2) == bytes((0x81, 0x80 | 5))
    assert await raw_ws.read_bytes(4) == b"\x01\x02\x03\x04"
    assert await raw_ws.read_bytes(5) == bytes(b ^ (i % 4 + 1) for i, b in enumerate(b"hello"))


async def test_send_ws_bytes_writes_anything(
    fake_comfyui: FakeComfyUI, raw_ws: RawWebSocket
) -> None:
    assert fake_comfyui.send_ws_bytes(b"\x81\x7e\xff\xff half a frame", to="raw") == 1
    assert fake_comfyui.send_ws_bytes(b"x", to="other") == 0
    assert await raw_ws.read_bytes(17) == b"\x81\x7e\xff\xff half a frame"


async def test_trio_websocket_sees_the_oversized_ping_as_a_protocol_error(comfy: Comfy) -> None:
    listener = await comfy.listen()
    comfy.fake.ping_ws(b"p" * 126)
    assert await listener.wait_closed() == 1002


# --------------------------------------------------------------------------- corrupt_answers


async def test_corrupt_answers_fixed_body_then_normal(
    fake_comfyui: FakeComfyUI, http_for: Any
) -> None:
    http: httpx.AsyncClient = http_for(fake_comfyui)
    page = "<html><body>502 Bad Gateway</body></html>"
    fake_comfyui.corrupt_answers(
        "/system_stats", status=502, body=page, content_type="text/html", times=2
    )
    for path in ("/system_stats", "/api/system_stats"):
        r = await http.get(path)
        assert (r.status_code, r.text, r.headers["content-type"]) == (502, page, "text/html")
    r = await http.get("/system_stats")
    assert r.status_code == 200
    assert r.json()["system"]["comfyui_version"] == "0.3.64"


async def test_corrupt_answers_json_of_the_wrong_shape(
    fake_comfyui: FakeComfyUI, http_for: Any
) -> None:
    http: httpx.AsyncClient = http_for(fake_comfyui)
    fake_comfyui.corrupt_answers("/queue", body='{"queue_running": "boom", "queue_pending": NaN}')
    fake_comfyui.corrupt_answers("/object_info", body=b'{"KSampler": {"input": ')  # truncated
    for _ in range(3):  # times=None: every answer
        r = await http.get("/queue")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json; charset=utf-8"
        assert r.text == '{"queue_running": "boom", "queue_pending": NaN}'
    with pytest.raises(json.JSONDecodeError):
        (await http.get("/object_info")).json()
    assert (await http.get("/object_info/KSampler")).json()["KSampler"]  # other routes: real
    fake_comfyui.clear_faults()
    assert (await http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}


async def test_corrupt_answers_fixed_prompt_answer_queues_nothing(
    fake_comfyui: FakeComfyUI, comfy: Comfy
) -> None:
    forged = '{"prompt_id": "p1", "number": "abc", "node_errors": "boom"}'
    fake_comfyui.corrupt_answers("/prompt", method="POST", body=forged, times=1)
    r = await comfy.submit(tiny(6))
    assert r.text == forged
    assert fake_comfyui.prompts_received == []  # the server never saw it
    assert (await comfy.http.get("/prompt")).json() == {"exec_info": {"queue_remaining": 0}}


async def test_corrupt_answers_rewrites_the_real_answer(
    fake_comfyui: FakeComfyUI, comfy: Comfy
) -> None:
    def wrong_number(real: bytes) -> bytes:
        answer = json.loads(real)
        return json.dumps({**answer, "number": "abc", "node_errors": "boom"}).encode()

    fake_comfyui.corrupt_answers("/prompt", method="POST", body=wrong_number, times=1)
    listener = await comfy.listen()
    r = await comfy.submit(tiny(7))
    answer = r.json()
    assert (answer["number"], answer["node_errors"]) == ("abc", "boom")
    assert r.headers["content-length"] == str(len(r.content))
    await listener.wait_done(answer["prompt_id"])  # it was queued and ran


async def test_corrupt_answers_by_route_template_and_method(
    fake_comfyui: FakeComfyUI, http_for: Any
) -> None:
    http: httpx.AsyncClient = http_for(fake_comfyui)
    fake_comfyui.corrupt_answers("/models/{folder}", body="[1, 2]", method="GET")
    assert (await http.get("/models/checkpoints")).json() == [1, 2]
    assert (await http.get("/api/models/loras")).json() == [1, 2]
    assert (await http.get("/models")).json() != [1, 2]
    fake_comfyui.corrupt_answers("/interrupt", method="POST", status=204, body="ignored")
    r = await http.post("/interrupt", json={})
    assert (r.status_code, r.content) == (204, b"")
    assert (await http.get("/interrupt")).status_code == 405  # GET is not taken


async def test_corrupt_answers_view(fake_comfyui: FakeComfyUI, comfy: Comfy) -> None:
    listener = await comfy.listen()
    _, _, entry = await comfy.run(tiny(8), listener)
    image = entry["outputs"]["2"]["images"][0]
    fake_comfyui.corrupt_answers("/view", body=lambda real: real[: len(real) // 2], times=1)
    cut = await comfy.http.get("/view", params=image)
    whole = await comfy.http.get("/view", params=image)
    assert cut.headers["content-type"] == "image/png"
    assert whole.content.startswith(cut.content)
    assert len(cut.content) == len(whole.content) // 2


async def test_corrupt_answers_refuses_websockets(fake_comfyui: FakeComfyUI) -> None:
    fake_comfyui.corrupt_answers("/ws", status=502, body="<html>Bad Gateway</html>", times=1)
    for expected in (b"HTTP/1.1 502", b"HTTP/1.1 101"):
        async with await trio.open_tcp_stream("127.0.0.1", fake_comfyui.port) as stream:
            head = await RawWebSocket(stream).handshake("/ws?clientId=refused")
            assert head.startswith(expected)
    with pytest.raises(ValueError, match="fixed body"):
        fake_comfyui.corrupt_answers("/ws", body=lambda real: real)


async def test_hostile_switches_check_their_arguments(fake_comfyui: FakeComfyUI) -> None:
    with pytest.raises(ValueError, match="starts with"):
        fake_comfyui.corrupt_answers("prompt", body="")
    with pytest.raises(ValueError, match="status"):
        fake_comfyui.corrupt_answers("/prompt", body="", status=101)
    with pytest.raises(ValueError, match="times"):
        fake_comfyui.corrupt_answers("/prompt", body="", times=0)
    with pytest.raises(ValueError, match="times"):
        fake_comfyui.send_ws_after("status", {}, times=0)
    with pytest.raises(ValueError, match="opcode"):
        fake_comfyui.send_ws_frame(16)
    fake_comfyui.crash()
    assert fake_comfyui.send_ws({}) == 0  # down: nobody to send to
    assert fake_comfyui.ping_ws() == 0
    assert fake_comfyui.websocket_client_ids == []


# --------------------------------------------------------------------------- corrupt_history


async def test_corrupt_history_after_the_prompt_ran(
    fake_comfyui: FakeComfyUI, comfy: Comfy
) -> None:
    listener = await comfy.listen()
    first, _, _ = await comfy.run(tiny(9), listener)
    fake_comfyui.corrupt_history({"outputs": "boom", "status": [1, 2]}, times=2)
    assert (await comfy.http.get("/history/unknown")).json() == {}  # not counted
    assert (await comfy.http.get(f"/history/{first}")).json() == {
        first: {"outputs": "boom", "status": [1, 2]}
    }
    assert (await comfy.http.get("/api/history")).json() == {
        first: {"outputs": "boom", "status": [1, 2]}
    }
    real = (await comfy.http.get(f"/history/{first}")).json()  # times=2: used up
    assert real[first]["status"]["status_str"] == "success"


async def test_corrupt_history_of_one_prompt_with_a_function(
    fake_comfyui: FakeComfyUI, comfy: Comfy
) -> None:
    listener = await comfy.listen()
    first, _, _ = await comfy.run(tiny(10), listener)
    second, _, _ = await comfy.run(tiny(11), listener)

    def nul_name(entry: dict[str, Any]) -> dict[str, Any]:
        entry["outputs"]["2"]["images"][0]["filename"] = "../../etc/passwd\x00.png"
        return entry

    fake_comfyui.corrupt_history(nul_name, prompt_id=second)
    answer = (await comfy.http.get("/history")).json()
    assert answer[first]["outputs"]["2"]["images"][0]["filename"] != "../../etc/passwd\x00.png"
    assert answer[second]["outputs"]["2"]["images"][0]["filename"] == "../../etc/passwd\x00.png"
    fake_comfyui.clear_faults()
    answer = (await comfy.http.get(f"/history/{second}")).json()
    assert answer[second]["outputs"]["2"]["images"][0]["filename"].startswith("f_")


# --------------------------------------------------------------------------- with other faults


async def test_hostile_messages_wait_while_hung(
    autojump_clock: trio.testing.MockClock, fake_comfyui: FakeComfyUI, raw_ws: RawWebSocket
) -> None:
    fake_comfyui.hang()
    fake_comfyui.send_ws("held")
    fake_comfyui.ping_ws(b"held too")
    with trio.move_on_after(5):  # virtual seconds
        await raw_ws.frame()
        raise AssertionError("a message got out while hung")
    fake_comfyui.unhang()
    assert await raw_ws.text() == "held"
    assert await raw_ws.frame() == (True, 0, 0x9, b"held too")


async def test_hostile_rules_outlive_a_restart(fake_comfyui: FakeComfyUI, http_for: Any) -> None:
    fake_comfyui.corrupt_answers("/features", body="[]")
    await fake_comfyui.restart()
    async with httpx.AsyncClient(base_url=fake_comfyui.url) as fresh:
        assert (await fresh.get("/features")).json() == []
