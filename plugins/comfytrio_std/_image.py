"""The ``image`` param type: an input image fetched once per job and put on every server."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from comfytrio import ComfyAPIError, ParamError
from comfytrio.hookspecs import BaseParamType, InstanceTarget, JobContext, Param, run_concurrently

__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "ImageType", "image_extension"]

logger = logging.getLogger("comfytrio_std")

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


def _is_url(value: str) -> bool:
    # A one-letter "scheme" is a Windows drive (C:\...), i.e. a path.
    return len(urlsplit(value).scheme) > 1


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
        """Refuse a value that is not a non-empty str, path or bytes, and a URL whose scheme
        is not http or https (``file://``, ``ftp://``...)."""
        super().validate(param)
        value = param.value
        if isinstance(value, bytes | bytearray | memoryview):
            if not len(value):
                raise ParamError(param.name, "the image bytes are empty")
            if len(value) > self.max_bytes:
                raise ParamError(
                    param.name, f"the image is {len(value)} bytes, over the {self.max_bytes} cap"
                )
            return
        if isinstance(value, os.PathLike):
            return
        if not isinstance(value, str) or not value:
            raise ParamError(
                param.name, f"expects an http(s) URL, a file path or bytes, got {value!r}"
            )
        if _is_url(value) and urlsplit(value).scheme.lower() not in ("http", "https"):
            raise ParamError(
                param.name,
                f"only http:// and https:// URLs or local paths are allowed, not {value!r}",
            )

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
            return bytes(value)
        if isinstance(value, str) and _is_url(value):
            return await job.fetch(value, max_bytes=self.max_bytes, timeout=self.timeout)
        path = trio.Path(os.fspath(value))
        try:
            size = (await path.stat()).st_size
            if size > self.max_bytes:
                raise ParamError(
                    param.name, f"{path} is {size} bytes, over the {self.max_bytes}-byte cap"
                )
            return await path.read_bytes()
        except OSError as exc:
            raise ParamError(param.name, f"cannot read {path}: {exc.strerror or exc}") from exc

    async def _place(self, target: InstanceTarget, name: str, data: bytes) -> str:
        if target.input_dir is None:
            return await target.upload_image(name, data)
        folder = Path(target.input_dir)
        dest = trio.Path(folder / name)
        tmp = trio.Path(folder / f".{name}.{uuid.uuid4().hex[:12]}.part")
        try:
            if await dest.exists():  # named by content: the same bytes are already there
                return name
            await trio.Path(folder).mkdir(parents=True, exist_ok=True)
            await tmp.write_bytes(data)
            await tmp.replace(dest)  # atomic: ComfyUI never sees half an image
        except OSError as exc:
            raise ComfyAPIError(
                f"cannot write image {name} into the input folder of {target.name} "
                f"({folder}): {exc}"
            ) from exc
        finally:
            with trio.CancelScope(shield=True):
                await tmp.unlink(missing_ok=True)
        return name
