"""The job board: every v2 job from submit to expiry, on one ``ComfyAPI``.

``JobBoard.run`` (started with ``nursery.start``) owns one task per running job, the
followers of every server's events, the recovery of the jobs a previous life left, and the
sweeper that expires old jobs. Every change of a job is written to the store before it is
announced (status, outputs, prompts), so a ``serve`` killed at any moment finds on restart
what it had told its clients, and the prompt ids to look for on the servers.

A job's life: ``queued`` (waiting for a server) -> ``running`` (its first prompt was posted)
-> ``succeeded`` | ``failed``; a cancel moves it to ``canceling`` while its prompts are
deleted or interrupted on every server, then ``canceled``; ``expired`` once its retention
ends (its outputs are removed then).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio
from starlette.routing import Route

from .. import __version__
from .._api import ComfyAPI
from .._errors import ComfyAPIError
from .._events import ComfyEvent
from .._job_events import JobEvent, JobPlanned, ShardFailed, ShardFinished, ShardSubmitted
from .._types import OutputFile, OutputValue
from ._asset_refs import resolve_asset_refs
from ._asset_routes import asset_routes
from ._assets import AssetStore
from ._outputs import OutputRegistry
from ._problems import ApiProblem
from ._progress import JobProgress
from ._records import TERMINAL, AssetRecord, JobRecord, PromptRecord
from ._recovery import recover_job
from ._store import Store
from ._submit import Submission, check_idempotency_key, key_reused, parse_submission
from ._validate import check_on_fleet
from ._webhooks import WebhookSender
from ._wire import job_error, job_json, output_json, rfc3339, status_json

__all__ = ["JobBoard", "JobEventItem", "Subscription"]

logger = logging.getLogger("comfytrio.serve")

JobEventItem = tuple[str, Any]
"""One SSE event: its name and its payload (a JSON object, or an ``AssetRecord`` for
``output``, rendered with the address the client used)."""

SUBSCRIBER_BUFFER = 256
MAX_LOG_LINES = 200


@attrs.frozen
class Subscription:
    """What an SSE stream of one job reads."""

    snapshot: list[JobEventItem]
    """The events that give the job's state now."""
    events: trio.MemoryReceiveChannel[JobEventItem] | None
    """What comes next (None: the job is terminal, nothing comes)."""
    close: Callable[[], None]
    """Stop receiving."""


@attrs.define(eq=False)
class LiveJob:
    """A job this process is running (or recovering)."""

    record: JobRecord
    """Its record as last written."""
    base_url: str
    """The address it was submitted to (for its webhook's links)."""
    registry: OutputRegistry
    """Its outputs made assets."""
    outputs: list[AssetRecord] = attrs.field(factory=list)
    """Its outputs so far."""
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    """Cancelled to cancel it."""
    subscribers: set[trio.MemorySendChannel[JobEventItem]] = attrs.field(factory=set)
    """Its SSE streams."""
    progress: JobProgress = attrs.field(factory=lambda: JobProgress({}))
    """Its progress over its shards."""
    progress_at: float = -math.inf
    """When the last progress event went out."""
    done: trio.Event = attrs.field(factory=trio.Event)
    """Set once it is terminal."""


