"""``comfytrio._http``: HTTP/1.1 on h11 over trio streams, for every ComfyUI client.

Against raw TCP servers on 127.0.0.1 that write each answer by hand (keep-alive, the three
ways a body ends, every way a server can fail mid-answer), a small proxy written here
(forwarding and ``CONNECT``), a TLS server with a certificate of our own CA, and the fake
ComfyUI.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import urlsplit

import pytest
import trio

from comfytrio._http import (
    ConnectError,
    ConnectTimeout,
    HttpClient,
    HTTPError,
    HTTPTimeout,
    ReadError,
    RemoteProtocolError,
    ResponseTooLarge,
    encode_multipart,
    open_stream,
)
from comfytrio._http_proxy import ProxyRules, _Bypass, split_url
from comfytrio._websocket import websocket_handshake
from comfytrio.testing import FakeComfyUI

Answer = Callable[[trio.SocketStream, bytes], Awaitable[None]]

PROXY_VARIABLES = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"]


@pytest.fixture(autouse=True)
def no_proxy_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the proxies it wants (the machine's own would change the routes)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


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


async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream, done: trio.CancelScope) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    done.cancel()


@asynccontextmanager
async def proxy_server(*, refuse: bytes = b"") -> AsyncIterator[tuple[str, list[bytes]]]:
    """A proxy: ``CONNECT host:port`` opens a tunnel (unless ``refuse`` is its answer), any
    other request is forwarded to the host of its absolute-form target, with what follows
    on its connection. Yields its URL and the head of each connection's first request."""
    heads: list[bytes] = []

    async def handler(client: trio.SocketStream) -> None:
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            if not (data := await client.receive_some(65536)):
                return
            buffer += data
        head = bytes(buffer[: buffer.index(b"\r\n\r\n")])
        heads.append(head)
        method, target, _ = head.split(b"\r\n")[0].split(b" ")
        if method == b"CONNECT":
            if refuse:
                await client.send_all(refuse)
                return
            host, port = target.decode().rsplit(":", 1)
            upstream = await trio.open_tcp_stream(host, int(port))
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            parts = urlsplit(target.decode())
            upstream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 80)
            await upstream.send_all(bytes(buffer))
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client, upstream, nursery.cancel_scope)
            nursery.start_soon(pipe, upstream, client, nursery.cancel_scope)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", heads
        nursery.cancel_scope.cancel()


async def ok(stream: trio.SocketStream, request: bytes) -> None:
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")


