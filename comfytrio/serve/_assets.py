"""Assets: UUID records (in the ``Store``) over content-addressed blobs (on disk).

A blob is the bytes of one blake3 digest, at ``root/blobs/<hex[:2]>/<hex>``; it is written
once (streamed to ``root/tmp``, hashed as it comes, fsynced, renamed into place) and removed
when the last record over it goes. Any number of records share one blob (dedup). One
``trio.Lock`` orders "is the blob there? place it, add the record" against "remove the record,
remove the blob if nothing else references it", so a blob never vanishes under a new record.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from typing import BinaryIO, Literal, cast, get_args

import attrs
import blake3
import trio

from .._errors import UnsafeNameError
from .._files import safe_join
from ._problems import ApiProblem
from ._records import AssetRecord
from ._store import Store

__all__ = ["HASH_PATTERN", "AssetKind", "AssetStore", "check_file_path", "check_hash"]

logger = logging.getLogger("comfytrio.serve")

AssetKind = Literal["image", "video", "audio", "text", "file", "latent"]

HASH_PATTERN = re.compile(r"blake3:[0-9a-f]{64}")
"""What a ``hash`` must look like: ``blake3:`` and 64 lower-case hex digits."""

_KINDS: frozenset[str] = frozenset(get_args(AssetKind))

_CHUNK = 1 << 20
"""Bytes gathered before one write-and-hash call in a worker thread."""


def check_hash(value: object, field: str = "hash") -> str:
    """``value`` when it is a ``blake3:<64 lower-case hex>`` string; else ``ApiProblem``
    (422 ``invalid_request``) naming ``field``."""
    if not isinstance(value, str) or not HASH_PATTERN.fullmatch(value):
        raise ApiProblem(
            422,
            "invalid_request",
            f"{field}: must be 'blake3:' followed by 64 lower-case hex digits",
            details={"field": field},
        )
    return value


def check_file_path(value: object, field: str = "file_path") -> str:
    """``value`` when it is a safe relative path (``a.png``, ``sub/a.png``: no absolute
    path, no ``..`` or empty component, no backslash, drive letter or control character);
    else ``ApiProblem`` (422 ``invalid_request``) naming ``field``."""
    if not isinstance(value, str):
        raise ApiProblem(
            422, "invalid_request", f"{field}: must be a string", details={"field": field}
        )
    try:
        safe_join(Path("/"), value)
    except UnsafeNameError as exc:
        raise ApiProblem(
            422,
            "invalid_request",
            f"{field}: must be a relative path that stays in its folder",
            details={"field": field},
        ) from exc
    return value


def _check_content_type(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise ApiProblem(
            422,
            "invalid_request",
            "content_type: must be a media type such as image/png",
            details={"field": "content_type"},
        )
    return value


def _check_tags(tags: Iterable[object]) -> tuple[str, ...]:
    out = tuple(tags)
    if not all(isinstance(tag, str) for tag in out):
        raise ApiProblem(422, "invalid_request", "tags: must be strings", details={"field": "tags"})
    return tuple(str(tag) for tag in out)


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind: {kind!r} is none of {sorted(_KINDS)}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _TempBlob:
    """A blob being written to ``root/tmp``, hashed as it goes (all I/O in the caller's
    worker-thread calls)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.hasher = blake3.blake3()
        self.file: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("wb")
        self.hasher.update(data)
        self.file.write(data)
        self.size += len(data)

    def finish(self) -> str:
        if self.file is None:
            self.write(b"")
        assert self.file is not None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return "blake3:" + str(self.hasher.hexdigest())

    def remove(self) -> None:
        try:
            if self.file is not None:
                self.file.close()
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove the partial blob %s: %s", self.path, exc)


@attrs.frozen
class _Minting:
    """What an asset is minted with, beside its bytes."""

    tags: tuple[str, ...]
    expires_at: float | None
    job_id: str | None
    node_id: str | None
    kind: str
    now: float | None


