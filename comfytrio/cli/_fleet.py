"""The fleet a long-running command drives (``serve``, ``worker``): ``run``'s instance options
(``--comfyui``, ``--url``...) or, to try things out, ``--fake N`` bundled fake ComfyUI
servers in the same process."""

from __future__ import annotations

import argparse
import signal
from functools import partial
from pathlib import Path

import trio

from .. import ComfyAPI, make_plugin_manager
from ._common import UsageError, add_number, add_path, logger
from ._run import _add_instance_arguments, _setup_from

__all__ = [
    "FAKE_MODELS",
    "add_fleet_arguments",
    "check_fleet_arguments",
    "fleet_api",
    "watch_stop_signals",
]

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


def add_fleet_arguments(parser: argparse.ArgumentParser, state_flag: str) -> None:
    """The fleet's arguments: ``--fake`` and its options, ``run``'s instance options, and
    ``--models-path``, ``--timeout``, ``--download-dir`` (default: ``downloads`` in the
    folder of ``state_flag``)."""
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
        f"where outputs of remote servers are downloaded (default DIR/downloads of {state_flag})",
    )


def check_fleet_arguments(args: argparse.Namespace) -> None:
    """``UsageError`` for a ``--fake`` that cannot be (negative, beside other servers, or
    without the testing extra)."""
    if args.fake:
        try:
            import comfytrio.testing  # noqa: F401
        except ImportError as exc:
            raise UsageError(
                f"--fake needs the testing extra: pip install 'comfytrio[testing]' ({exc})"
            ) from exc
    if args.fake < 0:
        raise UsageError(f"--fake must be 0 or more, got {args.fake}")
    if args.fake and (args.comfyui is not None or args.url):
        raise UsageError("--fake serves its own servers: leave out --comfyui and --url")


async def fleet_api(args: argparse.Namespace, state_dir: Path, nursery: trio.Nursery) -> ComfyAPI:
    """The ``ComfyAPI`` (not entered yet) of the arguments; ``--fake`` servers are started in
    ``nursery`` first, in folders under ``state_dir``. Raises ``UsageError``."""
    if args.fake:
        from ..testing import serve_fake_comfyui

        for i in range(args.fake):
            root = state_dir / f"fake-comfyui-{i}"
            _lay_out_fake(root, args.fake_model)
            fake = await nursery.start(
                partial(serve_fake_comfyui, root, seconds_per_image=args.fake_seconds_per_image)
            )
            args.url.append(fake.url)
    if args.download_dir is None:  # outputs are moved from there into the store
        args.download_dir = state_dir / "downloads"
    return _setup_from(args, make_plugin_manager()).api()


async def watch_stop_signals(
    command: str, *, task_status: trio.TaskStatus[trio.Event] = trio.TASK_STATUS_IGNORED
) -> None:
    """Start with ``nursery.start``: from then on SIGTERM and SIGINT set the returned event
    (once; a long-running command then stops the way it chooses) instead of killing us."""
    stopped = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started(stopped)
        async for signum in signals:
            if not stopped.is_set():
                logger.info("comfytrio %s: %s, stopping", command, signal.Signals(signum).name)
                stopped.set()
