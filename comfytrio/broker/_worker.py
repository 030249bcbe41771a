"""The worker's side: take jobs from Redis Streams, run them on one ``ComfyAPI``, store
their outputs, report them once.

Leases, fencing and hand-back (why each step is as it is):

- An entry read from a pool's stream stays in the group's pending list, owned by this
  worker, until acked. Its idle time is the lease: the worker renews it every ``lease / 3``
  seconds (``EXTEND``: only while it still owns the entry and the job is on its attempt).
  Any worker takes entries idle for ``lease`` seconds (``CLAIM``): their holder died.
- Starting a job increments its ``attempt`` (``START``); everything a worker writes later
  (progress, the terminal status, a hand-back) is checked against it, so an attempt that
  lost its lease, however late, changes nothing and its stored outputs are deleted.
- Outputs go to the store as shards finish; the terminal status, the outputs and their
  ``output`` events are written by one script (``FINISH``), which also acks the entry: a
  job is acked only once its outputs are stored, and reported once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import mimetypes
import os
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import coredis.exceptions
import trio

from .._api import ComfyAPI
from .._errors import (
    BrokerUnavailableError,
    ComfyAPIError,
    NoInstanceReadyError,
    ServerError,
    unwrapped,
)
from .._instance import InstanceState
from .._job_events import JobEvent, JobPlanned, ShardFailed, ShardFinished
from .._types import JobResult
from ..hookspecs import OutputStore
from ..serve._wire import job_error, output_kind
from ._keys import GROUP, Keys
from ._queue import POOL_NAME
from ._records import BrokerOutput, WorkerInfo, job_from_hash
from ._redis import Conn, entry_fields, flat_mapping, open_conn

__all__ = ["run_worker"]

logger = logging.getLogger("comfytrio.broker")

_BLOCK_MS = 1000
_HAND_BACK_IDLE_MS = 10**12
"""The idle time a handed-back entry gets: past any lease, so the next claim takes it."""
_MAX_MODELS = 10000


@attrs.define(eq=False)
class _Running:
    """A job this worker holds."""

    stream: str
    entry: str
    job_id: str
    delivered: int
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    token: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    attempt: int = 0
    cancel_requested: bool = False
    lost: bool = False
    handing_back: bool = False


@attrs.define
class _Progress:
    attempt: int
    shard_count: int = 0
    shards_finished: int = 0
    shards_failed: int = 0
    outputs_stored: int = 0

    def json(self) -> str:
        return json.dumps(attrs.asdict(self))


def _error(code: str, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "node_id": None,
        "class_type": None,
        "traceback": None,
    }


def _list_models(root: Path | None) -> list[str]:
    if root is None or not root.is_dir():
        return []
    found: list[str] = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            found.append(path.relative_to(root).as_posix())
            if len(found) >= _MAX_MODELS:
                break
    return found


class _Worker:
    """One worker: its connection, its jobs, its services."""

    def __init__(
        self,
        api: ComfyAPI,
        url: str,
        *,
        store: OutputStore,
        name: str,
        pools: Sequence[str],
        lease: float,
        max_attempts: int,
        grace: float,
        prefix: str,
        reconnect_timeout: float,
    ) -> None:
        self.api = api
        self.url = url
        self.store = store
        self.name = name
        self.pools = tuple(pools)
        self.lease = lease
        self.max_attempts = max_attempts
        self.grace = grace
        self.keys = Keys(prefix)
        self.reconnect_timeout = reconnect_timeout
        self.running: dict[str, _Running] = {}
        self.by_job: dict[str, _Running] = {}
        self.kill_scope = trio.CancelScope(shield=True)
        self.dead = False
        self.started_at = time.time()
        self.models: list[str] = []
        self._changed = trio.Event()
        self._conn: Conn | None = None

    # ------------------------------------------------------------------ state

    @property
    def conn(self) -> Conn:
        assert self._conn is not None
        return self._conn

    def capacity(self) -> int:
        """Jobs it can run at once now: its ready instances."""
        return sum(1 for i in self.api.instances if i.state == InstanceState.READY)

    def free(self) -> int:
        return self.capacity() - len(self.running)

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._changed.wait()

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            name=self.name,
            pools=self.pools,
            gpu_count=self.api.gpu.device_count,
            cuda_available=self.api.gpu.cuda_available,
            models=tuple(self.models),
            capacity=self.capacity(),
            busy=len(self.running),
            started_at=self.started_at,
            heartbeat_at=time.time(),
        )

    # ------------------------------------------------------------------ life

    async def main(
        self,
        stop: trio.Event,
        die: trio.Event | None,
        *,
        task_status: trio.TaskStatus[WorkerInfo],
    ) -> None:
        """Everything, shielded from the caller's cancellation (``stop`` says when to stop
        gracefully); ``die`` (tests) ends it at once, as a crash would."""
        with self.kill_scope:
            async with open_conn(self.url, self.reconnect_timeout) as conn:
                self._conn = conn
                await self._setup()
                async with trio.open_nursery() as background:
                    if die is not None:
                        background.start_soon(self._die_on, die)
                    await background.start(self._follow_control)
                    background.start_soon(self._heartbeat)
                    async with trio.open_nursery() as jobs:
                        async with trio.open_nursery() as intake:
                            intake.start_soon(self._read_loop, jobs)
                            intake.start_soon(self._claim_loop, jobs)
                            task_status.started(self.info())
                            await stop.wait()
                            intake.cancel_scope.cancel()
                        logger.info(
                            "worker %s: stopping, %d job(s) running", self.name, len(self.running)
                        )
                        with trio.move_on_after(self.grace):
                            while self.running:
                                await self._changed.wait()
                        for run in list(self.running.values()):
                            run.handing_back = True
                            run.scope.cancel()
                    background.cancel_scope.cancel()
                with contextlib.suppress(BrokerUnavailableError):  # else it expires
                    await conn.call(lambda: conn.client.delete([self.keys.worker(self.name)]))

    async def _die_on(self, die: trio.Event) -> None:
        await die.wait()
        logger.warning("worker %s: dying without handing back (test switch)", self.name)
        self.dead = True
        self.kill_scope.cancel()

    async def _setup(self) -> None:
        self.models = await trio.to_thread.run_sync(_list_models, self.api.models_path)
        await self._create_groups()

    async def _create_groups(self) -> None:
        client = self.conn.client
        for pool in self.pools:
            key = self.keys.jobs(pool)
            try:
                await self.conn.call(
                    lambda key=key: client.xgroup_create(key, GROUP, "0", mkstream=True)  # type: ignore[misc]
                )
            except coredis.exceptions.StreamDuplicateConsumerGroupError:
                pass  # it exists: what it delivered stays delivered
            except coredis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _heartbeat(self) -> None:
        interval = max(0.2, min(self.lease / 3, 5.0))
        ttl = max(2, math.ceil(interval * 3))
        key = self.keys.worker(self.name)
        while True:
            info = self.info()
            fields = {
                "name": info.name,
                "pools": json.dumps(list(info.pools)),
                "gpu_count": info.gpu_count,
                "cuda_available": int(info.cuda_available),
                "models": json.dumps(list(info.models)),
                "capacity": info.capacity,
                "busy": info.busy,
                "started_at": repr(info.started_at),
                "heartbeat_at": repr(info.heartbeat_at),
            }
            await self.conn.script("HEARTBEAT", [key], [ttl, *flat_mapping(fields)])
            await trio.sleep(interval)

    async def _follow_control(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Cancel requests, from the control stream's end when we started."""
        client = self.conn.client
        key = self.keys.control
        newest = await self.conn.call(lambda: client.xrevrange(key, "+", "-", count=1))
        last = newest[0].identifier if newest else "0-0"
        task_status.started()
        while True:
            answer = await self.conn.call(
                functools.partial(client.xread, {key: last}, count=100, block=_BLOCK_MS)
            )
            for entry in (answer or {}).get(key, ()):
                last, fields = entry_fields(entry)
                run = self.by_job.get(fields.get("job", ""))
                if fields.get("action") != "cancel" or run is None or run.attempt == 0:
                    continue  # not ours, or not started: its START sees `canceling`
                if str(run.attempt) == fields.get("attempt"):
                    logger.info("job %s: cancel requested", run.job_id)
                    run.cancel_requested = True
                    run.scope.cancel()

    # ------------------------------------------------------------------ intake

    async def _read_loop(self, jobs: trio.Nursery) -> None:
        """New entries, one at a time, only while a slot is free: a job never waits on a
        busy worker while another one idles."""
        client = self.conn.client
        streams = {self.keys.jobs(p): ">" for p in self.pools}
        while True:
            if self.free() <= 0:
                await self._wait_change(0.25)
                continue
            try:
                answer = await self.conn.call(
                    lambda: client.xreadgroup(
                        GROUP, self.name, streams=streams, count=1, block=_BLOCK_MS
                    )
                )
            except coredis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._create_groups()  # Redis lost its data: start over
                continue
            for stream, entries in (answer or {}).items():
                for entry in entries:
                    entry_id, fields = entry_fields(entry)
                    if self.free() > 0:
                        self._launch(jobs, str(stream), entry_id, fields.get("job", ""), 1)
                    else:  # several pools answered at once: give the extra back
                        await self._hand_back(str(stream), entry_id, 1)

    async def _claim_loop(self, jobs: trio.Nursery) -> None:
        """Every ``lease / 2`` s, entries whose holder stopped renewing them (for free slots
        only)."""
        while True:
            await trio.sleep(self.lease / 2)
            for pool in self.pools:
                free = self.free()
                if free <= 0:
                    break
                stream = self.keys.jobs(pool)
                claimed = await self.conn.script(
                    "CLAIM",
                    [stream],
                    [
                        GROUP,
                        self.name,
                        int(self.lease * 1000),
                        free,
                        self.keys.prefix,
                        self.lease,
                    ],
                )
                for entry, job_id, delivered in claimed:
                    if str(entry) in self.running:
                        continue  # ours, not renewed while Redis was away: renewed now
                    logger.info("job %s: claimed (delivery %s)", job_id, delivered)
                    self._launch(jobs, stream, str(entry), str(job_id), int(delivered))

    def _launch(
        self, jobs: trio.Nursery, stream: str, entry: str, job_id: str, delivered: int
    ) -> None:
        run = _Running(stream, entry, job_id, delivered)
        self.running[entry] = run
        self.by_job[job_id] = run
        jobs.start_soon(self._job, run)

    async def _hand_back(self, stream: str, entry: str, delivered: int) -> None:
        """Leave the entry to whichever worker claims next, with ``delivered - 1``
        deliveries counted (``run.delivered``: this delivery is not counted)."""
        client = self.conn.client
        await self.conn.call(
            lambda: client.xclaim(
                stream,
                GROUP,
                self.name,
                0,
                [entry],
                idle=_HAND_BACK_IDLE_MS,
                retrycount=max(0, delivered - 1),
                justid=True,
            )
        )

    async def _ack(self, run: _Running) -> None:
        client = self.conn.client
        await self.conn.call(lambda: client.xack(run.stream, GROUP, [run.entry]))
        await self.conn.call(lambda: client.xdel(run.stream, [run.entry]))

    # ------------------------------------------------------------------ one job

    async def _job(self, run: _Running) -> None:
        try:
            await self._run_job(run)
        except BrokerUnavailableError:
            raise
        except Exception:
            # A bug of ours: the entry stays unacked and runs again after its lease.
            logger.exception("job %s: unexpected error in worker %s", run.job_id, self.name)
        finally:
            self.running.pop(run.entry, None)
            if self.by_job.get(run.job_id) is run:
                del self.by_job[run.job_id]
            self._signal()

    async def _run_job(self, run: _Running) -> None:
        if not run.job_id:
            await self._ack(run)
            return
        if run.delivered > self.max_attempts:
            await self._dead_letter(run)
            return
        keys = self.keys
        state, value = await self.conn.script(
            "START",
            [keys.job(run.job_id), keys.events(run.job_id)],
            [self.name, run.token, repr(time.time())],
        )
        if state != "started":
            logger.info("job %s: %s (%s), dropped", run.job_id, state, value or "expired")
            await self._ack(run)
            return
        run.attempt = int(value)
        client = self.conn.client
        fields = await self.conn.call(lambda: client.hgetall(keys.job(run.job_id)))
        job = job_from_hash(fields)
        logger.info("job %s: attempt %d on worker %s", run.job_id, run.attempt, self.name)
        progress = _Progress(run.attempt)
        stored: list[BrokerOutput] = []
        problems: list[BaseException] = []
        result: JobResult | None = None
        error: BaseException | None = None
        send, receive = trio.open_memory_channel[JobEvent](math.inf)
        with run.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease, run)
                async with trio.open_nursery() as inner:
                    inner.start_soon(self._collect, run, receive, stored, progress, problems)
                    try:
                        result = await self.api.run_workflow(
                            job.workflow,
                            **job.options(),
                            timeout=job.timeout,
                            job_id=f"{run.job_id}.{run.attempt}",
                            events=send,
                        )
                    except Exception as exc:
                        error = exc
                        if not isinstance(exc, ComfyAPIError):
                            logger.exception("job %s: unexpected error", run.job_id)
                    finally:
                        send.close()
                nursery.cancel_scope.cancel()  # stop renewing the lease
        await self._conclude(run, result, error, stored, progress, problems)

    async def _conclude(
        self,
        run: _Running,
        result: JobResult | None,
        error: BaseException | None,
        stored: list[BrokerOutput],
        progress: _Progress,
        problems: list[BaseException],
    ) -> None:
        keys = self.keys
        if run.lost:
            logger.warning("job %s: attempt %d lost its lease; dropped", run.job_id, run.attempt)
            await self._discard(stored)
            return
        box_failure = not run.handing_back and not run.cancel_requested and _box_failure(error)
        if run.handing_back or box_failure:
            # Stopping: not this job's fault, not counted. A box whose servers all failed
            # it: counted (a job that fails every box ends in the dead-letter stream).
            why = f"on worker {self.name}: {error}" if box_failure else ""
            answer = await self.conn.script(
                "REQUEUE",
                [keys.job(run.job_id), keys.events(run.job_id)],
                [run.attempt, run.token, repr(time.time()), why],
            )
            if answer == "queued":
                delivered = run.delivered + 1 if box_failure else run.delivered
                await self._hand_back(run.stream, run.entry, delivered)
            elif answer == "canceled":
                await self._ack(run)
            logger.info("job %s: handed back (%s) %s", run.job_id, answer, why)
            await self._discard(stored)
            return
        if run.cancel_requested:
            status, err = "canceled", None
        elif error is not None:
            status, err = "failed", job_error(error)
        elif problems:
            status, err = (
                "failed",
                _error("output_store_error", f"storing outputs failed: {problems[0]}"),
            )
        elif result is not None and result.failures:
            failures = "; ".join(
                f"shard {f.index} on {f.instance}: {f.error}" for f in result.failures
            )
            status = "failed"
            err = _error(
                "shard_failed", f"some shards failed, the others' outputs are kept: {failures}"
            )
        else:
            status, err = "succeeded", None
        outputs = [] if status == "canceled" else stored
        answer = await self.conn.script(
            "FINISH",
            [keys.job(run.job_id), keys.events(run.job_id), run.stream],
            [
                run.attempt,
                run.token,
                status,
                json.dumps([o.to_json() for o in outputs]),
                "" if err is None else json.dumps(err),
                progress.json(),
                repr(time.time()),
                run.entry,
                GROUP,
                json.dumps({"status": status, "error": err}),
                *(json.dumps(o.to_json()) for o in outputs),
            ],
        )
        logger.info("job %s: attempt %d ended %s (%s)", run.job_id, run.attempt, status, answer)
        if answer != status or status == "canceled":
            await self._discard(stored)

    async def _keep_lease(self, run: _Running) -> None:
        """Renew the lease every ``lease / 3`` s; cancel the run when it is lost or the job
        is being canceled. Redis away: the run goes on (its end waits for Redis)."""
        keys = self.keys
        while True:
            await trio.sleep(self.lease / 3)
            try:
                owned, status = await self.conn.script(
                    "EXTEND",
                    [run.stream, keys.job(run.job_id)],
                    [GROUP, self.name, run.entry, run.attempt],
                )
            except BrokerUnavailableError:
                continue
            if not int(owned):
                run.lost = True
                run.scope.cancel()
                return
            if status == "canceling":
                run.cancel_requested = True
                run.scope.cancel()
                return

    async def _collect(
        self,
        run: _Running,
        events: trio.MemoryReceiveChannel[JobEvent],
        stored: list[BrokerOutput],
        progress: _Progress,
        problems: list[BaseException],
    ) -> None:
        """Store each shard's files as it finishes; report progress."""
        async for event in events:
            match event:
                case JobPlanned():
                    progress.shard_count = event.shard_count
                    await self._emit(run, "progress", progress.json())
                case ShardFinished():
                    for file in event.files:
                        key = (
                            f"{run.job_id}/{run.attempt}/"
                            f"{event.index}-{file.node_id}-{file.filename}"
                        )
                        content_type = mimetypes.guess_type(file.filename)[0]
                        try:
                            kept = await self.store.put(
                                key,
                                Path(file.path),
                                content_type=content_type or "application/octet-stream",
                            )
                        except Exception as exc:
                            logger.exception("job %s: storing %s failed", run.job_id, key)
                            problems.append(exc)
                            continue
                        stored.append(
                            BrokerOutput(
                                key=kept.key,
                                url=kept.url,
                                size=kept.size,
                                content_type=kept.content_type,
                                node_id=file.node_id,
                                filename=file.filename,
                                kind=output_kind(file.filename),
                                shard=event.index,
                                batch_index=file.batch_index,
                            )
                        )
                    progress.shards_finished += 1
                    progress.outputs_stored = len(stored)
                    await self._emit(run, "progress", progress.json())
                case ShardFailed():
                    if not event.retrying:
                        progress.shards_failed += 1
                    again = "; sent again" if event.retrying else ""
                    message = (
                        f"shard {event.index} attempt {event.attempt} on {event.instance or '-'} "
                        f"failed: {event.error}{again}"
                    )
                    await self._emit(run, "log", json.dumps({"message": message}))
                case _:
                    pass

    async def _emit(self, run: _Running, kind: str, data: str) -> None:
        """An event of the job, only while it is on this attempt (best effort)."""
        try:
            await self.conn.script(
                "EMIT",
                [self.keys.job(run.job_id), self.keys.events(run.job_id)],
                [run.attempt, kind, data],
            )
        except BrokerUnavailableError:
            logger.warning("job %s: %s event lost: Redis unavailable", run.job_id, kind)

    async def _discard(self, stored: list[BrokerOutput]) -> None:
        """Delete outputs that will never be reported."""
        for output in stored:
            try:
                await self.store.delete(output.key)
            except Exception:
                logger.exception("deleting output %s failed", output.key)

    async def _dead_letter(self, run: _Running) -> None:
        keys = self.keys
        client = self.conn.client
        fields = await self.conn.call(lambda: client.hgetall(keys.job(run.job_id)))
        last = fields.get("last_error") or "none recorded"
        message = (
            f"job {run.job_id} was delivered {run.delivered} times, more than "
            f"max_attempts={self.max_attempts}; last error: {last}"
        )
        err = _error("attempts_exhausted", message)
        logger.error("job %s: %s", run.job_id, message)
        await self.conn.script(
            "DEAD",
            [
                run.stream,
                keys.dead(run.stream.rsplit(":", 1)[-1]),
                keys.job(run.job_id),
                keys.events(run.job_id),
            ],
            [
                GROUP,
                run.entry,
                run.job_id,
                run.delivered,
                last,
                json.dumps(err),
                repr(time.time()),
                json.dumps({"status": "failed", "error": err}),
                self.name,
            ],
        )


