"""The ``serve`` state on disk: jobs, idempotency keys and asset records in one SQLite file.

``open_store(path)`` opens (and creates or upgrades) the file and yields a ``Store``. The
database runs in WAL mode with ``synchronous=FULL``: a call that returned is on disk, so jobs
and claimed idempotency keys survive a SIGKILL right after it. Every call runs in a worker
thread, one at a time (a ``CapacityLimiter`` of 1 in front of the one connection), so the
trio loop never waits on the disk and no two statements interleave; a call is not abandoned
when its caller is cancelled, so a write in flight always completes.

Records go in as the frozen values of ``_records.py`` and come back equal: dict and tuple
fields are JSON columns (tuples read back as tuples), prompts a JSON list of objects, the seed
text (a ComfyUI seed may not fit SQLite's signed 64-bit integers).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from ._problems import ApiProblem
from ._records import AssetRecord, JobRecord, PromptRecord

__all__ = ["SCHEMA_VERSION", "UNFINISHED", "Store", "open_store"]

logger = logging.getLogger("comfytrio.serve")

T = TypeVar("T")

SCHEMA_VERSION = 1
"""The schema this code writes (``meta.schema_version``); an older file is upgraded on open,
a newer one refused."""

UNFINISHED: frozenset[str] = frozenset({"queued", "running", "canceling"})
"""Statuses of a job still in the works (what a restarted ``serve`` picks up again)."""

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    workflow TEXT NOT NULL,
    comfytrio TEXT,
    metadata TEXT NOT NULL,
    webhook_url TEXT,
    idempotency_key TEXT,
    progress TEXT,
    outputs TEXT NOT NULL,
    error TEXT,
    prompts TEXT NOT NULL,
    shard_count INTEGER,
    split TEXT,
    seed TEXT,
    logs TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at);
CREATE TABLE IF NOT EXISTS job_metadata (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);
CREATE INDEX IF NOT EXISTS job_metadata_by_pair ON job_metadata (key, value);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assets (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    created_at REAL NOT NULL,
    file_path TEXT,
    expires_at REAL,
    job_id TEXT,
    tags TEXT NOT NULL,
    node_id TEXT,
    kind TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS assets_by_hash ON assets (hash);
CREATE INDEX IF NOT EXISTS assets_by_job ON assets (job_id);
CREATE INDEX IF NOT EXISTS assets_by_expiry ON assets (expires_at);
"""

_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1}
"""``version -> script`` bringing a file at ``version - 1`` to ``version``."""

_JOB_COLUMNS = (
    "id, status, created_at, expires_at, started_at, completed_at, workflow, comfytrio, "
    "metadata, webhook_url, idempotency_key, progress, outputs, error, prompts, shard_count, "
    "split, seed, logs"
)
_ASSET_COLUMNS = (
    "id, hash, size_bytes, content_type, created_at, file_path, expires_at, job_id, tags, "
    "node_id, kind"
)


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _dump_optional(value: Any) -> str | None:
    return None if value is None else _dump(value)


