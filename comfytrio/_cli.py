"""The ``comfytrio`` command line.

Each sub-command is one ``_Command``: a function that adds its arguments to its parser and
a function that runs it. Register new ones in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COMMANDS", "build_parser", "main"]


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _fake_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        required=True,
        type=Path,
        help="base directory (input/, output/, temp/, models/<type>/ are created if missing)",
    )
    parser.add_argument("--port", type=int, default=8188, help="port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--seconds-per-image",
        type=float,
        default=0.0,
        help="simulated GPU seconds per image produced",
    )
    parser.add_argument(
        "--seconds-per-step",
        type=float,
        default=0.0,
        help="simulated seconds per sampler step and latent",
    )
    parser.add_argument(
        "--startup-delay", type=float, default=0.0, help="seconds before it starts listening"
    )


def _fake_server(args: argparse.Namespace) -> int:
    try:
        import trio

        from .testing._engine import Settings
        from .testing._fake import FakeComfyUI
        from .testing._main import serve_until_signal
        from .testing._paths import FakePaths
        from .testing._server import SystemInfo
    except ImportError as exc:  # the testing extra is missing
        print(
            f"comfytrio fake-server needs the testing extra: pip install "
            f"'comfytrio[testing]' ({exc})",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = args.root.resolve()
    fake = FakeComfyUI(
        FakePaths.under(root),
        host=args.host,
        port=args.port,
        settings=Settings(
            seconds_per_image=args.seconds_per_image, seconds_per_step=args.seconds_per_step
        ),
        system=SystemInfo(
            argv=["main.py", "--cpu", "--listen", args.host, "--port", str(args.port)]
        ),
        startup_delay=args.startup_delay,
    )

    def ready(fake: FakeComfyUI) -> None:
        print(f"Fake ComfyUI serving {fake.url} (root: {root}); Ctrl-C to stop", flush=True)
        print(f"To see the GUI go to: {fake.url}", flush=True)

    try:
        trio.run(serve_until_signal, fake, ready)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(
            f"comfytrio fake-server: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    print("Stopped", flush=True)
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("comfytrio-demo"),
        help="where the fake install, instances and images go (default: ./comfytrio-demo)",
    )
    parser.add_argument("--instances", type=int, default=2, help="fake servers (default 2)")
    parser.add_argument(
        "--batch",
        type=int,
        default=4,
        help="images in the batch, split across the servers (default 4)",
    )


def _demo(args: argparse.Namespace) -> int:
    import trio

    from ._demo import run_demo
    from ._errors import ComfyAPIError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = args.dir.resolve()
    print(f"Starting {args.instances} fake ComfyUI servers under {work} ...", flush=True)
    try:
        result = trio.run(run_demo, work, args.instances, args.batch)
    except ComfyAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for shard in result.shards:
        print(f"shard {shard.index} on {shard.instance}: {shard.scaled} seeds={shard.seeds}")
    print(
        f"{len(result.outputs)} images (job {result.job_id}, "
        f"{result.finished_at - result.started_at:.2f} s):"
    )
    for output in result.outputs:
        print(f"  {output.path}")
    return 0 if result.ok else 1


COMMANDS: list[_Command] = [
    _Command(
        "fake-server",
        "serve a fake ComfyUI (for tests and demos) until Ctrl-C",
        _fake_server_arguments,
        _fake_server,
    ),
    _Command(
        "demo",
        "run a split batch on bundled fake ComfyUI servers and print where the images went",
        _demo_arguments,
        _demo,
    ),
]
"""The sub-commands, in help order."""


def build_parser() -> argparse.ArgumentParser:
    """The ``comfytrio`` argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="comfytrio", description="Run ComfyUI workflows on many ComfyUI servers."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``comfytrio`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    code: int = args.handler(args)
    return code
