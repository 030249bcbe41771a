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
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "DEFAULT_MAX_DOWNLOAD_BYTES",
    "Downloader",
    "check_download_url",
    "check_sha256",
    "safe_join",
]

logger = logging.getLogger("comfytrio.download")

DEFAULT_MAX_DOWNLOAD_BYTES = 8 * 1024**3
"""The default size cap of one download (8 GiB: larger than any LoRA in the wild)."""

DEFAULT_DOWNLOAD_TIMEOUT = 3600.0
"""The default deadline of one download, in seconds, from the request to the last byte: a
server that trickles a byte at a time (each one resetting httpx's read timeout) cannot hold a
job for longer than this."""

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
    """Downloads files for plugins: http(s) only, a size cap, an overall deadline, a temp
    file renamed into place, an optional sha256, and at most one request at a time per
    destination.

    ``max_bytes`` is the default cap of one download (``DEFAULT_MAX_DOWNLOAD_BYTES``) and
    ``timeout`` its default deadline in seconds, from the request to the last byte
    (``DEFAULT_DOWNLOAD_TIMEOUT``; ``math.inf``: none); each call may lower or raise either.
    One ``Downloader`` is made per plugin manager, so it lives as long as the api that uses
    it.
    """

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        _check_timeout(timeout)
        self.max_bytes = max_bytes
        self.timeout = timeout
        """The default deadline of one download, in seconds."""
        self._in_flight: dict[str, _Flight] = {}

    def _deadline(self, timeout: float | None) -> float:
        if timeout is None:
            return self.timeout
        _check_timeout(timeout)
        return timeout

    async def download(
        self,
        http: httpx.AsyncClient,
        url: str,
        dest: Path,
        *,
        sha256: str | None = None,
        max_bytes: int | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Download ``url`` to ``dest`` unless ``dest`` already exists.

        Returns True when this call (or a concurrent call it waited for) fetched the file,
        False when it was already there (an existing file is trusted: it is not hashed).
        Concurrent calls for the same ``dest`` make one request; if it fails, each of them
        raises. The bytes go to a temp file in ``dest``'s folder and are renamed into place
        only once complete and verified, so no partial file is ever left, even on
        cancellation. ``max_bytes`` and ``timeout`` (seconds for the whole transfer) default
        to the downloader's; the call that makes the request sets them for every waiter.

        Raises ``DownloadError`` (``url``, ``reason``): a scheme other than http(s), an HTTP
        status other than 200, a body over the cap, a transfer past its deadline, a sha256
        mismatch, a connection error or a body cut short, or a local write error.
        """
        check_download_url(url)
        check_sha256(url, sha256)
        cap = self.max_bytes if max_bytes is None else max_bytes
        deadline = self._deadline(timeout)
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
            progress = _Progress()
            with trio.move_on_after(deadline) as scope:
                await self._download_to(
                    http, url, dest, sha256=sha256, max_bytes=cap, progress=progress
                )
            if scope.cancelled_caught:
                raise _late(url, deadline, progress.received)
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
        progress: _Progress,
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
                progress.response = response
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
        self,
        http: httpx.AsyncClient,
        url: str,
        *,
        max_bytes: int | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Download ``url`` into memory (an input image, say), at most ``max_bytes`` bytes
        within ``timeout`` seconds (both default to the downloader's).

        Raises ``DownloadError`` as ``download`` does.
        """
        check_download_url(url)
        cap = self.max_bytes if max_bytes is None else max_bytes
        deadline = self._deadline(timeout)
        body = bytearray()
        progress = _Progress()
        try:
            with trio.move_on_after(deadline) as scope:
                async with http.stream("GET", url) as response:
                    progress.response = response
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
        if scope.cancelled_caught:
            raise _late(url, deadline, progress.received)
        logger.debug("fetched %s (%d bytes)", url, len(body))
        return bytes(body)


@attrs.define
class _Progress:
    """How far a transfer got (for the message of one past its deadline)."""

    response: httpx.Response | None = None

    @property
    def received(self) -> int:
        """Bytes of body received so far, counted as they come off the wire (the chunks a
        transfer reads are larger: a byte a second fills none)."""
        return 0 if self.response is None else self.response.num_bytes_downloaded


def _late(url: str, deadline: float, received: int) -> DownloadError:
    logger.warning("download of %s cut at its %g s deadline (%d bytes)", url, deadline, received)
    return DownloadError(url, f"did not finish in {deadline:g} s ({received} bytes received)")


def _check_timeout(timeout: float) -> None:
    # NaN and non-numbers fail the comparison too; math.inf means no deadline.
    if isinstance(timeout, bool) or not (isinstance(timeout, int | float) and timeout > 0):
        raise ValueError(
            f"a download timeout must be a positive number of seconds, got {timeout!r}"
        )


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
