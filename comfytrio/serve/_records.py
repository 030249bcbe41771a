"""What ``serve`` keeps about jobs and assets, as frozen values (stored by ``_store.py``).

Times are Unix seconds (``time.time()``); the app renders them as RFC 3339. JSON-like fields
hold exactly what is rendered (a v2 ``Progress`` or ``JobError`` object), so a record read
back after a restart answers the same as before it.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

__all__ = [
    "TERMINAL",
    "AssetRecord",
    "JobRecord",
    "JobStatus",
    "PromptRecord",
]

JobStatus = Literal["queued", "running", "succeeded", "canceling", "canceled", "failed", "expired"]

TERMINAL: frozenset[str] = frozenset({"succeeded", "canceled", "failed", "expired"})
"""Statuses a job never leaves (but ``expired``, which a terminal job reaches when its
retention ends)."""


@attrs.frozen
class PromptRecord:
    """One prompt a job sent to one ComfyUI server (a shard's attempt)."""

    index: int
    """The shard's index in the job."""
    attempt: int
    """1 for the first attempt, then 2, ..."""
    instance: str
    """The instance's name in the ``ComfyAPI``."""
    url: str
    """The server's base URL (how a restarted ``serve`` finds the prompt again)."""
    prompt_id: str
    """The prompt's id on that server."""


@attrs.frozen
class JobRecord:
    """One v2 job as stored."""

    id: str
    """The job id (a UUID4, lower case)."""
    status: JobStatus
    """Where it is in its life."""
    created_at: float
    """When it was accepted."""
    expires_at: float
    """When it and its outputs are removed (``expired``)."""
    workflow: dict[str, Any]
    """The API-format workflow as submitted (``core/ASSET`` references kept)."""
    started_at: float | None = None
    """When its first prompt started to run."""
    completed_at: float | None = None
    """When it reached a terminal status."""
    comfytrio: dict[str, Any] | None = None
    """The body's ``comfytrio`` object as given (params, models, LoRAs, seed...)."""
    metadata: dict[str, str] = attrs.field(factory=dict)
    """String labels given at submit, for ``GET /api/v2/jobs?metadata[k]=v``."""
    webhook_url: str | None = None
    """Where its terminal status is posted (None: the server's default, if any)."""
    idempotency_key: str | None = None
    """The ``Idempotency-Key`` it was submitted with."""
    progress: dict[str, Any] | None = None
    """The latest v2 ``Progress`` snapshot."""
    outputs: tuple[str, ...] = ()
    """Asset ids of its outputs so far, in order."""
    error: dict[str, Any] | None = None
    """The v2 ``JobError`` object of a failed job."""
    prompts: tuple[PromptRecord, ...] = ()
    """Every prompt it sent, in order."""
    shard_count: int | None = None
    """How many shards it was split into (None: not planned yet)."""
    split: str | None = None
    """``JobResult.split`` once planned."""
    seed: int | None = None
    """The job seed once planned."""
    logs: tuple[str, ...] = ()
    """Log lines about it (retries, server errors), for ``GET .../logs``."""


@attrs.frozen
class AssetRecord:
    """An asset: a record over a content-addressed blob."""

    id: str
    """The asset id (a UUID4, lower case)."""
    hash: str
    """``blake3:<64 hex digits>`` of its bytes."""
    size_bytes: int
    """Its size."""
    content_type: str
    """Its media type, as given at upload (or guessed for an output)."""
    created_at: float
    """When it was minted."""
    file_path: str | None = None
    """Its name (a relative path, never escaping its folder)."""
    expires_at: float | None = None
    """When it is removed (None: never)."""
    job_id: str | None = None
    """The job that produced it (None: an upload)."""
    tags: tuple[str, ...] = ()
    """Category tags given at upload."""
    node_id: str | None = None
    """For an output: the node that wrote it."""
    kind: Literal["image", "video", "audio", "text", "file", "latent"] = "file"
    """For an output: the v2 ``OutputType``."""
