"""The downloader plugins share: http(s) only, capped, atomic, verified, one request per file.

Every download here comes from a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import trio
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
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/slow": Route(BODY, delay=0.3)})
    downloader = Downloader()
    dest = tmp_path / "slow.safetensors"
    async with local_client() as http:
        with trio.move_on_after(0.1):
            await downloader.download(http, server.url("/slow"), dest)
        assert leftovers(tmp_path) == []
        assert await downloader.download(http, server.url("/slow"), dest)
    assert dest.read_bytes() == BODY


async def test_a_waiter_takes_over_when_the_first_caller_is_cancelled(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/slow": Route(BODY, delay=0.2)})
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
        await trio.sleep(0.05)
        callers.start_soon(patient)
        await trio.sleep(0.05)
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
