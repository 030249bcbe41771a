"""Our websocket client (``comfytrio._websocket``, on wsproto): the fake ComfyUI's event
stream, and the frame-level cases a server may send, from a raw TCP server on 127.0.0.1 that
writes the bytes by hand."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from comfytrio import QueueStatus, ServerLostError, open_comfy_client
from comfytrio._http import HttpClient
from comfytrio._websocket import (
    WebSocket,
    WebSocketClosed,
    WebSocketHandshakeError,
    websocket_handshake,
)
from comfytrio.testing import FakeComfyUI

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
Script = Callable[[trio.SocketStream, bytes], Awaitable[None]]


def frame(
    opcode: int, payload: bytes, *, final: bool = True, rsv: int = 0, mask: bytes = b""
) -> bytes:
    """A frame as a server writes it (unmasked unless ``mask`` is given)."""
    head = bytes([(0x80 if final else 0) | rsv | opcode])
    flag = 0x80 if mask else 0
    if len(payload) < 126:
        head += bytes([flag | len(payload)])
    elif len(payload) < 65536:
        head += bytes([flag | 126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([flag | 127]) + struct.pack("!Q", len(payload))
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + payload


def unmask(data: bytes) -> tuple[int, bytes]:
    """Opcode and payload of one masked client frame."""
    assert data[1] & 0x80, "client frames must be masked"
    length, start = data[1] & 0x7F, 2
    if length == 126:
        length, start = struct.unpack("!H", data[2:4])[0], 4
    elif length == 127:
        length, start = struct.unpack("!Q", data[2:10])[0], 10
    mask, payload = data[start : start + 4], data[start + 4 : start + 4 + length]
    return data[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_request(stream: trio.abc.Stream) -> bytes:
    """The head of one HTTP request."""
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive_some(4096)
    return request


async def accept(
    stream: trio.abc.Stream, *, accept_key: str | None = None, request: bytes | None = None
) -> bytes:
    """Read the client's handshake (unless given) and answer 101; return its key."""
    request = request or await read_request(stream)
    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    answer = accept_key or base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + answer.encode() + b"\r\n\r\n"
    )
    return key


@asynccontextmanager
async def raw_server(
    script: Script, *, max_message_size: int = 1024
) -> AsyncIterator[tuple[WebSocket, list[bytes]]]:
    """A websocket to a one-connection server running ``script(stream, key)``; yields it and
    the bytes the server received after the handshake."""
    received: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        key = await accept(stream)
        await script(stream, key)
        with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                received.append(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        async with client:
            ws = await websocket_handshake(
                client, f"127.0.0.1:{port}", "/ws", max_message_size=max_message_size
            )
            yield ws, received
        nursery.cancel_scope.cancel()


async def test_the_fake_comfyuis_events_arrive_in_order(fake_comfyui: FakeComfyUI) -> None:
    host = fake_comfyui.url.removeprefix("http://")
    name, port = host.split(":")
    async with await trio.open_tcp_stream(name, int(port)) as stream:
        ws = await websocket_handshake(stream, host, "/ws?clientId=me", max_message_size=2**20)
        first = json.loads(await ws.receive_text())
        assert first["type"] == "status"
        assert first["data"]["sid"] == "me"
        await ws.send_text(json.dumps({"type": "feature_flags", "data": {}}))
        async with HttpClient(fake_comfyui.url, proxy=None) as http:
            workflow = {
                "1": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 3},
                },
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
            }
            answer = await http.request(
                "POST", "/prompt", json={"prompt": workflow, "client_id": "me"}
            )
        prompt_id = answer.json()["prompt_id"]
        kinds = []
        with trio.fail_after(10):
            while True:
                message = json.loads(await ws.receive_text())
                if message["data"].get("prompt_id") == prompt_id:
                    kinds.append(message["type"])
                    if message["type"] == "execution_success":
                        break
        assert kinds[0] == "execution_start"
        assert "executed" in kinds
        assert kinds.index("executing") < kinds.index("executed")
        await ws.aclose()


async def test_fragments_are_joined_and_binary_messages_skipped_by_receive_text() -> None:
    async def script(stream: trio.SocketStream, key: bytes) -> None:
        await stream.send_all(
            frame(0x2, b"\x00\x00\x00\x01preview")  # binary: skipped
            + frame(0x1, b'{"type": "a', final=False)
            + frame(0x0, b'b", "x": "', final=False)
            + frame(0x0, 'é"}'.encode())
            + frame(0x1, b"x" * 300)  # a 16-bit length
        )

    async with raw_server(script) as (ws, _):
        assert json.loads(await ws.receive_text()) == {"type": "ab", "x": "é"}
        assert await ws.receive_text() == "x" * 300