def _load_optional(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _job_row(job: JobRecord) -> tuple[Any, ...]:
    return (
        job.id,
        job.status,
        job.created_at,
        job.expires_at,
        job.started_at,
        job.completed_at,
        _dump(job.workflow),
        _dump_optional(job.comfytrio),
        _dump(job.metadata),
        job.webhook_url,
        job.idempotency_key,
        _dump_optional(job.progress),
        _dump(list(job.outputs)),
        _dump_optional(job.error),
        _dump(
            [
                {
                    "index": p.index,
                    "attempt": p.attempt,
                    "instance": p.instance,
                    "url": p.url,
                    "prompt_id": p.prompt_id,
                }
                for p in job.prompts
            ]
        ),
        job.shard_count,
        job.split,
        None if job.seed is None else str(job.seed),
        _dump(list(job.logs)),
    )


def _job_of(row: Sequence[Any]) -> JobRecord:
    (
        id_,
        status,
        created_at,
        expires_at,
        started_at,
        completed_at,
        workflow,
        comfytrio,
        metadata,
        webhook_url,
        idempotency_key,
        progress,
        outputs,
        error,
        prompts,
        shard_count,
        split,
        seed,
        logs,
    ) = row
    return JobRecord(
        id=id_,
        status=status,
        created_at=created_at,
        expires_at=expires_at,
        workflow=json.loads(workflow),
        started_at=started_at,
        completed_at=completed_at,
        comfytrio=_load_optional(comfytrio),
        metadata=json.loads(metadata),
        webhook_url=webhook_url,
        idempotency_key=idempotency_key,
        progress=_load_optional(progress),
        outputs=tuple(json.loads(outputs)),
        error=_load_optional(error),
        prompts=tuple(PromptRecord(**p) for p in json.loads(prompts)),
        shard_count=shard_count,
        split=split,
        seed=None if seed is None else int(seed),
        logs=tuple(json.loads(logs)),
    )


def _asset_row(asset: AssetRecord) -> tuple[Any, ...]:
    return (
        asset.id,
        asset.hash,
        asset.size_bytes,
        asset.content_type,
        asset.created_at,
        asset.file_path,
        asset.expires_at,
        asset.job_id,
        _dump(list(asset.tags)),
        asset.node_id,
        asset.kind,
    )


def _asset_of(row: Sequence[Any]) -> AssetRecord:
    (
        id_,
        hash_,
        size_bytes,
        content_type,
        created_at,
        file_path,
        expires_at,
        job_id,
        tags,
        node_id,
        kind,
    ) = row
    return AssetRecord(
        id=id_,
        hash=hash_,
        size_bytes=size_bytes,
        content_type=content_type,
        created_at=created_at,
        file_path=file_path,
        expires_at=expires_at,
        job_id=job_id,
        tags=tuple(json.loads(tags)),
        node_id=node_id,
        kind=kind,
    )


def _encode_cursor(job: JobRecord) -> str:
    raw = _dump([job.created_at, job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, id_ = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ApiProblem(422, "invalid_request", "cursor: not a cursor this server gave") from exc
    if not isinstance(created_at, int | float) or isinstance(created_at, bool):
        raise ApiProblem(422, "invalid_request", "cursor: not a cursor this server gave")
    if not isinstance(id_, str):
        raise ApiProblem(422, "invalid_request", "cursor: not a cursor this server gave")
    return float(created_at), id_


class Store:
    """The open SQLite file (made by ``open_store``). Every method runs its statements in a
    worker thread, one call at a time, each call one transaction."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self.path = path
        """The SQLite file."""
        self._db = connection
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def in_transaction() -> T:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await trio.to_thread.run_sync(in_transaction, limiter=self._limiter)

    # -- jobs ---------------------------------------------------------------------------------

    async def put_job(self, job: JobRecord) -> None:
        """Insert ``job``, or replace the stored job with its id."""
        row = _job_row(job)
        marks = ", ".join("?" * len(row))

        def work(db: sqlite3.Connection) -> None:
            db.execute(f"INSERT OR REPLACE INTO jobs ({_JOB_COLUMNS}) VALUES ({marks})", row)
            db.execute("DELETE FROM job_metadata WHERE job_id = ?", (job.id,))
            db.executemany(
                "INSERT INTO job_metadata (job_id, key, value) VALUES (?, ?, ?)",
                [(job.id, k, v) for k, v in job.metadata.items()],
            )

        await self._run(work)

    async def get_job(self, job_id: str) -> JobRecord | None:
        """The job with id ``job_id`` (None: none)."""

        def work(db: sqlite3.Connection) -> JobRecord | None:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else _job_of(row)

        return await self._run(work)

    async def delete_job(self, job_id: str) -> bool:
        """Remove the job with id ``job_id`` (its assets stay); whether there was one."""

        def work(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM job_metadata WHERE job_id = ?", (job_id,))
            return db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

        return await self._run(work)

    async def list_jobs(
        self,
        *,
        statuses: set[str] | None = None,
        metadata: dict[str, str] | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """One page of jobs, newest first (``created_at``, then ``id``, descending).

        ``statuses``: only jobs in one of these (None: any); ``metadata``: only jobs whose
        metadata has every given key with the given value; ``limit``: the most jobs on the
        page (at least 1); ``cursor``: the ``next`` cursor of the previous page (None: the
        first page). Returns the page and the cursor of the next one (None: this page is the
        last). Raises ``ApiProblem`` (422 ``invalid_request``) for a cursor this store did not
        give, or a ``limit`` under 1.
        """
        if limit < 1:
            raise ApiProblem(422, "invalid_request", "limit: must be at least 1")
        where: list[str] = []
        args: list[Any] = []
        if statuses is not None:
            if not statuses:
                return [], None
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(sorted(statuses))
        for key, value in (metadata or {}).items():
            where.append(
                "EXISTS (SELECT 1 FROM job_metadata m "
                "WHERE m.job_id = jobs.id AND m.key = ? AND m.value = ?)"
            )
            args.extend((key, value))
        if cursor is not None:
            after_time, after_id = _decode_cursor(cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args.extend((after_time, after_time, after_id))
        query = f"SELECT {_JOB_COLUMNS} FROM jobs"
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit + 1)

        def work(db: sqlite3.Connection) -> list[JobRecord]:
            return [_job_of(row) for row in db.execute(query, args)]

        jobs = await self._run(work)
        if len(jobs) > limit:
            del jobs[limit:]
            return jobs, _encode_cursor(jobs[-1])
        return jobs, None

    async def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs queued, running or canceling, oldest first (what a restart picks up)."""
        return await self._select_jobs(
            "status IN ('queued', 'running', 'canceling') ORDER BY created_at, id", ()
        )

    async def expired_jobs(self, now: float) -> list[JobRecord]:
        """Jobs whose ``expires_at`` is at or before ``now`` and not marked ``expired`` yet,
        oldest first."""
        return await self._select_jobs(
            "expires_at <= ? AND status != 'expired' ORDER BY expires_at, id", (now,)
        )

    async def _select_jobs(self, clause: str, args: tuple[Any, ...]) -> list[JobRecord]:
        def work(db: sqlite3.Connection) -> list[JobRecord]:
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {clause}", args)
            return [_job_of(row) for row in rows]

        return await self._run(work)

    # -- idempotency keys ---------------------------------------------------------------------

    async def claim_idempotency_key(self, key: str, job_id: str, now: float, ttl: float) -> bool:
        """Claim ``key`` for ``job_id`` until ``now + ttl``, atomically: True when claimed by
        this call (the key was free, or its earlier claim had expired and is taken over);
        False when another claim holds it."""

        def work(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "INSERT INTO idempotency_keys (key, job_id, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, "
                "expires_at = excluded.expires_at WHERE idempotency_keys.expires_at <= ?",
                (key, job_id, now + ttl, now),
            )
            return cur.rowcount > 0

        return await self._run(work)

    async def idempotency_claim(self, key: str, now: float) -> str | None:
        """The id ``key`` is claimed for (None: not claimed, or the claim expired)."""

        def work(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT job_id FROM idempotency_keys WHERE key = ? AND expires_at > ?",
                (key, now),
            ).fetchone()
            return None if row is None else cast(str, row[0])

        return await self._run(work)

    async def release_idempotency_key(self, key: str) -> None:
        """Free ``key`` (a request that claimed it was refused: a retry may use it)."""
        await self._run(lambda db: db.execute("DELETE FROM idempotency_keys WHERE key = ?", (key,)))

    async def forget_idempotency_keys(self, now: float) -> int:
        """Remove the claims expired at ``now``; how many."""

        def work(db: sqlite3.Connection) -> int:
            cur = db.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,))
            return cur.rowcount

        return await self._run(work)

    # -- assets -------------------------------------------------------------------------------

    async def put_asset(self, asset: AssetRecord) -> None:
        """Insert ``asset``, or replace the stored asset with its id."""
        row = _asset_row(asset)
        marks = ", ".join("?" * len(row))
        await self._run(
            lambda db: db.execute(
                f"INSERT OR REPLACE INTO assets ({_ASSET_COLUMNS}) VALUES ({marks})", row
            )
        )

    async def get_asset(self, asset_id: str) -> AssetRecord | None:
        """The asset with id ``asset_id`` (None: none)."""
        found = await self._select_assets("id = ?", (asset_id,))
        return found[0] if found else None

    async def delete_asset(self, asset_id: str) -> bool:
        """Remove the asset record ``asset_id`` (never its blob); whether there was one."""

        def work(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM assets WHERE id = ?", (asset_id,)).rowcount > 0

        return await self._run(work)

    async def asset_by_hash(self, hash_: str) -> AssetRecord | None:
        """An asset (the oldest) over the blob ``hash_`` (None: no record references it)."""
        found = await self._select_assets("hash = ? ORDER BY created_at, id LIMIT 1", (hash_,))
        return found[0] if found else None

    async def count_assets_with_hash(self, hash_: str) -> int:
        """How many asset records reference the blob ``hash_``."""

        def work(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT COUNT(*) FROM assets WHERE hash = ?", (hash_,)).fetchone()
            return int(row[0])

        return await self._run(work)

    async def expired_assets(self, now: float) -> list[AssetRecord]:
        """Assets whose ``expires_at`` is at or before ``now``, oldest deadline first."""
        return await self._select_assets(
            "expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at, id", (now,)
        )

    async def assets_of_job(self, job_id: str) -> list[AssetRecord]:
        """The assets produced by job ``job_id``, in the order they were minted."""
        return await self._select_assets("job_id = ? ORDER BY created_at, id", (job_id,))

    async def find_assets(
        self,
        hash_: str,
        *,
        file_path: str | None,
        tags: Iterable[str],
    ) -> list[AssetRecord]:
        """Uploaded assets (no job) over ``hash_`` with this ``file_path`` and these
        ``tags`` (in this order), oldest first."""
        found = await self._select_assets(
            "hash = ? AND job_id IS NULL AND file_path IS ? AND tags = ? ORDER BY created_at, id",
            (hash_, file_path, _dump(list(tags))),
        )
        return found

    async def _select_assets(self, clause: str, args: tuple[Any, ...]) -> list[AssetRecord]:
        def work(db: sqlite3.Connection) -> list[AssetRecord]:
            rows = db.execute(f"SELECT {_ASSET_COLUMNS} FROM assets WHERE {clause}", args)
            return [_asset_of(row) for row in rows]

        return await self._run(work)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("serve store %s: journal mode %s, not WAL", path, mode)
        # FULL: a commit that returned is on disk even if the machine loses power next.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{path} has schema version {version}; this comfytrio knows up to "
                    f"{SCHEMA_VERSION}"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step].split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except BaseException:
        db.close()
        raise
    return db


@asynccontextmanager
async def open_store(path: Path) -> AsyncIterator[Store]:
    """Open the SQLite file at ``path`` (made, with its folder, when missing; its schema
    created or upgraded) and yield a ``Store`` over it; closed when the block ends.

    Raises ``sqlite3.Error`` (or ``OSError``) when the file cannot be opened, and
    ``RuntimeError`` for a file written by a newer comfytrio (a higher schema version).
    """
    db = await trio.to_thread.run_sync(_connect, path)
    store = Store(db, path)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(db.close, limiter=store._limiter)
