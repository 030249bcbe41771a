"""The ``comfytrio`` command line: ``run``, ``demo``, ``doctor``, ``plugins`` and
``fake-server``.

Each sub-command is one ``Command`` (in its own module): a function that adds its arguments
to its parser and a function that runs it and returns the exit code. Register new ones in
``COMMANDS``. The command line knows no param type: ``--param`` text is typed and parsed by
the plugins (``infer_param_type`` hook, ``ParamType.parse_text``).

Exit codes: 0 success, 1 the job (or a check) failed, 2 a usage error (bad arguments, a bad
param, a workflow that cannot be read), 130 interrupted (Ctrl-C). Results go to stdout
(paths, or JSON with ``--json``); progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from ._common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, Command, UsageError, err
from ._demo import add_demo_arguments, demo
from ._doctor import add_doctor_arguments, doctor
from ._fake_server import add_fake_server_arguments, fake_server
from ._params import build_params, load_param_file, load_workflow, parse_lora, parse_model
from ._plugins import add_plugins_arguments, plugins
from ._run import add_run_arguments, run
from ._serve import add_serve_arguments, serve
from ._worker import add_worker_arguments, worker

__all__ = [
    "COMMANDS",
    "Command",
    "UsageError",
    "build_params",
    "build_parser",
    "load_param_file",
    "load_workflow",
    "main",
    "parse_lora",
    "parse_model",
]

COMMANDS: list[Command] = [
    Command(
        "run",
        "run a workflow on ComfyUI instances (started here, or --url) and print the outputs",
        add_run_arguments,
        run,
    ),
    Command(
        "serve",
        "serve the Comfy API v2 over HTTP in front of every server (or --fake N) until Ctrl-C",
        add_serve_arguments,
        serve,
    ),
    Command(
        "worker",
        "take jobs from a Redis Streams broker and run them on this box's servers until SIGTERM",
        add_worker_arguments,
        worker,
    ),
    Command(
        "demo",
        "run a split batch on bundled fake ComfyUI servers and print where the images went",
        add_demo_arguments,
        demo,
    ),
    Command(
        "doctor",
        "check NVML, a ComfyUI install (--comfyui) and servers (--url); say what to fix",
        add_doctor_arguments,
        doctor,
    ),
    Command(
        "plugins",
        "list the installed param types and asset resolvers, one line each",
        add_plugins_arguments,
        plugins,
    ),
    Command(
        "fake-server",
        "serve a fake ComfyUI (for tests and demos) until Ctrl-C",
        add_fake_server_arguments,
        fake_server,
    ),
]
"""The sub-commands, in help order."""


class _Parser(argparse.ArgumentParser):
    """argparse, with our exit code for usage errors kept at 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``comfytrio`` argument parser with every registered sub-command."""
    parser = _Parser(prog="comfytrio", description="Run ComfyUI workflows on many ComfyUI servers.")
    parser.add_argument("--version", action="version", version=f"comfytrio {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our stdout went away (| head): not worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return code