async def test_receive_gives_text_and_binary_messages_in_order() -> None:
    async def script(stream: trio.SocketStream, key: bytes) -> None:
        await stream.send_all(
            frame(0x1, b"one")
            + frame(0x2, b"\x00\x01", final=False)
            + frame(0x9, b"ping in between")  # a control frame inside a fragmented message
            + frame(0x0, b"\x02\x03")
            + frame(0x1, b"two")
        )

    async with raw_server(script) as (ws, received):
        assert [await ws.receive() for _ in range(3)] == ["one", b"\x00\x01\x02\x03", "two"]
    assert unmask(b"".join(received)) == (0xA, b"ping in between")


@pytest.mark.parametrize("size", [70 * 1024, 1024 * 1024])
async def test_long_messages_with_16_and_64_bit_lengths(size: int) -> None:
    text = (b"0123456789abcdef" * (size // 16))[:size]
    binary = os.urandom(size)

    async def script(stream: trio.SocketStream, key: bytes) -> None:
        await stream.send_all(frame(0x1, text) + frame(0x2, binary))

    async with raw_server(script, max_message_size=size) as (ws, _):
        assert await ws.receive() == text.decode()
        assert await ws.receive() == binary


async def test_a_text_message_is_sent_masked() -> None:
    got: list[tuple[int, bytes]] = []

    async def script(stream: trio.SocketStream, key: bytes) -> None:
        data = b""
        while len(got) < 2:
            data += await stream.receive_some(65536)
            with contextlib.suppress(IndexError, struct.error):
                opcode, payload = unmask(data)
                header = 2 + (2 if len(payload) >= 126 else 0) + 4
                if len(data) >= header + len(payload):
                    got.append((opcode, payload))
                    data = data[header + len(payload) :]
        await stream.send_all(frame(0x1, b"thanks"))

    flags = json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    async with raw_server(script) as (ws, _):
        await ws.send_text(flags)
        await ws.send_text("é" * 100)  # 200 bytes: a 16-bit length
        assert await ws.receive_text() == "thanks"
    assert got == [(0x1, flags.encode()), (0x1, ("é" * 100).encode())]


async def test_frames_split_across_reads_are_put_together() -> None:
    async def script(stream: trio.SocketStream, key: bytes) -> None:
        data = frame(0x1, b"hello") + frame(0x1, b"y" * 200)
        for i in range(0, len(data), 3):
            await stream.send_all(data[i : i + 3])
            await trio.sleep(0.001)  # each piece arrives on its own

    async with raw_server(script) as (ws, _):
        assert await ws.receive_text() == "hello"
        assert await ws.receive_text() == "y" * 200


@pytest.mark.parametrize("cut", [0, 1, 4])
async def test_frames_sent_with_the_handshake_answer_are_not_lost(cut: int) -> None:
    """Whole frames, and a frame cut anywhere (its rest comes later), after the 101."""
    rest = frame(0x1, b"then this")

    async def handler(stream: trio.SocketStream) -> None:
        request = await read_request(stream)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept_key = base64.b64encode(hashlib.sha1(key + GUID).digest())
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: "
            + accept_key
            + b"\r\n\r\n"
            + frame(0x1, b"at once")
            + rest[:cut]
        )
        await trio.sleep(0.05)
        await stream.send_all(rest[cut:])
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            ws = await websocket_handshake(stream, "h", "/ws", max_message_size=1024)
            with trio.fail_after(5):
                assert await ws.receive_text() == "at once"
                assert await ws.receive_text() == "then this"
        nursery.cancel_scope.cancel()


async def test_a_ping_is_answered_with_a_masked_pong() -> None:
    async def script(stream: trio.SocketStream, key: bytes) -> None:
        await stream.send_all(frame(0x9, b"are you there") + frame(0x1, b"after"))

    async with raw_server(script) as (ws, received):
        assert await ws.receive_text() == "after"
    assert unmask(b"".join(received)[:19]) == (0xA, b"are you there")


async def test_a_close_is_answered_and_reported_with_its_code() -> None:
    async def script(stream: trio.SocketStream, key: bytes) -> None:
        await stream.send_all(frame(0x8, struct.pack("!H", 1001) + b"going away"))

    async with raw_server(script) as (ws, received):
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive_text()
        assert (info.value.code, info.value.reason) == (1001, "going away")
        with pytest.raises(WebSocketClosed):
            await ws.receive_text()  # stays closed
        with pytest.raises(WebSocketClosed):
            await ws.send_text("too late")
    assert unmask(b"".join(received)) == (0x8, struct.pack("!H", 1001))


async def test_our_close_sends_its_code() -> None:
    async def script(stream: trio.SocketStream, key: bytes) -> None:
        pass

    async with raw_server(script) as (ws, received):
        await ws.aclose(1001)
        with pytest.raises(WebSocketClosed):
            await ws.receive()
    assert unmask(b"".join(received)) == (0x8, struct.pack("!H", 1001))


async def test_a_stream_that_just_ends_is_1006() -> None:
    async def script(stream: trio.SocketStream, key: bytes) -> None:
        await stream.send_all(frame(0x1, b"last"))
        await stream.aclose()

    async with raw_server(script) as (ws, _):
        assert await ws.receive_text() == "last"
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive_text()
        assert info.value.code == 1006


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(frame(0x1, b"z" * 2000), 1009, id="too-long"),
        pytest.param(
            frame(0x1, b"z" * 600, final=False) + frame(0x0, b"z" * 600), 1009, id="too-long-parts"
        ),
        pytest.param(frame(0x0, b"orphan"), 1002, id="orphan-continuation"),
        pytest.param(frame(0x1, b"a", final=False) + frame(0x1, b"b"), 1002, id="no-continuation"),
        pytest.param(frame(0x1, b"\xff\xfe"), 1007, id="bad-utf8"),
        pytest.param(frame(0x3, b"?"), 1002, id="reserved-opcode"),
        pytest.param(frame(0x1, b"x", rsv=0x40), 1002, id="rsv1"),
        pytest.param(frame(0x1, b"x", rsv=0x10), 1002, id="rsv3"),
        pytest.param(frame(0x1, b"masked", mask=b"abcd"), 1002, id="masked-by-the-server"),
        pytest.param(frame(0x9, b"p" * 126), 1002, id="long-ping"),
        pytest.param(frame(0x9, b"p", final=False), 1002, id="fragmented-ping"),
        pytest.param(frame(0x8, b"\x03"), 1002, id="one-byte-close"),
        pytest.param(frame(0x8, struct.pack("!H", 999)), 1002, id="bad-close-code"),
    ],
)
async def test_a_broken_or_oversized_message_closes_with_its_code(data: bytes, code: int) -> None:
    async def script(stream: trio.SocketStream, key: bytes) -> None:
        await stream.send_all(data)

    async with raw_server(script) as (ws, received):
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive_text()
        assert info.value.code == code
        with pytest.raises(WebSocketClosed):
            await ws.receive_text()
    assert unmask(b"".join(received))[0] == 0x8  # we closed, with the code
    assert unmask(b"".join(received))[1][:2] == struct.pack("!H", code)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "answered HTTP 403"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: wrong\r\n\r\n",
            "accept token",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
            "Upgrade: websocket",
        ),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not a websocket handshake answer"),
        (b"HTTP/1.1 101 Switch", "closed the connection during the handshake"),
    ],
)
async def test_a_refused_handshake_says_why(answer: bytes, message: str) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(answer)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            with pytest.raises(WebSocketHandshakeError, match=message):
                await websocket_handshake(stream, "h", "/ws", max_message_size=1024)
        nursery.cancel_scope.cancel()


async def test_a_wss_server_is_reached_with_its_certificate_checked(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ssl, trusting = tls
    status = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 3}}}}
    subscribed = trio.Event()

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            request = await read_request(stream)
            if b"upgrade: websocket" not in request.lower():
                await stream.send_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                return
            await accept(stream, request=request)
            await subscribed.wait()
            await stream.send_all(frame(0x1, json.dumps(status).encode()))
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, handler, 0, server_ssl, host="127.0.0.1")
        )
        url = f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}"

        # Our default context does not know this CA: the certificate is refused.
        with pytest.raises(ServerLostError, match="cannot connect"):
            async with open_comfy_client(url):
                pass

        async with open_comfy_client(url, ssl_context=trusting) as client:
            assert client.connected
            async with client.subscribe() as events:
                subscribed.set()
                with trio.fail_after(5):
                    event = await events.receive()
            assert event == QueueStatus(client.name, 3)
            assert (await client.http.request("GET", "/anything")).status_code == 204  # HTTP too
        nursery.cancel_scope.cancel()