def _box_failure(error: BaseException | None) -> bool:
    """Whether ``error`` says this box could not run the job (no server ready, or its
    servers lost it in a way another server may not: ``ServerError.retryable``), rather
    than that the job itself is wrong."""
    if isinstance(error, NoInstanceReadyError):
        return True
    return isinstance(error, ServerError) and error.retryable


def _default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def run_worker(
    api: ComfyAPI,
    url: str,
    *,
    store: OutputStore,
    name: str | None = None,
    pools: Sequence[str] = ("default",),
    lease: float = 30.0,
    max_attempts: int = 3,
    grace: float = 30.0,
    prefix: str = "comfytrio",
    reconnect_timeout: float = 60.0,
    task_status: trio.TaskStatus[WorkerInfo] = trio.TASK_STATUS_IGNORED,
    _die: trio.Event | None = None,
) -> None:
    """Run jobs of ``pools`` from the Redis at ``url`` on ``api`` until cancelled; start it
    with ``await nursery.start(run_worker, api, url, store=...)``, which returns its
    ``WorkerInfo`` once it reads jobs.

    It holds at most as many jobs as ``api`` has ready instances (each runs with
    ``run_workflow``, split over them) and reads a job only when it can start it now.
    While it runs one it renews its lease every ``lease / 3`` seconds; a worker that stops
    renewing (it died) loses its jobs to the others after ``lease`` seconds. An entry
    delivered more than ``max_attempts`` times goes to the pool's dead-letter stream and
    its job fails (``attempts_exhausted``). Each shard's files go into ``store`` under
    ``<job id>/<attempt>/<shard>-<node id>-<file name>`` as the shard ends; the job's
    terminal status and outputs are written once, by the attempt that holds it.

    Cancelling it stops it gracefully: it reads no more, gives its running jobs ``grace``
    seconds, then cancels them (their prompts leave the servers) and hands them back at
    once, queued again. ``name``: its consumer name (default host, pid and a random
    suffix); give each worker its own.

    Raises ``BrokerUnavailableError`` when Redis stays unreachable ``reconnect_timeout``
    seconds (its running jobs keep running while it retries), ``ValueError`` for a bad
    ``pools``, ``lease``, ``max_attempts`` or ``grace``.
    """
    if not pools or any(not POOL_NAME.fullmatch(p) for p in pools):
        raise ValueError(
            f"pools must be names of 1 to 64 letters, digits, '_', '-', '.': {pools!r}"
        )
    if lease <= 0 or grace < 0 or max_attempts < 1:
        raise ValueError("lease must be > 0, grace >= 0 and max_attempts >= 1")
    worker = _Worker(
        api,
        url,
        store=store,
        name=name or _default_name(),
        pools=pools,
        lease=lease,
        max_attempts=max_attempts,
        grace=grace,
        prefix=prefix,
        reconnect_timeout=reconnect_timeout,
    )
    stop = trio.Event()
    with unwrapped():
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def main(*, task_status: trio.TaskStatus[WorkerInfo]) -> None:
                try:
                    await worker.main(stop, _die, task_status=task_status)
                finally:
                    done.set()

            info = await nursery.start(main)
            task_status.started(info)
            try:
                await done.wait()
            finally:
                stop.set()
