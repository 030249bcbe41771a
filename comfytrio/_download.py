"""Safe downloads for plugins: http(s) only, bounded, atomic, verified, one request per file.

A ``Downloader`` lives as long as the plugin manager that owns it (so as long as the
``ComfyAPI``): its in-flight table is what lets 50 jobs that need the same LoRA at the same
moment share one request. Nothing here is a module global.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path, PurePosixPath
from typing import cast
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from ._errors import DownloadError, UnsafeNameError

__all__ = [
    "DEFAULT_MAX_DOWNLOAD_BYTES",
    "Downloader",
    "check_download_url",
    "check_sha256",
    "safe_join",
]

logger = logging.getLogger("comfytrio.download")

DEFAULT_MAX_DOWNLOAD_BYTES = 8 * 1024**3
"""The default size cap of one download (8 GiB: larger than any LoRA in the wild)."""

_CHUNK = 1 << 16
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_download_url(url: str) -> None:
    """Refuse anything but an absolute ``http://`` or ``https://`` URL.

    Raises ``DownloadError`` (with ``url`` and ``reason``) for ``file://``, ``ftp://``, a
    relative URL, or a URL without a host. Does no I/O.
    """
    if not isinstance(url, str):
        raise DownloadError(repr(url), "the URL must be a string")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = f"{scheme}://" if scheme else "no scheme"
        raise DownloadError(url, f"only http:// and https:// URLs are allowed, not {shown}")
    if not parts.hostname:
        raise DownloadError(url, "the URL has no host")


def check_sha256(url: str, sha256: str | None) -> None:
    """Refuse an expected digest that is not 64 hex digits (``DownloadError``)."""
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise DownloadError(url, f"the expected sha256 {sha256!r} is not 64 hex digits")


def safe_join(folder: Path, name: str) -> Path:
    """``folder / name``, refusing any ``name`` that could land outside ``folder``.

    ``name`` may hold sub-folders separated by ``/``. Refused with ``UnsafeNameError``: an
    empty name, an absolute path, a ``..`` or ``.`` or empty component, a backslash, a
    drive letter, a NUL or other control character. The check is on the name alone (no I/O).
    """
    if not isinstance(name, str) or not name:
        raise UnsafeNameError(str(name), str(folder))
    if "\\" in name or any(ord(c) < 32 for c in name) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeNameError(name, str(folder))
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("/"):
        raise UnsafeNameError(name, str(folder))
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeNameError(name, str(folder))
    return folder.joinpath(*parts)


@attrs.define(eq=False)
class _Flight:
    """One download in progress, shared by everyone who waits for the same file."""

    url: str
    done: trio.Event = attrs.field(factory=trio.Event)
    error: DownloadError | None = None
    downloaded: bool | None = None
    """True when fetched, False when the file was already there, None when cancelled."""


class Downloader:
    """Downloads files for plugins: http(s) only, a size cap, a temp file renamed into place,
    an optional sha256, and at most one request at a time per destination.

    ``max_bytes`` is the default cap of one download (``DEFAULT_MAX_DOWNLOAD_BYTES``); each
    call may lower or raise it. One ``Downloader`` is made per plugin manager, so it lives as
    long as the api that uses it.
    """

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._in_flight: dict[str, _Flight] = {}

    async def download(
        self,
        http: httpx.AsyncClient,
        url: str,
        dest: Path,
        *,
        sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> bool:
        """Download ``url`` to ``dest`` unless ``dest`` already exists.

        Returns True when this call (or a concurrent call it waited for) fetched the file,
        False when it was already there (an existing file is trusted: it is not hashed).
        Concurrent calls for the same ``dest`` make one request; if it fails, each of them
        raises. The bytes go to a temp file in ``dest``'s folder and are renamed into place
        only once complete and verified, so no partial file is ever left, even on
        cancellation.

        Raises ``DownloadError`` (``url``, ``reason``): a scheme other than http(s), an HTTP
        status other than 200, a body over the cap, a sha256 mismatch, a connection error or
        a body cut short, or a local write error.
        """
        check_download_url(url)
        check_sha256(url, sha256)
        cap = self.max_bytes if max_bytes is None else max_bytes
        key = os.fspath(dest)  # callers pass paths built one way (models_path/loras/name)
        while (flight := self._in_flight.get(key)) is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise DownloadError(flight.error.url, flight.error.reason) from flight.error
            if flight.downloaded is not None:
                return flight.downloaded
            # The task that was downloading was cancelled: look again, maybe take over.
        # Claimed before the first checkpoint, so a concurrent caller always finds it.
        flight = self._in_flight[key] = _Flight(url)
        try:
            if await trio.Path(dest).exists():
                flight.downloaded = False
                return False
            await self._download_to(http, url, dest, sha256=sha256, max_bytes=cap)
            flight.downloaded = True
            return True
        except DownloadError as exc:
            flight.error = exc
            raise
        finally:
            del self._in_flight[key]
            flight.done.set()

    async def _download_to(
        self,
        http: httpx.AsyncClient,
        url: str,
        dest: Path,
        *,
        sha256: str | None,
        max_bytes: int,
    ) -> None:
        folder = trio.Path(dest.parent)
        try:
            await folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DownloadError(url, f"cannot create {dest.parent}: {exc}") from exc
        # Same folder as dest, so the final rename is atomic; a dot name keeps ComfyUI's
        # model lists from showing it while it grows.
        tmp = trio.Path(dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.part")
        digest = hashlib.sha256()
        size = 0
        logger.info("downloading %s -> %s", url, dest)
        try:
            async with http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise DownloadError(url, f"HTTP {response.status_code}")
                _check_declared_length(url, response, max_bytes)
                async with (
                    await trio.open_file(tmp, "wb") as fh,
                    _chunks(response) as chunks,
                ):
                    async for chunk in chunks:
                        size += len(chunk)
                        if size > max_bytes:
                            raise DownloadError(url, f"the body is over the {max_bytes}-byte cap")
                        digest.update(chunk)
                        await fh.write(chunk)
                    await fh.flush()
                    await trio.to_thread.run_sync(os.fsync, fh.fileno())
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise DownloadError(
                    url, f"sha256 mismatch: expected {sha256.lower()}, got {digest.hexdigest()}"
                )
            await tmp.replace(dest)
            logger.info("downloaded %s (%d bytes) -> %s", url, size, dest)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise DownloadError(url, _describe(exc)) from exc
        except OSError as exc:
            raise DownloadError(url, f"cannot write {dest}: {exc}") from exc
        finally:
            with trio.CancelScope(shield=True):
                await tmp.unlink(missing_ok=True)

    async def fetch(
        self, http: httpx.AsyncClient, url: str, *, max_bytes: int | None = None
    ) -> bytes:
        """Download ``url`` into memory (an input image, say), at most ``max_bytes`` bytes.

        Raises ``DownloadError`` as ``download`` does.
        """
        check_download_url(url)
        cap = self.max_bytes if max_bytes is None else max_bytes
        body = bytearray()
        try:
            async with http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise DownloadError(url, f"HTTP {response.status_code}")
                _check_declared_length(url, response, cap)
                async with _chunks(response) as chunks:
                    async for chunk in chunks:
                        body += chunk
                        if len(body) > cap:
                            raise DownloadError(url, f"the body is over the {cap}-byte cap")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise DownloadError(url, _describe(exc)) from exc
        logger.debug("fetched %s (%d bytes)", url, len(body))
        return bytes(body)


def _chunks(response: httpx.Response) -> aclosing[AsyncGenerator[bytes, None]]:
    # httpx types aiter_bytes() as an AsyncIterator, but it is an async generator: close it
    # ourselves when we stop early (over the cap), or it is finalized by the GC, unclosed.
    return aclosing(cast("AsyncGenerator[bytes, None]", response.aiter_bytes(_CHUNK)))


def _check_declared_length(url: str, response: httpx.Response, max_bytes: int) -> None:
    # Refuse before reading a byte when the server says up front that it is too big.
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise DownloadError(
            url, f"the body is {int(declared)} bytes, over the {max_bytes}-byte cap"
        )


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
