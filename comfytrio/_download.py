"""Safe downloads for plugins: http(s) only, bounded, atomic, verified, one request per file.

A ``Downloader`` lives as long as the plugin manager that owns it (so as long as the
``ComfyAPI``): its in-flight table is what lets 50 jobs that need the same LoRA at the same
moment share one request, and its digest cache what lets them hash the file once. Nothing
here is a module global.

Trust rules (``docs/plugins.md``): every redirect is followed by hand and checked (http(s)
only, never from https to http, at most ``MAX_REDIRECTS``); a file is taken only when it is
a regular file, and a given ``sha256`` is checked on every file taken, whether fetched now,
fetched by a concurrent call or already there; a ``check_body`` sees the first bytes of a
body (a LoRA must not be an HTML page).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TypeAlias, cast
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from ._errors import DownloadError, UnsafeNameError
from ._files import (
    CONTROL_CHARACTERS,
    MAX_NAME_BYTES,
    atomic_file,
    fits,
    hash_file,
    read_head,
    safe_join,
)

__all__ = [
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "DEFAULT_MAX_DOWNLOAD_BYTES",
    "MAX_NAME_BYTES",
    "MAX_REDIRECTS",
    "SNIFF_BYTES",
    "BodyCheck",
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

MAX_REDIRECTS = 10
"""The most redirects one download follows (each one checked)."""

SNIFF_BYTES = 4096
"""How many of a body's first bytes a ``check_body`` is shown (fewer for a shorter body)."""

BodyCheck: TypeAlias = Callable[[bytes, int], "str | None"]
"""``check_body(head, size)``: why a body (its first ``SNIFF_BYTES`` bytes and its total
size) is not what the caller wants, or None when it is fine. Pure and quick: it runs in the
event loop."""

_CHUNK = 1 << 16
_hash_file = hash_file  # looked up at each call: tests count the files hashed
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_download_url(url: str) -> None:
    """Refuse anything but an absolute ``http://`` or ``https://`` URL.

    Raises ``DownloadError`` (with ``url`` and ``reason``) for ``file://``, ``ftp://``, a
    relative URL, a URL without a host, a malformed one (``http://[::1``, a port that is no
    number) or one holding a control character. Does no I/O.
    """
    if not isinstance(url, str):
        raise DownloadError(repr(url), "the URL must be a string")
    if CONTROL_CHARACTERS.search(url):
        raise DownloadError(repr(url), "the URL holds a control character (NUL, newline...)")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise DownloadError(url, f"the URL is malformed: {exc}") from exc
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


def _check_dest(url: str, dest: Path) -> None:
    # For callers that built ``dest`` without ``safe_join``: the OS would raise ValueError
    # (NUL) or ENAMETOOLONG, not an error that names the culprit.
    if "\x00" in os.fspath(dest.parent):
        raise DownloadError(url, f"the destination folder {str(dest.parent)!r} holds a NUL")
    if not dest.name or CONTROL_CHARACTERS.search(dest.name) or not fits(dest.name):
        raise UnsafeNameError(dest.name, str(dest.parent))


@attrs.define(eq=False)
class _Flight:
    """One download in progress, shared by everyone who waits for the same file."""

    url: str
    sha256: str | None
    done: trio.Event = attrs.field(factory=trio.Event)
    error: DownloadError | None = None
    downloaded: bool | None = None
    """True when fetched, False when the file was already there, None when cancelled."""


