"""The producer's side: submit jobs to Redis, follow them, cancel them, list them."""

from __future__ import annotations

import builtins
import functools
import json
import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import coredis.exceptions
import trio
from coredis import PureToken

from .._errors import IdempotencyKeyReusedError, JobNotFoundError
from .._types import LoRARef, ModelRef
from ._keys import GROUP, TERMINAL, Keys
from ._records import (
    BrokerJob,
    JobUpdate,
    WorkerInfo,
    expired_job,
    job_from_hash,
    request_json,
    worker_from_hash,
)
from ._redis import Conn, entry_fields, open_conn, pairs

__all__ = ["JOB_ID", "POOL_NAME", "JobQueue", "open_job_queue"]

JOB_ID = re.compile(r"(?!\.+$)[A-Za-z0-9_.-]{1,100}")
"""A job id: it names keys, and becomes ``<id>.<attempt>`` in ``run_workflow`` (128 at most)."""

POOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""A pool's name (it names a stream)."""

_BLOCK_MS = 1000
_LIST_BATCH = 100


def _check_job_id(job_id: str) -> None:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise ValueError(
            "job_id must be 1 to 100 letters, digits, '_', '-' or '.' (not only dots), "
            f"got {job_id!r}"
        )


def _check_pool(pool: str) -> None:
    if not isinstance(pool, str) or not POOL_NAME.fullmatch(pool):
        raise ValueError(f"pool must be 1 to 64 letters, digits, '_', '-' or '.', got {pool!r}")


def _update(entry_id: str, fields: Mapping[str, str]) -> JobUpdate:
    return JobUpdate(entry_id, fields.get("kind", ""), json.loads(fields.get("data") or "{}"))


