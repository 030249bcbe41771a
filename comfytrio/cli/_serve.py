"""``comfytrio serve``: the Comfy API v2 over HTTP in front of every server ``run`` takes
(``--comfyui``, ``--url``) or, to try it, ``--fake N`` bundled fake servers in this process.

It runs until SIGINT or SIGTERM; then running jobs are cancelled on their servers and left
``canceling`` in the state folder, which the next start finishes.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import trio

from .. import ComfyAPIError, make_plugin_manager
from .._errors import unwrapped
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_flag,
    add_number,
    add_path,
    err,
    has_extra,
    logger,
    setup_logging,
)
from ._fleet import (
    add_fleet_arguments,
    check_fleet_arguments,
    fleet_api,
    watch_stop_signals,
)

__all__ = ["add_serve_arguments", "serve"]

TOKEN_VARIABLE = "COMFYTRIO_SERVE_TOKEN"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Every argument of ``comfytrio serve``."""
    group = parser.add_argument_group("serve")
    group.add_argument(
        "--bind",
        default="127.0.0.1:8189",
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:8189; port 0: any free one). Another host "
        "than a loopback address needs --token",
    )
    group.add_argument(
        "--token",
        default=None,
        help=f"a bearer token every request must carry (default ${TOKEN_VARIABLE})",
    )
    add_path(
        group,
        "--serve-dir",
        "DIR",
        "where jobs, keys, uploads and outputs are kept (default ./comfytrio-serve)",
    )
    add_number(group, "--max-queued", int, 1000, "jobs queued or running at once (then 429)")
    add_number(
        group,
        "--retention",
        float,
        24 * 3600.0,
        "seconds a job and its outputs are kept (default a day)",
        metavar="S",
    )
    group.add_argument("--webhook-url", help="where every job's terminal status is posted")
    group.add_argument(
        "--webhook-secret",
        help="the Standard Webhooks secret (whsec_...; default: one made and kept in "
        "DIR/webhook-secret)",
    )
    add_flag(group, "--print-url", "print the URL on stdout once it listens (for scripts)")
    broker = parser.add_argument_group(
        "jobs on a Redis Streams broker, run by `comfytrio worker` (instead of a fleet here)"
    )
    broker.add_argument(
        "--broker", metavar="URL", help="the Redis server, e.g. redis://redis-host:6379/0"
    )
    broker.add_argument(
        "--outputs",
        metavar="URL",
        help="the workers' output store (file:///shared/outputs, s3://bucket/prefix?...)",
    )
    broker.add_argument(
        "--pool", default="default", help="the pool submitted jobs go to (default 'default')"
    )
    broker.add_argument("--prefix", default="comfytrio", help="the broker's key prefix")
    add_fleet_arguments(parser, "--serve-dir")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")


def _bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"--bind expects HOST:PORT, e.g. 127.0.0.1:8189, got {text!r}")
    return host.strip("[]"), int(port)


async def _serve(args: argparse.Namespace, config: object) -> None:
    from ..serve import ServeConfig, serve_broker_api, serve_comfy_api

    assert isinstance(config, ServeConfig)
    async with trio.open_nursery() as nursery:
        stopped = await nursery.start(watch_stop_signals, "serve")
        if args.broker:
            plugins = make_plugin_manager()
            store = plugins.open_output_store(args.outputs)
            handle = await nursery.start(
                partial(
                    serve_broker_api,
                    args.broker,
                    store,
                    config,
                    plugins=plugins,
                    pool=args.pool,
                    prefix=args.prefix,
                )
            )
            if args.print_url:
                print(handle.url, flush=True)
            await stopped.wait()
        else:
            api = await fleet_api(args, config.state_dir, nursery)
            async with api:
                handle = await nursery.start(serve_comfy_api, api, config)
                logger.info("comfytrio serve: %s, %d server(s)", handle.url, len(api.instances))
                if args.print_url:
                    print(handle.url, flush=True)
                await stopped.wait()
        nursery.cancel_scope.cancel()


def serve(args: argparse.Namespace) -> int:
    """``comfytrio serve``: serve until SIGINT or SIGTERM."""
    setup_logging(args.verbose + 1)
    if not has_extra("comfytrio serve", "serve", "comfytrio.serve"):
        return EXIT_USAGE
    if args.broker and not has_extra("--broker", "broker", "comfytrio.broker"):
        return EXIT_USAGE
    from ..serve import ServeConfig
    from ..serve._server import check_bind

    try:
        host, port = _bind(args.bind)
        check_fleet_arguments(args)
        if args.broker and (args.fake or args.comfyui is not None or args.url):
            raise UsageError(
                "--broker serves jobs that `comfytrio worker` runs: leave out --fake, "
                "--comfyui and --url"
            )
        if bool(args.broker) != bool(args.outputs):
            raise UsageError("--broker and --outputs go together")
        config = ServeConfig(
            state_dir=(args.serve_dir or Path.cwd() / "comfytrio-serve").resolve(),
            host=host,
            port=port,
            token=args.token or os.environ.get(TOKEN_VARIABLE) or None,
            max_queued=args.max_queued,
            retention=args.retention,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
        )
        check_bind(config)
    except (UsageError, ValueError) as exc:
        err(f"comfytrio serve: error: {exc}")
        return EXIT_USAGE
    try:
        with unwrapped():
            trio.run(_serve, args, config)
    except UsageError as exc:
        err(f"comfytrio serve: error: {exc}")
        return EXIT_USAGE
    except ComfyAPIError as exc:
        err(f"comfytrio serve: {exc}")
        return EXIT_FAILED
    except OSError as exc:
        err(f"comfytrio serve: cannot listen on {args.bind}: {exc}")
        return EXIT_FAILED
    return EXIT_OK