class Downloader:
    """Downloads files for plugins: http(s) only, redirects checked, a size cap, an overall
    deadline, a temp file renamed into place, an optional sha256 (checked on every file
    taken, and hashed once per file and content), an optional check of the body, and at
    most one request at a time per destination.

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
        self._digests: dict[str, tuple[int, int, str]] = {}
        """path -> (size, mtime_ns, sha256) of the files hashed or written: a file is hashed
        again only when its size or modification time changed."""

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
        check_body: BodyCheck | None = None,
    ) -> bool:
        """Download ``url`` to ``dest`` unless ``dest`` already exists.

        Returns True when this call (or a concurrent call it waited for) fetched the file,
        False when it was already there. Whichever way the file came, it is checked before it
        is taken: it must be a regular file (a directory or a FIFO there is an error), match
        ``sha256`` when one is given (hashed once per file and content: the digest is kept
        by path, size and modification time), and pass ``check_body`` when one is given.

        Concurrent calls for the same ``dest`` make one request; if it fails, each of them
        with the same URL and sha256 raises (one with another URL or sha256 tries its own).
        Redirects are followed by hand, at most ``MAX_REDIRECTS``, each one checked: to
        http(s) only, never from https to http. The bytes go to a temp file in ``dest``'s
        folder (a short hidden name, so a ``dest`` name of 255 bytes works) and are renamed
        into place only once complete and verified, so no partial file is ever left, even on
        cancellation. ``max_bytes`` and ``timeout`` (seconds for the whole transfer) default
        to the downloader's; the call that makes the request sets them for every waiter.

        Raises ``DownloadError`` (``url``, ``reason``): a scheme other than http(s), a
        refused redirect, an HTTP status other than 200, a body over the cap, a transfer past
        its deadline, a sha256 mismatch (of the body, or of the file already there), a body
        ``check_body`` refuses, a directory or other non-regular file at ``dest``, a
        connection error or a body cut short, or a local write error. ``UnsafeNameError``: a
        ``dest`` name with a control character or over ``MAX_NAME_BYTES`` bytes.
        """
        check_download_url(url)
        check_sha256(url, sha256)
        dest = Path(dest)
        _check_dest(url, dest)
        expected = None if sha256 is None else sha256.lower()
        cap = self.max_bytes if max_bytes is None else max_bytes
        deadline = self._deadline(timeout)
        key = os.fspath(dest)  # callers pass paths built one way (models_path/loras/name)
        fetched = False
        while (flight := self._in_flight.get(key)) is not None:
            await flight.done.wait()
            if flight.error is not None:
                if (flight.url, flight.sha256) == (url, expected):
                    raise DownloadError(flight.error.url, flight.error.reason) from flight.error
                continue  # another URL or digest failed: try ours
            if flight.downloaded is not None:
                if expected is None and check_body is None:
                    return flight.downloaded
                # Our own checks are on the file: take our turn to make them (a cache hit
                # when the digest is the one just written).
                fetched = fetched or flight.downloaded
            # Else the task that was downloading was cancelled: look again, maybe take over.
        # Claimed before the first checkpoint, so a concurrent caller always finds it.
        flight = self._in_flight[key] = _Flight(url, expected)
        try:
            present = await _stat_dest(url, dest)
            if present is not None:
                await self._check_present(url, dest, present, expected, check_body)
                flight.downloaded = False
                return fetched
            progress = _Progress()
            with trio.move_on_after(deadline) as scope:
                await self._download_to(
                    http,
                    url,
                    dest,
                    sha256=expected,
                    max_bytes=cap,
                    progress=progress,
                    check_body=check_body,
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

    async def _check_present(
        self,
        url: str,
        dest: Path,
        present: os.stat_result,
        sha256: str | None,
        check_body: BodyCheck | None,
    ) -> None:
        """Check a file already at ``dest`` as a fetched one is checked."""
        again = "delete it to download it again"
        if check_body is not None:
            head = await _read_head(url, dest)
            reason = check_body(head, present.st_size)
            if reason is not None:
                raise DownloadError(
                    url, f"the file already at {dest} is refused: {reason} ({again})"
                )
        if sha256 is not None:
            digest = await self._digest(url, dest, present)
            if digest != sha256:
                raise DownloadError(
                    url,
                    f"sha256 mismatch: the file already at {dest} has {digest}, "
                    f"expected {sha256} ({again})",
                )

    async def _digest(self, url: str, dest: Path, present: os.stat_result) -> str:
        """The sha256 of the file at ``dest``, from the cache while its size and modification
        time are those of ``present``; else hashed in a thread (cancellable)."""
        key = os.fspath(dest)
        cached = self._digests.get(key)
        if cached is not None and cached[:2] == (present.st_size, present.st_mtime_ns):
            return cached[2]
        stop = threading.Event()
        try:
            digest, before, after = await trio.to_thread.run_sync(
                partial(_hash_file, key, stop), abandon_on_cancel=True
            )
        except OSError as exc:
            raise DownloadError(url, f"cannot read {dest}: {exc}") from exc
        finally:
            stop.set()  # an abandoned thread stops at its next chunk
        if before == after:  # not changed while it was read
            self._digests[key] = (*before, digest)
        logger.debug("hashed %s: %s", dest, digest)
        return digest

    async def _download_to(
        self,
        http: httpx.AsyncClient,
        url: str,
        dest: Path,
        *,
        sha256: str | None,
        max_bytes: int,
        progress: _Progress,
        check_body: BodyCheck | None,
    ) -> None:
        digest = hashlib.sha256()
        head = bytearray()
        logger.info("downloading %s -> %s", url, dest)
        try:
            async with (
                atomic_file(dest, url) as out,
                aclosing(_body(http, url, max_bytes, progress)) as chunks,
            ):
                async for chunk in chunks:
                    if len(head) < SNIFF_BYTES:
                        head += chunk[: SNIFF_BYTES - len(head)]
                    digest.update(chunk)
                    await out.write(chunk)
                if check_body is not None:
                    reason = check_body(bytes(head), out.size)
                    if reason is not None:
                        kind = progress.content_type()
                        raise DownloadError(
                            url, reason + (f" (Content-Type {kind})" if kind else "")
                        )
                if sha256 is not None and digest.hexdigest() != sha256:
                    raise DownloadError(
                        url, f"sha256 mismatch: expected {sha256}, got {digest.hexdigest()}"
                    )
                written = await out.commit()
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise DownloadError(url, _describe(exc)) from exc
        # The rename keeps size and mtime: 50 jobs that check this digest hash nothing.
        self._digests[os.fspath(dest)] = (written.st_size, written.st_mtime_ns, digest.hexdigest())
        logger.info("downloaded %s (%d bytes) -> %s", url, written.st_size, dest)

    async def fetch(
        self,
        http: httpx.AsyncClient,
        url: str,
        *,
        max_bytes: int | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Download ``url`` into memory (an input image, say), at most ``max_bytes`` bytes
        within ``timeout`` seconds (both default to the downloader's). Redirects are checked
        as ``download`` checks them.

        Raises ``DownloadError`` as ``download`` does.
        """
        check_download_url(url)
        cap = self.max_bytes if max_bytes is None else max_bytes
        deadline = self._deadline(timeout)
        body = bytearray()
        progress = _Progress()
        try:
            with trio.move_on_after(deadline) as scope:
                async with aclosing(_body(http, url, cap, progress)) as chunks:
                    async for chunk in chunks:
                        body += chunk
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise DownloadError(url, _describe(exc)) from exc
        if scope.cancelled_caught:
            raise _late(url, deadline, progress.received)
        logger.debug("fetched %s (%d bytes)", url, len(body))
        return bytes(body)