class JobQueue:
    """A producer's handle on the broker (from ``open_job_queue``): submit jobs, follow
    them, cancel them, list them and the workers.

    Every call retries while Redis is unreachable, for the queue's ``reconnect_timeout``
    seconds, then raises ``BrokerUnavailableError``.
    """

    def __init__(
        self, conn: Conn, *, prefix: str, retention: float, idempotency_ttl: float
    ) -> None:
        self._conn = conn
        self._keys = Keys(prefix)
        self.retention = retention
        """Seconds a job's record is kept after its latest change."""
        self.idempotency_ttl = idempotency_ttl
        """Seconds an idempotency key stays taken."""

    async def submit(
        self,
        workflow: Mapping[str, Any],
        *,
        pool: str = "default",
        params: Mapping[str, Mapping[str, Any]] | None = None,
        models: Sequence[ModelRef] = (),
        loras: Sequence[LoRARef] = (),
        seed: int | None = None,
        same_images: bool = False,
        max_shards: int | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        webhook_url: str | None = None,
        job_id: str | None = None,
    ) -> str:
        """Queue ``workflow`` for the workers of ``pool``; return its job id.

        The keywords are ``ComfyAPI.run_workflow``'s (``params``, ``models``, ``loras``,
        ``seed``, ``same_images``, ``max_shards``, ``timeout``), kept with the job and handed
        to the worker that runs it; ``metadata`` (a JSON object) is the caller's, for
        ``list``; ``webhook_url`` is kept for a front end. The job's hash, its index entry,
        its first event and its stream entry are written by one script: all or nothing.

        ``job_id``: the caller's id (1 to 100 letters, digits, ``_``, ``-``, ``.``; default
        a new random one). A submit with the id of a job that exists does nothing and returns
        the id: give one to make a retried submit safe. ``idempotency_key``: a key taken for
        ``idempotency_ttl`` seconds; reused for another job it raises
        ``IdempotencyKeyReusedError`` (``.job_id`` names the job that has it).

        Raises ``ValueError`` for a malformed ``job_id``, ``pool``, ``max_shards`` or a
        request that is not JSON (``TypeError`` for a value JSON cannot hold),
        ``IdempotencyKeyReusedError``, ``BrokerUnavailableError``.
        """
        if job_id is None:
            job_id = uuid.uuid4().hex
        _check_job_id(job_id)
        _check_pool(pool)
        if max_shards is not None and (
            isinstance(max_shards, bool) or not isinstance(max_shards, int) or max_shards < 1
        ):
            raise ValueError(
                f"max_shards must be None or an integer of at least 1, got {max_shards!r}"
            )
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise ValueError("idempotency_key must be 1 to 255 characters")
        request = request_json(
            workflow,
            params=params,
            models=models,
            loras=loras,
            seed=seed,
            same_images=same_images,
            max_shards=max_shards,
            timeout=timeout,
        )
        meta = json.dumps(dict(metadata or {}), allow_nan=False)
        now = time.time()
        retention = max(1, math.ceil(self.retention))
        keys = [
            self._keys.job(job_id),
            self._keys.index,
            self._keys.events(job_id),
            self._keys.jobs(pool),
        ]
        if idempotency_key is not None:
            keys.append(self._keys.idem(idempotency_key))
        answer = await self._conn.script(
            "SUBMIT",
            keys,
            [
                job_id,
                repr(now),
                retention,
                max(1, math.ceil(self.idempotency_ttl)),
                idempotency_key or "",
                pool,
                request,
                meta,
                webhook_url or "",
                json.dumps({"status": "queued", "error": None}),
                repr(now + retention),
            ],
        )
        if answer[0] == "reused":
            assert idempotency_key is not None
            raise IdempotencyKeyReusedError(idempotency_key, str(answer[1]))
        return job_id

    async def get(self, job_id: str) -> BrokerJob:
        """The job as it is now. A job whose record expired is answered with status
        ``expired`` while its index entry is left. Raises ``JobNotFoundError``,
        ``BrokerUnavailableError``."""
        client = self._conn.client
        fields = await self._conn.call(lambda: client.hgetall(self._keys.job(job_id)))
        if fields:
            return job_from_hash(fields)
        score = await self._conn.call(lambda: client.zscore(self._keys.index, job_id))
        if score is None:
            raise JobNotFoundError(job_id)
        return expired_job(job_id, float(score))

    async def wait(self, job_id: str, *, timeout: float | None = None) -> BrokerJob:
        """Wait until the job is terminal (``succeeded``, ``failed``, ``canceled``,
        ``expired``) and return it. It follows the job's event stream (``XREAD BLOCK``) and
        looks at its hash whenever a second passes without news (a stream that expired
        says nothing). Raises ``JobNotFoundError``, ``TimeoutError`` after ``timeout``
        seconds (None: no limit), ``BrokerUnavailableError``."""
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                return await self._wait(job_id)
        except trio.TooSlowError:
            raise TimeoutError(f"job {job_id} not terminal after {timeout} s") from None

    async def _wait(self, job_id: str) -> BrokerJob:
        job = await self.get(job_id)
        last = "0-0"
        while not job.terminal:
            batch = await self._read_events(job_id, last)
            if not batch:
                job = await self.get(job_id)
                continue
            for update in batch:
                last = update.id
                if update.kind == "status" and update.data.get("status") in TERMINAL:
                    job = await self.get(job_id)
        return job

    async def _read_events(
        self, job_id: str, last: str, *, block: bool = True
    ) -> builtins.list[JobUpdate]:
        key = self._keys.events(job_id)
        client = self._conn.client
        answer = await self._conn.call(
            lambda: client.xread({key: last}, count=100, block=_BLOCK_MS if block else None)
        )
        if not answer:
            return []
        return [_update(*entry_fields(e)) for e in answer.get(key, ())]

    async def events(self, job_id: str) -> AsyncGenerator[JobUpdate, None]:
        """The job's updates from its first (``status``, ``progress``, ``log``, then its
        ``output`` entries and its terminal ``status``, each once), as they come; ends after
        the terminal status. An async generator: close it with ``contextlib.aclosing``
        when you stop early. Raises ``JobNotFoundError``, ``BrokerUnavailableError``."""
        job = await self.get(job_id)
        last = "0-0"
        while True:
            # A terminal job's stream is complete: read what is left without blocking.
            batch = await self._read_events(job_id, last, block=not job.terminal)
            if not batch:
                if job.terminal:
                    return  # its stream expired: nothing more to say
                job = await self.get(job_id)
                continue
            for update in batch:
                last = update.id
                yield update
                if update.kind == "status" and update.data.get("status") in TERMINAL:
                    return

    async def cancel(self, job_id: str) -> BrokerJob:
        """Cancel the job; return it as it is then. Idempotent: a queued job is
        ``canceled`` at once (the worker that reads it later drops it); a running one goes
        ``canceling`` and its worker stops its prompts, then writes ``canceled``; a terminal
        one is answered as it is. Raises ``JobNotFoundError``, ``BrokerUnavailableError``."""
        answer = await self._conn.script(
            "CANCEL",
            [self._keys.job(job_id), self._keys.events(job_id), self._keys.control],
            [repr(time.time()), job_id],
        )
        if not answer:
            return await self.get(job_id)  # expired, or JobNotFoundError
        return job_from_hash(pairs(answer))

    async def list(
        self,
        *,
        statuses: Iterable[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[builtins.list[BrokerJob], str | None]:
        """Jobs, newest first: those of ``statuses`` (None: all) whose metadata has every
        key and value of ``metadata``; at most ``limit``. Returns the page and the cursor
        of the next one (None on the last page). Raises ``ValueError`` for a ``limit``
        below 1 or a malformed cursor, ``BrokerUnavailableError``."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        wanted = None if statuses is None else set(statuses)
        top: float = math.inf
        after: str | None = None
        if cursor is not None:
            try:
                score_text, after = cursor.split("|", 1)
                top = float(score_text)
            except ValueError:
                raise ValueError(f"malformed cursor {cursor!r}") from None
        client = self._conn.client
        page: builtins.list[BrokerJob] = []
        scores: builtins.list[float] = []
        offset = 0
        while True:
            batch = await self._conn.call(
                functools.partial(
                    client.zrange,
                    self._keys.index,
                    "+inf" if top == math.inf else repr(top),
                    "-inf",
                    sortby=PureToken.BYSCORE,
                    rev=True,
                    withscores=True,
                    offset=offset,
                    count=_LIST_BATCH,
                )
            )
            offset += len(batch)
            for item in batch:
                assert isinstance(item, tuple)
                member, score = str(item[0]), float(item[1])
                if after is not None and score == top and member >= after:
                    continue  # at or before the cursor (equal scores: reverse member order)
                if len(page) == limit:
                    return page, f"{scores[-1]!r}|{page[-1].id}"
                job = await self._job_or_expired(member, score)
                if wanted is not None and job.status not in wanted:
                    continue
                if metadata and any(
                    k not in job.metadata or job.metadata[k] != v for k, v in metadata.items()
                ):
                    continue
                page.append(job)
                scores.append(score)
            if len(batch) < _LIST_BATCH:
                return page, None

    async def _job_or_expired(self, job_id: str, score: float) -> BrokerJob:
        client = self._conn.client
        fields = await self._conn.call(lambda: client.hgetall(self._keys.job(job_id)))
        if not fields:
            return expired_job(job_id, score)
        return job_from_hash(fields)

    async def workers(self) -> builtins.list[WorkerInfo]:
        """Every worker whose heartbeat is current, by name. Raises
        ``BrokerUnavailableError``."""
        client = self._conn.client

        async def scan() -> builtins.list[dict[str, str]]:
            keys = [k async for k in client.scan_iter(match=self._keys.worker_pattern)]
            return [await client.hgetall(k) for k in keys]

        found = [worker_from_hash(f) for f in await self._conn.call(scan) if f]
        return sorted(found, key=lambda w: w.name)

    async def pending(self, pool: str = "default") -> int:
        """How many jobs of ``pool`` wait for a worker (in its stream, never delivered).
        Raises ``BrokerUnavailableError``."""
        key = self._keys.jobs(pool)
        client = self._conn.client
        try:
            groups = await self._conn.call(lambda: client.xinfo_groups(key))
        except coredis.exceptions.ResponseError:
            return 0  # no stream yet
        last = "0-0"
        for group in groups:
            if group.get("name") == GROUP:
                last = str(group.get("last-delivered-id") or "0-0")
        entries = await self._conn.call(lambda: client.xrange(key, f"({last}", "+"))
        return len(entries)


@asynccontextmanager
async def open_job_queue(
    url: str,
    *,
    prefix: str = "comfytrio",
    retention: float = 86400.0,
    idempotency_ttl: float = 86400.0,
    reconnect_timeout: float = 60.0,
) -> AsyncIterator[JobQueue]:
    """A ``JobQueue`` on the Redis at ``url`` (``redis://host:port/db``); its connections
    are closed on exit.

    ``prefix`` starts every key (several brokers may share one Redis); ``retention``
    (seconds) is how long a job's record and events are kept after its latest change;
    ``idempotency_ttl`` how long an idempotency key stays taken; ``reconnect_timeout``
    how long each call retries while Redis is unreachable. Nothing is sent on entry.
    Raises ``ValueError`` for a malformed URL or a retention under one second."""
    if retention < 1 or idempotency_ttl < 1:
        raise ValueError("retention and idempotency_ttl must be at least 1 second")
    async with open_conn(url, reconnect_timeout) as conn:
        yield JobQueue(conn, prefix=prefix, retention=retention, idempotency_ttl=idempotency_ttl)
