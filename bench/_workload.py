"""The benchmark workload and the helpers every runner shares (standard library only: the seed
runner imports it from the seed's own venv).

A job is the model-free workflow (EmptyImage -> SaveImage) with ``images`` images: the batch
comes from a PrimitiveInt titled "API - BATCH SIZE" (``gpu_scale``: the libraries that split a
job split it there) and the file name prefix from a PrimitiveString titled "API - PROMPT". Every
job gets its own prefix and its own colour, so ComfyUI's cache never answers for the work.

Every runner prints one JSON object (``RunnerResult``) on stdout:

- ``sequential``: jobs run one at a time on idle servers (overhead = wall - server span);
- ``concurrent``: ``jobs`` jobs submitted at once (latency, makespan, CPU, memory);
- ``rss_*_kib``: ``ru_maxrss`` at start, before the concurrent phase, and at the end.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from typing import Any, TypedDict

__all__ = [
    "BATCH_TITLE",
    "PREFIX_TITLE",
    "JobRecord",
    "RunnerResult",
    "add_runner_arguments",
    "emit",
    "inject",
    "job_params",
    "maxrss_kib",
    "percentile",
    "prefix_for",
    "workflow",
]

BATCH_TITLE = "API - BATCH SIZE"
PREFIX_TITLE = "API - PROMPT"
IMAGE_SIZE = 64
"""Small images: the fake servers encode real PNGs, and they share the CPUs with us."""


class JobRecord(TypedDict):
    prefix: str
    wall_s: float
    files: int
    error: str | None


class RunnerResult(TypedDict):
    library: str
    warmup: list[JobRecord]
    sequential: list[JobRecord]
    concurrent: list[JobRecord]
    makespan_s: float
    cpu_s: float
    rss_start_kib: int
    rss_before_kib: int
    rss_peak_kib: int


def workflow(index: int) -> dict[str, Any]:
    """The API-format workflow of job ``index`` (its own EmptyImage colour)."""
    return {
        "1": {
            "class_type": "PrimitiveInt",
            "inputs": {"value": 1},
            "_meta": {"title": BATCH_TITLE},
        },
        "2": {
            "class_type": "PrimitiveString",
            "inputs": {"value": "bench"},
            "_meta": {"title": PREFIX_TITLE},
        },
        "3": {
            "class_type": "EmptyImage",
            "inputs": {
                "width": IMAGE_SIZE,
                "height": IMAGE_SIZE,
                "batch_size": ["1", 0],
                "color": (index * 7919) % 0xFFFFFF,
            },
            "_meta": {"title": "Empty Image"},
        },
        "4": {
            "class_type": "SaveImage",
            "inputs": {"images": ["3", 0], "filename_prefix": ["2", 0]},
            "_meta": {"title": "Save Image"},
        },
    }


def job_params(prefix: str, images: int) -> dict[str, dict[str, Any]]:
    """The seed-style ``params`` of one job."""
    return {
        "batch_size": {
            "type": "integer",
            "value": images,
            "gpu_scale": True,
            "node_mappings": BATCH_TITLE,
        },
        "prompt": {"type": "string", "value": prefix, "node_mappings": PREFIX_TITLE},
    }


def inject(workflow: dict[str, Any], prefix: str, images: int) -> dict[str, Any]:
    """``workflow`` with the batch and prefix put in by hand (the minimal client's way)."""
    workflow["1"]["inputs"]["value"] = images
    workflow["2"]["inputs"]["value"] = prefix
    return workflow


def prefix_for(tag: str, phase: str, index: int) -> str:
    """A prefix unique to this run, library, phase and job."""
    return f"{tag}-{phase}-{index:06d}"


def maxrss_kib() -> int:
    """Peak resident memory of this process so far (KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def emit(result: RunnerResult) -> None:
    """Print the runner's result as one JSON line on stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def add_runner_arguments(parser: Any) -> None:
    """The arguments every runner takes (``parser`` is an ``argparse.ArgumentParser``)."""
    parser.add_argument("--jobs", type=int, default=40, help="concurrent jobs (default 40)")
    parser.add_argument(
        "--latency-jobs",
        type=int,
        default=20,
        help="jobs run one at a time first, for the overhead (default 20)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="jobs run first and not measured (default 2)"
    )
    parser.add_argument("--images-per-job", type=int, default=1, help="images per job")
    parser.add_argument("--tag", default="bench", help="prefix tag, unique per run")