async def _body(
    http: httpx.AsyncClient, url: str, max_bytes: int, progress: _Progress
) -> AsyncGenerator[bytes, None]:
    """The body of ``GET url`` (redirects checked), chunk by chunk, at most ``max_bytes``
    bytes; a status other than 200 or a longer body is a ``DownloadError``."""
    async with _get(http, url) as response:
        progress.response = response
        if response.status_code != 200:
            raise DownloadError(url, f"HTTP {response.status_code}")
        _check_declared_length(url, response, max_bytes)
        size = 0
        # httpx types aiter_bytes() as an AsyncIterator, but it is an async generator: close
        # it ourselves when we stop early (over the cap), or the GC finalizes it, unclosed.
        body = cast("AsyncGenerator[bytes, None]", response.aiter_bytes(_CHUNK))
        async with aclosing(body) as chunks:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadError(url, f"the body is over the {max_bytes}-byte cap")
                yield chunk


@asynccontextmanager
async def _get(http: httpx.AsyncClient, url: str) -> AsyncIterator[httpx.Response]:
    """``GET url`` as a stream, following redirects by hand whatever the client's
    ``follow_redirects`` says: at most ``MAX_REDIRECTS``, each hop checked
    (``_check_redirect``). Yields the first answer that is no redirect."""
    request = http.build_request("GET", url)
    for _ in range(MAX_REDIRECTS + 1):
        response = await http.send(request, stream=True, follow_redirects=False)
        try:
            following = response.next_request  # set by httpx for a redirect it did not follow
            if following is None:
                yield response
                return
            _check_redirect(url, request.url, following.url, response.status_code)
            logger.debug("%s: redirected from %s to %s", url, request.url, following.url)
        finally:
            await response.aclose()
        request = following
    raise DownloadError(url, f"more than {MAX_REDIRECTS} redirects")


