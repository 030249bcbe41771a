"""``main.py`` of a fake ComfyUI install: ComfyUI's command line, the fake behind it.

Started exactly like a real ComfyUI (``python main.py --listen 127.0.0.1 --port 8188
--input-directory ...``), so code that launches ComfyUI as a child process can launch this.
Fake-only knobs come from environment variables (see ``lay_out_fake_comfyui_install``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ._engine import Settings
from ._fake import DEFAULT_IDLE_TIMEOUT, FakeComfyUI, run_fake
from ._install import FAKE_NODES_FILE
from ._paths import FakePaths, parse_extra_model_paths
from ._profiles import DEFAULT_COMFYUI_VERSION, profile_for
from ._server import SystemInfo

__all__ = ["main", "serve_until_signal", "start_until_signal"]

logger = logging.getLogger("comfytrio.testing")

ENV_SECONDS_PER_IMAGE = "COMFYTRIO_FAKE_SECONDS_PER_IMAGE"
ENV_SECONDS_PER_STEP = "COMFYTRIO_FAKE_SECONDS_PER_STEP"
ENV_STARTUP_DELAY = "COMFYTRIO_FAKE_STARTUP_DELAY"
ENV_EXIT_AT_START = "COMFYTRIO_FAKE_EXIT_AT_START"
ENV_CRASH_ON_NODE = "COMFYTRIO_FAKE_CRASH_ON_NODE"
ENV_FAIL_NODE = "COMFYTRIO_FAKE_FAIL_NODE"
ENV_IDLE_TIMEOUT = "COMFYTRIO_FAKE_IDLE_TIMEOUT"
"""Seconds an idle keep-alive connection is kept before the fake closes it (default 75)."""
ENV_COMFYUI_VERSION = "COMFYTRIO_FAKE_COMFYUI_VERSION"
"""The ComfyUI version the fake speaks as (``COMFYUI_VERSIONS``; default 0.3.64)."""


def _existing_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"'{path}' is not a valid directory.")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="comfytrio fake ComfyUI")
    parser.add_argument("--listen", nargs="?", const="0.0.0.0,::", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--disable-auto-launch", action="store_true")
    parser.add_argument("--auto-launch", action="store_true")
    parser.add_argument("--base-directory", type=str, default=None)
    parser.add_argument("--user-directory", type=_existing_dir, default=None)
    parser.add_argument("--input-directory", type=str, default=None)
    parser.add_argument("--output-directory", type=str, default=None)
    parser.add_argument("--temp-directory", type=str, default=None)
    parser.add_argument("--database-url", type=str, default=None)
    parser.add_argument("--disable-metadata", action="store_true")
    parser.add_argument("--cuda-device", type=int, default=None)
    parser.add_argument(
        "--extra-model-paths-config", type=str, nargs="+", action="append", default=None
    )
    parser.add_argument(
        "--preview-method", choices=["none", "auto", "latent2rgb", "taesd"], default="none"
    )
    parser.add_argument("--verbose", nargs="?", const="DEBUG", default="INFO")
    return parser


def _env_float(name: str, default: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return float(raw)
    except ValueError:
        logger.warning("%s=%r is not a number; using %g", name, raw, default)
        return default


def _idle_timeout() -> float:
    seconds = _env_float(ENV_IDLE_TIMEOUT, DEFAULT_IDLE_TIMEOUT)
    if not seconds > 0:
        logger.warning(
            "%s=%r is not a positive number; using %g",
            ENV_IDLE_TIMEOUT,
            os.environ.get(ENV_IDLE_TIMEOUT),
            DEFAULT_IDLE_TIMEOUT,
        )
        return DEFAULT_IDLE_TIMEOUT
    return seconds


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))


def _install_dir() -> Path:
    script = sys.argv[0] if sys.argv else ""
    if script.endswith("main.py"):
        return Path(script).resolve().parent
    return Path.cwd()


def _load_nodes(fake: FakeComfyUI, install: Path) -> None:
    path = install / FAKE_NODES_FILE
    if not path.is_file():
        return
    declarations: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    for class_type, options in declarations.items():
        fake.declare_node(class_type, **dict(options))
        logger.info("fake custom node: %s", class_type)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake with ComfyUI's flags until SIGINT/SIGTERM; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args, unknown = _parser().parse_known_args(args_list)
    _setup_logging(args.verbose)
    if unknown:
        logger.warning("comfytrio fake ComfyUI: ignoring unknown arguments: %s", " ".join(unknown))
    exit_code = os.environ.get(ENV_EXIT_AT_START)
    if exit_code:
        sys.stderr.write(
            f"comfytrio fake ComfyUI: {ENV_EXIT_AT_START}={exit_code}, exiting during start\n"
        )
        sys.stderr.flush()
        return int(exit_code)
    if args.cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.cuda_device)
    install = _install_dir()
    base = Path(os.path.abspath(args.base_directory)) if args.base_directory else install
    paths = FakePaths.under(base)
    if args.input_directory:
        paths.input = Path(os.path.abspath(args.input_directory))
    if args.output_directory:
        paths.output = Path(os.path.abspath(args.output_directory))
    if args.temp_directory:
        paths.temp = Path(os.path.abspath(args.temp_directory)) / "temp"
    if args.user_directory:
        paths.user = Path(os.path.abspath(args.user_directory))
    configs = [install / "extra_model_paths.yaml"]
    for group in args.extra_model_paths_config or []:
        configs += [Path(c) for c in group]
    for config in configs:
        if config.is_file():
            for folder, path, is_default in parse_extra_model_paths(
                config.read_text(encoding="utf-8"), config.parent
            ):
                paths.add_model_dir(folder, path, is_default=is_default)
    host = str(args.listen).split(",")[0] or "127.0.0.1"
    system = SystemInfo(
        argv=["main.py", *args_list],
        cpu=bool(args.cpu),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    settings = Settings(
        seconds_per_image=_env_float(ENV_SECONDS_PER_IMAGE),
        seconds_per_step=_env_float(ENV_SECONDS_PER_STEP),
        disable_metadata=bool(args.disable_metadata),
        previews=args.preview_method != "none",
    )
    try:
        profile = profile_for(os.environ.get(ENV_COMFYUI_VERSION) or DEFAULT_COMFYUI_VERSION)
    except ValueError as exc:
        logger.error("comfytrio fake ComfyUI: %s: %s", ENV_COMFYUI_VERSION, exc)
        return 1
    fake = FakeComfyUI(
        paths,
        host=host,
        port=args.port,
        settings=settings,
        system=system,
        startup_delay=_env_float(ENV_STARTUP_DELAY),
        exit_on_crash=True,
        idle_timeout=_idle_timeout(),
        profile=profile,
    )
    _load_nodes(fake, install)
    if os.environ.get(ENV_CRASH_ON_NODE):
        fake.crash_on_node(os.environ[ENV_CRASH_ON_NODE])
    if os.environ.get(ENV_FAIL_NODE):
        fake.fail_node(os.environ[ENV_FAIL_NODE])

    def ready(fake: FakeComfyUI) -> None:
        shown = fake.url.replace("0.0.0.0", "127.0.0.1")
        logger.info("Starting server\n\nTo see the GUI go to: %s", shown)
        sys.stdout.flush()

    try:
        stopped_by = trio.run(serve_until_signal, fake, ready)
    except KeyboardInterrupt:
        stopped_by = signal.SIGINT
    except OSError as exc:
        logger.error("comfytrio fake ComfyUI: cannot listen on %s:%s: %s", host, args.port, exc)
        return 1
    if stopped_by == signal.SIGTERM:
        # A real ComfyUI dies of SIGTERM without cleaning up: do the same.
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    logger.info("\nStopped server")
    shutil.rmtree(paths.temp, ignore_errors=True)
    return 0


async def serve_until_signal(
    fake: FakeComfyUI, on_ready: Callable[[FakeComfyUI], None] | None = None
) -> int:
    """Serve ``fake`` until SIGINT or SIGTERM; returns the signal number."""
    return await start_until_signal(partial(run_fake, fake), on_ready)


async def start_until_signal(
    start: Callable[..., Awaitable[None]],
    on_ready: Callable[[FakeComfyUI], None] | None = None,
) -> int:
    """Serve the fake that ``nursery.start(start)`` returns until SIGINT or SIGTERM; returns
    the signal number."""
    stopped_by = int(signal.SIGINT)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            fake: FakeComfyUI = await nursery.start(start)
            await fake.wait_ready()
            if on_ready is not None:
                on_ready(fake)
            async for signum in signals:
                stopped_by = signum
                nursery.cancel_scope.cancel()
                break
    return stopped_by
