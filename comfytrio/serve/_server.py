"""``serve`` as a trio service: the store, the asset store, the webhooks, the job board and
the HTTP server (Hypercorn's trio worker), all in one nursery."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette

from .._api import ComfyAPI
from ._app import build_serve_app
from ._assets import AssetStore
from ._board import JobBoard
from ._config import ServeConfig
from ._store import open_store
from ._webhooks import WebhookSender, load_or_make_secret

__all__ = ["ServeHandle", "check_bind", "open_serve_app", "serve_comfy_api"]

logger = logging.getLogger("comfytrio.serve")

STORE_FILE = "serve.sqlite3"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(config: ServeConfig) -> None:
    """Refuse (``ValueError``) to listen beyond this machine without a bearer token."""
    if not _is_loopback(config.host) and not config.token:
        raise ValueError(
            f"serve listens on {config.host}, beyond this machine, only with a bearer token "
            "(--token, or COMFYTRIO_SERVE_TOKEN): anyone who reaches it could run workflows"
        )


@attrs.frozen
class ServeHandle:
    """A running ``serve``."""

    url: str
    """Where it listens, e.g. ``http://127.0.0.1:8189``."""
    board: JobBoard
    """Its jobs."""
    app: Starlette
    """Its ASGI app."""


@asynccontextmanager
async def open_serve_app(api: ComfyAPI, config: ServeConfig) -> AsyncIterator[JobBoard]:
    """Open the store in ``config.state_dir``, the asset store, the webhook sender and the
    job board over ``api`` (entered already); yield the board (``build_serve_app(board,
    config)`` is the ASGI app to mount). Leaving the block cancels every job still running
    (their prompts are removed from the servers; the store keeps them ``canceling``... or as
    they were, and the next start finishes them)."""
    state = config.state_dir
    await trio.Path(state).mkdir(parents=True, exist_ok=True)
    async with open_store(state / STORE_FILE) as store:
        assets = AssetStore(store, state / "assets", max_bytes=config.max_upload_bytes)
        secret = await load_or_make_secret(state, config.webhook_secret)
        webhooks = WebhookSender(secret=secret, default_url=config.webhook_url)
        async with trio.open_nursery() as nursery:
            await nursery.start(webhooks.run)
            board = JobBoard(
                api,
                store,
                assets,
                webhooks=webhooks,
                max_queued=config.max_queued,
                retention=config.retention,
                idempotency_ttl=config.idempotency_ttl,
                progress_interval=config.progress_interval,
            )
            await nursery.start(board.run)
            try:
                yield board
            finally:
                nursery.cancel_scope.cancel()


async def serve_comfy_api(
    api: ComfyAPI,
    config: ServeConfig,
    *,
    task_status: trio.TaskStatus[ServeHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Comfy API v2 over ``api`` (entered already) until cancelled; with
    ``nursery.start`` it returns a ``ServeHandle`` once it listens (``config.port`` 0: any
    free port). Raises ``ValueError`` for a non-loopback host without a token, ``OSError``
    when it cannot listen."""
    check_bind(config)
    async with open_serve_app(api, config) as board:
        app = build_serve_app(board, config)
        hconfig = HypercornConfig()
        host = f"[{config.host}]" if ":" in config.host else config.host
        hconfig.bind = [f"{host}:{config.port}"]
        hconfig.accesslog = None
        hconfig.errorlog = logging.getLogger("comfytrio.serve.hypercorn")
        hconfig.graceful_timeout = 2.0
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn_serve, app, hconfig)
            url = binds[0]
            logger.info("serving the Comfy API v2 on %s", url)
            task_status.started(ServeHandle(url, board, app))
