"""What the downloader trusts: redirects, bodies, digests, what is at the destination, names.

Every download comes from a real HTTP(S) server on 127.0.0.1 (the https one with a
certificate from the ``tls`` fixture's own CA).
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from comfytrio_std import lora_body_check, lora_body_problem
from test_plugins_support import (
    Route,
    load_workflow,
    local_client,
    plan,
    safetensors_bytes,
    start_http_server,
    std_plugins,
)

import comfytrio._download
from comfytrio import DownloadError, LoRARef, UnsafeNameError
from comfytrio.hookspecs import Downloader, check_download_url, safe_join

WEIGHTS = safetensors_bytes(2000)
SHA = hashlib.sha256(WEIGHTS).hexdigest()
OTHER = b"other weights " * 200

TLS = tuple[ssl.SSLContext, ssl.SSLContext]


def leftovers(folder: Path) -> list[str]:
    """Every entry of ``folder``, temp files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def redirect(to: str, status: int = 302) -> Route:
    """A route that redirects to ``to``."""
    return Route(b"", status=status, headers={"Location": to})


def trusting_client(tls: TLS, *, follow_redirects: bool = True) -> httpx.AsyncClient:
    """A client like the api's (it follows redirects itself) that trusts the test CA."""
    return httpx.AsyncClient(verify=tls[1], follow_redirects=follow_redirects)


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("follow_redirects", [True, False], ids=["api-client", "plain-client"])
async def test_an_https_to_http_redirect_is_refused(
    nursery: trio.Nursery, tmp_path: Path, tls: TLS, follow_redirects: bool
) -> None:
    plain = await start_http_server(nursery, {"/a.safetensors": Route(WEIGHTS)})
    secure = await start_http_server(
        nursery, {"/a.safetensors": redirect(plain.url("/a.safetensors"))}, tls=tls[0]
    )
    url = secure.url("/a.safetensors")
    assert url.startswith("https://")
    async with trusting_client(tls, follow_redirects=follow_redirects) as http:
        with pytest.raises(DownloadError, match=r"https->http redirect") as caught:
            await Downloader().download(http, url, tmp_path / "a.safetensors")
        with pytest.raises(DownloadError, match=r"https->http redirect") as fetched:
            await Downloader().fetch(http, url)
    for error in (caught.value, fetched.value):
        assert error.url == url
        assert plain.url("/a.safetensors") in error.reason
    assert plain.count("/a.safetensors") == 0  # never asked
    assert leftovers(tmp_path) == []


async def test_an_https_redirect_to_https_and_http_to_https_are_followed(
    nursery: trio.Nursery, tmp_path: Path, tls: TLS
) -> None:
    secure = await start_http_server(
        nursery, {"/old": redirect("/new", 301), "/new": Route(WEIGHTS)}, tls=tls[0]
    )
    plain = await start_http_server(nursery, {"/up": redirect(secure.url("/old"), 307)})
    async with trusting_client(tls) as http:
        assert await Downloader().download(http, plain.url("/up"), tmp_path / "a", sha256=SHA)
        assert await Downloader().fetch(http, secure.url("/old")) == WEIGHTS
    assert (tmp_path / "a").read_bytes() == WEIGHTS
    assert secure.count("/new") == 2


async def test_a_redirect_to_another_scheme_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/a": redirect("file:///etc/passwd")})
    async with local_client() as http:
        with pytest.raises(DownloadError, match=r"redirect to a file:// URL") as caught:
            await Downloader().download(http, server.url("/a"), tmp_path / "a")
    assert caught.value.url == server.url("/a")
    assert leftovers(tmp_path) == []


async def test_a_redirect_loop_stops_after_max_redirects(nursery: trio.Nursery) -> None:
    server = await start_http_server(nursery, {"/loop": redirect("/loop")})
    async with local_client() as http:
        with pytest.raises(DownloadError, match=r"more than 10 redirects"):
            await Downloader().fetch(http, server.url("/loop"))
    assert server.count("/loop") == comfytrio._download.MAX_REDIRECTS + 1


