"""The job board of ``serve --broker``: the same Comfy API v2 over jobs that live in Redis
Streams and run on ``comfytrio worker`` processes on any number of GPU boxes.

A front end keeps nothing a job needs: the record, the events and the outputs are in Redis
and in the shared output store, so any number of front ends answer for every job. What
differs from the in-process board:

- Validation at submit is what needs no server: the body, the ``comfytrio`` object, the
  params against the workflow (titles, inputs, types). What only a server knows (node
  classes, model names) is checked by the worker; a job it refuses ends ``failed`` with
  ``invalid_workflow``.
- ``core/ASSET`` uploads are put into the output store (``uploads/<hash>``), so the worker
  that runs the job fetches them from there; their records stay with the front end that
  took them.
- An output's asset id is derived from its store key; its content is read from the store.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from .._errors import IdempotencyKeyReusedError, JobNotFoundError, ParamError
from .._plan import validate_params
from .._plugins import Plugins
from ..broker import BrokerJob, BrokerOutput, JobQueue
from ..hookspecs import OutputStore
from ._asset_refs import resolve_asset_refs
from ._asset_routes import asset_routes, base_url_of, parse_range
from ._assets import AssetStore
from ._board import JobEventItem, Subscription
from ._problems import ApiProblem
from ._records import JobRecord
from ._submit import Submission, check_idempotency_key, key_reused, parse_submission
from ._wire import FAR_FUTURE, job_json, rfc3339, status_json

__all__ = ["BrokerBoard", "output_asset_id"]

logger = logging.getLogger("comfytrio.serve")

OUTPUT_ID_PREFIX = "out_"
"""An output's asset id is this and its store key in URL-safe base64: every front end gives
an output the same id and finds its bytes without asking anyone."""

EVENTS_BUFFER = 256


def output_asset_id(key: str) -> str:
    """The asset id of the output stored under ``key``."""
    return OUTPUT_ID_PREFIX + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def output_key(asset_id: str) -> str | None:
    """The store key of an output's asset id; None for any other id (an upload's)."""
    if not asset_id.startswith(OUTPUT_ID_PREFIX):
        return None
    text = asset_id[len(OUTPUT_ID_PREFIX) :]
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def _output_json(output: BrokerOutput, job: BrokerJob, base_url: str) -> dict[str, Any]:
    return {
        "node_id": output.node_id,
        "name": output.filename,
        "type": output.kind,
        "content_type": output.content_type,
        "size_bytes": output.size,
        "id": output_asset_id(output.key),
        "hash": None,
        "url": f"{base_url}/api/v2/assets/{output_asset_id(output.key)}/content",
        "url_expires_at": rfc3339(job.expires_at or FAR_FUTURE),
        "job_id": job.id,
    }


def _progress(
    progress: Mapping[str, Any] | None, *, succeeded: bool = False
) -> dict[str, Any] | None:
    """The broker's shard-level progress (``BrokerJob.progress``, or a ``progress``
    event's data) as a v2 ``Progress`` (nodes: shards)."""
    if progress is None:
        return None
    total = int(progress.get("shard_count") or 1)
    done = min(total, int(progress.get("shards_finished") or 0))
    if succeeded:
        done = total
    return {
        "value": round(done / max(1, total), 4),
        "nodes_done": done,
        "nodes_total": total,
        "current_node": None,
        "current_node_class": None,
        "step": None,
        "steps": None,
        "message": f"{done}/{total} shard(s) done",
    }


def _record(job: BrokerJob) -> JobRecord:
    """A ``JobRecord`` view of a broker job, for the v2 rendering."""
    return JobRecord(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        created_at=job.created_at,
        expires_at=job.expires_at or job.created_at,
        workflow=dict(job.workflow),
        started_at=job.started_at,
        completed_at=job.completed_at,
        metadata={str(k): str(v) for k, v in job.metadata.items()},
        webhook_url=job.webhook_url,
        idempotency_key=job.idempotency_key,
        progress=_progress(job.progress, succeeded=job.status == "succeeded"),
        error=dict(job.error) if job.error is not None else None,
        shard_count=int(job.progress["shard_count"]) if job.progress else None,
    )


