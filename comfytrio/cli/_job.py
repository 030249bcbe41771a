"""Running one job from the command line: start (or attach to) the instances, show progress,
run the workflow, stop everything, and turn what happened into an exit code.

SIGTERM and SIGHUP stop a job the way Ctrl-C does, so every ComfyUI we started is stopped
before the command exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from rich.console import Console

from .. import (
    ComfyAPI,
    ComfyAPIError,
    ComfyUIInstance,
    GPUInfo,
    JobResult,
    ParamError,
    Plugins,
    WorkflowOptions,
)
from .._errors import single_error, unwrapped
from ._common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, err
from ._output import report_error
from ._progress import Display, LineDisplay, LiveDisplay, follow_progress

__all__ = ["Job", "Setup", "make_display", "run_job"]


@dataclass(frozen=True)
class Setup:
    """What ``ComfyAPI`` is made with."""

    targets: list[ComfyUIInstance | str]
    """The instances to start (or attach to) and the URLs of running servers."""
    models_path: Path
    """The models root."""
    gpu: GPUInfo
    """The GPUs the started instances share."""
    auto_start: bool = True
    """False: attach to instances already running on their ports."""
    ready_timeout: float = 120.0
    """Seconds every server has to answer."""
    execution_timeout: float = 3600.0
    """Seconds each shard may run."""
    state_dir: Path | None = None
    """Where started instances keep their folders and logs."""
    download_dir: Path | None = None
    """Where outputs of remote servers are downloaded."""
    plugins: Plugins | None = None
    """The plugins (None: the api loads them)."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment variables for started instances."""

    def api(self) -> ComfyAPI:
        """A ``ComfyAPI`` (not entered yet) made with all of this."""
        return ComfyAPI(
            self.targets,
            self.models_path,
            gpu=self.gpu,
            auto_start=self.auto_start,
            ready_timeout=self.ready_timeout,
            execution_timeout=self.execution_timeout,
            state_dir=self.state_dir,
            download_dir=self.download_dir,
            plugins=self.plugins,
            env=self.env,
        )


@dataclass(frozen=True)
class Job:
    """What ``run_workflow`` (or ``check_workflow``, for ``--dry-run``) is called with."""

    workflow: dict[str, Any]
    """The workflow (API format)."""
    options: WorkflowOptions
    """Its params, models, LoRAs, seed and ``same_images`` (``--same-images``)."""


async def _execute(setup: Setup, job: Job, display: Display | None) -> JobResult:
    """Start (or attach to) the instances, run the job, stop everything; the JobResult.

    Whatever happens (an error, Ctrl-C), leaving ``async with api`` stops every process we
    started before this returns or raises.
    """
    api = setup.api()
    with unwrapped():
        async with trio.open_nursery() as nursery:
            await nursery.start(_watch_signals)
            progress = None
            if display is not None:
                progress = await nursery.start(
                    partial(follow_progress, api, display, workflow=job.workflow)
                )
            try:
                async with api:
                    if display is not None and progress is not None:
                        # Every instance is ready now: show it before a quick job ends.
                        progress.update(api.statistics(), trio.current_time())
                        display.show(progress)
                    return await api.run_workflow(job.workflow, **job.options)
            finally:
                nursery.cancel_scope.cancel()


class _Stopped(Exception):
    """SIGTERM or SIGHUP arrived: the job stops the way Ctrl-C stops it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def _watch_signals(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Turn SIGTERM and SIGHUP into ``_Stopped``: without this the interpreter would die at
    once and the ComfyUI processes we started (each in its own session, so that a Ctrl-C in
    the terminal reaches only us) would outlive it."""
    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    with trio.open_signal_receiver(*wanted) as signals:
        task_status.started()
        async for signum in signals:
            raise _Stopped(signum)


def _interrupted(exc: BaseException) -> bool:
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return False


def make_display(args: argparse.Namespace) -> tuple[Display | None, Console | None]:
    """(display or None, the rich console it draws on or None), from ``--quiet`` and
    ``--progress``/``--no-progress``."""
    if getattr(args, "quiet", False):
        return None, None
    mode = getattr(args, "progress", "auto")
    live = mode == "live" or (mode == "auto" and sys.stderr.isatty())
    if live:
        console = Console(stderr=True, force_terminal=True if mode == "live" else None)
        return LiveDisplay(console), console
    if mode == "none":
        return None, None
    return LineDisplay(sys.stderr), None


def run_job(
    setup: Setup, job: Job, display: Display | None, *, as_json: bool
) -> tuple[int, JobResult | None]:
    """Run the job; (exit code, JobResult or None). Errors are reported here."""
    try:
        result = trio.run(_execute, setup, job, display)
    except ParamError as exc:
        report_error(exc, as_json=as_json)
        return EXIT_USAGE, None
    except ComfyAPIError as exc:
        report_error(exc, as_json=as_json)
        return EXIT_FAILED, None
    except _Stopped as exc:
        err(f"stopped by {exc}: the job was cancelled and every ComfyUI we started was stopped")
        return 128 + exc.signum, None
    except BaseException as exc:
        stopped = exc.subgroup(_Stopped) if isinstance(exc, BaseExceptionGroup) else None
        if stopped is not None:  # the signal arrived while other tasks were also ending
            signum = single_error(stopped)
            err(
                "stopped by a signal: the job was cancelled and every ComfyUI we started "
                "was stopped"
            )
            return 128 + (signum.signum if isinstance(signum, _Stopped) else signal.SIGTERM), None
        if _interrupted(exc):
            err("interrupted: the job was cancelled and every ComfyUI we started was stopped")
            return EXIT_INTERRUPTED, None
        raise
    return EXIT_OK, result