class AssetStore:
    """Asset records in ``store`` over blobs under ``root`` (``root/blobs``, ``root/tmp``);
    an upload holds at most ``max_bytes`` bytes."""

    def __init__(self, store: Store, root: Path, *, max_bytes: int) -> None:
        self.store = store
        """Where the records are."""
        self.root = Path(root)
        """The folder of ``blobs/`` and ``tmp/``."""
        self.max_bytes = max_bytes
        """Largest upload, in bytes."""
        self._lock = trio.Lock()

    # -- paths --------------------------------------------------------------------------------

    def blob_path(self, record: AssetRecord) -> Path:
        """Where the bytes of ``record`` are."""
        return self._blob_path(record.hash)

    def _blob_path(self, hash_: str) -> Path:
        hex_ = hash_.removeprefix("blake3:")
        return self.root / "blobs" / hex_[:2] / hex_

    def _temp_path(self) -> Path:
        return self.root / "tmp" / f"upload-{secrets.token_hex(8)}"

    # -- adding -------------------------------------------------------------------------------

    async def add_stream(
        self,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str,
        file_path: str,
        expected_hash: str | None = None,
        tags: Iterable[str] = (),
        expires_at: float | None = None,
        job_id: str | None = None,
        node_id: str | None = None,
        kind: str = "file",
        now: float | None = None,
    ) -> tuple[AssetRecord, bool]:
        """Store the bytes of ``chunks`` and mint an asset over them; return it and whether
        its blob is new (False: the bytes were there already, deduped).

        ``now``: its ``created_at`` (default: ``time.time()``).
        Raises ``ApiProblem``: 422 ``invalid_request`` for a bad ``file_path``,
        ``content_type``, ``expected_hash`` or tag; 413 ``invalid_request`` when the bytes
        pass ``max_bytes``; 409 ``hash_mismatch`` when they do not hash to
        ``expected_hash``; ``ValueError`` when ``kind`` is no v2 ``OutputType``. Nothing is
        left on disk or in the store when it raises.
        """
        check_file_path(file_path)
        _check_content_type(content_type)
        _check_kind(kind)
        if expected_hash is not None:
            check_hash(expected_hash, "expected_hash")
        minting = _Minting(_check_tags(tags), expires_at, job_id, node_id, kind, now)
        temp = _TempBlob(self._temp_path())
        placed = False
        try:
            pending = bytearray()
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise ApiProblem(
                        413,
                        "invalid_request",
                        f"file: larger than the {self.max_bytes} bytes this server takes",
                        details={"field": "file", "max_bytes": self.max_bytes},
                    )
                pending += chunk
                if len(pending) >= _CHUNK:
                    data, pending = bytes(pending), bytearray()
                    await trio.to_thread.run_sync(temp.write, data)
            data = bytes(pending)
            await trio.to_thread.run_sync(temp.write, data)
            hash_ = await trio.to_thread.run_sync(temp.finish)
            if expected_hash is not None and hash_ != expected_hash:
                raise ApiProblem(
                    409,
                    "hash_mismatch",
                    "expected_hash does not match the hash of the received bytes",
                    details={"expected_hash": expected_hash, "hash": hash_},
                )
            record = self._record(hash_, temp.size, content_type, file_path, minting)
            created = await self._place(temp.path, record)
            placed = True
            return record, created
        finally:
            with trio.CancelScope(shield=True):
                if not placed:
                    await trio.to_thread.run_sync(temp.remove)
                # Why: an async generator left half-read would be finalized by the GC.
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()

    async def add_file(
        self,
        path: Path,
        *,
        content_type: str,
        file_path: str,
        job_id: str | None = None,
        node_id: str | None = None,
        kind: str = "file",
        expires_at: float | None = None,
        move: bool = False,
        tags: Iterable[str] = (),
        now: float | None = None,
    ) -> AssetRecord:
        """Mint an asset over the file at ``path`` (a job's output), hashed in a worker
        thread. ``move``: the file is taken (renamed into the blob store, or removed once
        its bytes are there); else it is copied and left alone. ``max_bytes`` does not
        apply. Raises ``ApiProblem`` (422) for a bad ``file_path`` or ``content_type``,
        ``ValueError`` for a ``kind`` that is no v2 ``OutputType``, and ``OSError`` when the
        file cannot be read or the blob written."""
        check_file_path(file_path)
        _check_content_type(content_type)
        _check_kind(kind)
        minting = _Minting(_check_tags(tags), expires_at, job_id, node_id, kind, now)
        temp_path = self._temp_path()

        def stage() -> tuple[str, int]:
            hasher = blake3.blake3()
            temp_path.parent.mkdir(parents=True, exist_ok=True)
            if move:
                try:
                    os.replace(path, temp_path)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                else:
                    with temp_path.open("rb") as f:
                        size = _hash_into(hasher, f)
                    return "blake3:" + str(hasher.hexdigest()), size
            size = 0
            with path.open("rb") as src, temp_path.open("wb") as dst:
                while block := src.read(_CHUNK):
                    hasher.update(block)
                    dst.write(block)
                    size += len(block)
                dst.flush()
                os.fsync(dst.fileno())
            if move:
                path.unlink()
            return "blake3:" + str(hasher.hexdigest()), size

        def drop_temp() -> None:
            temp_path.unlink(missing_ok=True)

        placed = False
        try:
            hash_, size = await trio.to_thread.run_sync(stage)
            record = self._record(hash_, size, content_type, file_path, minting)
            await self._place(temp_path, record)
            placed = True
            return record
        finally:
            if not placed:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(drop_temp)

    async def from_hash(
        self,
        hash_: str,
        *,
        file_path: str | None = None,
        tags: Iterable[str] = (),
        expires_at: float | None = None,
        now: float | None = None,
    ) -> tuple[AssetRecord, bool]:
        """An asset over the blob ``hash_`` the store already has, with no bytes sent: the
        uploaded asset with the same hash, ``file_path`` and ``tags`` when one exists (its
        ``expires_at`` extended to ``expires_at`` if that is later, never shortened; returned
        with False), else a new one (True). Its content type and size are those of the blob's
        other records. Raises ``ApiProblem``: 422 ``invalid_request`` for a malformed hash,
        file path or tag; 404 ``blob_not_found`` when no blob has that hash."""
        check_hash(hash_)
        if file_path is not None:
            check_file_path(file_path)
        tags = _check_tags(tags)
        async with self._lock:
            source = await self.store.asset_by_hash(hash_)
            if source is None or not await trio.Path(self._blob_path(hash_)).is_file():
                raise ApiProblem(404, "blob_not_found", "no blob with this hash")
            same = await self.store.find_assets(hash_, file_path=file_path, tags=tags)
            if same:
                found = same[0]
                later = _later(found.expires_at, expires_at)
                if later != found.expires_at:
                    found = attrs.evolve(found, expires_at=later)
                    await self.store.put_asset(found)
                return found, False
            minting = _Minting(tags, expires_at, None, None, "file", now)
            record = self._record(hash_, source.size_bytes, source.content_type, file_path, minting)
            await self.store.put_asset(record)
            return record, True

    def _record(
        self, hash_: str, size: int, content_type: str, file_path: str | None, how: _Minting
    ) -> AssetRecord:
        return AssetRecord(
            id=str(uuid.uuid4()),
            hash=hash_,
            size_bytes=size,
            content_type=content_type,
            created_at=time.time() if how.now is None else how.now,
            file_path=file_path,
            expires_at=how.expires_at,
            job_id=how.job_id,
            tags=how.tags,
            node_id=how.node_id,
            kind=cast(AssetKind, how.kind),
        )

    async def _place(self, temp: Path, record: AssetRecord) -> bool:
        """Rename ``temp`` into the blob store (or drop it when the blob is there) and store
        ``record``; whether the blob is new."""
        dest = self.blob_path(record)

        def move() -> bool:
            if dest.is_file():
                temp.unlink(missing_ok=True)
                return False
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, dest)
            _fsync_dir(dest.parent)
            return True

        async with self._lock:
            created = await trio.to_thread.run_sync(move)
            try:
                await self.store.put_asset(record)
            except BaseException:
                if created:
                    with trio.CancelScope(shield=True):
                        await self._drop_blob_if_unused(record.hash)
                raise
        return created

    # -- reading ------------------------------------------------------------------------------

    async def has_blob(self, hash_: str) -> bool:
        """Whether an asset may be minted over ``hash_`` (a record references it and its
        bytes are on disk). A malformed hash is simply absent."""
        if not isinstance(hash_, str) or not HASH_PATTERN.fullmatch(hash_):
            return False
        if await self.store.count_assets_with_hash(hash_) == 0:
            return False
        return await trio.Path(self._blob_path(hash_)).is_file()

    async def get(self, asset_id: str) -> AssetRecord:
        """The asset ``asset_id``; ``ApiProblem`` (404 ``not_found``) when there is none."""
        record = await self.store.get_asset(asset_id)
        if record is None:
            raise ApiProblem(404, "not_found", "no asset with this id")
        return record

    # -- removing -----------------------------------------------------------------------------

    async def delete(self, asset_id: str) -> None:
        """Delete the asset record ``asset_id``; its blob goes too when no other record uses
        it. Raises ``ApiProblem``: 404 ``not_found`` for an unknown id; 409 ``asset_in_use``
        for an output of a job that is still kept (outputs go with their job)."""
        record = await self.get(asset_id)
        if record.job_id is not None:
            job = await self.store.get_job(record.job_id)
            if job is not None and job.status != "expired":
                raise ApiProblem(409, "asset_in_use", "this asset cannot be deleted now")
        async with self._lock:
            if not await self.store.delete_asset(asset_id):
                raise ApiProblem(404, "not_found", "no asset with this id")
            await self._drop_blob_if_unused(record.hash)

    async def sweep(self, now: float) -> int:
        """Remove the assets expired at ``now`` and the blobs no record uses any more; how
        many records went."""
        removed = 0
        for record in await self.store.expired_assets(now):
            async with self._lock:
                if await self.store.delete_asset(record.id):
                    removed += 1
                    await self._drop_blob_if_unused(record.hash)
        if removed:
            logger.info("asset sweep: %d expired asset(s) removed", removed)
        return removed

    async def _drop_blob_if_unused(self, hash_: str) -> None:
        if await self.store.count_assets_with_hash(hash_) > 0:
            return
        path = self._blob_path(hash_)

        def unlink() -> None:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("could not remove the blob %s: %s", path, exc)

        await trio.to_thread.run_sync(unlink)


def _hash_into(hasher: blake3.blake3, f: BinaryIO) -> int:
    size = 0
    while block := f.read(_CHUNK):
        hasher.update(block)
        size += len(block)
    return size


def _later(current: float | None, wanted: float | None) -> float | None:
    """The retention that keeps the asset at least as long as both (None: forever)."""
    if current is None or wanted is None:
        return None
    return max(current, wanted)
