"""The jobs API of later ComfyUI versions (served when the profile has ``jobs_api``).

Read from Comfy-Org/ComfyUI ``server.py`` (commit ``002c3fb9``, the 0.38 line). The routes
are registered as ``/api/jobs...`` and, like every route, also under ``/api``:

- ``GET /api/jobs``: ``{"jobs": [...], "pagination": {offset, limit, total, has_more}}``;
  query ``status`` (comma list of ``pending,in_progress,completed,failed,cancelled``),
  ``workflow_id``, ``sort_by`` (``created_at``, ``execution_duration``), ``sort_order``
  (``asc``, ``desc``: the default), ``limit`` (a positive integer), ``offset`` (negative
  counts as 0). A bad value is a 400 ``{"error": "..."}``.
- ``GET /api/jobs/{job_id}``: the job with its details, or 404 ``{"error": "Job not found"}``.
- ``POST /api/jobs/{job_id}/cancel``: interrupt it if running, drop it if pending;
  ``{"cancelled": bool}`` (200 even for a finished or unknown id).
- ``POST /api/jobs/cancel`` ``{"job_ids": [...]}``: each id as above; 400 when the body is
  not JSON, ``job_ids`` no list, or an id no canonical UUID (``invalid_ids``, nothing
  cancelled); unknown ids are no-ops (the merged code, not the pull request's 404).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ._engine import Engine, is_canonical_uuid
from ._engine_jobs import JOB_STATUSES, job_of, list_jobs

__all__ = ["JobRoutes"]


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(data), status_code=status, media_type="application/json; charset=utf-8"
    )


def _error(message: str, status: int = 400, **more: Any) -> Response:
    return _json({"error": message, **more}, status)


@dataclass
class JobRoutes:
    """The ``/api/jobs`` endpoints of one server generation (bound to its engine)."""

    engine: Engine

    def endpoints(self) -> list[tuple[str, str, Callable[[Request], Any]]]:
        """``(method, path, endpoint)`` of every jobs route."""
        return [
            ("GET", "/api/jobs", self.jobs),
            ("POST", "/api/jobs/cancel", self.cancel_many),
            ("GET", "/api/jobs/{job_id}", self.job),
            ("POST", "/api/jobs/{job_id}/cancel", self.cancel_one),
        ]

    def _snapshot(self) -> tuple[list[list[Any]], list[list[Any]], dict[str, Any]]:
        queue = self.engine.queue_snapshot()
        return queue["queue_running"], queue["queue_pending"], self.engine.history.entries

    async def jobs(self, request: Request) -> Response:
        """``GET /api/jobs``."""
        query = request.query_params
        statuses: list[str] = list(JOB_STATUSES)
        if query.get("status"):
            statuses = [s.strip().lower() for s in query["status"].split(",") if s.strip()]
            invalid = [s for s in statuses if s not in JOB_STATUSES]
            if invalid:
                return _error(
                    f"Invalid status value(s): {', '.join(invalid)}. "
                    f"Valid values: {', '.join(JOB_STATUSES)}"
                )
        sort_by = query.get("sort_by", "created_at").lower()
        if sort_by not in ("created_at", "execution_duration"):
            return _error("sort_by must be 'created_at' or 'execution_duration'")
        sort_order = query.get("sort_order", "desc").lower()
        if sort_order not in ("asc", "desc"):
            return _error("sort_order must be 'asc' or 'desc'")
        limit: int | None = None
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                return _error("limit must be an integer")
            if limit <= 0:
                return _error("limit must be a positive integer")
        offset = 0
        if "offset" in query:
            try:
                offset = max(int(query["offset"]), 0)
            except ValueError:
                return _error("offset must be an integer")
        running, pending, history = self._snapshot()
        jobs, total = list_jobs(
            running,
            pending,
            history,
            statuses=statuses,
            workflow_id=query.get("workflow_id"),
            sort_by=sort_by,
            descending=sort_order == "desc",
            limit=limit,
            offset=offset,
        )
        pagination = {
            "offset": offset,
            "limit": limit,
            "total": total,
            "has_more": offset + len(jobs) < total,
        }
        return _json({"jobs": jobs, "pagination": pagination})

    async def job(self, request: Request) -> Response:
        """``GET /api/jobs/{job_id}``."""
        job = job_of(request.path_params["job_id"], *self._snapshot())
        if job is None:
            return _error("Job not found", 404)
        return _json(job)

    async def cancel_one(self, request: Request) -> Response:
        """``POST /api/jobs/{job_id}/cancel``."""
        outcome = self.engine.cancel(request.path_params["job_id"])
        return _json({"cancelled": outcome in ("running", "pending")})

    async def cancel_many(self, request: Request) -> Response:
        """``POST /api/jobs/cancel``."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error("Request body must be valid JSON")
        job_ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(job_ids, list):
            return _error("job_ids must be a list")
        invalid = [
            jid if isinstance(jid, str) else repr(jid)
            for jid in job_ids
            if not is_canonical_uuid(jid)
        ]
        if invalid:
            return _error("job_ids contains invalid id(s)", invalid_ids=invalid)
        cancelled = False
        for jid in job_ids:
            if self.engine.cancel(jid) in ("running", "pending"):
                cancelled = True
        return _json({"cancelled": cancelled})
