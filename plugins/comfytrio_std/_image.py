"""The ``image`` param type: an input image fetched once per job and put on every server."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from comfytrio import ComfyAPIError, DownloadError, ParamError
from comfytrio.hookspecs import (
    BaseParamType,
    InstanceTarget,
    JobContext,
    Param,
    atomic_file,
    check_download_url,
    run_concurrently,
    shown,
)

__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "ImageType", "image_extension"]

logger = logging.getLogger("comfytrio_std")

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")

DEFAULT_MAX_IMAGE_BYTES = 64 * 1024**2
"""The default size cap of one input image (64 MiB)."""

_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, ".png"),
    (b"\xff\xd8\xff", 0, ".jpg"),
    (b"GIF87a", 0, ".gif"),
    (b"GIF89a", 0, ".gif"),
    (b"WEBP", 8, ".webp"),
    (b"BM", 0, ".bmp"),
    (b"II*\x00", 0, ".tiff"),
    (b"MM\x00*", 0, ".tiff"),
)


def image_extension(data: bytes) -> str | None:
    """The file extension of an image from its first bytes (PNG, JPEG, GIF, WebP, BMP,
    TIFF), or None when it is none of those."""
    for magic, offset, extension in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            if extension == ".webp" and not data.startswith(b"RIFF"):
                continue
            return extension
    return None


def _scheme(value: str) -> str:
    """The URL scheme of ``value`` (lower case), or "" for a path. A one-letter "scheme" is
    a Windows drive (``C:\\...``), i.e. a path. Never raises (``urlsplit`` does, for a
    malformed host)."""
    match = _SCHEME.match(value)
    return match[1].lower() if match and len(match[1]) > 1 else ""


def _is_url(value: str) -> bool:
    return bool(_scheme(value))


_READ_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


class _NotRegularError(Exception):
    """The path is no regular file (``kind`` says what it is)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _TooBigError(Exception):
    """The file holds more than the cap."""


