"""``comfytrio serve``: the official Comfy API v2 in front of a whole ``ComfyAPI`` fleet.

Any HTTP client (Comfy-Org's ``comfy-sdk`` unchanged, curl, another language) submits,
follows, cancels and collects jobs; each job runs on the fleet, one prompt on the least
loaded server or, with a ``gpu_scale`` param in its ``comfytrio`` object, a batch split over
every server. See docs/serve.md.

The layout, top to bottom::

    _server.py   serve_comfy_api / open_serve_app: everything below in one nursery
    _app.py      build_serve_app: the Starlette routes, auth, the error envelope, SSE
    _asset_routes.py  /api/v2/assets...: upload, dedup by blake3, content with ranges
    _board.py    JobBoard: every job from submit to expiry on one ComfyAPI
    _broker_board.py  BrokerBoard: the same over a Redis Streams broker (``--broker``)
    _recovery.py what a restart does with the jobs a previous life left
    _submit.py   a POST /api/v2/jobs body, checked (the ``comfytrio`` object)
    _wire.py     jobs, outputs and errors as the spec writes them (pure)
    _store.py    SQLite (one worker thread): jobs, idempotency keys, asset records
    _assets.py   AssetStore: content-addressed blobs under the state folder
    _webhooks.py WebhookSender: Standard Webhooks, signed, retried, never blocking
    _openapi.py  the official OpenAPI document plus our additions
    _records.py, _config.py, _problems.py  the frozen values and the one refusal

It needs the ``serve`` extra (``pip install 'comfytrio[serve]'``).
"""

from __future__ import annotations

from ._app import build_serve_app as build_serve_app
from ._board import JobBoard as JobBoard
from ._config import ServeConfig as ServeConfig
from ._openapi import openapi_document as openapi_document
from ._server import ServeHandle as ServeHandle
from ._server import open_serve_app as open_serve_app
from ._server import serve_broker_api as serve_broker_api
from ._server import serve_comfy_api as serve_comfy_api

__all__ = [
    "JobBoard",
    "ServeConfig",
    "ServeHandle",
    "build_serve_app",
    "open_serve_app",
    "openapi_document",
    "serve_broker_api",
    "serve_comfy_api",
]
