"""What the broker hands out: jobs, their outputs and updates, workers (frozen values),
and how they are read from (and written to) Redis."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .._api import WorkflowOptions
from .._types import LoRARef, ModelRef

__all__ = [
    "BrokerJob",
    "BrokerOutput",
    "JobUpdate",
    "WorkerInfo",
    "expired_job",
    "job_from_hash",
    "request_json",
    "worker_from_hash",
]


@attrs.frozen
class BrokerOutput:
    """One output file of a job, kept in the workers' ``OutputStore``."""

    key: str
    """Its key in the store (``<job id>/<attempt>/<shard>-<node id>-<file name>``)."""
    url: str
    """Where a client fetches it (``StoredOutput.url``)."""
    size: int
    """Its size in bytes."""
    content_type: str
    """Its media type."""
    node_id: str
    """The output node that wrote it."""
    filename: str
    """ComfyUI's file name (``prefix_00001_.png``)."""
    kind: str
    """Its Comfy API v2 ``OutputType``, from the file name: ``image``, ``video``,
    ``audio``, ``latent``, ``text`` or ``file``."""
    shard: int
    """The shard that made it."""
    batch_index: int | None
    """Its index in the job's whole batch (``OutputFile.batch_index``), None when not
    known."""

    def to_json(self) -> dict[str, Any]:
        """As kept in Redis."""
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BrokerOutput:
        """From what ``to_json`` gave."""
        return cls(
            key=str(data["key"]),
            url=str(data["url"]),
            size=int(data["size"]),
            content_type=str(data["content_type"]),
            node_id=str(data["node_id"]),
            filename=str(data["filename"]),
            kind=str(data["kind"]),
            shard=int(data["shard"]),
            batch_index=None if data.get("batch_index") is None else int(data["batch_index"]),
        )


@attrs.frozen
class BrokerJob:
    """A job as the broker keeps it (a snapshot: ask ``JobQueue.get`` again for news)."""

    id: str
    """Its id."""
    pool: str
    """The pool whose workers run it."""
    status: str
    """``queued``, ``running``, ``succeeded``, ``canceling``, ``canceled``, ``failed`` or
    ``expired`` (its record is gone after its retention; only the id and creation time
    are left)."""
    created_at: float
    """When it was submitted (Unix seconds)."""
    started_at: float | None
    """When its latest attempt started; None before any."""
    completed_at: float | None
    """When it became terminal; None before."""
    expires_at: float | None
    """When its record goes away (its retention from its latest change)."""
    attempt: int
    """How many times a worker started it (0 while never started)."""
    worker: str | None
    """The worker running (or that last ran) it."""
    workflow: Mapping[str, Any]
    """The workflow (API format) as submitted."""
    params: Mapping[str, Mapping[str, Any]]
    """Its params, by name."""
    models: tuple[ModelRef, ...]
    """The models it needs."""
    loras: tuple[LoRARef, ...]
    """The LoRAs it uses."""
    seed: int | None
    """The seed asked for (None: a random one)."""
    same_images: bool
    """``run_workflow``'s ``same_images``."""
    max_shards: int | None
    """``run_workflow``'s ``max_shards``."""
    timeout: float | None
    """``run_workflow``'s ``timeout`` (seconds per shard; None: the worker's default)."""
    metadata: Mapping[str, Any]
    """The caller's metadata (a JSON object), as given."""
    idempotency_key: str | None
    """The idempotency key it was submitted with."""
    webhook_url: str | None
    """Where its terminal status should be posted (kept for a front end; the broker posts
    nothing)."""
    outputs: tuple[BrokerOutput, ...]
    """Its output files once it ended (of the attempt that ended it, each once)."""
    error: Mapping[str, Any] | None
    """Why it failed: a Comfy API v2 ``JobError`` (``code``, ``message``, ``node_id``,
    ``class_type``, ``traceback``); None unless failed."""
    progress: Mapping[str, Any] | None
    """Its latest progress (``shard_count``, ``shards_finished``, ``shards_failed``,
    ``outputs_stored``, ``attempt``); None before any."""
    last_error: str | None
    """Why its latest attempt did not end it (a lost lease), if one did not."""

    def options(self) -> WorkflowOptions:
        """``run_workflow``'s keywords for it (but ``timeout``)."""
        return WorkflowOptions(
            params=self.params,
            models=self.models,
            loras=self.loras,
            seed=self.seed,
            same_images=self.same_images,
            max_shards=self.max_shards,
        )

    @property
    def terminal(self) -> bool:
        """True once it can never change again."""
        return self.status in ("succeeded", "canceled", "failed", "expired")