class JobBoard:
    """Jobs on one ``ComfyAPI``: submit, follow, cancel, keep, expire, recover."""

    def __init__(
        self,
        api: ComfyAPI,
        store: Store,
        assets: AssetStore,
        *,
        webhooks: WebhookSender | None = None,
        max_queued: int = 1000,
        retention: float = 24 * 3600.0,
        idempotency_ttl: float = 24 * 3600.0,
        progress_interval: float = 0.5,
        sweep_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        """The fleet."""
        self.store = store
        """Where jobs and keys are kept."""
        self.assets = assets
        """Uploads and outputs."""
        self.webhooks = webhooks
        """Where terminal statuses are posted (None: nowhere)."""
        self.max_queued = max_queued
        self.retention = retention
        self.idempotency_ttl = idempotency_ttl
        self.progress_interval = progress_interval
        self.sweep_interval = sweep_interval
        self.clock = clock
        self._live: dict[str, LiveJob] = {}
        self._by_prompt: dict[str, tuple[LiveJob, int]] = {}
        self._nursery: trio.Nursery | None = None
        self._reserved = 0

    # ------------------------------------------------------------------ service

    async def run(
        self, *, task_status: trio.TaskStatus[JobBoard] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled: recover what a previous life left, follow the servers,
        run jobs, expire old ones. Cancelling it cancels every running job (their prompts are
        removed from the servers) and leaves them ``canceling`` in the store, so the next
        life finishes them."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for record in await self.store.unfinished_jobs():
                live = self._live_job(record, base_url="")
                self._live[record.id] = live
                nursery.start_soon(self._recover, live)
            nursery.start_soon(self._follow_servers)
            nursery.start_soon(self._sweep)
            task_status.started(self)

    def _live_job(self, record: JobRecord, base_url: str) -> LiveJob:
        registry = OutputRegistry(
            self.assets, record.id, record.expires_at, download_dir=self.api.download_dir
        )
        return LiveJob(record, base_url, registry)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None:
            raise RuntimeError("JobBoard.run is not running")
        self._nursery.start_soon(fn, *args)

    # ------------------------------------------------------------------ reading

    def _queue_position(self, job_id: str) -> int | None:
        queued = sorted(
            (j.record for j in self._live.values() if j.record.status == "queued"),
            key=lambda r: (r.created_at, r.id),
        )
        for position, record in enumerate(queued, 1):
            if record.id == job_id:
                return position
        return None

    async def _view(self, job_id: str) -> tuple[JobRecord, list[AssetRecord]]:
        live = self._live.get(job_id)
        if live is not None:
            return live.record, list(live.outputs)
        record = await self.store.get_job(job_id)
        if record is None:
            raise ApiProblem(404, "not_found", f"no job {job_id}")
        outputs = [] if record.status == "expired" else await self._outputs_of(record)
        return record, outputs

    async def _outputs_of(self, record: JobRecord) -> list[AssetRecord]:
        found = {a.id: a for a in await self.store.assets_of_job(record.id)}
        return [found[i] for i in record.outputs if i in found]

    async def job(self, job_id: str, base_url: str) -> dict[str, Any]:
        """``GET /api/v2/jobs/{id}``."""
        record, outputs = await self._view(job_id)
        return job_json(record, outputs, base_url, queue_position=self._queue_position(job_id))

    async def jobs(
        self,
        base_url: str,
        *,
        statuses: set[str] | None,
        metadata: dict[str, str] | None,
        limit: int,
        cursor: str | None,
    ) -> dict[str, Any]:
        """``GET /api/v2/jobs``: newest first, ``next_cursor`` unless it is the last page."""
        records, next_cursor = await self.store.list_jobs(
            statuses=statuses, metadata=metadata, limit=limit, cursor=cursor
        )
        jobs = []
        for stored in records:
            live = self._live.get(stored.id)
            record = live.record if live is not None else stored
            outputs = list(live.outputs) if live is not None else await self._outputs_of(record)
            if record.status == "expired":
                outputs = []
            jobs.append(
                job_json(record, outputs, base_url, queue_position=self._queue_position(record.id))
            )
        page: dict[str, Any] = {"jobs": jobs}
        if next_cursor is not None:
            page["next_cursor"] = next_cursor
        return page

    async def workflow(self, job_id: str) -> dict[str, Any]:
        """``GET .../workflow``: the workflow as submitted."""
        record, _ = await self._view(job_id)
        if record.status == "expired":
            raise ApiProblem(404, "not_found", f"job {job_id} has expired")
        return {"workflow": record.workflow, "format": "api"}

    async def logs(self, job_id: str) -> list[str]:
        """``GET .../logs``: what happened to it (retries, server errors)."""
        record, _ = await self._view(job_id)
        return list(record.logs)

    async def health(self) -> dict[str, Any]:
        """``GET /api/v2/health``."""
        servers = [
            {"name": i.name, "url": i.url, "state": str(i.state)} for i in self.api.instances
        ]
        ready = any(s["state"] == "ready" for s in servers)
        counts = {"queued": 0, "running": 0}
        for live in self._live.values():
            if live.record.status in counts:
                counts[live.record.status] += 1
        return {
            "status": "ok" if ready else "degraded",
            "version": __version__,
            "servers": servers,
            **counts,
        }

    async def subscribe(self, job_id: str) -> Subscription:
        """The job's snapshot (status, progress, latest preview) and, while it is not
        terminal, a channel of what comes next (closed after its terminal status; a reader
        that falls ``SUBSCRIBER_BUFFER`` events behind is closed too and may reconnect).
        ``ApiProblem`` 404 for an unknown job. Call ``close()`` when done."""
        record, _ = await self._view(job_id)
        snapshot: list[JobEventItem] = [
            ("status", status_json(record, self._queue_position(job_id)))
        ]
        if record.progress is not None:
            snapshot.append(("progress", record.progress))
        live = self._live.get(job_id)
        if live is None or live.record.status in TERMINAL:
            return Subscription(snapshot, None, lambda: None)
        if live.progress.preview is not None:
            snapshot.append(("preview", live.progress.preview))
        send, receive = trio.open_memory_channel[JobEventItem](SUBSCRIBER_BUFFER)
        live.subscribers.add(send)

        def close() -> None:
            live.subscribers.discard(send)
            send.close()
            receive.close()

        return Subscription(snapshot, receive, close)

    def _publish(self, live: LiveJob, name: str, data: Any) -> None:
        for send in list(live.subscribers):
            try:
                send.send_nowait((name, data))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                live.subscribers.discard(send)  # too slow: it reconnects for a new snapshot
                send.close()

    # ------------------------------------------------------------------ writing

    async def _save(self, live: LiveJob, **changes: Any) -> None:
        """Change the job's record and write it before anyone hears of it."""
        live.record = attrs.evolve(live.record, **changes)
        await self.store.put_job(live.record)
        if "status" in changes:
            self._publish(
                live, "status", status_json(live.record, self._queue_position(live.record.id))
            )

    async def _log(self, live: LiveJob, line: str) -> None:
        logs = (*live.record.logs, f"{rfc3339(self.clock())} {line}")[-MAX_LOG_LINES:]
        await self._save(live, logs=logs)

    async def submit(
        self, body: Any, *, idempotency_key: str | None, base_url: str
    ) -> dict[str, Any]:
        """``POST /api/v2/jobs``: check the body and the workflow against the servers, claim
        the key, record the job, start it. Raises ``ApiProblem``."""
        check_idempotency_key(idempotency_key)
        submission = parse_submission(body)
        workflow, params = await resolve_asset_refs(submission, self.assets)
        await check_on_fleet(self.api, submission, workflow, params)
        # Why a reservation: between this count and the job joining _live the store is
        # awaited; without it, concurrent submits would all pass the bound.
        active = self._reserved + sum(
            1 for j in self._live.values() if j.record.status not in TERMINAL
        )
        if active >= self.max_queued:
            raise ApiProblem(
                429,
                "queue_full",
                f"{active} jobs are queued or running, the most this server takes; retry later",
                retry_after=5,
            )
        self._reserved += 1
        try:
            record = await self._record_new_job(submission, idempotency_key)
        finally:
            self._reserved -= 1
        live = self._live_job(record, base_url)
        self._live[record.id] = live
        self._spawn(self._run, live, submission, workflow, params)
        logger.info("job %s: queued (%d node(s))", record.id, len(submission.workflow))
        return job_json(record, [], base_url, queue_position=self._queue_position(record.id))

    async def _record_new_job(
        self, submission: Submission, idempotency_key: str | None
    ) -> JobRecord:
        """Claim the key, write the job; release the key if the job was not written."""
        now = self.clock()
        job_id = _new_id()
        if idempotency_key is not None and not await self.store.claim_idempotency_key(
            idempotency_key, job_id, now, self.idempotency_ttl
        ):
            raise key_reused()
        record = JobRecord(
            id=job_id,
            status="queued",
            created_at=now,
            expires_at=now + self.retention,
            workflow=submission.workflow,
            comfytrio=submission.comfytrio,
            metadata=submission.metadata,
            webhook_url=submission.webhook_url,
            idempotency_key=idempotency_key,
        )
        try:
            await self.store.put_job(record)
        except BaseException:
            if idempotency_key is not None:
                with trio.CancelScope(shield=True):
                    await self.store.release_idempotency_key(idempotency_key)
            raise
        return record

    async def cancel(self, job_id: str, base_url: str) -> dict[str, Any]:
        """``POST .../cancel``: idempotent; a terminal job is answered as it is."""
        live = self._live.get(job_id)
        if live is not None and live.record.status in ("queued", "running"):
            await self._save(live, status="canceling")
            await self._log(live, "cancel requested")
            live.scope.cancel()
        return await self.job(job_id, base_url)

    # ------------------------------------------------------------------ running

    async def _run(
        self,
        live: LiveJob,
        submission: Submission,
        workflow: dict[str, Any],
        params: dict[str, dict[str, Any]],
    ) -> None:
        send, receive = trio.open_memory_channel[JobEvent](math.inf)
        error: BaseException | None = None
        failures = ""
        with live.scope:
            async with trio.open_nursery() as nursery:
                live.progress = JobProgress(
                    {k: n.get("class_type") for k, n in workflow.items() if isinstance(n, dict)}
                )
                nursery.start_soon(self._follow_job, live, receive)
                try:
                    result = await self.api.run_workflow(
                        workflow,
                        **submission.options(params),
                        timeout=submission.timeout,
                        job_id=live.record.id,
                        events=send,
                    )
                except Exception as exc:
                    error = exc
                    if not isinstance(exc, ComfyAPIError):
                        logger.exception("job %s: unexpected error", live.record.id)
                else:
                    await self._register(live, list(result.outputs), list(result.values))
                    order = {o.path: i for i, o in enumerate(result.outputs)}
                    live.outputs.sort(
                        key=lambda a: order.get(live.registry.paths.get(a.id, ""), len(order))
                    )
                    if result.failures:
                        failures = "; ".join(
                            f"shard {f.index} on {f.instance}: {f.error}" for f in result.failures
                        )
                finally:
                    send.close()
        with trio.CancelScope(shield=True):
            if live.scope.cancelled_caught or live.record.status == "canceling":
                await self._finish(live, "canceled")
            elif error is not None:
                await self._finish(live, "failed", job_error(error))
            elif failures:
                await self._finish(
                    live,
                    "failed",
                    {
                        "code": "shard_failed",
                        "message": f"some shards failed, the others' outputs are kept: {failures}",
                        "node_id": None,
                        "class_type": None,
                        "traceback": None,
                    },
                )
            else:
                await self._finish(live, "succeeded")

    async def _finish(
        self, live: LiveJob, status: str, error: dict[str, Any] | None = None
    ) -> None:
        progress = live.record.progress
        if status == "succeeded":
            progress = live.progress.snapshot(complete=True)
        await self._save(
            live,
            status=status,
            error=error,
            progress=progress,
            outputs=tuple(a.id for a in live.outputs),
            completed_at=self.clock(),
        )
        if error is not None:
            await self._log(live, f"{error['code']}: {error['message']}")
        logger.info("job %s: %s, %d output(s)", live.record.id, status, len(live.outputs))
        for send in list(live.subscribers):
            send.close()
        live.subscribers.clear()
        for prompt in live.record.prompts:
            self._by_prompt.pop(prompt.prompt_id, None)
        live.done.set()
        self._live.pop(live.record.id, None)
        if self.webhooks is not None:
            self.webhooks.send(
                live.record.webhook_url,
                f"job.{status}",
                job_json(live.record, live.outputs, live.base_url),
            )

    async def _follow_job(self, live: LiveJob, events: trio.MemoryReceiveChannel[JobEvent]) -> None:
        """Record what ``run_workflow`` says of the job as it happens."""
        async for event in events:
            match event:
                case JobPlanned():
                    await self._save(
                        live, shard_count=event.shard_count, split=event.split, seed=event.seed
                    )
                    live.progress.planned(event.shard_count)
                case ShardSubmitted():
                    prompt = PromptRecord(
                        event.index, event.attempt, event.instance, event.url, event.prompt_id
                    )
                    self._by_prompt[event.prompt_id] = (live, event.index)
                    live.progress.submitted(event.index)
                    changes: dict[str, Any] = {"prompts": (*live.record.prompts, prompt)}
                    if live.record.status == "queued":
                        changes.update(status="running", started_at=self.clock())
                    await self._save(live, **changes)
                case ShardFinished():
                    live.progress.finished(event.index)
                    await self._register(live, list(event.files), list(event.values))
                    self._progress(live, force=True)
                case ShardFailed():
                    again = "; sent again" if event.retrying else ""
                    await self._log(
                        live,
                        f"shard {event.index} attempt {event.attempt} on {event.instance} "
                        f"(prompt {event.prompt_id}) failed: {event.error}{again}",
                    )

    async def _register(
        self, live: LiveJob, files: list[OutputFile], values: list[OutputValue]
    ) -> None:
        """Make each new output of the job an asset; record and announce them."""
        added = await live.registry.add(files, values)
        if not added:
            return
        live.outputs.extend(added)
        await self._save(live, outputs=tuple(a.id for a in live.outputs))
        for asset in added:
            self._publish(live, "output", asset)

    # ------------------------------------------------------------------ servers' events

    async def _follow_servers(self) -> None:
        """Follow every instance's client (again after a restart) for progress and
        previews of our prompts."""
        followed: list[object] = []
        async with trio.open_nursery() as nursery:
            while True:
                for instance in self.api.instances:
                    client = instance.client
                    if client is not None and not any(client is c for c in followed):
                        followed.append(client)
                        nursery.start_soon(self._follow_client, client)
                await trio.sleep(0.5)

    async def _follow_client(self, client: Any) -> None:
        try:
            async with client.subscribe() as events:
                async for event in events:
                    self._on_server_event(event)
        except (trio.ClosedResourceError, trio.BrokenResourceError, ComfyAPIError):
            return  # that client closed; its successor is followed instead

    def _on_server_event(self, event: ComfyEvent) -> None:
        prompt_id = getattr(event, "prompt_id", None)
        found = self._by_prompt.get(prompt_id) if prompt_id else None
        if found is None:
            return
        live, index = found
        changed = live.progress.apply(index, event)
        if changed == "preview":
            self._publish(live, "preview", live.progress.preview)
        elif changed == "progress":
            self._progress(live)

    def _progress(self, live: LiveJob, *, force: bool = False) -> None:
        """Update the job's progress snapshot; publish it at most every
        ``progress_interval`` seconds (and always when a shard ends)."""
        progress = live.progress.snapshot()
        live.record = attrs.evolve(live.record, progress=progress)
        now = trio.current_time()
        if force or now - live.progress_at >= self.progress_interval:
            live.progress_at = now
            self._publish(live, "progress", progress)

    # ------------------------------------------------------------------ restart, expiry

    async def _recover(self, live: LiveJob) -> None:
        """Finish a job a previous life left unfinished (see ``recover_job``)."""
        with live.scope:
            outcome = await recover_job(self.api, live.record)
        with trio.CancelScope(shield=True):
            for line in outcome.logs:
                await self._log(live, line)
            if outcome.status == "rerun" and not live.scope.cancelled_caught:
                try:
                    submission = parse_submission(_body_of(live.record))
                    workflow, params = await resolve_asset_refs(submission, self.assets)
                except ApiProblem as exc:
                    await self._finish(live, "failed", _problem_error(exc))
                    return
                live.scope = trio.CancelScope()
                self._spawn(self._run, live, submission, workflow, params)
                return
            await self._register(live, outcome.files, outcome.values)
            if live.scope.cancelled_caught:
                await self._finish(live, "canceled")
            else:
                await self._finish(live, outcome.status, outcome.error)

    async def _sweep(self) -> None:
        """Expire jobs past their retention and remove their outputs; remove expired
        uploads and idempotency keys."""
        while True:
            now = self.clock()
            for record in await self.store.expired_jobs(now):
                if record.status not in TERMINAL or record.id in self._live:
                    continue  # a job still running expires once it ends
                await self.store.put_job(attrs.evolve(record, status="expired"))
                for asset in await self.store.assets_of_job(record.id):
                    with contextlib.suppress(ApiProblem):  # already gone
                        await self.assets.delete(asset.id)
                logger.info("job %s: expired", record.id)
            await self.assets.sweep(now)
            await self.store.forget_idempotency_keys(now)  # else the table only grows
            await trio.sleep(self.sweep_interval)

    def render_event(self, item: JobEventItem, base_url: str, job_id: str) -> tuple[str, Any]:
        """An event as the client gets it (an output asset as the v2 ``Output``)."""
        name, data = item
        if isinstance(data, AssetRecord):
            return name, output_json(data, base_url)
        return item

    def asset_routes(self, *, retention: float) -> list[Route]:
        """The ``/api/v2/assets...`` routes over this board's asset store."""
        return asset_routes(self.assets, retention=retention)


def _body_of(record: JobRecord) -> dict[str, Any]:
    """The submit body a stored job was made of (to run it again)."""
    body: dict[str, Any] = {"workflow": record.workflow, "metadata": record.metadata}
    if record.comfytrio is not None:
        body["comfytrio"] = record.comfytrio
    if record.webhook_url is not None:
        body["webhook_url"] = record.webhook_url
    return body


def _problem_error(problem: ApiProblem) -> dict[str, Any]:
    return {
        "code": problem.code,
        "message": problem.message,
        "node_id": None,
        "class_type": None,
        "traceback": None,
    }


def _new_id() -> str:
    import uuid

    return str(uuid.uuid4())
