"""``comfytrio serve``: the Comfy API v2 over HTTP in front of every server ``run`` takes
(``--comfyui``, ``--url``) or, to try it, ``--fake N`` bundled fake servers in this process.

It runs until SIGINT or SIGTERM; then running jobs are cancelled on their servers and left
``canceling`` in the state folder, which the next start finishes.
"""

from __future__ import annotations

import argparse
import os
import signal
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
    logger,
    setup_logging,
)
from ._run import _add_instance_arguments, _setup_from

__all__ = ["add_serve_arguments", "serve"]

TOKEN_VARIABLE = "COMFYTRIO_SERVE_TOKEN"

FAKE_MODELS = (
    "checkpoints/juggernaut_xl.safetensors",
    "checkpoints/v1-5-pruned-emaonly.safetensors",
    "loras/detail_enhancer.safetensors",
)
"""Model files every ``--fake`` server lists: those of the example workflows."""


def _lay_out_fake(root: Path, models: list[str]) -> None:
    """A fake's folder with placeholder model files and ``input/example.png``, so the
    example workflows (and one's own, with ``--fake-model``) validate and run."""
    from ._demo import demo_picture

    for name in (*FAKE_MODELS, *models):
        folder, _, file = name.partition("/")
        if not folder or not file or ".." in name.split("/"):
            raise UsageError(f"--fake-model expects FOLDER/NAME, got {name!r}")
        path = root / "models" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(b"placeholder weights of a fake model")
    (root / "input").mkdir(parents=True, exist_ok=True)
    (root / "input" / "example.png").write_bytes(demo_picture())


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
    fake = parser.add_argument_group("try it without ComfyUI")
    add_number(
        fake,
        "--fake",
        int,
        0,
        "serve N bundled fake ComfyUI servers in this process instead of --comfyui/--url",
        metavar="N",
    )
    add_number(
        fake,
        "--fake-seconds-per-image",
        float,
        0.5,
        "simulated GPU seconds per image of the fakes (default 0.5)",
        metavar="S",
    )
    fake.add_argument(
        "--fake-model",
        action="append",
        default=[],
        metavar="FOLDER/NAME",
        help="one more model file the fakes list (repeat); they already have "
        + ", ".join(FAKE_MODELS),
    )
    _add_instance_arguments(parser)
    job = parser.add_argument_group("jobs")
    add_path(job, "--models-path", "DIR", "models root (default PATH/models with --comfyui)")
    add_number(
        job, "--timeout", float, 3600.0, "seconds each shard may run (default 3600)", metavar="S"
    )
    add_path(
        job,
        "--download-dir",
        "DIR",
        "where outputs of remote servers are downloaded (default DIR/downloads of --serve-dir)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")


def _bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"--bind expects HOST:PORT, e.g. 127.0.0.1:8189, got {text!r}")
    return host.strip("[]"), int(port)


async def _serve(args: argparse.Namespace, config: object) -> None:
    from ..serve import ServeConfig, serve_comfy_api

    assert isinstance(config, ServeConfig)
    plugins = make_plugin_manager()
    async with trio.open_nursery() as nursery:
        if args.fake:
            from ..testing import serve_fake_comfyui

            for i in range(args.fake):
                root = config.state_dir / f"fake-comfyui-{i}"
                _lay_out_fake(root, args.fake_model)
                fake = await nursery.start(
                    partial(
                        serve_fake_comfyui,
                        root,
                        seconds_per_image=args.fake_seconds_per_image,
                    )
                )
                args.url.append(fake.url)
        if args.download_dir is None:  # outputs are moved from there into the asset store
            args.download_dir = config.state_dir / "downloads"
        setup = _setup_from(args, plugins)
        api = setup.api()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with api:
                handle = await nursery.start(serve_comfy_api, api, config)
                if args.print_url:
                    print(handle.url, flush=True)
                logger.info("comfytrio serve: %s, %d server(s)", handle.url, len(api.instances))
                async for signum in signals:
                    logger.info("comfytrio serve: %s, stopping", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()


def serve(args: argparse.Namespace) -> int:
    """``comfytrio serve``: serve until SIGINT or SIGTERM."""
    setup_logging(args.verbose + 1)
    try:
        from ..serve import ServeConfig
        from ..serve._server import check_bind
    except ImportError as exc:
        err(f"comfytrio serve needs the serve extra: pip install 'comfytrio[serve]' ({exc})")
        return EXIT_USAGE
    if args.fake:
        try:
            import comfytrio.testing  # noqa: F401
        except ImportError as exc:
            err(f"--fake needs the testing extra: pip install 'comfytrio[testing]' ({exc})")
            return EXIT_USAGE
    try:
        host, port = _bind(args.bind)
        if args.fake < 0:
            raise UsageError(f"--fake must be 0 or more, got {args.fake}")
        if args.fake and (args.comfyui is not None or args.url):
            raise UsageError("--fake serves its own servers: leave out --comfyui and --url")
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
