"""How results and errors are written: JSON for ``--json`` (stdout), messages on stderr."""

from __future__ import annotations

import json
from typing import Any

from .. import ExecutionError, JobResult, OutputFile
from ._common import err

__all__ = ["error_json", "output_json", "report_error", "result_json"]


def output_json(o: OutputFile) -> dict[str, Any]:
    """One output file as JSON."""
    return {
        "path": o.path,
        "instance": o.instance,
        "prompt_id": o.prompt_id,
        "node_id": o.node_id,
        "filename": o.filename,
        "subfolder": o.subfolder,
        "type": o.type,
        "batch_index": o.batch_index,
    }


def result_json(result: JobResult) -> dict[str, Any]:
    """A finished job as the JSON ``comfytrio run --json`` prints."""
    return {
        "ok": result.ok,
        "job_id": result.job_id,
        "seed": result.seed,
        "split": result.split,
        "reproducible": result.reproducible,
        "seconds": round(result.finished_at - result.started_at, 3),
        "paths": result.paths,
        "outputs": [output_json(o) for o in result.outputs],
        "values": [
            {
                "shard": v.shard,
                "instance": v.instance,
                "prompt_id": v.prompt_id,
                "node_id": v.node_id,
                "key": v.key,
                "values": list(v.values),
            }
            for v in result.values
        ],
        "shards": [
            {
                "index": s.index,
                "instance": s.instance,
                "prompt_id": s.prompt_id,
                "scaled": s.scaled,
                "seeds": s.seeds,
                "batch_offset": s.batch_offset,
                "seconds": round(s.finished_at - s.submitted_at, 3),
                "ok": s.ok,
            }
            for s in result.shards
        ],
        "failures": [
            {
                "index": f.index,
                "instance": f.instance,
                "prompt_id": f.prompt_id,
                "error": type(f.error).__name__,
                "message": str(f.error),
                "node_id": f.node_id,
                "node_type": f.node_type,
                "exception_type": f.exception_type,
                "outputs": [output_json(o) for o in f.outputs],
            }
            for f in result.failures
        ],
    }


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
