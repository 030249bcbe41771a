"""``serve`` as a trio service: the store, the asset store, the webhooks, the job board and
the HTTP server (Hypercorn's trio worker), all in one nursery."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Generic, TypeVar

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette

from .._api import ComfyAPI
from .._plugins import Plugins
from ..hookspecs import OutputStore
from ._app import Board, build_serve_app
from ._assets import AssetStore
from ._board import JobBoard

if TYPE_CHECKING:
    from ._broker_board import BrokerBoard
from ._config import ServeConfig
from ._store import open_store
from ._webhooks import WebhookSender, load_or_make_secret

__all__ = [
    "ServeHandle",
    "check_bind",
    "open_serve_app",
    "serve_broker_api",
    "serve_comfy_api",
]

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


B = TypeVar("B", bound=Board)


@attrs.frozen
class ServeHandle(Generic[B]):
    """A running ``serve``."""

    url: str
    """Where it listens, e.g. ``http://127.0.0.1:8189``."""
    board: B
    """Its jobs (a ``JobBoard``, or a ``BrokerBoard`` with ``--broker``)."""
    app: Starlette
    """Its ASGI app."""


def _hypercorn_config(config: ServeConfig) -> HypercornConfig:
    hconfig = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hconfig.bind = [f"{host}:{config.port}"]
    hconfig.accesslog = None
    hconfig.errorlog = logging.getLogger("comfytrio.serve.hypercorn")
    hconfig.graceful_timeout = 2.0
    return hconfig


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
    task_status: trio.TaskStatus[ServeHandle[JobBoard]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Comfy API v2 over ``api`` (entered already) until cancelled; with
    ``nursery.start`` it returns a ``ServeHandle`` once it listens (``config.port`` 0: any
    free port). Raises ``ValueError`` for a non-loopback host without a token, ``OSError``
    when it cannot listen."""
    check_bind(config)
    async with open_serve_app(api, config) as board:
        app = build_serve_app(board, config)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn_serve, app, _hypercorn_config(config))
            url = binds[0]
            logger.info("serving the Comfy API v2 on %s", url)
            task_status.started(ServeHandle(url, board, app))


async def serve_broker_api(
    broker_url: str,
    store: OutputStore,
    config: ServeConfig,
    *,
    plugins: Plugins,
    pool: str = "default",
    prefix: str = "comfytrio",
    task_status: trio.TaskStatus[ServeHandle[BrokerBoard]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Comfy API v2 over the jobs of a Redis Streams broker (``serve --broker``)
    until cancelled: jobs go to ``pool`` and run on ``comfytrio worker`` processes, whose
    outputs are read from ``store``. Uploads are kept in ``config.state_dir`` and put into
    ``store`` for the workers. Raises as ``serve_comfy_api``, and ``BrokerUnavailableError``
    when the broker cannot be reached."""
    from ..broker import open_job_queue  # the broker extra (coredis), only when asked for
    from ._broker_board import BrokerBoard as Board_

    check_bind(config)
    state = config.state_dir
    await trio.Path(state).mkdir(parents=True, exist_ok=True)
    async with (
        open_job_queue(broker_url, prefix=prefix, retention=config.retention) as queue,
        open_store(state / STORE_FILE) as local,
        trio.open_nursery() as nursery,
    ):
        assets = AssetStore(local, state / "assets", max_bytes=config.max_upload_bytes)
        board = Board_(queue, store, assets, plugins, pool=pool, max_queued=config.max_queued)
        await nursery.start(board.run)
        app = build_serve_app(board, config)
        binds = await nursery.start(hypercorn_serve, app, _hypercorn_config(config))
        logger.info("serving the Comfy API v2 on %s over the broker %s", binds[0], broker_url)
        task_status.started(ServeHandle(binds[0], board, app))