async def test_requests_reuse_one_kept_alive_connection() -> None:
    async with raw_server(ok) as (url, requests, connections), HttpClient(url) as http:
        for _ in range(3):
            r = await http.request("GET", "/system_stats")
            assert (r.status_code, r.reason, r.text) == (200, "OK", "hello")
        assert r.headers.get("CONTENT-LENGTH") == "5"
        assert list(r.headers) == [("content-length", "5")]
        stats = http.statistics()
        assert (stats.opened, stats.reused, stats.resent, stats.idle) == (1, 2, 0, 1)
    assert connections == [1, 1, 1]
    assert requests[0].startswith(b"GET /system_stats HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in requests[0]


async def test_new_connection_skips_the_kept_alive_one() -> None:
    async with raw_server(ok) as (url, _, connections), HttpClient(url) as http:
        await http.request("GET", "/system_stats")
        r = await http.request("GET", "/system_stats", new_connection=True)  # a health probe
        assert r.text == "hello"
        await http.request("GET", "/system_stats")
        stats = http.statistics()
        assert (stats.opened, stats.reused, stats.idle) == (2, 1, 2)
    assert connections == [1, 2, 2]


async def test_a_post_body_is_sent_whole_with_its_length() -> None:
    body, content_type = encode_multipart(
        {"overwrite": "true", "type": "input"}, {"image": ('a "b".png', b"\x89PNG" * 5000, "x/y")}
    )
    async with raw_server(ok) as (url, requests, _), HttpClient(url) as http:
        await http.request("POST", "/prompt", json={"prompt": {"1": {}}, "x": "é"})
        await http.request(
            "POST", "/upload/image", content=body, headers={"Content-Type": content_type}
        )
        await http.request("POST", "/interrupt")
    head, _, sent = requests[0].partition(b"\r\n\r\n")
    assert b"Content-Length: 28" in head
    assert b"Content-Type: application/json" in head
    assert json.loads(sent) == {"prompt": {"1": {}}, "x": "é"}
    assert sent == '{"prompt":{"1":{}},"x":"é"}'.encode()
    upload_head, _, upload = requests[1].partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in upload_head.lower()
    assert f"Content-Type: {content_type}".encode() in upload_head
    assert b'name="image"; filename="a %22b%22.png"\r\nContent-Type: x/y\r\n\r\n' in upload
    assert b"\x89PNG" * 5000 in upload
    assert b"Content-Length: 0\r\n" in requests[2]  # a POST without a body says so


async def test_headers_and_params_of_the_client_and_of_each_request() -> None:
    async with (
        raw_server(ok) as (url, requests, _),
        HttpClient(url + "/comfy/", headers={"X-Team": "render", "User-Agent": "ours"}) as http,
    ):
        await http.request("GET", "/view", params={"filename": "a b&c.png", "type": "output"})
        await http.request("GET", "/object_info/Node Name", headers={"x-team": "other"})
    first, second = (r.split(b"\r\n\r\n")[0].split(b"\r\n") for r in requests)
    assert first[0] == b"GET /comfy/view?filename=a%20b%26c.png&type=output HTTP/1.1"
    assert b"X-Team: render" in first
    assert b"User-Agent: ours" in first
    assert [line for line in first if line.lower().startswith(b"user-agent")] == [
        b"User-Agent: ours"
    ]
    assert second[0] == b"GET /comfy/object_info/Node%20Name HTTP/1.1"
    assert b"x-team: other" in second
    assert b"X-Team: render" not in second


async def test_a_connection_is_reused_whatever_its_descriptor_number() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(soft, hard) < 1200:
        pytest.skip("needs more than 1024 open files")
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1100:  # the next sockets get numbers above 1023
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        async with raw_server(ok) as (url, _, connections), HttpClient(url) as http:
            for _ in range(2):
                assert (await http.request("GET", "/x")).text == "hello"
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

    async with raw_server(chunked) as (url, _, connections), HttpClient(url) as http:
        assert (await http.request("GET", "/a")).text == "hello world"
        assert (await http.request("GET", "/b")).content == b"hello world"
    assert connections == [1, 1]


async def test_a_body_that_ends_with_the_connection_is_read_to_the_end() -> None:
    async def until_close(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\nall of ")
        await stream.send_all(b"it")
        await stream.aclose()

    async with raw_server(until_close) as (url, _, connections), HttpClient(url) as http:
        assert (await http.request("GET", "/a")).text == "all of it"
        assert (await http.request("GET", "/b")).text == "all of it"
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

    async with raw_server(closing) as (url, _, connections), HttpClient(url) as http:
        assert (await http.request("GET", "/1")).text == "a"
        assert (await http.request("POST", "/2")).text == "b"
        await trio.sleep(0.05)  # the server's FIN arrives while the connection is idle
        assert (await http.request("POST", "/3")).text == "b"  # not resent: never sent there
        assert http.statistics().resent == 0
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

    async with raw_server(empty) as (url, _, connections), HttpClient(url) as http:
        assert (await http.request("HEAD", "/x")).headers["content-length"] == "99"
        assert (await http.request("DELETE", "/gone")).status_code == 204
        r = await http.request("POST", "/interrupt")
        assert (r.status_code, r.content) == (200, b"")
    assert connections == [1, 1, 1]


async def test_a_streamed_body_comes_in_pieces_and_an_unread_one_is_not_reused() -> None:
    async def big(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n")
        for _ in range(3):
            await stream.send_all(b"x" * 100000)

    async with raw_server(big) as (url, _, connections), HttpClient(url) as http:
        async with http.stream("GET", "/view") as r:
            sizes = [len(chunk) async for chunk in r.aiter_bytes()]
        assert sum(sizes) == 300000
        assert len(sizes) > 1
        async with http.stream("GET", "/view") as r:
            assert r.status_code == 200  # and its body is never read
        async with http.stream("GET", "/view") as r:
            assert len(await r.aread()) == 300000
        assert len((await http.request("GET", "/view")).content) == 300000
    assert connections == [1, 1, 2, 2]


async def test_a_body_over_max_bytes_is_refused_and_its_connection_closed() -> None:
    async def sized(stream: trio.SocketStream, request: bytes) -> None:
        if b"/chunked" in request:
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"a\r\n0123456789\r\n" * 3
                + b"0\r\n\r\n"
            )
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" + b"x" * 30)

    async with raw_server(sized) as (url, _, connections), HttpClient(url) as http:
        assert len((await http.request("GET", "/length", max_bytes=30)).content) == 30
        with pytest.raises(ResponseTooLarge, match="longer than 29 bytes"):
            await http.request("GET", "/length", max_bytes=29)
        with pytest.raises(ResponseTooLarge):
            await http.request("GET", "/chunked", max_bytes=25)
        assert len((await http.request("GET", "/chunked", max_bytes=30)).content) == 30
    assert connections == [1, 1, 2, 3]


@pytest.mark.parametrize(
    ("sent", "error", "message"),
    [
        pytest.param(b"", ReadError, "closed the connection before answering", id="nothing"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
            ReadError,
            "closed the connection in the middle of the body",
            id="cut-body",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            ReadError,
            "in the middle of the body",
            id="cut-chunk",
        ),
        pytest.param(
            b"SSH-2.0-OpenSSH\r\n\r\n", RemoteProtocolError, "not valid HTTP/1.1", id="not-http"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
            RemoteProtocolError,
            "Content-Length",
            id="bad-length",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            RemoteProtocolError,
            "chunk",
            id="garbage-chunk-size",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
            RemoteProtocolError,
            "chunk",
            id="negative-chunk-size",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
            RemoteProtocolError,
            "not valid HTTP/1.1",
            id="oversized-head",
        ),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\n" * 50,
            RemoteProtocolError,
            "informational",
            id="endless-100-continue",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
            + b"X-Trailer: 1\r\n" * 6000,
            RemoteProtocolError,
            "not valid HTTP/1.1",
            id="endless-trailers",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            RemoteProtocolError,
            "not valid HTTP/1.1",
            id="unasked-101",
        ),
    ],
)
async def test_a_broken_answer_is_an_http_error(
    sent: bytes, error: type[Exception], message: str
) -> None:
    async def broken(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(sent)
        await stream.aclose()

    async with raw_server(broken) as (url, _, _), HttpClient(url) as http:
        with pytest.raises(error, match=message) as info:
            await http.request("GET", "/x")
    assert isinstance(info.value, HTTPError)
    assert (info.value.method, info.value.url) == ("GET", f"{url}/x")
    assert str(info.value).startswith(f"GET {url}/x: ")


async def test_a_connection_reset_mid_body_is_a_read_error() -> None:
    async def reset(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nabc")
        await trio.sleep(0.05)
        linger = struct.pack("ii", 1, 0)  # close with a RST, not a FIN
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        await stream.aclose()

    async with raw_server(reset) as (url, _, _), HttpClient(url) as http:
        with pytest.raises(ReadError, match="in the middle of the body"):
            await http.request("GET", "/x")
        with pytest.raises(ReadError, match="in the middle of the body"):
            async with http.stream("GET", "/x") as r:
                await r.aread()


async def test_timeouts_and_refused_connections_are_http_errors() -> None:
    async def silent(stream: trio.SocketStream, request: bytes) -> None:
        await trio.sleep_forever()

    async with raw_server(silent) as (url, _, _), HttpClient(url, timeout=0.2) as http:
        with pytest.raises(HTTPTimeout, match=r"nothing came in 0.2 s before answering"):
            await http.request("GET", "/x")
        with pytest.raises(HTTPTimeout):
            await http.request("GET", "/x", timeout=0.05)
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with HttpClient(f"http://127.0.0.1:{port}") as http:
        with pytest.raises(ConnectError, match=r"cannot connect to 127.0.0.1"):
            await http.request("GET", "/x")
    async with HttpClient("http://unresolvable.invalid") as http:
        with pytest.raises(ConnectError, match=r"unresolvable.invalid"):
            await http.request("GET", "/x")


async def test_a_connect_timeout_is_both_a_connect_error_and_a_timeout() -> None:
    async def never_answers_the_handshake(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, never_answers_the_handshake, 0, host="127.0.0.1")
        )
        url = f"https://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with HttpClient(url, connect_timeout=0.1) as http:
            with pytest.raises(ConnectTimeout, match=r"no connection to 127.0.0.1:.* in 0.1 s"):
                await http.request("GET", "/x")
        nursery.cancel_scope.cancel()
    assert issubclass(ConnectTimeout, ConnectError)
    assert issubclass(ConnectTimeout, HTTPTimeout)


async def test_a_cancelled_request_does_not_leave_its_connection_in_the_pool() -> None:
    async def slow_then_ok(stream: trio.SocketStream, request: bytes) -> None:
        if b"/slow" in request:
            await trio.sleep(0.3)
        await ok(stream, request)

    async with raw_server(slow_then_ok) as (url, _, connections), HttpClient(url) as http:
        with trio.move_on_after(0.05):
            await http.request("GET", "/slow")
        assert (await http.request("GET", "/fast")).text == "hello"  # not the slow one's answer
    assert connections == [1, 2]


async def test_a_body_cancelled_midway_does_not_leave_its_connection_in_the_pool() -> None:
    async def half_then_rest(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        if b"/slow" in request:
            await trio.sleep(0.3)
        await stream.send_all(b"world")

    async with raw_server(half_then_rest) as (url, _, connections), HttpClient(url) as http:
        with trio.move_on_after(0.1):
            await http.request("GET", "/slow")
        with trio.move_on_after(0.1):
            async with http.stream("GET", "/slow") as r:
                async for _ in r.aiter_bytes():
                    pass
        assert (await http.request("GET", "/fast")).text == "helloworld"
        assert http.statistics().idle == 1
    assert connections == [1, 2, 3]


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
        async with HttpClient(url) as http:  # our default context does not know this CA
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.request("GET", "/")
        async with HttpClient(url, ssl_context=trusting) as http:
            assert [(await http.request("GET", "/")).text for _ in range(2)] == ["ok", "ok"]
            assert http.statistics().opened == 1
        nursery.cancel_scope.cancel()


async def test_the_fake_comfyui_end_to_end(fake_comfyui: FakeComfyUI) -> None:
    async with HttpClient(fake_comfyui.url) as http:
        stats = await http.request("GET", "/system_stats")
        assert "system" in stats.json()
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
        answer = await http.request("POST", "/prompt", json={"prompt": workflow})
        assert answer.status_code == 200
        prompt_id = answer.json()["prompt_id"]
        for _ in range(500):  # until it ran
            if history := (await http.request("GET", f"/history/{prompt_id}")).json():
                break
            await trio.sleep(0.02)
        (image,) = history[prompt_id]["outputs"]["2"]["images"]
        png = (await http.request("GET", "/view", params=image)).content
        assert png.startswith(b"\x89PNG")

        body, content_type = encode_multipart(
            {"overwrite": "true", "type": "input", "subfolder": "up"},
            {"image": ("mine é.png", png, "image/png")},
        )
        uploaded = await http.request(
            "POST", "/upload/image", content=body, headers={"Content-Type": content_type}
        )
        assert uploaded.json() == {"name": "mine é.png", "subfolder": "up", "type": "input"}
        params = {"filename": "mine é.png", "subfolder": "up", "type": "input"}
        async with http.stream("GET", "/view", params=params) as r:
            assert r.status_code == 200
            assert await r.aread() == png
        assert http.statistics().opened == 1


def closes_its_kept_alive_connection_as_the_next_request_comes() -> Answer:
    """Answers the first request of each connection, then closes the connection without a
    word when the next one arrives: the race of a keep-alive timeout that fires just as a
    client reuses the connection."""
    served: set[trio.SocketStream] = set()  # the streams themselves: ids are reused

    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        if stream in served:
            await stream.aclose()
            return
        served.add(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return answer


async def test_an_idempotent_request_on_a_connection_closed_as_it_was_reused_goes_again() -> None:
    answer = closes_its_kept_alive_connection_as_the_next_request_comes()
    async with raw_server(answer) as (url, requests, connections), HttpClient(url) as http:
        assert (await http.request("GET", "/system_stats")).text == "ok"
        assert (await http.request("GET", "/system_stats")).text == "ok"  # again, on a new one
        marked = await http.request("POST", "/queue", json={"delete": ["x"]}, idempotent=True)
        assert marked.text == "ok"
        async with http.stream("GET", "/view") as r:
            assert await r.aread() == b"ok"
        assert http.statistics().resent == 3
    assert connections == [1, 1, 2, 2, 3, 3, 4]
    assert [r.split(b" ", 2)[:2] for r in requests].count([b"POST", b"/queue"]) == 2


async def test_a_post_on_a_connection_closed_as_it_was_reused_is_not_sent_again() -> None:
    answer = closes_its_kept_alive_connection_as_the_next_request_comes()
    async with raw_server(answer) as (url, requests, connections), HttpClient(url) as http:
        assert (await http.request("GET", "/system_stats")).text == "ok"
        with pytest.raises(ReadError, match="closed the connection before answering"):
            await http.request("POST", "/prompt", json={"prompt": {}})
    assert connections == [1, 1]
    assert requests[1].startswith(b"POST /prompt ")  # it went once, and only once


async def test_idempotent_false_forbids_sending_a_get_again() -> None:
    answer = closes_its_kept_alive_connection_as_the_next_request_comes()
    async with raw_server(answer) as (url, _, connections), HttpClient(url) as http:
        assert (await http.request("GET", "/system_stats")).text == "ok"
        with pytest.raises(ReadError):
            await http.request("GET", "/system_stats", idempotent=False)
    assert connections == [1, 1]


async def test_a_new_connection_that_fails_is_not_tried_again() -> None:
    async def hang_up(stream: trio.SocketStream, request: bytes) -> None:
        await stream.aclose()

    async with raw_server(hang_up) as (url, requests, connections), HttpClient(url) as http:
        with pytest.raises(ReadError):
            await http.request("GET", "/system_stats")
    assert (len(requests), connections) == (1, [1])


async def test_a_closed_client_refuses_requests() -> None:
    async with raw_server(ok) as (url, _, _):
        http = HttpClient(url)
        await http.request("GET", "/")
        await http.aclose()
        assert http.is_closed
        assert http.statistics().idle == 0
        with pytest.raises(RuntimeError, match="closed"):
            await http.request("GET", "/")


# ---------------------------------------------------------------------------- proxies


async def test_an_http_request_is_forwarded_by_the_proxy_with_its_credentials() -> None:
    async with raw_server(ok) as (url, requests, connections), proxy_server() as (proxy, heads):
        authority = proxy.removeprefix("http://")
        async with HttpClient(url, proxy=f"http://us%40er:p%3Ass@{authority}") as http:
            for _ in range(2):
                assert (await http.request("GET", "/system_stats")).text == "hello"
    assert len(heads) == 1  # one connection to the proxy, kept alive
    assert connections == [1, 1]
    for request in requests:
        lines = request.split(b"\r\n")
        assert lines[0] == f"GET {url}/system_stats HTTP/1.1".encode()
        assert b"Proxy-Authorization: Basic dXNAZXI6cDpzcw==" in lines  # us@er:p:ss


async def test_https_goes_through_a_connect_tunnel(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ssl, trusting = tls
    seen: list[bytes] = []

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        buffer = bytearray()
        with contextlib.suppress(trio.BrokenResourceError):
            while (request := await read_request(stream, buffer)) is not None:
                seen.append(request)
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with trio.open_nursery() as nursery, proxy_server() as (proxy, heads):
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, handler, 0, server_ssl, host="127.0.0.1")
        )
        port = listeners[0].transport_listener.socket.getsockname()[1]
        authority = proxy.removeprefix("http://")
        async with HttpClient(
            f"https://127.0.0.1:{port}", ssl_context=trusting, proxy=f"http://me:pw@{authority}"
        ) as http:
            assert [(await http.request("GET", "/x")).text for _ in range(2)] == ["ok", "ok"]
        nursery.cancel_scope.cancel()
    (head,) = heads
    lines = head.split(b"\r\n")
    assert lines[0] == f"CONNECT 127.0.0.1:{port} HTTP/1.1".encode()
    assert b"Proxy-Authorization: Basic bWU6cHc=" in lines
    assert [r.split(b"\r\n")[0] for r in seen] == [b"GET /x HTTP/1.1"] * 2  # origin form


async def test_a_websocket_goes_through_a_connect_tunnel(fake_comfyui: FakeComfyUI) -> None:
    host = fake_comfyui.url.removeprefix("http://")
    async with proxy_server() as (proxy, heads):
        stream = await open_stream(f"ws://{host}/ws", proxy=proxy)
        async with stream:
            ws = await websocket_handshake(stream, host, "/ws?clientId=me", max_message_size=2**20)
            with trio.fail_after(5):
                first = json.loads(await ws.receive_text())
            assert first["type"] == "status"
            await ws.aclose()
    assert heads == [f"CONNECT {host} HTTP/1.1\r\nHost: {host}".encode()]


async def test_the_proxies_of_the_environment_and_no_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with raw_server(ok) as (url, _, _), proxy_server() as (proxy, heads):
        monkeypatch.setenv("http_proxy", proxy)
        async with HttpClient(url) as http:
            await http.request("GET", "/")
        assert len(heads) == 1
        async with HttpClient(url, proxy=None) as http:  # None: no proxy, whatever the environment
            await http.request("GET", "/")
        monkeypatch.setenv("NO_PROXY", "example.com, 127.0.0.1")
        async with HttpClient(url) as http:
            await http.request("GET", "/")
        stream = await open_stream(url)  # the websocket's way goes direct too
        await stream.aclose()
        assert len(heads) == 1
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.delenv("http_proxy")
        monkeypatch.setenv("ALL_PROXY", proxy)
        stream = await open_stream(url)
        await stream.aclose()
        assert len(heads) == 2


async def test_a_proxy_that_cannot_be_used_is_a_connect_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with raw_server(ok) as (url, requests, _):
        async with HttpClient(url, proxy="socks5://user:secret@127.0.0.1:1080") as http:
            with pytest.raises(ConnectError, match=r"socks5://127.0.0.1:1080") as info:
                await http.request("GET", "/")
            assert "secret" not in str(info.value)
        monkeypatch.setenv("HTTPS_PROXY", "socks5h://127.0.0.1:1080")
        with pytest.raises(ConnectError, match="only http:// and https:// proxies"):
            await open_stream("wss://127.0.0.1:9/ws")
        async with proxy_server(refuse=b"HTTP/1.1 407 Who are you\r\n\r\n") as (proxy, _):
            with pytest.raises(ConnectError, match=r"refused a tunnel to .*: HTTP 407 Who are you"):
                await open_stream(url, proxy=proxy)
            async with HttpClient(url.replace("http:", "https:"), proxy=proxy) as http:
                with pytest.raises(ConnectError, match="refused a tunnel"):
                    await http.request("GET", "/")
    assert requests == []


@pytest.mark.parametrize(
    ("no_proxy", "url", "bypassed"),
    [
        ("example.com", "http://example.com", True),
        ("example.com", "http://www.example.com", True),
        ("example.com", "http://wwwexample.com", False),
        (".example.com", "http://example.com", False),
        (".example.com", "http://www.example.com", True),
        ("*.example.com", "http://a.example.com", True),
        ("EXAMPLE.com", "https://Example.COM", True),
        ("localhost", "http://localhost:8188", True),
        ("localhost", "http://sub.localhost", False),
        ("127.0.0.1", "http://127.0.0.1:8188", True),
        ("127.0.0.1", "http://127.0.0.2:8188", False),
        ("10.0.0.0/8", "http://10.1.2.3", True),
        ("::1", "http://[::1]:8188", True),
        ("[::1]", "http://[::1]:8188", True),
        ("example.com:8188", "http://example.com:8188", True),
        ("example.com:8188", "http://example.com:8189", False),
        ("http://example.com", "http://example.com", True),
        ("http://example.com", "https://example.com", False),
        ("*", "http://anything", True),
        ("", "http://localhost", False),  # httpx does not skip the proxy for localhost itself
    ],
)
def test_no_proxy_is_read_as_httpx_reads_it(no_proxy: str, url: str, bypassed: bool) -> None:

    rules = ProxyRules({"all": "http://proxy:3128"}, [])
    if no_proxy == "*":
        rules = ProxyRules({}, [])
    elif no_proxy:
        rules = ProxyRules({"all": "http://proxy:3128"}, [_Bypass.parse(no_proxy)])
    origin, _, _ = split_url(url)
    assert (rules.select(origin) is None) == bypassed


def test_the_environment_s_proxies_by_scheme(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("HTTP_PROXY", "plain:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://secure:3128")
    monkeypatch.setenv("ALL_PROXY", "http://all:3128")
    monkeypatch.setenv("no_proxy", " example.com ,,")
    rules = ProxyRules.from_environment()
    assert rules.select(split_url("http://a")[0]) == "http://plain:3128"
    assert rules.select(split_url("wss://a")[0]) == "http://secure:3128"
    assert rules.select(split_url("http://a.example.com")[0]) is None
    monkeypatch.delenv("HTTP_PROXY")
    assert ProxyRules.from_environment().select(split_url("ws://a")[0]) == "http://all:3128"
