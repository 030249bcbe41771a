"""``ComfyTransport``: the HTTP/1.1 under every ComfyUI client's ``httpx.AsyncClient``.

Against the fake ComfyUI for what ComfyClient does with it, and against a raw TCP server on
127.0.0.1 that writes each answer by hand, for keep-alive, the three ways a body ends, and
every way a server can fail mid-answer.
"""

from __future__ import annotations

import contextlib
import os
import resource
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio

from comfytrio import open_comfy_client
from comfytrio._transport import ComfyTransport
from comfytrio.testing import FakeComfyUI

Answer = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def read_request(stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
    """One whole request (head and ``Content-Length`` body) off ``stream``; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buffer) < end + length:
        buffer += await stream.receive_some(65536)
    request = bytes(buffer[: end + length])
    del buffer[: end + length]
    return request


@asynccontextmanager
async def raw_server(answer: Answer) -> AsyncIterator[tuple[str, list[bytes], list[int]]]:
    """A server answering each request with ``answer(stream, request)``, until the client or
    the answer closes the connection. Yields its URL, every request received, and for each
    request the number of the connection it came on."""
    requests: list[bytes] = []
    connections: list[int] = []
    count = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal count
        count += 1
        number = count
        buffer = bytearray()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while (request := await read_request(stream, buffer)) is not None:
                requests.append(request)
                connections.append(number)
                await answer(stream, request)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", requests, connections
        nursery.cancel_scope.cancel()


def client(url: str, **kwargs: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, transport=ComfyTransport(), **kwargs)  # type: ignore[arg-type]


async def ok(stream: trio.SocketStream, request: bytes) -> None:
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")


async def test_requests_reuse_one_kept_alive_connection() -> None:
    async with raw_server(ok) as (url, requests, connections), client(url) as http:
        for _ in range(3):
            r = await http.get("/system_stats")
            assert (r.status_code, r.text, r.http_version) == (200, "hello", "HTTP/1.1")
    assert connections == [1, 1, 1]
    assert requests[0].startswith(b"GET /system_stats HTTP/1.1\r\n")


async def test_a_post_body_is_sent_whole_with_its_length() -> None:
    async with raw_server(ok) as (url, requests, _), client(url) as http:
        await http.post("/prompt", json={"prompt": {"1": {}}})
        await http.post("/upload/image", files={"image": ("a.png", b"\x89PNG" * 5000)})
    head, _, body = requests[0].partition(b"\r\n\r\n")
    assert b"Content-Length: 19" in head
    assert body == b'{"prompt":{"1":{}}}'
    upload_head, _, upload = requests[1].partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in upload_head.lower()
    assert b"\x89PNG" * 5000 in upload


async def test_a_connection_is_reused_whatever_its_descriptor_number() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(soft, hard) < 1200:
        pytest.skip("needs more than 1024 open files")
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1100:  # the next sockets get numbers above 1023
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        async with raw_server(ok) as (url, _, connections), client(url) as http:
            for _ in range(2):
                assert (await http.get("/x")).text == "hello"
    finally:
        for fd in fillers:
            os.close(fd)
    assert connections == [1, 1]


async def test_a_chunked_body_is_joined() -> None:
    async def chunked(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n"
        )
        await trio.sleep(0.01)  # the rest in another segment
        await stream.send_all(b"6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")

    async with raw_server(chunked) as (url, _, connections), client(url) as http:
        assert (await http.get("/a")).text == "hello world"
        assert (await http.get("/b")).text == "hello world"
    assert connections == [1, 1]


async def test_a_body_that_ends_with_the_connection_is_read_to_the_end() -> None:
    async def until_close(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\nall of ")
        await stream.send_all(b"it")
        await stream.aclose()

    async with raw_server(until_close) as (url, _, connections), client(url) as http:
        assert (await http.get("/a")).text == "all of it"
        assert (await http.get("/b")).text == "all of it"
    assert connections == [1, 2]


async def test_connection_close_and_an_idle_connection_closed_by_the_server() -> None:
    answered = 0

    async def closing(stream: trio.SocketStream, request: bytes) -> None:
        nonlocal answered
        answered += 1
        if answered == 1:  # says so
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na"
            )
        else:  # says nothing, and closes once idle (a keep-alive timeout)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
        await stream.aclose()

    async with raw_server(closing) as (url, _, connections), client(url) as http:
        assert (await http.get("/1")).text == "a"
        assert (await http.get("/2")).text == "b"
        await trio.sleep(0.05)  # the server's FIN arrives while the connection is idle
        assert (await http.get("/3")).text == "b"
    assert connections == [1, 2, 3]


async def test_no_body_after_head_204_or_an_empty_length() -> None:
    async def empty(stream: trio.SocketStream, request: bytes) -> None:
        if request.startswith(b"HEAD"):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
        elif b"/gone" in request:
            await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            await stream.send_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            )

    async with raw_server(empty) as (url, _, connections), client(url) as http:
        assert (await http.head("/x")).headers["content-length"] == "99"
        assert (await http.delete("/gone")).status_code == 204
        r = await http.post("/interrupt")
        assert (r.status_code, r.content) == (200, b"")
    assert connections == [1, 1, 1]


async def test_a_streamed_body_comes_in_pieces_and_an_unread_one_is_not_reused() -> None:
    async def big(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n")
        for _ in range(3):
            await stream.send_all(b"x" * 100000)

    async with raw_server(big) as (url, _, connections), client(url) as http:
        async with http.stream("GET", "/view") as r:
            sizes = [len(chunk) async for chunk in r.aiter_raw()]
        assert sum(sizes) == 300000
        assert len(sizes) > 1
        async with http.stream("GET", "/view") as r:
            assert r.status_code == 200  # and its body is never read
        assert len((await http.get("/view")).content) == 300000
    assert connections == [1, 1, 2]


@pytest.mark.parametrize(
    ("sent", "error", "message"),
    [
        (b"", httpx.RemoteProtocolError, "closed the connection before answering"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
            httpx.RemoteProtocolError,
            "middle of the body",
        ),
        (b"SSH-2.0-OpenSSH\r\n\r\n", httpx.RemoteProtocolError, "not an HTTP response"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
            httpx.RemoteProtocolError,
            "bad Content-Length",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            httpx.RemoteProtocolError,
            "bad chunk size",
        ),
    ],
)
async def test_a_broken_answer_is_an_httpx_error(
    sent: bytes, error: type[Exception], message: str
) -> None:
    async def broken(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(sent)
        await stream.aclose()

    async with raw_server(broken) as (url, _, _), client(url) as http:
        with pytest.raises(error, match=message):
            await http.get("/x")


async def test_timeouts_and_refused_connections_are_httpx_errors() -> None:
    async def silent(stream: trio.SocketStream, request: bytes) -> None:
        await trio.sleep_forever()

    async with raw_server(silent) as (url, _, _), client(url, timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/x")
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with client(f"http://127.0.0.1:{port}") as http:
        with pytest.raises(httpx.ConnectError, match="cannot connect"):
            await http.get("/x")


async def test_a_cancelled_request_does_not_leave_its_connection_in_the_pool() -> None:
    async def slow_then_ok(stream: trio.SocketStream, request: bytes) -> None:
        if b"/slow" in request:
            await trio.sleep(0.3)
        await ok(stream, request)

    async with raw_server(slow_then_ok) as (url, _, connections), client(url) as http:
        with trio.move_on_after(0.05):
            await http.get("/slow")
        assert (await http.get("/fast")).text == "hello"  # not the slow one's late answer
    assert connections == [1, 2]


async def test_https_checks_the_certificate_with_the_given_context(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ssl, trusting = tls

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        buffer = bytearray()
        with contextlib.suppress(trio.BrokenResourceError):
            while await read_request(stream, buffer) is not None:
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, handler, 0, server_ssl, host="127.0.0.1")
        )
        url = f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url, transport=ComfyTransport()) as http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get("/")
        transport = ComfyTransport(ssl_context=trusting)
        async with httpx.AsyncClient(base_url=url, transport=transport) as http:
            assert [(await http.get("/")).text for _ in range(2)] == ["ok", "ok"]
        nursery.cancel_scope.cancel()


async def test_the_comfy_client_talks_to_the_fake_through_it(fake_comfyui: FakeComfyUI) -> None:
    async with open_comfy_client(fake_comfyui.url) as comfy:
        assert isinstance(comfy.http._transport, ComfyTransport)
        workflow = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 2},
            },
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "t"},
            },
        }
        result = await comfy.run(workflow)
        (ref,) = result.files
        r = await comfy.http.get(
            "/view", params={"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        )
        assert r.content.startswith(b"\x89PNG")


def closes_its_kept_alive_connection_as_the_next_request_comes() -> Answer:
    """Answers the first request of each connection, then closes the connection without a
    word when the next one arrives: the race of a keep-alive timeout that fires just as a
    client reuses the connection."""
    served: set[int] = set()

    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        if id(stream) in served:
            await stream.aclose()
            return
        served.add(id(stream))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return answer


async def test_an_idempotent_request_on_a_connection_closed_as_it_was_reused_goes_again() -> None:
    answer = closes_its_kept_alive_connection_as_the_next_request_comes()
    async with raw_server(answer) as (url, requests, connections), client(url) as http:
        assert (await http.get("/system_stats")).text == "ok"
        assert (await http.get("/system_stats")).text == "ok"  # sent again on a new connection
        marked = await http.post("/queue", json={"delete": ["x"]}, extensions={"idempotent": True})
        assert marked.text == "ok"
    assert connections == [1, 1, 2, 2, 3]
    assert [r.split(b" ", 2)[:2] for r in requests].count([b"POST", b"/queue"]) == 2


async def test_a_post_on_a_connection_closed_as_it_was_reused_is_not_sent_again() -> None:
    answer = closes_its_kept_alive_connection_as_the_next_request_comes()
    async with raw_server(answer) as (url, requests, connections), client(url) as http:
        assert (await http.get("/system_stats")).text == "ok"
        with pytest.raises(httpx.RemoteProtocolError, match="closed the connection"):
            await http.post("/prompt", json={"prompt": {}})
    assert connections == [1, 1]
    assert requests[1].startswith(b"POST /prompt ")  # it went once, and only once


async def test_a_new_connection_that_fails_is_not_tried_again() -> None:
    async def hang_up(stream: trio.SocketStream, request: bytes) -> None:
        await stream.aclose()

    async with raw_server(hang_up) as (url, requests, connections), client(url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/system_stats")
    assert (len(requests), connections) == (1, [1])
