"""The ASGI app of one server generation: a Starlette app of the HTTP routes
(``_server_routes``) and ``/ws`` (``_server_ws``), every route also under ``/api``, aiohttp's
plain 404/405 texts, wrapped in the hostile answers (``_server_hostile``) and the gate that
holds every request while the server hangs. Hypercorn serves it (``_fake_serving``).

What the server says about itself (version, ``/system_stats``) is in ``_server_system``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ._engine import Engine
from ._faults import Gate
from ._server_hostile import HostileAnswers
from ._server_routes import HttpRoutes
from ._server_system import COMFYUI_VERSION, SystemInfo
from ._server_ws import SocketEndpoint, SocketHub

__all__ = ["COMFYUI_VERSION", "SystemInfo", "build_app"]


class _Gatekeeper:
    """ASGI middleware: HTTP requests wait while the server hangs."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.gate.wait_open()
        await self.app(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    code = exc.status_code if isinstance(exc, HTTPException) else 500
    text = {404: "Not Found", 405: "Method Not Allowed"}.get(code, "Error")
    return PlainTextResponse(f"{code}: {text}", status_code=code)


def build_app(engine: Engine, hub: SocketHub, system: SystemInfo) -> ASGIApp:
    """The ASGI app of one server generation (``hub`` holds its websockets)."""
    faults = engine.state.faults
    websocket = SocketEndpoint(engine, hub, faults.gate)
    routes = [WebSocketRoute("/ws", websocket.serve), *HttpRoutes(engine, system).routes()]
    app: ASGIApp = Starlette(
        routes=[*routes, Mount("/api", routes=routes)],
        exception_handlers={404: _not_found, 405: _not_found},
    )
    return _Gatekeeper(HostileAnswers(app, faults.hostile, faults.gate), faults.gate)
