"""``comfytrio worker``: one GPU box's worker of a Redis Streams broker.

It drives the box's ComfyUI servers (``run``'s instance options, or ``--fake N``), pulls jobs
from the broker only as fast as they free up, runs them, puts their outputs into the output
store every front end reads (``--outputs``), and acknowledges a job only once its outputs
are stored. SIGTERM stops it gracefully: it reads no more jobs, lets the running ones finish
for ``--grace`` seconds, then hands them back to the other workers.
"""

from __future__ import annotations

import argparse
import os
import socket
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
    setup_logging,
)
from ._fleet import (
    add_fleet_arguments,
    check_fleet_arguments,
    fleet_api,
    watch_stop_signals,
)

__all__ = ["add_worker_arguments", "worker"]


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Every argument of ``comfytrio worker``."""
    group = parser.add_argument_group("broker")
    group.add_argument(
        "--broker",
        required=True,
        metavar="URL",
        help="the Redis (or Valkey) server, e.g. redis://redis-host:6379/0",
    )
    group.add_argument(
        "--outputs",
        required=True,
        metavar="URL",
        help="where job outputs go, read by every front end: file:///shared/outputs (a "
        "folder every box mounts) or s3://bucket/prefix?endpoint_url=...",
    )
    group.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="NAME",
        help="take jobs of this pool (repeat; default: the pool 'default'), e.g. sdxl",
    )
    group.add_argument("--name", help="this worker's name (default: the host name and pid)")
    add_number(
        group,
        "--lease",
        float,
        30.0,
        "seconds a job stays ours without a heartbeat; another worker claims it after "
        "(default 30; extended while it runs)",
        metavar="S",
    )
    add_number(
        group,
        "--max-attempts",
        int,
        3,
        "deliveries of one job before it goes to the dead-letter stream",
    )
    add_number(
        group,
        "--grace",
        float,
        30.0,
        "seconds running jobs get to finish on SIGTERM before they are handed back",
        metavar="S",
    )
    group.add_argument("--prefix", default="comfytrio", help="the broker's key prefix")
    add_path(
        group,
        "--worker-dir",
        "DIR",
        "where this worker keeps downloads and --fake servers (default ./comfytrio-worker)",
    )
    add_flag(group, "--print-ready", "print 'ready' on stdout once it takes jobs (for scripts)")
    add_fleet_arguments(parser, "--worker-dir")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")


async def _work(args: argparse.Namespace, state: Path) -> None:
    from ..broker import run_worker

    store = make_plugin_manager().open_output_store(args.outputs)
    async with trio.open_nursery() as nursery:
        stopped = await nursery.start(watch_stop_signals, "worker")
        api = await fleet_api(args, state, nursery)
        async with api, trio.open_nursery() as working:
            await working.start(
                lambda task_status: run_worker(
                    api,
                    args.broker,
                    store=store,
                    name=args.name or f"{socket.gethostname()}-{os.getpid()}",
                    pools=tuple(args.pool) or ("default",),
                    lease=args.lease,
                    max_attempts=args.max_attempts,
                    grace=args.grace,
                    prefix=args.prefix,
                    task_status=task_status,
                )
            )
            if args.print_ready:
                print("ready", flush=True)
            await stopped.wait()
            working.cancel_scope.cancel()  # run_worker hands back what it holds
        nursery.cancel_scope.cancel()


def worker(args: argparse.Namespace) -> int:
    """``comfytrio worker``: take jobs from the broker until SIGTERM."""
    setup_logging(args.verbose + 1)
    if not has_extra("comfytrio worker", "broker", "comfytrio.broker"):
        return EXIT_USAGE
    try:
        check_fleet_arguments(args)
        if not args.broker.startswith(("redis://", "rediss://", "unix://")):
            raise UsageError(f"--broker expects redis://HOST:PORT/DB, got {args.broker!r}")
        if args.lease <= 0 or args.grace < 0 or args.max_attempts < 1:
            raise UsageError("--lease must be positive, --grace 0 or more, --max-attempts >= 1")
        state = (args.worker_dir or Path.cwd() / "comfytrio-worker").resolve()
        with unwrapped():
            trio.run(_work, args, state)
    except UsageError as exc:
        err(f"comfytrio worker: error: {exc}")
        return EXIT_USAGE
    except (ComfyAPIError, ValueError) as exc:
        err(f"comfytrio worker: {exc}")
        return EXIT_FAILED
    return EXIT_OK