# --------------------------------------------------------------------------- LoRA bodies

HTML = b"<!DOCTYPE html><html><head><title>Index of /loras</title></head>" + b" " * 2000


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (HTML, "looks like an HTML or XML page"),
        (b"\xef\xbb\xbf\r\n  <html>" + b"x" * 2000, "looks like an HTML or XML page"),
        ("\ufeff<html>".encode("utf-16-le") + b"x\x00" * 1000, "looks like an HTML or XML page"),
        (b'{"error": "Access to model is restricted"}' + b" " * 2000, "looks like JSON"),
        (b"  [1, 2, 3]" + b" " * 2000, "looks like JSON"),
        (b"Not Found. Please log in to download this file.\n" * 50, "looks like text"),
        (b"\x00" * 100, "100 bytes, too small"),
        (WEIGHTS[:500], "500 bytes, too small"),
        # A header that says it ends past the end of the file.
        (safetensors_bytes(10, header_size=4000)[:2000], "header size 4000 does not fit"),
        (b"\x80\x02}q\x00" + bytes(2000), "not a safetensors file"),  # a pickle, named .st
    ],
    ids=[
        "html",
        "bom-html",
        "utf16-html",
        "json",
        "json-list",
        "text",
        "tiny",
        "small",
        "header-too-long",
        "pickle",
    ],
)
async def test_a_lora_body_that_is_no_weights_is_refused_and_never_saved(
    nursery: trio.Nursery, tmp_path: Path, body: bytes, reason: str
) -> None:
    server = await start_http_server(
        nursery, {"/x.safetensors": Route(body, content_type="text/html")}
    )
    models = tmp_path / "models"
    lora = LoRARef("x.safetensors", server.url("/x.safetensors"))
    with pytest.raises(DownloadError) as caught:
        await plan(std_plugins(), load_workflow("sdxl_txt2img"), loras=[lora], models_path=models)
    assert caught.value.url == lora.url
    assert reason in caught.value.reason
    assert leftovers(models / "loras") == []


@pytest.mark.parametrize("header_size", [0x13C, 0x17B, 0x15B, 0x120, 0x10A])
def test_a_safetensors_file_is_weights_whatever_its_first_byte(header_size: int) -> None:
    # The first byte is the low byte of the header size: '<', '{', '[', ' ', '\n' here.
    body = safetensors_bytes(500, header_size=header_size)
    assert body[0] == header_size & 0xFF
    assert lora_body_problem(body[:4096], len(body), safetensors=True) is None


def test_other_lora_formats_are_only_refused_when_they_look_like_text() -> None:
    pickle = b"\x80\x02}q\x00" + bytes(5000)
    zipped = b"PK\x03\x04" + bytes(5000)
    check: Callable[[bytes, int], str | None] = lora_body_check("style.pt")
    assert check(pickle, len(pickle)) is None
    assert check(zipped, len(zipped)) is None
    assert "HTML" in (check(HTML, len(HTML)) or "")
    assert lora_body_check("style.SafeTensors")(pickle, len(pickle)) is not None


async def test_an_html_page_already_saved_as_a_lora_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/x.safetensors": Route(WEIGHTS)})
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / "x.safetensors").write_bytes(HTML)  # what an older version may have saved
    lora = LoRARef("x.safetensors", server.url("/x.safetensors"))
    with pytest.raises(DownloadError, match=r"already at .* is refused: the body looks like"):
        await plan(
            std_plugins(), load_workflow("sdxl_txt2img"), loras=[lora], models_path=loras.parent
        )
    assert (loras / "x.safetensors").read_bytes() == HTML  # never overwritten
    assert server.count("/x.safetensors") == 0


# --------------------------------------------------------------------------- sha256


