"""What every sub-command shares: exit codes, ``UsageError``, the ``Command`` record,
stderr messages, logging set-up, and small helpers (free ports, a quiet NVML)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import socket
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Command",
    "UsageError",
    "add_flag",
    "add_number",
    "add_path",
    "add_repeated",
    "err",
    "free_ports",
    "logger",
    "quiet_nvml",
    "setup_logging",
]

EXIT_OK = 0
"""Everything worked."""
EXIT_FAILED = 1
"""The job failed (or some of its shards did), or doctor found a problem."""
EXIT_USAGE = 2
"""The command line, a param or the workflow file is wrong."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT); SIGTERM and SIGHUP give 128 + their number."""

logger = logging.getLogger("comfytrio.cli")
"""The commands' own warnings (``comfytrio.cli``)."""


class UsageError(Exception):
    """The command line is wrong (exit code 2); the message says what to fix."""


@dataclass(frozen=True)
class Command:
    """One sub-command: its name and help, what adds its arguments, what runs it."""

    name: str
    """What is typed after ``comfytrio``."""
    help: str
    """One line for ``comfytrio --help`` (and its own description)."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Adds its arguments to its parser."""
    run: Callable[[argparse.Namespace], int]
    """Runs it with the parsed arguments; returns the exit code."""


Arguments = argparse._ActionsContainer
"""A parser or an argument group: what arguments are added to."""


def add_path(parser: Arguments, flag: str, metavar: str, help: str, **more: Any) -> None:
    """``flag PATH``: a ``Path``."""
    parser.add_argument(flag, type=Path, metavar=metavar, help=help, **more)


def add_repeated(parser: Arguments, flag: str, metavar: str, help: str) -> None:
    """``flag VALUE``, repeatable: a list of the values (empty when never given)."""
    parser.add_argument(flag, action="append", default=[], metavar=metavar, help=help)


def add_number(
    parser: Arguments,
    flag: str,
    kind: Callable[[str], Any],
    default: float | None,
    help: str,
    metavar: str | None = None,
) -> None:
    """``flag N``: a number read with ``kind`` (``int``, ``float``...), ``default`` when
    not given."""
    parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=help)


def add_flag(parser: Arguments, flag: str, help: str) -> None:
    """``flag``, without a value: True when given."""
    parser.add_argument(flag, action="store_true", help=help)


def err(message: str) -> None:
    """Write one line to stderr (the command's own messages, never results)."""
    print(message, file=sys.stderr, flush=True)


def has_extra(what: str, extra: str, module: str) -> bool:
    """Whether ``module`` (of the ``extra`` extra) can be imported; if not, say what to
    install (``what`` is the command or option that needs it)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        err(f"{what} needs the {extra} extra: pip install 'comfytrio[{extra}]' ({exc})")
        return False
    return True


class _ReportedByUs(logging.Filter):
    """Drops the api's record of each failed shard: the command prints every error itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "comfytrio" and str(record.msg).startswith("job %s: shard"))


def setup_logging(verbose: int, console: Console | None = None) -> None:
    """WARNING by default, INFO with ``-v``, DEBUG with ``-vv`` (the ComfyUI logs too).

    With a live display, records go through rich's handler on the same console, so they
    print above the table instead of tearing it.
    """
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    if console is not None:
        handler = RichHandler(console=console, show_path=False, show_time=verbose > 1)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if verbose <= 0:
        handler.addFilter(_ReportedByUs())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)


def free_ports(count: int) -> list[int]:
    """``count`` ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def quiet_nvml() -> Iterator[None]:
    """Hide pynvml's own deprecation notice (it asks for nvidia-ml-py, same module)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The pynvml package is deprecated")
        yield
