"""The ASGI app of ``serve``: the Comfy API v2 routes over a ``JobBoard`` (Starlette).

Every refusal is the spec's error envelope (``ApiProblem``); an unexpected error is a 500
``upstream_error`` whose message says nothing of the internals (they go to the log). With a
token configured, every request needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, Protocol

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ._asset_routes import base_url_of
from ._board import JobEventItem, Subscription
from ._config import ServeConfig
from ._openapi import openapi_json_route
from ._problems import ApiProblem, error_envelope

__all__ = ["build_serve_app"]

logger = logging.getLogger("comfytrio.serve")

STATUSES = {"queued", "running", "succeeded", "canceling", "canceled", "failed", "expired"}
MAX_LIMIT = 200
_METADATA_KEY = re.compile(r"metadata\[(.+)\]")


class Board(Protocol):
    """What the app serves: ``JobBoard`` (jobs on a ``ComfyAPI`` in this process) or
    ``BrokerBoard`` (jobs on a Redis Streams broker)."""

    async def submit(
        self, body: Any, *, idempotency_key: str | None, base_url: str
    ) -> dict[str, Any]: ...
    async def jobs(
        self,
        base_url: str,
        *,
        statuses: set[str] | None,
        metadata: dict[str, str] | None,
        limit: int,
        cursor: str | None,
    ) -> dict[str, Any]: ...
    async def job(self, job_id: str, base_url: str) -> dict[str, Any]: ...
    async def workflow(self, job_id: str) -> dict[str, Any]: ...
    async def logs(self, job_id: str) -> list[str]: ...
    async def cancel(self, job_id: str, base_url: str) -> dict[str, Any]: ...
    async def health(self) -> dict[str, Any]: ...
    async def subscribe(self, job_id: str) -> Subscription: ...
    def render_event(self, item: JobEventItem, base_url: str, job_id: str) -> tuple[str, Any]: ...
    def asset_routes(self, *, retention: float) -> list[Route]: ...


def _problem_response(problem: ApiProblem) -> JSONResponse:
    headers = {"Retry-After": str(problem.retry_after)} if problem.retry_after else None
    if problem.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(problem.envelope(), status_code=problem.status, headers=headers)


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiProblem)
    return _problem_response(exc)


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    message = {
        404: f"no route {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_envelope(code, message), status_code=exc.status_code)


async def _on_error(request: Request, exc: Exception) -> Response:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_envelope("upstream_error", "the server failed to process the request"),
        status_code=500,
    )


class BearerAuth:
    """Refuse (401 ``unauthorized``) a request without ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                problem = ApiProblem(
                    401, "unauthorized", "missing or wrong 'Authorization: Bearer <token>'"
                )
                await _problem_response(problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        # 422, not 400: the spec's POST /api/v2/jobs answers every validation failure so.
        raise ApiProblem(422, "invalid_request", f"the body is not JSON: {exc}") from exc


def _list_query(request: Request) -> dict[str, Any]:
    query = request.query_params
    statuses = None
    if query.get("status"):
        statuses = {s.strip() for s in query["status"].split(",") if s.strip()}
        unknown = statuses - STATUSES
        if unknown:
            raise ApiProblem(
                400,
                "invalid_request",
                f"status: unknown {', '.join(sorted(unknown))}; known: "
                f"{', '.join(sorted(STATUSES))}",
            )
    limit = 50
    if "limit" in query:
        text = query["limit"]
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            raise ApiProblem(
                400, "invalid_request", f"limit must be an integer 1..{MAX_LIMIT}, got {text!r}"
            )
        limit = int(text)
    metadata: dict[str, str] = {}
    for key, value in query.multi_items():
        match = _METADATA_KEY.fullmatch(key)
        if match:
            metadata[match.group(1)] = value
    return {
        "statuses": statuses,
        "metadata": metadata or None,
        "limit": limit,
        "cursor": query.get("cursor") or None,
    }


def _sse(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def build_serve_app(board: Board, config: ServeConfig) -> Starlette:
    """The Starlette app serving ``board`` as the Comfy API v2 (plus the assets of
    ``board.assets``, ``/api/v2/health`` and ``/api/v2/openapi.json``). It runs on trio
    (Hypercorn's trio worker) inside the nursery where ``board.run`` runs."""

    async def submit(request: Request) -> Response:
        body = await _json_body(request)
        job = await board.submit(
            body,
            idempotency_key=request.headers.get("idempotency-key"),
            base_url=base_url_of(request),
        )
        return JSONResponse(job, status_code=201)

    async def list_jobs(request: Request) -> Response:
        return JSONResponse(await board.jobs(base_url_of(request), **_list_query(request)))

    async def get_job(request: Request) -> Response:
        return JSONResponse(await board.job(request.path_params["id"], base_url_of(request)))

    async def get_workflow(request: Request) -> Response:
        return JSONResponse(await board.workflow(request.path_params["id"]))

    async def get_logs(request: Request) -> Response:
        lines = await board.logs(request.path_params["id"])
        if not lines:
            return Response(status_code=204)
        return PlainTextResponse("\n".join(lines) + "\n")

    async def cancel(request: Request) -> Response:
        return JSONResponse(await board.cancel(request.path_params["id"], base_url_of(request)))

    async def health(request: Request) -> Response:
        return JSONResponse(await board.health())

    async def events(request: Request) -> Response:
        job_id = request.path_params["id"]
        base = base_url_of(request)
        subscription = await board.subscribe(job_id)  # a 404 before the stream starts
        snapshot, channel = subscription.snapshot, subscription.events

        def encode(item: JobEventItem) -> bytes:
            return _sse(*board.render_event(item, base, job_id))

        async def stream() -> AsyncIterator[bytes]:
            try:
                for item in snapshot:
                    yield encode(item)
                if channel is None:
                    return
                while True:
                    with trio.move_on_after(config.keepalive) as idle:
                        item = await channel.receive()
                    if idle.cancelled_caught:
                        yield b": keepalive\n\n"
                        continue
                    yield encode(item)
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            finally:
                subscription.close()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    routes = [
        Route("/api/v2/health", health, methods=["GET"]),
        openapi_json_route(),
        Route("/api/v2/jobs", submit, methods=["POST"]),
        Route("/api/v2/jobs", list_jobs, methods=["GET"]),
        Route("/api/v2/jobs/{id}", get_job, methods=["GET"]),
        Route("/api/v2/jobs/{id}/workflow", get_workflow, methods=["GET"]),
        Route("/api/v2/jobs/{id}/logs", get_logs, methods=["GET"]),
        Route("/api/v2/jobs/{id}/events", events, methods=["GET"]),
        Route("/api/v2/jobs/{id}/cancel", cancel, methods=["POST"]),
        *board.asset_routes(retention=config.retention),
    ]
    middleware = [Middleware(BearerAuth, token=config.token)] if config.token else []
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            ApiProblem: _on_problem,
            HTTPException: _on_http,
            Exception: _on_error,
        },
    )