async def test_a_file_already_there_is_checked_against_the_sha256(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/a": Route(WEIGHTS)})
    dest = tmp_path / "a.safetensors"
    dest.write_bytes(OTHER)
    async with local_client() as http:
        with pytest.raises(DownloadError, match="sha256 mismatch") as caught:
            await Downloader().download(http, server.url("/a"), dest, sha256=SHA)
        assert str(dest) in caught.value.reason
        assert hashlib.sha256(OTHER).hexdigest() in caught.value.reason
        assert dest.read_bytes() == OTHER  # refused, not overwritten
        dest.write_bytes(WEIGHTS)
        assert not await Downloader().download(http, server.url("/a"), dest, sha256=SHA.upper())
    assert server.count("/a") == 0


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the downloader hashes from disk, in order."""
    seen: list[str] = []
    original = comfytrio._download._hash_file

    def counting(path: str, stop: Any) -> Any:
        seen.append(path)
        return original(path, stop)

    monkeypatch.setattr(comfytrio._download, "_hash_file", counting)
    return seen


async def test_fifty_jobs_using_one_lora_hash_it_once(
    nursery: trio.Nursery, tmp_path: Path, hashed: list[str]
) -> None:
    server = await start_http_server(nursery, {"/a": Route(WEIGHTS)})
    dest = tmp_path / "a.safetensors"
    dest.write_bytes(WEIGHTS)
    downloader = Downloader()
    results: list[bool] = []
    async with local_client() as http:

        async def ask() -> None:
            results.append(await downloader.download(http, server.url("/a"), dest, sha256=SHA))

        async with trio.open_nursery() as callers:
            for _ in range(50):
                callers.start_soon(ask)
        assert results == [False] * 50
        assert hashed == [str(dest)]
        # A new content (same path) is hashed again, and refused.
        dest.write_bytes(OTHER)
        with pytest.raises(DownloadError, match="sha256 mismatch"):
            await downloader.download(http, server.url("/a"), dest, sha256=SHA)
    assert hashed == [str(dest)] * 2
    assert server.count("/a") == 0


async def test_a_file_just_downloaded_is_not_hashed_again(
    nursery: trio.Nursery, tmp_path: Path, hashed: list[str]
) -> None:
    server = await start_http_server(nursery, {"/a": Route(WEIGHTS, delay=0.1)})
    dest = tmp_path / "a.safetensors"
    downloader = Downloader()
    results: list[bool] = []
    async with local_client() as http:

        async def ask() -> None:
            results.append(await downloader.download(http, server.url("/a"), dest, sha256=SHA))

        async with trio.open_nursery() as callers:
            for _ in range(20):
                callers.start_soon(ask)
        assert not await downloader.download(http, server.url("/a"), dest, sha256=SHA)
    assert results == [True] * 20
    assert hashed == []
    assert server.count("/a") == 1


async def test_a_concurrent_call_with_another_url_and_hash_checks_its_own_hash(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/a": Route(WEIGHTS, delay=0.1), "/b": Route(OTHER)})
    dest = tmp_path / "a.safetensors"
    downloader = Downloader()
    other_sha = hashlib.sha256(OTHER).hexdigest()
    errors: list[DownloadError] = []
    async with local_client() as http, trio.open_nursery() as callers:

        async def first() -> None:
            assert await downloader.download(http, server.url("/a"), dest)

        async def second() -> None:
            with pytest.raises(DownloadError) as caught:
                await downloader.download(http, server.url("/b"), dest, sha256=other_sha)
            errors.append(caught.value)

        callers.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()  # first holds the flight
        callers.start_soon(second)
    (error,) = errors
    assert error.url == server.url("/b")
    assert error.reason.startswith("sha256 mismatch: the file already at")
    assert SHA in error.reason
    assert other_sha in error.reason
    assert server.count("/b") == 0
    assert dest.read_bytes() == WEIGHTS


async def test_a_waiter_with_another_url_tries_its_own_when_the_first_fails(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(
        nursery, {"/gone": Route(b"no", status=404, delay=0.1), "/a": Route(WEIGHTS)}
    )
    dest = tmp_path / "a.safetensors"
    downloader = Downloader()
    async with local_client() as http, trio.open_nursery() as callers:

        async def first() -> None:
            with pytest.raises(DownloadError, match="HTTP 404"):
                await downloader.download(http, server.url("/gone"), dest)

        async def second() -> None:
            assert await downloader.download(http, server.url("/a"), dest, sha256=SHA)

        callers.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        callers.start_soon(second)
    assert dest.read_bytes() == WEIGHTS
    assert server.count("/a") == 1


# --------------------------------------------------------------------------- destination


async def test_a_directory_at_the_destination_is_an_error(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/a": Route(WEIGHTS)})
    dest = tmp_path / "a.safetensors"
    dest.mkdir()
    async with local_client() as http:
        with pytest.raises(DownloadError, match="is a directory, not a file") as caught:
            await Downloader().download(http, server.url("/a"), dest)
    assert str(dest) in caught.value.reason
    assert server.count("/a") == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
async def test_a_fifo_at_the_destination_is_an_error(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await start_http_server(nursery, {"/a": Route(WEIGHTS)})
    dest = tmp_path / "a.safetensors"
    os.mkfifo(dest)
    async with local_client() as http:
        with trio.fail_after(5), pytest.raises(DownloadError, match="not a regular file"):
            await Downloader().download(http, server.url("/a"), dest, sha256=SHA)


async def test_a_name_of_255_bytes_downloads_and_one_of_256_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/a": Route(WEIGHTS)})
    longest = "é" * 121 + ".safetensors"  # 242 + 12 = 254 bytes
    longest = "x" + longest
    assert len(longest.encode()) == 255
    async with local_client() as http:
        dest = safe_join(tmp_path, longest)
        assert await Downloader().download(http, server.url("/a"), dest, sha256=SHA)
        assert leftovers(tmp_path) == [longest]
        too_long = "x" + longest
        with pytest.raises(UnsafeNameError) as caught:
            safe_join(tmp_path, too_long)
        assert caught.value.name == too_long
        with pytest.raises(UnsafeNameError):
            await Downloader().download(http, server.url("/a"), tmp_path / too_long)
    assert server.count("/a") == 1


@pytest.mark.parametrize(
    ("dest", "error", "culprit"),
    [
        ("bad\x00name.safetensors", UnsafeNameError, "bad\x00name.safetensors"),
        ("new\nline.safetensors", UnsafeNameError, "new\nline.safetensors"),
        ("sub\x00dir/a.safetensors", DownloadError, "sub\x00dir"),
    ],
    ids=["nul-in-name", "newline-in-name", "nul-in-folder"],
)
async def test_a_destination_with_a_control_character_names_it(
    tmp_path: Path, dest: str, error: type[Exception], culprit: str
) -> None:
    async with local_client() as http:
        with pytest.raises(error) as caught:
            await Downloader().download(http, "http://127.0.0.1:9/a", tmp_path / dest)
    if isinstance(caught.value, UnsafeNameError):
        assert caught.value.name == culprit
    else:
        assert repr(culprit)[1:-1] in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["http://[::1/a", "http://127.0.0.1:99999/a", "http://127.0.0.1/a\x00b", "http://x/\nGET"],
    ids=["bad-ipv6", "bad-port", "nul", "newline"],
)
async def test_a_malformed_url_is_a_download_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(DownloadError):
        check_download_url(url)
    async with local_client() as http:
        with pytest.raises(DownloadError):
            await Downloader().download(http, url, tmp_path / "a")
        with pytest.raises(DownloadError):
            await Downloader().fetch(http, url)
    assert leftovers(tmp_path) == []
