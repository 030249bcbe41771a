"""Files on disk: where comfytrio may put one, how it writes one, how it reads one it did not
write.

- Names: one rule for every name that comes from outside (a LoRA or image name a user gives,
  an output's sub-folder and file name a server reports, whether the file is read in place
  on a local instance or downloaded from a remote one): it never leaves its folder
  (``safe_join``, ``output_path``).
- Writing: every file comfytrio saves goes through ``atomic_file``: written under a short
  hidden temp name in its destination's folder, fsynced, and renamed into place only when
  complete, so no reader ever sees a partial file and none is left behind, even on
  cancellation.
- Reading: a file found in place is opened without blocking and taken only when it is a
  regular file (a FIFO or a device there cannot hang a worker thread).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

import trio

from ._errors import DownloadError, UnsafeNameError

__all__ = [
    "CONTROL_CHARACTERS",
    "MAX_NAME_BYTES",
    "SPILL_BYTES",
    "AtomicFile",
    "atomic_file",
    "fits",
    "hash_file",
    "open_regular",
    "output_path",
    "read_head",
    "safe_join",
]

logger = logging.getLogger("comfytrio.files")

MAX_NAME_BYTES = 255
"""The longest file name (one path component, in bytes) file systems take."""

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
"""NUL, newlines and the other control characters: never in a name we accept."""

SPILL_BYTES = 8 * 1024 * 1024
"""An ``AtomicFile`` keeps up to this many bytes in memory before it writes them out: a
usual output then costs one worker-thread call in all."""

_DRIVE = re.compile(r"^[A-Za-z]:")

T = TypeVar("T")

_HASH_CHUNK = 1 << 20


def fits(part: str) -> bool:
    """Whether the file system can store ``part`` as one path component: encodable, at most
    ``MAX_NAME_BYTES`` bytes."""
    try:
        return len(os.fsencode(part)) <= MAX_NAME_BYTES
    except UnicodeEncodeError:
        return False


def safe_join(folder: Path, name: str) -> Path:
    """``folder / name``, refusing any ``name`` that could land outside ``folder``.

    ``name`` may hold sub-folders separated by ``/``. Refused with ``UnsafeNameError``: an
    empty name, an absolute path, a ``..`` or ``.`` or empty component, a backslash, a
    drive letter, a NUL or other control character, a component longer than
    ``MAX_NAME_BYTES`` bytes or one the file system cannot encode. The check is on the name
    alone (no I/O).
    """
    if not isinstance(name, str) or not name:
        raise UnsafeNameError(str(name), str(folder))
    if "\\" in name or CONTROL_CHARACTERS.search(name) or _DRIVE.match(name):
        raise UnsafeNameError(name, str(folder))
    if PurePosixPath(name).is_absolute():
        raise UnsafeNameError(name, str(folder))
    parts = name.split("/")
    if any(part in ("", ".", "..") or not fits(part) for part in parts):
        raise UnsafeNameError(name, str(folder))
    return folder.joinpath(*parts)


def output_path(folder: Path, subfolder: str, filename: str) -> Path:
    """Where a server's output (``subfolder``, ``filename`` as ComfyUI reports them) is, or
    goes, inside ``folder``: ``safe_join`` of the two, a Windows server's backslashes read as
    separators."""
    name = "/".join(p for p in (subfolder, filename) if p)
    return safe_join(folder, name.replace("\\", "/"))


# --------------------------------------------------------------------------- writing


class AtomicFile:
    """A file being written to ``dest`` (see ``atomic_file``, which makes one).

    Bytes are kept in memory up to ``spill`` bytes, then appended to a temp file in
    ``dest``'s folder (a short hidden name, so a ``dest`` name of ``MAX_NAME_BYTES`` bytes
    works; the folder is made on first use), in a worker thread. ``commit`` writes the rest,
    fsyncs and renames the temp file into place. A local error (disk full, no permission, a
    file where the folder should be) is a ``DownloadError`` naming ``url``, where the bytes
    came from, when one is given, else the ``OSError`` itself.
    """

    def __init__(self, dest: Path, url: str | None, *, spill: int, mode: int | None = None) -> None:
        self.dest = dest
        """Where the file goes."""
        self.url = url
        """Where its bytes come from (for errors), if they come from a URL."""
        self.size = 0
        """Bytes written so far."""
        self.committed = False
        """Whether the file is in place."""
        self._spill = spill
        self._mode = mode
        self._tmp = dest.parent / f".part-{secrets.token_hex(8)}"
        self._pending = bytearray()
        self._file: BinaryIO | None = None
        self._touched = False  # a worker thread may have made the temp file

    async def write(self, data: bytes) -> None:
        """Append ``data``."""
        self.size += len(data)
        self._pending += data
        if len(self._pending) >= self._spill:
            await self._in_thread(self._flush_pending)

    async def commit(self) -> os.stat_result:
        """Write what is left, fsync, and rename the file into place; return its stat (size
        and modification time, which the rename keeps)."""
        written = await self._in_thread(self._finish)
        self.committed = True
        return written

    async def discard(self) -> None:
        """Close and remove the temp file, if there is one. Never raises: the error that got
        us here is the one to report."""
        if self._touched:
            await trio.to_thread.run_sync(self._remove)

    async def _in_thread(self, work: Callable[[], T]) -> T:
        self._touched = True
        try:
            return await trio.to_thread.run_sync(work)
        except OSError as exc:
            if self.url is None:
                raise
            raise DownloadError(self.url, f"cannot write {self.dest}: {exc}") from exc

    def _flush_pending(self) -> BinaryIO:
        if self._file is None:
            self._tmp.parent.mkdir(parents=True, exist_ok=True)
            if self._mode is None:
                self._file = self._tmp.open("wb")
            else:  # made with its mode: no moment where others may read it
                fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._mode)
                os.fchmod(fd, self._mode)  # whatever the umask
                self._file = os.fdopen(fd, "wb")
        self._file.write(self._pending)
        self._pending.clear()
        return self._file

    def _finish(self) -> os.stat_result:
        file = self._flush_pending()
        file.flush()
        os.fsync(file.fileno())
        written = os.fstat(file.fileno())
        file.close()
        self._tmp.replace(self.dest)
        return written

    def _remove(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
            self._tmp.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove the partial file %s: %s", self._tmp, exc)


@asynccontextmanager
async def atomic_file(
    dest: Path, url: str | None = None, *, spill: int | None = None, mode: int | None = None
) -> AsyncIterator[AtomicFile]:
    """Write ``dest`` atomically: the block writes to the ``AtomicFile`` and calls its
    ``commit()``; leaving the block without (an error, a cancellation) removes what was
    written. ``url``: where the bytes come from (a local error is then a ``DownloadError``);
    ``spill``: bytes kept in memory before a write (default ``SPILL_BYTES``); ``mode``: the
    file's permissions from its creation on (default: the umask's)."""
    out = AtomicFile(dest, url, spill=SPILL_BYTES if spill is None else spill, mode=mode)
    try:
        yield out
    finally:
        if not out.committed:
            with trio.CancelScope(shield=True):
                await out.discard()


# --------------------------------------------------------------------------- reading

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
"""Opening a FIFO without a writer does not block with O_NONBLOCK (then fstat refuses it)."""


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading without blocking; refuse (OSError) what is no regular file."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise OSError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, opened


def read_head(path: str, size: int) -> bytes:
    """The first ``size`` bytes of the regular file at ``path`` (fewer for a shorter one)."""
    fd, _ = open_regular(path)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def hash_file(path: str, stop: threading.Event) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """(sha256, (size, mtime_ns) before, after) of a regular file; stops early (the result
    then unused) once ``stop`` is set."""
    fd, before = open_regular(path)
    try:
        digest = hashlib.sha256()
        while not stop.is_set() and (chunk := os.read(fd, _HASH_CHUNK)):
            digest.update(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    return (
        digest.hexdigest(),
        (before.st_size, before.st_mtime_ns),
        (after.st_size, after.st_mtime_ns),
    )
