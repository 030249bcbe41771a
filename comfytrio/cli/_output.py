"""How results and errors are written: JSON for ``--json`` (stdout), messages on stderr."""

from __future__ import annotations

import json
from typing import Any

from .. import ExecutionError, JobResult, OutputFile
from ._common import err

__all__ = ["error_json", "output_json", "picked", "report_error", "result_json"]


def picked(obj: Any, names: str, **shown: Any) -> dict[str, Any]:
    """``obj``'s attributes ``names`` (space-separated), by name and in that order, as JSON
    shows them; a name given in ``shown`` takes that value (a renamed, rounded or converted
    field) instead of the attribute."""
    return {name: shown[name] if name in shown else getattr(obj, name) for name in names.split()}


def output_json(o: OutputFile) -> dict[str, Any]:
    """One output file as JSON."""
    return picked(o, "path instance prompt_id node_id filename subfolder type batch_index")


def result_json(result: JobResult) -> dict[str, Any]:
    """A finished job as the JSON ``comfytrio run --json`` prints."""
    return picked(
        result,
        "ok job_id seed split reproducible seconds paths outputs values shards failures",
        seconds=round(result.finished_at - result.started_at, 3),
        outputs=[output_json(o) for o in result.outputs],
        values=[
            picked(v, "shard instance prompt_id node_id key values", values=list(v.values))
            for v in result.values
        ],
        shards=[
            picked(
                s,
                "index instance prompt_id scaled seeds batch_offset seconds ok",
                seconds=round(s.finished_at - s.submitted_at, 3),
            )
            for s in result.shards
        ],
        failures=[
            picked(
                f,
                "index instance prompt_id error message node_id node_type exception_type outputs",
                error=type(f.error).__name__,
                message=str(f.error),
                outputs=[output_json(o) for o in f.outputs],
            )
            for f in result.failures
        ],
    )


def error_json(exc: BaseException) -> dict[str, Any]:
    """An error (and the others of a failed job) as the JSON ``--json`` prints."""
    others = getattr(exc, "other_errors", None) or []
    return {
        "ok": False,
        "error": {
            "type": type(exc).__name__,
            "message": str(exc),
            "other_errors": [{"type": type(e).__name__, "message": str(e)} for e in others],
            "outputs": [
                output_json(o)
                for e in (exc, *others)
                if isinstance(e, ExecutionError)
                for o in e.outputs
            ],
        },
    }


def report_error(exc: BaseException, *, as_json: bool) -> None:
    """The error's message on stderr (the others of a failed job too); JSON on stdout."""
    err(f"error: {exc}")
    for other in getattr(exc, "other_errors", None) or []:
        err(f"error: {other}")
    if as_json:
        print(json.dumps(error_json(exc), indent=2), flush=True)