@attrs.frozen
class JobUpdate:
    """One entry of a job's event stream (``JobQueue.events``)."""

    id: str
    """The stream entry's id (in order; ``events`` replays from the first)."""
    kind: str
    """``status`` (``data``: ``status``, and ``error`` once failed), ``progress``
    (``data``: as ``BrokerJob.progress``) or ``output`` (``data``: a ``BrokerOutput`` as
    JSON, sent with the terminal status, each once)."""
    data: Mapping[str, Any]
    """Its payload."""


@attrs.frozen
class WorkerInfo:
    """A worker as its registry entry says (renewed by its heartbeat)."""

    name: str
    """Its consumer name in the pools' groups."""
    pools: tuple[str, ...]
    """The pools it takes jobs from."""
    gpu_count: int
    """How many GPUs (or CPU instances) its machine offers."""
    cuda_available: bool
    """Whether those are CUDA devices."""
    models: tuple[str, ...]
    """The model files it has (paths under its ``models_path``, such as
    ``checkpoints/x.safetensors``); empty when it has no local models folder."""
    capacity: int
    """How many jobs it can run at once now (its ready ComfyUI instances)."""
    busy: int
    """How many it runs."""
    started_at: float
    """When it started (Unix seconds)."""
    heartbeat_at: float
    """When it last said it was alive."""


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text else None


def _json(text: str | None, default: Any) -> Any:
    return json.loads(text) if text else default


def request_json(
    workflow: Mapping[str, Any],
    *,
    params: Mapping[str, Mapping[str, Any]] | None,
    models: Sequence[ModelRef],
    loras: Sequence[LoRARef],
    seed: int | None,
    same_images: bool,
    max_shards: int | None,
    timeout: float | None,
) -> str:
    """A job's request as kept in its hash. Raises ``TypeError``/``ValueError`` when
    something is not JSON."""
    return json.dumps(
        {
            "workflow": workflow,
            "params": {k: dict(v) for k, v in (params or {}).items()},
            "models": [attrs.asdict(m) for m in models],
            "loras": [attrs.asdict(lora) for lora in loras],
            "seed": seed,
            "same_images": same_images,
            "max_shards": max_shards,
            "timeout": timeout,
        },
        allow_nan=False,
    )


def job_from_hash(fields: Mapping[str, str]) -> BrokerJob:
    """A job from its Redis hash."""
    request = _json(fields.get("request"), {})
    return BrokerJob(
        id=fields["id"],
        pool=fields.get("pool", ""),
        status=fields.get("status", ""),
        created_at=float(fields.get("created_at") or 0.0),
        started_at=_float_or_none(fields.get("started_at")),
        completed_at=_float_or_none(fields.get("completed_at")),
        expires_at=_float_or_none(fields.get("expires_at")),
        attempt=int(fields.get("attempt") or 0),
        worker=fields.get("worker") or None,
        workflow=request.get("workflow", {}),
        params=request.get("params", {}),
        models=tuple(ModelRef(**m) for m in request.get("models", [])),
        loras=tuple(LoRARef(**lora) for lora in request.get("loras", [])),
        seed=request.get("seed"),
        same_images=bool(request.get("same_images", False)),
        max_shards=request.get("max_shards"),
        timeout=request.get("timeout"),
        metadata=_json(fields.get("metadata"), {}),
        idempotency_key=fields.get("idempotency_key") or None,
        webhook_url=fields.get("webhook_url") or None,
        outputs=tuple(BrokerOutput.from_json(o) for o in _json(fields.get("outputs"), [])),
        error=_json(fields.get("error"), None),
        progress=_json(fields.get("progress"), None),
        last_error=fields.get("last_error") or None,
    )


def expired_job(job_id: str, created_at: float) -> BrokerJob:
    """What is left of a job whose record expired: its id and creation time."""
    return BrokerJob(
        id=job_id,
        pool="",
        status="expired",
        created_at=created_at,
        started_at=None,
        completed_at=None,
        expires_at=None,
        attempt=0,
        worker=None,
        workflow={},
        params={},
        models=(),
        loras=(),
        seed=None,
        same_images=False,
        max_shards=None,
        timeout=None,
        metadata={},
        idempotency_key=None,
        webhook_url=None,
        outputs=(),
        error=None,
        progress=None,
        last_error=None,
    )


def worker_from_hash(fields: Mapping[str, str]) -> WorkerInfo:
    """A worker from its registry hash."""
    return WorkerInfo(
        name=fields.get("name", ""),
        pools=tuple(_json(fields.get("pools"), [])),
        gpu_count=int(fields.get("gpu_count") or 0),
        cuda_available=fields.get("cuda_available") == "1",
        models=tuple(_json(fields.get("models"), [])),
        capacity=int(fields.get("capacity") or 0),
        busy=int(fields.get("busy") or 0),
        started_at=float(fields.get("started_at") or 0.0),
        heartbeat_at=float(fields.get("heartbeat_at") or 0.0),
    )