def _check_redirect(url: str, source: httpx.URL, target: httpx.URL, status: int) -> None:
    """Refuse a redirect to anything but http(s), and any from https to http (a
    man-in-the-middle could then serve what it likes)."""
    hop = f"HTTP {status} from {source} to {target}"
    if target.scheme not in ("http", "https"):
        raise DownloadError(url, f"refused a redirect to a {target.scheme}:// URL ({hop})")
    if source.scheme == "https" and target.scheme == "http":
        raise DownloadError(url, f"refused an https->http redirect ({hop})")


async def _stat_dest(url: str, dest: Path) -> os.stat_result | None:
    """``dest``'s stat (symlinks followed), None when there is nothing there; a directory or
    another non-regular file there is a ``DownloadError`` naming it."""
    try:
        present = await trio.Path(dest).stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DownloadError(url, f"cannot check {dest}: {exc}") from exc
    if stat.S_ISDIR(present.st_mode):
        raise DownloadError(url, f"{dest} is a directory, not a file")
    if not stat.S_ISREG(present.st_mode):
        raise DownloadError(url, f"{dest} is not a regular file (a FIFO, a socket, a device...)")
    return present


async def _read_head(url: str, dest: Path) -> bytes:
    try:
        return await trio.to_thread.run_sync(
            partial(read_head, os.fspath(dest), SNIFF_BYTES), abandon_on_cancel=True
        )
    except OSError as exc:
        raise DownloadError(url, f"cannot read {dest}: {exc}") from exc


@attrs.define
class _Progress:
    """How far a transfer got (for the message of one past its deadline)."""

    response: httpx.Response | None = None

    @property
    def received(self) -> int:
        """Bytes of body received so far, counted as they come off the wire (the chunks a
        transfer reads are larger: a byte a second fills none)."""
        return 0 if self.response is None else self.response.num_bytes_downloaded

    def content_type(self) -> str | None:
        """The ``Content-Type`` of the answer, if there is one."""
        return None if self.response is None else self.response.headers.get("content-type")


def _late(url: str, deadline: float, received: int) -> DownloadError:
    logger.warning("download of %s cut at its %g s deadline (%d bytes)", url, deadline, received)
    return DownloadError(url, f"did not finish in {deadline:g} s ({received} bytes received)")


def _check_timeout(timeout: float) -> None:
    # NaN and non-numbers fail the comparison too; math.inf means no deadline.
    if isinstance(timeout, bool) or not (isinstance(timeout, int | float) and timeout > 0):
        raise ValueError(
            f"a download timeout must be a positive number of seconds, got {timeout!r}"
        )


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