class BrokerBoard:
    """Jobs on a Redis Streams broker: the board ``serve --broker`` answers with."""

    def __init__(
        self,
        queue: JobQueue,
        store: OutputStore,
        assets: AssetStore,
        plugins: Plugins,
        *,
        pool: str = "default",
        max_queued: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        """The broker."""
        self.store = store
        """Where workers put outputs (and this board puts uploads)."""
        self.assets = assets
        """Uploads this front end took."""
        self.plugins = plugins
        """For checking params without a server."""
        self.pool = pool
        """The pool jobs go to unless their ``comfytrio`` object names one."""
        self.max_queued = max_queued
        self.clock = clock
        self._nursery: trio.Nursery | None = None

    async def run(
        self, *, task_status: trio.TaskStatus[BrokerBoard] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Host the event followers of SSE streams until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    # ------------------------------------------------------------------ jobs

    def _job_json(self, job: BrokerJob, base_url: str) -> dict[str, Any]:
        body = job_json(_record(job), [], base_url)
        body["outputs"] = [_output_json(o, job, base_url) for o in job.outputs]
        body["comfytrio"].update(pool=job.pool, attempt=job.attempt, worker=job.worker)
        return body

    async def _get(self, job_id: str) -> BrokerJob:
        try:
            return await self.queue.get(job_id)
        except JobNotFoundError as exc:
            raise ApiProblem(404, "not_found", f"no job {job_id}") from exc

    async def job(self, job_id: str, base_url: str) -> dict[str, Any]:
        """``GET /api/v2/jobs/{id}``."""
        return self._job_json(await self._get(job_id), base_url)

    async def jobs(
        self,
        base_url: str,
        *,
        statuses: set[str] | None,
        metadata: dict[str, str] | None,
        limit: int,
        cursor: str | None,
    ) -> dict[str, Any]:
        """``GET /api/v2/jobs``."""
        found, next_cursor = await self.queue.list(
            statuses=statuses, metadata=metadata, limit=limit, cursor=cursor
        )
        page: dict[str, Any] = {"jobs": [self._job_json(j, base_url) for j in found]}
        if next_cursor is not None:
            page["next_cursor"] = next_cursor
        return page

    async def workflow(self, job_id: str) -> dict[str, Any]:
        """``GET .../workflow``."""
        job = await self._get(job_id)
        if job.status == "expired":
            raise ApiProblem(404, "not_found", f"job {job_id} has expired")
        return {"workflow": dict(job.workflow), "format": "api"}

    async def logs(self, job_id: str) -> list[str]:
        """``GET .../logs``: the attempts and what ended them."""
        job = await self._get(job_id)
        lines = []
        if job.attempt > 1:
            lines.append(f"attempt {job.attempt} (by {job.worker})")
        if job.last_error:
            lines.append(f"an earlier attempt did not end it: {job.last_error}")
        if job.error is not None:
            lines.append(f"{job.error.get('code')}: {job.error.get('message')}")
        return lines

    async def cancel(self, job_id: str, base_url: str) -> dict[str, Any]:
        """``POST .../cancel``."""
        try:
            job = await self.queue.cancel(job_id)
        except JobNotFoundError as exc:
            raise ApiProblem(404, "not_found", f"no job {job_id}") from exc
        return self._job_json(job, base_url)

    async def health(self) -> dict[str, Any]:
        """``GET /api/v2/health``: the workers the broker knows (their heartbeats)."""
        known = await self.queue.workers()
        workers = [
            {"name": w.name, "url": f"worker:{w.name}", "state": "ready" if w.capacity else "busy"}
            for w in known
        ]
        return {
            "status": "ok" if workers else "degraded",
            "version": __version__,
            "servers": workers,
            "queued": await self.queue.pending(self.pool),
            "running": sum(w.busy for w in known),
        }

    async def submit(
        self, body: Any, *, idempotency_key: str | None, base_url: str
    ) -> dict[str, Any]:
        """``POST /api/v2/jobs`` onto the broker."""
        check_idempotency_key(idempotency_key)
        submission = parse_submission(body)
        if submission.webhook_url is not None:
            # Why refused: no one process sees every job end here; a silent drop would be worse.
            raise ApiProblem(
                422,
                "invalid_request",
                "webhook_url: serve --broker sends no webhooks yet; follow the job's events",
                details={"field": "webhook_url"},
            )
        workflow, params = await resolve_asset_refs(submission, self.assets)
        params = await self._shared_uploads(params, submission)
        try:
            validate_params(self.plugins, workflow, params)
        except ParamError as exc:
            raise ApiProblem(
                422, "invalid_workflow", str(exc), details={"param": exc.param}
            ) from exc
        pending = await self.queue.pending(self.pool)
        if pending >= self.max_queued:
            raise ApiProblem(
                429,
                "queue_full",
                f"{pending} jobs wait in pool {self.pool!r}, the most this server takes",
                retry_after=5,
            )
        try:
            job_id = await self.queue.submit(
                workflow,
                **submission.options(params),
                pool=self.pool,
                timeout=submission.timeout,
                idempotency_key=idempotency_key,
                metadata=submission.metadata,
            )
        except IdempotencyKeyReusedError as exc:
            raise key_reused() from exc
        return self._job_json(await self.queue.get(job_id), base_url)

    async def _shared_uploads(
        self, params: dict[str, dict[str, Any]], submission: Submission
    ) -> dict[str, dict[str, Any]]:
        """Each asset param's blob put into the output store; its value becomes what a
        worker can read (a ``file://`` store's path, else its URL)."""
        shared = dict(params)
        for name, param in params.items():
            if not name.startswith("core/ASSET "):
                continue
            blob = Path(param["value"])
            stored = await self.store.put(
                f"uploads/{blob.name}", blob, content_type="application/octet-stream"
            )
            url = urlsplit(stored.url)
            value = unquote(url.path) if url.scheme == "file" else stored.url
            shared[name] = {**param, "value": value}
        return shared

    async def subscribe(self, job_id: str) -> Subscription:
        """The job's snapshot and what comes next, from its event stream in Redis."""
        job = await self._get(job_id)
        snapshot: list[JobEventItem] = [("status", status_json(_record(job), None))]
        progress = _progress(job.progress, succeeded=job.status == "succeeded")
        if progress is not None:
            snapshot.append(("progress", progress))
        if job.terminal or self._nursery is None:
            return Subscription(snapshot, None, lambda: None)
        send, receive = trio.open_memory_channel[JobEventItem](EVENTS_BUFFER)
        scope = trio.CancelScope()

        async def follow() -> None:
            with scope, send:
                async for update in self.queue.events(job_id):
                    if update.kind == "status":
                        item: JobEventItem = ("status", {"status": update.data["status"]})
                    elif update.kind == "output":
                        item = ("output_json", dict(update.data))
                    elif update.kind == "progress":
                        item = ("progress", _progress(update.data))
                    else:
                        continue
                    try:
                        send.send_nowait(item)
                    except trio.WouldBlock:
                        return  # too slow: the client reconnects for a new snapshot

        self._nursery.start_soon(follow)

        def close() -> None:
            scope.cancel()
            receive.close()

        return Subscription(snapshot, receive, close)

    def render_event(self, item: JobEventItem, base_url: str, job_id: str) -> tuple[str, Any]:
        """An event as the client gets it (an output with its asset id and URL)."""
        name, data = item
        if name != "output_json":
            return item
        output = BrokerOutput.from_json(data)
        asset_id = output_asset_id(output.key)
        return (
            "output",
            {
                "node_id": output.node_id,
                "name": output.filename,
                "type": output.kind,
                "content_type": output.content_type,
                "size_bytes": output.size,
                "id": asset_id,
                "hash": None,
                "url": f"{base_url}/api/v2/assets/{asset_id}/content",
                "url_expires_at": rfc3339(self.clock() + 86400),
                "job_id": job_id,
            },
        )

    # ------------------------------------------------------------------ assets

    async def _output(self, asset_id: str) -> BrokerOutput | None:
        """The output with that asset id, if a job has it (else None: maybe an upload).
        Only keys a job reports are read: an id cannot name anything else in the store."""
        key = output_key(asset_id)
        if key is None:
            return None
        try:
            job = await self.queue.get(key.split("/", 1)[0])
        except JobNotFoundError:
            raise ApiProblem(404, "not_found", f"no asset {asset_id}") from None
        found = next((o for o in job.outputs if o.key == key), None)
        if found is None or job.status == "expired":
            raise ApiProblem(404, "not_found", f"no asset {asset_id}")
        return found

    def asset_routes(self, *, retention: float) -> list[Route]:
        """The asset routes: uploads from the local store, outputs from the output store."""
        local = asset_routes(self.assets, retention=retention)
        by_path = {(r.path, m): r.endpoint for r in local for m in (r.methods or ())}

        async def content(request: Request) -> Response:
            output = await self._output(request.path_params["id"])
            if output is None:
                answer: Response = await by_path[("/api/v2/assets/{id}/content", "GET")](request)
                return answer
            data = await self.store.get(output.key)
            headers = {"Accept-Ranges": "bytes", "Content-Type": output.content_type}
            wanted = request.headers.get("range")
            span = parse_range(wanted, len(data)) if wanted else None
            if span is False:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
            if isinstance(span, tuple):
                first, last = span
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                return Response(data[first : last + 1], status_code=206, headers=headers)
            return Response(data, headers=headers)

        async def metadata(request: Request) -> Response:
            output = await self._output(request.path_params["id"])
            if output is None:
                found: Response = await by_path[("/api/v2/assets/{id}", "GET")](request)
                return found
            base = base_url_of(request)
            asset_id = request.path_params["id"]
            return JSONResponse(
                {
                    "id": asset_id,
                    "hash": None,
                    "size_bytes": output.size,
                    "content_type": output.content_type,
                    "file_path": output.filename,
                    "created_at": rfc3339(self.clock()),
                    "url": f"{base}/api/v2/assets/{asset_id}/content",
                    "url_expires_at": rfc3339(self.clock() + 86400),
                    "expires_at": None,
                    "job_id": output.key.split("/", 1)[0],
                }
            )

        return [
            Route("/api/v2/assets/{id}/content", content, methods=["GET"]),
            Route("/api/v2/assets/{id}", metadata, methods=["GET"]),
            *local,
        ]
