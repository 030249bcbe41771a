"""The downloader plugins share: http(s) only, capped, atomic, verified, one request per file.

Every download here comes from a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from functools import partial
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing
from conftest import until
from test_plugins_support import Route, local_client, start_http_server

from comfytrio import DownloadError, UnsafeNameError
from comfytrio.hookspecs import Downloader, check_download_url, check_sha256, safe_join

BODY = b"lora weights " * 1000
SHA = hashlib.sha256(BODY).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Every file in ``folder``, temp files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def test_a_download_lands_whole_under_its_name(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await start_http_server(nursery, {"/style.safetensors": Route(BODY)})
    dest = tmp_path / "loras" / "style.safetensors"
    async with local_client() as http:
        assert await Downloader().download(http, server.url("/style.safetensors"), dest)
    assert dest.read_bytes() == BODY
    assert leftovers(dest.parent) == ["style.safetensors"]


async def test_a_file_already_there_is_not_fetched_again(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/a": Route(BODY)})
    dest = tmp_path / "a.safetensors"
    dest.write_bytes(b"already here")
    async with local_client() as http:
        assert not await Downloader().download(http, server.url("/a"), dest)
    assert server.count("/a") == 0
    assert dest.read_bytes() == b"already here"


async def test_concurrent_callers_for_one_file_share_one_request(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/big": Route(BODY, delay=0.2)})
    downloader = Downloader()
    dest = tmp_path / "big.safetensors"
    results: list[bool] = []
    async with local_client() as http:

        async def ask() -> None:
            results.append(await downloader.download(http, server.url("/big"), dest))

        async with trio.open_nursery() as callers:
            for _ in range(50):
                callers.start_soon(ask)
    assert server.count("/big") == 1
    assert results == [True] * 50
    assert dest.read_bytes() == BODY


async def test_a_failed_download_fails_every_waiter_with_one_request(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/gone": Route(b"no", status=404, delay=0.1)})
    downloader = Downloader()
    errors: list[DownloadError] = []
    async with local_client() as http:

        async def ask() -> None:
            try:
                await downloader.download(http, server.url("/gone"), tmp_path / "x")
            except DownloadError as exc:
                errors.append(exc)

        async with trio.open_nursery() as callers:
            for _ in range(10):
                callers.start_soon(ask)
    assert server.count("/gone") == 1
    assert len(errors) == 10
    assert all(e.url == server.url("/gone") and e.reason == "HTTP 404" for e in errors)
    assert leftovers(tmp_path) == []


async def test_a_server_that_drops_mid_body_leaves_no_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/cut": Route(BODY, drop_after=1000)})
    async with local_client() as http:
        with pytest.raises(DownloadError) as caught:
            await Downloader().download(http, server.url("/cut"), tmp_path / "cut.safetensors")
    assert caught.value.url == server.url("/cut")
    assert "RemoteProtocolError" in caught.value.reason
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
    assert leftovers(tmp_path) == []


async def test_a_sha256_mismatch_is_refused_and_leaves_no_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/a": Route(BODY)})
    async with local_client() as http:
        with pytest.raises(DownloadError, match="sha256 mismatch") as caught:
            await Downloader().download(http, server.url("/a"), tmp_path / "a", sha256="0" * 64)
        assert SHA in caught.value.reason
        assert leftovers(tmp_path) == []
        # The right digest, in either case, is accepted.
        await Downloader().download(http, server.url("/a"), tmp_path / "a", sha256=SHA.upper())
    assert (tmp_path / "a").read_bytes() == BODY


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
async def test_a_body_over_the_cap_is_refused_and_leaves_no_file(
    nursery: trio.Nursery, tmp_path: Path, chunked: bool
) -> None:
    server = await start_http_server(nursery, {"/huge": Route(BODY, chunked=chunked)})
    async with local_client() as http:
        with pytest.raises(DownloadError, match="cap") as caught:
            await Downloader(max_bytes=5000).download(http, server.url("/huge"), tmp_path / "h")
        assert "5000" in caught.value.reason
        # A per-call cap overrides the downloader's.
        with pytest.raises(DownloadError, match="cap"):
            await Downloader().download(http, server.url("/huge"), tmp_path / "h", max_bytes=10)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.safetensors",
        "/relative/path",
        "http://",
        "javascript:alert(1)",
    ],
)
async def test_only_http_and_https_urls_are_fetched(tmp_path: Path, url: str) -> None:
    async with local_client() as http:
        with pytest.raises(DownloadError) as caught:
            await Downloader().download(http, url, tmp_path / "x")
        with pytest.raises(DownloadError):
            await Downloader().fetch(http, url)
    assert caught.value.url == url
    assert leftovers(tmp_path) == []


def test_http_and_https_urls_pass_the_check() -> None:
    check_download_url("http://127.0.0.1:8000/a")
    check_download_url("HTTPS://huggingface.co/x/resolve/main/y.safetensors")


@pytest.mark.parametrize(
    "name",
    [
        "../escape.safetensors",
        "a/../../b",
        "/etc/passwd",
        "a\\..\\b",
        "",
        ".",
        "a//b",
        "C:evil",
        "bad\x00name",
        "sub/./x",
    ],
)
def test_names_that_could_escape_their_folder_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafeNameError) as caught:
        safe_join(tmp_path / "loras", name)
    assert caught.value.name == name
    assert caught.value.folder == str(tmp_path / "loras")


def test_names_with_sub_folders_stay_inside(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "sdxl/style.safetensors") == tmp_path / "sdxl" / "style.safetensors"
    assert safe_join(tmp_path, "a..b.safetensors") == tmp_path / "a..b.safetensors"


async def test_a_cancelled_download_leaves_no_file_and_the_next_caller_takes_over(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/slow": Route(BODY, delay=3)})
    downloader = Downloader()
    dest = tmp_path / "slow.safetensors"
    async with local_client() as http:
        async with trio.open_nursery() as caller:
            caller.start_soon(partial(downloader.download, http, server.url("/slow"), dest))
            await until(lambda: server.count("/slow") == 1)  # its request is out
            caller.cancel_scope.cancel()
        assert leftovers(tmp_path) == []
        assert await downloader.download(http, server.url("/slow"), dest)
    assert dest.read_bytes() == BODY
    assert server.count("/slow") == 2


async def test_a_waiter_takes_over_when_the_first_caller_is_cancelled(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/slow": Route(BODY, delay=3)})
    downloader = Downloader()
    dest = tmp_path / "slow.safetensors"
    async with local_client() as http, trio.open_nursery() as callers:
        first = trio.CancelScope()

        async def impatient() -> None:
            with first:
                await downloader.download(http, server.url("/slow"), dest)

        async def patient() -> None:
            assert await downloader.download(http, server.url("/slow"), dest)

        callers.start_soon(impatient)
        await until(lambda: server.count("/slow") == 1)  # the first caller's request is out
        callers.start_soon(patient)
        await trio.testing.wait_all_tasks_blocked()  # the second waits for the first
        first.cancel()
    assert dest.read_bytes() == BODY
    assert server.count("/slow") == 2


async def test_fetch_returns_the_body_within_its_cap(nursery: trio.Nursery) -> None:
    server = await start_http_server(nursery, {"/img": Route(BODY), "/404": Route(status=404)})
    async with local_client() as http:
        assert await Downloader().fetch(http, server.url("/img")) == BODY
        with pytest.raises(DownloadError, match="cap"):
            await Downloader().fetch(http, server.url("/img"), max_bytes=100)
        with pytest.raises(DownloadError, match="HTTP 404"):
            await Downloader().fetch(http, server.url("/404"))


async def test_an_unreachable_server_is_a_download_error(tmp_path: Path) -> None:
    # A port nobody listens on: bind one, close it, use it.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with local_client() as http:
        with pytest.raises(DownloadError, match="ConnectError"):
            await Downloader().download(http, f"http://127.0.0.1:{port}/x", tmp_path / "x")
    assert leftovers(tmp_path) == []


def test_a_bad_expected_digest_is_refused_before_any_request() -> None:
    with pytest.raises(DownloadError, match="64 hex digits"):
        check_sha256("http://x/y", "abc")


# --------------------------------------------------------------------------- deadlines


@attrs.define(eq=False)
class TrickleServer:
    """Answers every request with a 1 MB body announced, then sends it a byte a second."""

    port: int = 0
    requests: int = 0

    @property
    def url(self) -> str:
        """The URL it answers."""
        return f"http://127.0.0.1:{self.port}/slow.safetensors"

    async def serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                head += chunk
            self.requests += 1
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                while True:
                    await stream.send_all(b"x")
                    await trio.sleep(1)


async def start_trickle_server(nursery: trio.Nursery) -> TrickleServer:
    """Start a ``TrickleServer`` on 127.0.0.1 (a free port) in ``nursery``."""
    server = TrickleServer()
    listeners = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]
    return server


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """A virtual clock that jumps once every task has been blocked for 20 ms of real time
    (not at once, as ``autojump_clock`` does: the downloader makes its folder and files in
    threads, and a jump while one runs would pass the deadline before the request is sent).
    The servers' delays and the downloads' deadlines here are virtual seconds."""
    return trio.testing.MockClock(autojump_threshold=0.02)


def received(error: DownloadError) -> int:
    """The bytes a deadline error says were received."""
    found = re.search(r"\((\d+) bytes received\)", error.reason)
    assert found, error.reason
    return int(found.group(1))


async def test_a_trickling_download_fails_at_its_deadline_for_every_waiter(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_trickle_server(nursery)
    downloader = Downloader(timeout=10)
    dest = tmp_path / "loras" / "slow.safetensors"
    errors: list[DownloadError] = []
    async with local_client() as http:

        async def ask() -> None:
            with pytest.raises(DownloadError) as caught:
                await downloader.download(http, server.url, dest)
            errors.append(caught.value)

        started = trio.current_time()
        async with trio.open_nursery() as callers:
            for _ in range(3):
                callers.start_soon(ask)
        assert trio.current_time() - started == pytest.approx(10, abs=1)
    assert server.requests == 1
    assert len(errors) == 3
    for error in errors:
        assert error.url == server.url
        assert error.reason.startswith("did not finish in 10 s (")
        assert 5 <= received(error) <= 11  # a byte a second
    assert leftovers(dest.parent) == []


async def test_a_per_call_deadline_overrides_the_downloaders(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_trickle_server(nursery)
    async with local_client() as http:
        started = trio.current_time()
        with pytest.raises(DownloadError, match=r"did not finish in 2\.5 s") as caught:
            await Downloader().download(http, server.url, tmp_path / "x", timeout=2.5)
        assert trio.current_time() - started == pytest.approx(2.5, abs=0.5)
    assert caught.value.url == server.url
    assert leftovers(tmp_path) == []


async def test_a_trickling_fetch_fails_at_its_deadline(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = await start_trickle_server(nursery)
    async with local_client() as http:
        with pytest.raises(DownloadError) as caught:
            await Downloader(timeout=10).fetch(http, server.url)
        assert caught.value.url == server.url
        assert caught.value.reason.startswith("did not finish in 10 s (")
        assert 5 <= received(caught.value) <= 11
        with pytest.raises(DownloadError, match=r"did not finish in 3 s"):
            await Downloader(timeout=10).fetch(http, server.url, timeout=3)
    assert server.requests == 2


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
async def test_a_deadline_must_be_positive(timeout: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        Downloader(timeout=timeout)
    async with local_client() as http:
        with pytest.raises(ValueError, match="timeout"):
            await Downloader().download(
                http, "http://127.0.0.1:1/x", tmp_path / "x", timeout=timeout
            )
        with pytest.raises(ValueError, match="timeout"):
            await Downloader().fetch(http, "http://127.0.0.1:1/x", timeout=timeout)
