"""The HTTP routes of the fake, after ComfyUI 0.3.64 (``01_idle_gets.json`` ... ``18_...``).

Each route is one method of ``HttpRoutes``, marked with the method and path it answers
(``@_route("POST", "/queue")``), or, for a GET that answers a value as JSON, one line of
``HttpRoutes._snapshots``; ``build_app`` mounts them at the root and under ``/api``. A
server whose profile has the jobs API gets ``_server_jobs``' routes too.
Status codes, content types and bodies follow the recordings; errors a real server turns
into aiohttp's bare 500 (a body that is not JSON, ``"prompt"`` being a list) get the same
``500 Internal Server Error`` text here.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from ._engine import Engine, member
from ._paths import disk_work
from ._server_files import store_upload, view_file
from ._server_jobs import JobRoutes
from ._server_system import SERVER_FEATURES, SystemInfo

__all__ = ["HttpRoutes"]

logger = logging.getLogger("comfytrio.testing")

_ERROR_500 = "500 Internal Server Error\n\nServer got itself in trouble"

Endpoint = Callable[[Request], Awaitable[Response]]
"""A route's answer to a request."""

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Response]])

_ROUTES: list[tuple[str, str, str]] = []
"""(method, path, name of the ``HttpRoutes`` method), in the order they are defined."""


def _route(method: str, path: str) -> Callable[[_Handler], _Handler]:
    """Mark an ``HttpRoutes`` method as the answer to ``method path``."""

    def mark(handler: _Handler) -> _Handler:
        _ROUTES.append((method, path, handler.__name__))
        return handler

    return mark


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(data), status_code=status, media_type="application/json; charset=utf-8"
    )


def _empty(status: int = 200) -> Response:
    return Response(status_code=status)


def _aiohttp_errors(endpoint: Endpoint) -> Endpoint:
    """Answer any exception like aiohttp does: a bare 500 text."""

    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception:
            logger.info(
                "fake ComfyUI: %s %s -> 500", request.method, request.url.path, exc_info=True
            )
            return PlainTextResponse(_ERROR_500, status_code=500)

    return wrapper


def _snapshot(get: Callable[[], Any]) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return _json(get())

    return endpoint


def _clear_and_delete(
    body: Any, clear: Callable[[], object], delete: Callable[[Any], object]
) -> None:
    """``POST /queue`` and ``POST /history``: ``{"clear": true}``, then ``{"delete": [ids]}``."""
    if member(body, "clear", False):
        clear()
    if "delete" in body:
        for prompt_id in body["delete"]:
            delete(prompt_id)


@dataclass
class HttpRoutes:
    """The HTTP endpoints of one server generation (bound to its engine)."""

    engine: Engine
    system: SystemInfo

    def routes(self) -> list[BaseRoute]:
        """Every route, each answering exceptions with aiohttp's 500."""
        endpoints = [(method, path, getattr(self, name)) for method, path, name in _ROUTES]
        if self.engine.state.profile.jobs_api:
            endpoints += JobRoutes(self.engine).endpoints()
        endpoints += [("GET", path, _snapshot(get)) for path, get in self._snapshots().items()]
        return [
            Route(path, _aiohttp_errors(endpoint), methods=[method])
            for method, path, endpoint in endpoints
        ]

    def _snapshots(self) -> dict[str, Callable[[], Any]]:
        """The GET routes that answer what a function returns now, as JSON."""
        return {
            "/system_stats": self.system.stats,
            "/features": SERVER_FEATURES.copy,
            "/prompt": self.engine.queue_info,
            "/queue": self.engine.queue_snapshot,
            "/models": self.engine.state.paths.model_folder_names,
        }

    # -- nodes and models --------------------------------------------------------------------

    @_route("GET", "/object_info")
    async def object_info(self, request: Request) -> Response:
        state = self.engine.state
        return _json(await disk_work(state.registry.object_info, state.paths))

    @_route("GET", "/object_info/{node_class}")
    async def object_info_node(self, request: Request) -> Response:
        name = request.path_params["node_class"]
        node = self.engine.state.registry.get(name)
        if node is None:
            return _json({})
        return _json({name: await disk_work(node.object_info, self.engine.state.paths)})

    @_route("GET", "/models/{folder}")
    async def models_folder(self, request: Request) -> Response:
        paths = self.engine.state.paths
        files = await disk_work(paths.list_models, request.path_params["folder"])
        if files is None:
            return _empty(404)
        return _json(files)

    # -- queue and prompts ---------------------------------------------------------------------

    @_route("POST", "/prompt")
    async def post_prompt(self, request: Request) -> Response:
        body = await request.json()
        status, answer = self.engine.post_prompt(body)
        return _json(answer, status)

    @_route("POST", "/queue")
    async def post_queue(self, request: Request) -> Response:
        body = await request.json()
        _clear_and_delete(body, self.engine.clear_queue, self.engine.delete_queued)
        return _empty()

    @_route("POST", "/interrupt")
    async def interrupt(self, request: Request) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        self.engine.interrupt(body.get("prompt_id"))
        return _empty()

    @_route("POST", "/free")
    async def free(self, request: Request) -> Response:
        body = await request.json()
        unload = body.get("unload_models", False)
        free_memory = body.get("free_memory", False)
        if unload:
            self.engine.set_flag("unload_models", unload)
        if free_memory:
            self.engine.set_flag("free_memory", free_memory)
        return _empty()

    # -- history -----------------------------------------------------------------------------

    @_route("GET", "/history")
    async def history(self, request: Request) -> Response:
        max_items = request.query_params.get("max_items")
        offset = request.query_params.get("offset")
        return _json(
            self.engine.history.page(
                int(max_items) if max_items is not None else None,
                int(offset) if offset is not None else -1,
            )
        )

    @_route("GET", "/history/{prompt_id}")
    async def history_item(self, request: Request) -> Response:
        return _json(self.engine.history.answer(request.path_params["prompt_id"]))

    @_route("POST", "/history")
    async def post_history(self, request: Request) -> Response:
        body = await request.json()
        history = self.engine.history
        _clear_and_delete(body, history.clear, history.delete)
        return _empty()

    # -- files -------------------------------------------------------------------------------

    @_route("GET", "/view")
    async def view(self, request: Request) -> Response:
        query = request.query_params
        if "filename" not in query:
            return _empty(404)
        found = await disk_work(view_file, self.engine.state.paths, dict(query))
        if isinstance(found, int):
            return _empty(found)
        body, content_type, name = found
        return Response(
            body, media_type=content_type, headers={"Content-Disposition": f'filename="{name}"'}
        )

    @_route("POST", "/upload/image")
    async def upload_image(self, request: Request) -> Response:
        paths = self.engine.state.paths
        async with request.form() as form:
            image = form.get("image")
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            if paths.directory_by_type(fields.get("type") or "input") is None:
                raise UnboundLocalError("cannot access local variable 'type_dir'")
            if image is None or image == "":
                return _empty(400)
            if not isinstance(image, UploadFile):
                raise TypeError("'str' object has no attribute 'file'")
            data = await image.read()
            filename = image.filename or ""
        answer = await disk_work(store_upload, paths, filename, data, fields)
        if isinstance(answer, int):
            return _empty(answer)
        return _json(answer)
