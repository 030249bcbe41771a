"""Jobs and outputs as the Comfy API v2 writes them (pure functions, no I/O).

Times are RFC 3339 in UTC; follow-up links of a job are host-relative (``/api/v2/jobs/...``,
which the spec allows and which stays right behind a proxy); an output's ``url`` is absolute,
as the spec's ``format: uri`` asks, built from the address the client used.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._errors import (
    ComfyAPIError,
    ComfyUITimeoutError,
    DownloadError,
    ExecutionError,
    ExecutionInterruptedError,
    ModelNotFoundError,
    ParamError,
    ServerError,
    WorkflowError,
)
from ._records import AssetRecord, JobRecord

__all__ = [
    "FAR_FUTURE",
    "job_error",
    "job_json",
    "output_json",
    "output_kind",
    "rfc3339",
    "status_json",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi"}
AUDIO_SUFFIXES = {".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus"}
FAR_FUTURE = 253402300799.0
"""9999-12-31T23:59:59Z: the ``url_expires_at`` of a link that does not expire."""


def rfc3339(when: float) -> str:
    """Unix seconds as ``2026-11-28T09:50:00Z`` (whole seconds, UTC): every time serve writes
    (jobs, assets, outputs, webhooks, log lines)."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _maybe_time(when: float | None) -> str | None:
    return None if when is None else rfc3339(when)


def output_json(asset: AssetRecord, base_url: str) -> dict[str, Any]:
    """The spec's ``Output`` object of an output asset."""
    return {
        "node_id": asset.node_id or "",
        "name": asset.file_path or asset.id,
        "type": asset.kind,
        "content_type": asset.content_type,
        "size_bytes": asset.size_bytes,
        "id": asset.id,
        "hash": asset.hash,
        "url": f"{base_url}/api/v2/assets/{asset.id}/content",
        "url_expires_at": rfc3339(asset.expires_at or FAR_FUTURE),
        "job_id": asset.job_id,
    }


def status_json(job: JobRecord, queue_position: int | None) -> dict[str, Any]:
    """The SSE ``status`` event's payload."""
    return {"status": job.status, "queue_position": queue_position}


def _metrics(job: JobRecord) -> dict[str, int | None]:
    queue_end = job.started_at if job.started_at is not None else job.completed_at
    queue_ms = None if queue_end is None else round((queue_end - job.created_at) * 1000)
    execution_ms = None
    if job.started_at is not None and job.completed_at is not None:
        execution_ms = round((job.completed_at - job.started_at) * 1000)
    return {"queue_ms": queue_ms, "execution_ms": execution_ms}


def job_json(
    job: JobRecord,
    outputs: list[AssetRecord],
    base_url: str,
    *,
    queue_position: int | None = None,
) -> dict[str, Any]:
    """The spec's ``Job`` object, with comfytrio's additive ``metadata`` and ``comfytrio``
    fields (the shards: where each ran and under which prompt id, the split, the seed)."""
    link = f"/api/v2/jobs/{job.id}"
    shards: dict[int, dict[str, Any]] = {}
    for prompt in job.prompts:  # the last attempt of each shard
        shards[prompt.index] = {
            "index": prompt.index,
            "attempt": prompt.attempt,
            "instance": prompt.instance,
            "prompt_id": prompt.prompt_id,
        }
    return {
        "id": job.id,
        "status": job.status,
        "created_at": rfc3339(job.created_at),
        "started_at": _maybe_time(job.started_at),
        "completed_at": _maybe_time(job.completed_at),
        "expires_at": rfc3339(job.expires_at),
        "queue_position": queue_position if job.status == "queued" else None,
        "progress": job.progress,
        "outputs": [output_json(a, base_url) for a in outputs],
        "error": job.error,
        "metrics": _metrics(job),
        "urls": {"self": link, "events": f"{link}/events", "cancel": f"{link}/cancel"},
        "metadata": dict(job.metadata),
        "comfytrio": {
            "shards": [shards[i] for i in sorted(shards)],
            "shard_count": job.shard_count,
            "split": job.split,
            "seed": job.seed,
        },
    }


def job_error(exc: BaseException) -> dict[str, Any]:
    """The v2 ``JobError`` of what ended a job."""
    code = "comfytrio_error"
    node_id = class_type = traceback = None
    message = str(exc) or type(exc).__name__
    if isinstance(exc, ExecutionInterruptedError):
        code = "interrupted"
    elif isinstance(exc, ExecutionError):
        code = "node_execution_error"
        node_id, class_type = exc.node_id, exc.node_type
        traceback = "".join(exc.traceback) or None
    elif isinstance(exc, WorkflowError):
        code = "invalid_workflow"
    elif isinstance(exc, ComfyUITimeoutError):
        code = "timeout"
    elif isinstance(exc, ModelNotFoundError):
        code = "model_not_found"
    elif isinstance(exc, DownloadError):
        code = "download_failed"
    elif isinstance(exc, ParamError):
        code = "invalid_params"
    elif isinstance(exc, ServerError):
        code = "server_error"
    elif not isinstance(exc, ComfyAPIError):
        code, message = "internal_error", "an unexpected error ended the job (see serve's log)"
    return {
        "code": code,
        "message": message,
        "node_id": node_id,
        "class_type": class_type,
        "traceback": traceback,
    }


def output_kind(name: str) -> str:
    """The v2 ``OutputType`` of an output file, from its name."""
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    if suffix == ".latent":
        return "latent"
    if suffix in (".txt", ".json"):
        return "text"
    return "file"
