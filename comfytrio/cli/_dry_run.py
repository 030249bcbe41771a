"""``comfytrio run --dry-run``: check the job on every server and print the planned shards
and every problem (``ComfyAPI.check_workflow``), sending no prompt.

Exit code 0 when nothing is wrong, 1 (``EXIT_FAILED``, as ``doctor`` does) when a problem
is found; errors before the check (the command line, the workflow file) stay 2.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from .. import CheckReport, ComfyAPIError, InstanceState, WorkflowProblem
from .._errors import shown, unwrapped
from ._common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, logger
from ._job import Job, Setup
from ._output import picked, report_error

__all__ = ["dry_run", "problem_json", "report_json", "report_lines"]


def _json_value(value: Any) -> Any:
    """``value`` as it is when JSON can hold it, else its ``repr`` (bytes, say)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return shown(value)
    return value


def problem_json(problem: WorkflowProblem) -> dict[str, Any]:
    """One problem as JSON."""
    return picked(
        problem,
        "kind message node_id title class_type input value allowed param instances shards error",
        input=problem.input_name,
        value=_json_value(problem.value),
        allowed=list(problem.allowed),
        instances=list(problem.instances),
        shards=list(problem.shards),
        error=type(problem.error).__name__ if problem.error is not None else None,
    )


def report_json(report: CheckReport) -> dict[str, Any]:
    """A dry run's report as the JSON ``comfytrio run --dry-run --json`` prints."""
    return picked(
        report,
        "ok dry_run seed split instances shards problems notes",
        dry_run=True,
        instances=list(report.instances),
        shards=[
            picked(
                s,
                "index params scaled seeds batch_offset",
                params={name: _json_value(v) for name, v in s.params.items()},
            )
            for s in report.shards
        ],
        problems=[problem_json(p) for p in report.problems],
        notes=list(report.notes),
    )


def _value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else shown(value)


def _where(problem: WorkflowProblem, report: CheckReport) -> str:
    parts: list[str] = []
    if problem.instances and len(problem.instances) < len(report.instances):
        parts.append(f"on {', '.join(problem.instances)}")
    if problem.shards and len(problem.shards) < len(report.shards):
        parts.append(f"shard(s) {', '.join(map(str, problem.shards))}")
    if problem.param and problem.kind not in ("param_error", "job_error"):
        parts.append(f"set by param {problem.param!r}")
    return f" ({'; '.join(parts)})" if parts else ""


def report_lines(report: CheckReport) -> list[str]:
    """A dry run's report as the lines ``comfytrio run --dry-run`` prints."""
    planned = (
        f"{len(report.shards)} shard(s), seed {report.seed}, split {report.split}"
        if report.split is not None
        else "the job could not be planned"
    )
    lines = [
        f"dry run on {len(report.instances)} instance(s) "
        f"({', '.join(report.instances) or 'none'}): {planned}; nothing was sent"
    ]
    for shard in report.shards:
        values = ", ".join(f"{name}={_value(v)}" for name, v in shard.params.items())
        seeds = ", ".join(f"{title}={seed}" for title, seed in shard.seeds.items())
        line = f"  shard {shard.index}: {values or 'no params'}"
        if seeds:
            line += f"; seeds {seeds}"
        if shard.batch_offset is not None:
            line += f"; batch offset {shard.batch_offset}"
        lines.append(line)
    lines += [f"note: {note}" for note in report.notes]
    if report.ok:
        lines.append("no problems found")
        return lines
    lines.append(f"{len(report.problems)} problem(s):")
    for problem in report.problems:
        lines.append(f"- {problem.message}{_where(problem, report)}")
        if problem.allowed and problem.error is None:  # an error's message lists them
            lines.append(f"    allowed: {', '.join(problem.allowed)}")
    return lines


async def _check(setup: Setup, job: Job) -> CheckReport:
    """Enter the api (start or attach), give every server its first try, check the job."""
    api = setup.api()
    with unwrapped():
        async with api:
            with trio.move_on_after(setup.ready_timeout):
                for instance in api.instances:
                    await instance.tried.wait()
            for instance in api.instances:
                if instance.state is not InstanceState.READY:
                    logger.warning("ComfyUI %s is not ready: not checked", instance.name)
            return await api.check_workflow(job.workflow, **job.options)


def dry_run(setup: Setup, job: Job, *, as_json: bool) -> int:
    """Run the check, print the report (stdout); the exit code."""
    try:
        report = trio.run(_check, setup, job)
    except ComfyAPIError as exc:
        report_error(exc, as_json=as_json)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if as_json:
        print(json.dumps(report_json(report), indent=2), flush=True)
    else:
        print("\n".join(report_lines(report)), flush=True)
    return EXIT_OK if report.ok else EXIT_FAILED
