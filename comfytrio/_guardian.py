"""Start a command (ComfyUI) so that it dies with the orchestrator, however the orchestrator dies.

``run_comfyui`` runs this file by path, with the orchestrator's own interpreter (the
command's interpreter may be another venv, without comfytrio, so this module imports
nothing but the standard library)::

    python -I _guardian.py --fd READ_FD --grace SECONDS -- COMMAND...

``READ_FD`` is the read end of a pipe whose only write end the orchestrator holds
(close-on-exec, so no other child inherits it). The kernel closes that write end when the
orchestrator's process ends, however it ends: a normal exit, a crash, ``kill -9``, or a
SIGTERM from docker or systemd that Python leaves at its default action (no ``finally``
runs then). The read end then sees end-of-file. The orchestrator also closes it itself once
it has stopped the command, so end-of-file always means "this instance is over".

How it works:

- The guardian forks a small *watcher* (this file again, with ``--watch``), then ``exec``s
  COMMAND in its own process. So the process the orchestrator started, waits for and
  signals IS the command: its pid is the process-group leader (the orchestrator started us
  in a new session), its exit code is the command's own (-N when signal N killed it), and a
  SIGKILL or SIGSTOP sent to that pid reaches the command, not a middleman that would leave
  it running (the fault handling stops a hung ComfyUI that way).
- The watcher stays in that process group, holds ``READ_FD`` and blocks until end-of-file.
  Then, if the command (its parent) still runs, it sends SIGTERM and SIGCONT to the group,
  waits up to ``--grace`` seconds for the command to exit, and ends with SIGKILL to the
  group: whatever is left (the command, its own children, the watcher itself) dies.
- The watcher catches SIGTERM with a handler that does nothing, so ``killpg(SIGTERM)`` from
  the orchestrator stops the command but not the watcher, which still cleans up after it.
  (A handler and never ``SIG_IGN``: an ignored signal stays ignored across ``exec``.)

Why a pipe and not ``prctl(PR_SET_PDEATHSIG)``: the death signal fires when the *thread*
that forked the child exits, not the process. trio runs ``subprocess.Popen`` in a worker
thread of its cache, which retires idle threads, so ComfyUI would be killed in the middle of
a healthy run. It is also Linux-only, while a pipe's end-of-file works on every POSIX system
(Linux, macOS, the BSDs). Windows is not supported: it has no ``fork``, no process groups
and no POSIX signals.

If COMMAND cannot be started, one line goes to stderr and the exit code is 127 (as a shell
does).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["main"]

_PREFIX = "comfytrio guardian"
_STOP_CHECK = 0.05
"""Seconds between checks that the command has exited, while the watcher stops it."""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=_PREFIX, description="Run COMMAND; stop it when READ_FD reaches end-of-file."
    )
    parser.add_argument("--fd", type=int, required=True, help="read end of the pipe")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL")
    parser.add_argument(
        "--watch", type=int, metavar="LEADER", help="internal: be the watcher of group LEADER"
    )
    parser.add_argument("command", nargs="*", help="the command (after --)")
    args = parser.parse_args(argv)
    if args.watch is None and not args.command:
        parser.error("no command given")
    return args


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"{_PREFIX}: {message}\n")
    sys.stderr.flush()
    raise SystemExit(127)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Start the watcher and become the command (see the module docstring)."""
    args = _parse(argv)
    if args.watch is not None:
        _watch(args.fd, args.watch, args.grace)
    command: list[str] = args.command
    leader = os.getpid()
    # SIGTERM stays blocked across fork and exec into the watcher (a blocked mask survives
    # both), so the watcher has its handler before any SIGTERM can hit it. One that arrives
    # here stays pending and kills this process once unblocked below, as it would have
    # killed the command.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        watcher = os.fork()
    except OSError as exc:
        _fail(f"cannot fork the watcher: {exc}")
    if watcher == 0:
        _exec_watcher(args.fd, leader, args.grace)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.close(args.fd)  # the command does not need it (end-of-file does not depend on it)
    # Python ignores these at start and exec keeps an ignored signal ignored; give the
    # command the defaults, as subprocess's restore_signals does.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        os.kill(watcher, signal.SIGKILL)  # nothing to guard
        os.waitpid(watcher, 0)
        _fail(f"cannot run {command[0]}: {exc}")


def _exec_watcher(read_fd: int, leader: int, grace: float) -> NoReturn:
    """In the forked child: run this file again as the watcher. A fresh program rather than
    the fork's copy of this one: its command line does not hold COMMAND (whoever looks for
    ComfyUI by its command line, ``pgrep -f main.py``, finds ComfyUI only)."""
    try:
        watcher = [sys.executable, "-I", os.path.abspath(__file__), "--watch", str(leader)]
        os.execv(sys.executable, [*watcher, "--fd", str(read_fd), "--grace", repr(grace)])
    except BaseException as exc:
        sys.stderr.write(f"{_PREFIX}: cannot start the watcher: {exc}\n")
        sys.stderr.flush()
    # Never unwind into the forked copy of main(): it would exec the command a second time.
    os._exit(1)


def _ignore(signum: int, frame: object) -> None:
    """The watcher's SIGTERM handler: the orchestrator's SIGTERM is for the command."""


def _watch(read_fd: int, leader: int, grace: float) -> NoReturn:
    """The watcher (a child of the command, in its group): wait for end-of-file on
    ``read_fd``, then stop the process group ``leader``. Never returns."""
    signal.signal(signal.SIGTERM, _ignore)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    # The orchestrator reads the command's output until end-of-file: our copies of that pipe
    # must not keep it open after the command is gone.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    _wait_for_eof(read_fd)
    _stop_group(leader, grace)
    raise SystemExit(0)


def _wait_for_eof(read_fd: int) -> None:
    """Block until every write end of the pipe is closed (the orchestrator never writes;
    any byte it might is dropped)."""
    poller = select.poll()  # unlike select(), any descriptor number
    poller.register(read_fd, select.POLLIN)
    while True:
        poller.poll()
        if not os.read(read_fd, 4096):
            return


def _stop_group(leader: int, grace: float) -> None:
    """SIGTERM the group if the command (our parent) still runs, give it ``grace`` seconds,
    then SIGKILL the group: what is left of it, this watcher included."""
    # Our parent changes from the command to a reaper when the command exits. The group id
    # cannot be reused by another group meanwhile: this watcher is still a member.
    if os.getppid() == leader:
        _signal_group(leader, signal.SIGTERM)
        _signal_group(leader, signal.SIGCONT)  # a stopped process must run to see SIGTERM
        deadline = time.monotonic() + grace
        while os.getppid() == leader and time.monotonic() < deadline:
            time.sleep(_STOP_CHECK)
    _signal_group(leader, signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


if __name__ == "__main__":
    main()