def _kind_of(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _read_capped(path: str, cap: int, stop: threading.Event) -> bytes:
    """The bytes of the regular file ``path``, at most ``cap`` (``_TooBigError`` past it).

    Never blocks on what is no regular file: ``stat`` refuses it before it is opened (a
    device is never opened), and the open is non-blocking with ``fstat`` checked again (a
    FIFO swapped in meanwhile). The size is that of the bytes read (``/dev/zero``-like files
    that report 0 bytes are cut at ``cap + 1``). Stops once ``stop`` is set.
    """
    before = os.stat(path)
    if not stat.S_ISREG(before.st_mode):
        raise _NotRegularError(_kind_of(before.st_mode))
    fd = os.open(path, _OPEN_FLAGS)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise _NotRegularError(_kind_of(opened.st_mode))
        if opened.st_size > cap:
            raise _TooBigError(opened.st_size)
        data = bytearray()
        while len(data) <= cap and not stop.is_set():
            chunk = os.read(fd, min(_READ_CHUNK, cap + 1 - len(data)))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > cap:
        raise _TooBigError(len(data))
    return bytes(data)


async def _holds(dest: trio.Path, size: int) -> bool:
    """Whether ``dest`` is a regular file of ``size`` bytes (anything else there is
    replaced, or, a directory, refused by the rename)."""
    try:
        present = await dest.stat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(present.st_mode) and present.st_size == size


class ImageType(BaseParamType):
    """``image``: an ``http(s)`` URL, a local path or bytes, into ``inputs.image``.

    Prepared once per job: fetched (without blocking other tasks, at most ``max_bytes``),
    named ``comfytrio_<sha256>.<ext>`` so two different images never clash, then written
    into the input folder of every local target and uploaded (``/upload/image``) to every
    remote one, all at once.
    """

    name = "image"
    input_name = "image"

    def __init__(
        self, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, timeout: float | None = None
    ) -> None:
        self.max_bytes = max_bytes
        """The size cap of one image."""
        self.timeout = timeout
        """Seconds fetching one image URL may take; None uses the downloader's."""

    def validate(self, param: Param) -> None:
        """Refuse a value that is not a non-empty str, path or bytes, a URL whose scheme is
        not http or https (``file://``, ``ftp://``...) or that is malformed, and a path
        holding a NUL."""
        super().validate(param)
        value = param.value
        if isinstance(value, bytes | bytearray | memoryview):
            size = memoryview(value).nbytes
            if not size:
                raise ParamError(param.name, "the image bytes are empty")
            if size > self.max_bytes:
                raise ParamError(
                    param.name, f"the image is {size} bytes, over the {self.max_bytes} cap"
                )
            return
        is_path = isinstance(value, os.PathLike)  # a path, whatever it looks like
        if is_path:
            try:
                value = os.fspath(value)
            except Exception as exc:  # a caller's __fspath__ may raise anything
                raise ParamError(
                    param.name, f"cannot turn {shown(value)} into a path: {exc!r}"
                ) from exc
            if not isinstance(value, str):
                raise ParamError(param.name, f"expects a str path, got {shown(value)}")
        if not isinstance(value, str) or not value:
            raise ParamError(
                param.name, f"expects an http(s) URL, a file path or bytes, got {shown(value)}"
            )
        if "\x00" in value:
            raise ParamError(param.name, f"a path or URL cannot hold a NUL: {shown(value)}")
        if not is_path and _is_url(value):
            if _scheme(value) not in ("http", "https"):
                raise ParamError(
                    param.name,
                    "only http:// and https:// URLs or local paths are allowed, "
                    f"not {shown(value)}",
                )
            try:
                check_download_url(value)
            except DownloadError as exc:
                raise ParamError(param.name, exc.reason) from exc

    def parse_text(self, text: str, param_name: str) -> Any:
        """A path or an http(s) URL, as typed (``validate`` checks it, ``prepare`` reads it)."""
        return text

    async def prepare(self, param: Param, job: JobContext) -> Any:
        """Load the image, name it by its hash, place it on every target; return its name."""
        data = await self._load(param, job)
        extension = image_extension(data)
        if extension is None:
            raise ParamError(
                param.name,
                f"is not a PNG, JPEG, WebP, GIF, BMP or TIFF image (starts with {data[:8]!r})",
            )
        name = f"comfytrio_{hashlib.sha256(data).hexdigest()}{extension}"
        placed: dict[str, str] = {}

        def placing(target: InstanceTarget) -> Callable[[], Awaitable[None]]:
            async def place() -> None:
                placed[target.name] = await self._place(target, name, data)

            return place

        await run_concurrently(placing(t) for t in job.targets)
        different = {t: v for t, v in placed.items() if v != name}
        if different:
            # Every shard's workflow names one file, whichever server runs it.
            raise ParamError(param.name, f"servers stored the image under other names: {different}")
        logger.debug("image %r: %s on %d server(s)", param.name, name, len(placed))
        return name

    async def _load(self, param: Param, job: JobContext) -> bytes:
        value = param.value
        if isinstance(value, bytes | bytearray | memoryview):
            return memoryview(value).tobytes()
        if isinstance(value, str) and _is_url(value):
            return await job.fetch(value, max_bytes=self.max_bytes, timeout=self.timeout)
        return await self._read_file(param, os.fspath(value))

    async def _read_file(self, param: Param, path: str) -> bytes:
        """The bytes of a local image: a regular file only, capped on the bytes read, in a
        thread that a cancel abandons (and that then stops at its next chunk)."""
        stop = threading.Event()
        try:
            return await trio.to_thread.run_sync(
                partial(_read_capped, path, self.max_bytes, stop), abandon_on_cancel=True
            )
        except _NotRegularError as exc:
            raise ParamError(param.name, f"{path} is {exc.kind}, not a regular file") from exc
        except _TooBigError as exc:
            raise ParamError(
                param.name, f"{path} holds over {self.max_bytes} bytes (the cap)"
            ) from exc
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ParamError(param.name, f"cannot read {path}: {reason}") from exc
        finally:
            stop.set()

    async def _place(self, target: InstanceTarget, name: str, data: bytes) -> str:
        if target.input_dir is None:
            return await target.upload_image(name, data)
        folder = Path(target.input_dir)
        try:
            if await _holds(trio.Path(folder / name), len(data)):  # named by content
                return name
            async with atomic_file(folder / name) as out:  # ComfyUI never sees half an image
                await out.write(data)
                await out.commit()
        except OSError as exc:
            raise ComfyAPIError(
                f"cannot write image {name} into the input folder of {target.name} "
                f"({folder}): {exc}"
            ) from exc
        return name
