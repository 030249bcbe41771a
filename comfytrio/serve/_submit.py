"""A ``POST /api/v2/jobs`` body, checked and turned into what ``ComfyAPI.run_workflow`` takes.

Nothing here does I/O: asset references are listed for the board to look up, and the
workflow is checked against the servers by the board (``ComfyAPI.check_workflow``).

The ``comfytrio`` object is our additive field (see docs/serve.md)::

    {"params": {...},            # comfytrio's params dict: by node title, gpu_scale...
     "models": [{"type": "checkpoints", "name": "sd_xl_base_1.0.safetensors"}],
     "loras": [{"name": "x.safetensors", "url": "https://...", "strength": 0.8}],
     "seed": 42, "same_images": true, "max_shards": 2, "timeout": 600}

Without it, or without a ``gpu_scale`` param in it, a job is one prompt on whichever server
frees first (``max_shards`` 1); with one, the batch is split over every server.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import attrs

from .._api import WorkflowOptions
from .._types import LoRARef, ModelRef
from ._problems import ApiProblem
from ._webhooks import check_webhook_url

__all__ = [
    "AssetUse",
    "Submission",
    "check_idempotency_key",
    "key_reused",
    "parse_submission",
]

MAX_METADATA_KEYS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_SEED = 2**64 - 1
ASSET_TYPE = "core/ASSET"


@attrs.frozen
class AssetUse:
    """A ``core/ASSET`` reference found in the workflow."""

    node_id: str
    """The node whose input holds it."""
    input_name: str
    """That input."""
    asset_id: str
    """``info.id``."""


@attrs.frozen
class Submission:
    """A checked submit body."""

    workflow: dict[str, Any]
    """The workflow as submitted (kept for ``GET .../workflow``)."""
    comfytrio: dict[str, Any] | None
    """The ``comfytrio`` object as given."""
    params: dict[str, dict[str, Any]]
    """Its params."""
    models: tuple[ModelRef, ...]
    """Its models."""
    loras: tuple[LoRARef, ...]
    """Its LoRAs."""
    seed: int | None
    """Its seed."""
    same_images: bool
    """Its ``same_images``."""
    max_shards: int | None
    """At most this many shards (None: one per server)."""
    timeout: float | None
    """Seconds each shard may run (None: the api's)."""
    metadata: dict[str, str]
    """String labels."""
    webhook_url: str | None
    """Where its terminal status is posted."""
    assets: tuple[AssetUse, ...]
    """Every ``core/ASSET`` reference in the workflow."""

    def options(self, params: dict[str, dict[str, Any]]) -> WorkflowOptions:
        """The keywords of ``check_workflow`` and ``run_workflow``, with ``params`` (its
        own and those its asset references became)."""
        return WorkflowOptions(
            params=params,
            models=self.models,
            loras=self.loras,
            seed=self.seed,
            same_images=self.same_images,
            max_shards=self.max_shards,
        )


def _invalid(message: str, **details: Any) -> ApiProblem:
    return ApiProblem(422, "invalid_request", message, details=details or None)


def _is_ui_format(workflow: Mapping[str, Any]) -> bool:
    return isinstance(workflow.get("nodes"), list) and "links" in workflow


def _bad_metadata(message: str, **details: Any) -> ApiProblem:
    return ApiProblem(422, "metadata_invalid", message, details=details or None)


def _metadata(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad_metadata("'metadata' must be an object of string labels", field="metadata")
    if len(raw) > MAX_METADATA_KEYS:
        raise _bad_metadata(f"'metadata' holds {len(raw)} labels, at most {MAX_METADATA_KEYS}")
    for key, value in raw.items():
        if not isinstance(value, str) or not key or len(key) > MAX_METADATA_KEY:
            raise _bad_metadata(
                f"metadata[{key!r}]: labels are non-empty names of at most "
                f"{MAX_METADATA_KEY} characters with string values",
                field=f"metadata.{key}",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise _bad_metadata(
                f"metadata[{key!r}] is {len(value)} characters, at most {MAX_METADATA_VALUE}",
                field=f"metadata.{key}",
            )
    return dict(raw)


def _asset_uses(workflow: Mapping[str, Any]) -> list[AssetUse]:
    uses: list[AssetUse] = []
    for node_id, node in workflow.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for name, value in inputs.items():
            if isinstance(value, dict) and value.get("__type") == ASSET_TYPE:
                info = value.get("info")
                asset_id = info.get("id") if isinstance(info, dict) else None
                if not isinstance(asset_id, str) or not asset_id:
                    raise ApiProblem(
                        422,
                        "missing_asset",
                        f"node {node_id} input {name!r}: a core/ASSET reference needs "
                        "info.id (an asset uploaded with POST /api/v2/assets)",
                        details={"node_id": str(node_id), "input": name},
                    )
                uses.append(AssetUse(str(node_id), str(name), asset_id))
    return uses


def _refs(raw: Any, field: str, make: type[Any], keys: tuple[str, ...]) -> tuple[Any, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _invalid(f"comfytrio.{field} must be a list", field=f"comfytrio.{field}")
    made = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) - set(keys):
            raise _invalid(
                f"comfytrio.{field}[{i}] must be an object with keys among {', '.join(keys)}",
                field=f"comfytrio.{field}[{i}]",
            )
        try:
            made.append(make(**entry))
        except (TypeError, ValueError) as exc:
            where = f"comfytrio.{field}[{i}]"
            raise _invalid(f"{where}: {exc}", field=where) from exc
    return tuple(made)


_OPTION_KEYS = frozenset(
    {"params", "models", "loras", "seed", "same_images", "max_shards", "timeout"}
)


def _options(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _invalid("'comfytrio' must be an object", field="comfytrio")
    unknown = set(raw) - _OPTION_KEYS
    if unknown:
        raise _invalid(
            f"comfytrio: unknown key(s) {', '.join(sorted(unknown))}; known: "
            f"{', '.join(sorted(_OPTION_KEYS))}",
            field="comfytrio",
        )
    params = raw.get("params") or {}
    if not isinstance(params, dict) or not all(isinstance(p, dict) for p in params.values()):
        raise _invalid(
            "comfytrio.params must map param names to objects like "
            '{"type": "integer", "value": 4, "node_mappings": "API - BATCH SIZE"}',
            field="comfytrio.params",
        )
    seed = raw.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        raise _invalid(
            f"comfytrio.seed must be an integer 0..2**64-1, got {seed!r}", field="comfytrio.seed"
        )
    same = raw.get("same_images", False)
    if not isinstance(same, bool):
        raise _invalid(
            f"comfytrio.same_images must be true or false, got {same!r}",
            field="comfytrio.same_images",
        )
    shards = raw.get("max_shards")
    if shards is not None and (
        isinstance(shards, bool) or not isinstance(shards, int) or shards < 1
    ):
        raise _invalid(
            f"comfytrio.max_shards must be an integer >= 1, got {shards!r}",
            field="comfytrio.max_shards",
        )
    timeout = raw.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise _invalid(
            f"comfytrio.timeout must be a positive number of seconds, got {timeout!r}",
            field="comfytrio.timeout",
        )
    return {
        "params": {str(k): dict(v) for k, v in params.items()},
        "models": _refs(raw.get("models"), "models", ModelRef, ("type", "name")),
        "loras": _refs(
            raw.get("loras"),
            "loras",
            LoRARef,
            ("name", "url", "strength", "sha256", "strength_clip", "node_title"),
        ),
        "seed": seed,
        "same_images": same,
        "max_shards": shards,
        "timeout": None if timeout is None else float(timeout),
    }


def parse_submission(body: Any) -> Submission:
    """Check a submit body; raise ``ApiProblem`` (422 ``invalid_workflow``,
    ``workflow_format_ui``, ``missing_asset`` or ``invalid_request``) naming the field."""
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object with a 'workflow'")
    unknown = set(body) - {"workflow", "extra_data", "metadata", "webhook_url", "comfytrio"}
    if "inputs" in body:
        raise _invalid("'inputs' is reserved by the Comfy API v2 and not accepted yet")
    if unknown:
        raise _invalid(f"unknown field(s) {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    workflow = body.get("workflow")
    if not isinstance(workflow, dict):
        raise ApiProblem(
            422, "invalid_workflow", "'workflow' must be an API-format workflow (an object)"
        )
    if _is_ui_format(workflow):
        raise ApiProblem(
            422,
            "workflow_format_ui",
            "this is a UI-format workflow (nodes/links): export it with 'Export (API)'",
        )
    if not workflow:
        raise ApiProblem(422, "invalid_workflow", "the workflow has no nodes")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise ApiProblem(
                422,
                "invalid_workflow",
                f"node {node_id}: every node needs a 'class_type' and 'inputs'",
                details={"node_errors": {str(node_id): [{"reason": "malformed_node"}]}},
            )
    extra = body.get("extra_data")
    if extra is not None:
        if not isinstance(extra, dict) or set(extra) - {"api_key_comfy_org"}:
            raise _invalid("'extra_data' accepts only 'api_key_comfy_org'", field="extra_data")
        if extra:
            raise _invalid(
                "extra_data.api_key_comfy_org (partner nodes) is not supported by comfytrio "
                "serve: partner nodes need Comfy's own platform",
                field="extra_data.api_key_comfy_org",
            )
    webhook = body.get("webhook_url")
    if webhook is not None:
        if not isinstance(webhook, str):
            raise _invalid("'webhook_url' must be an http(s) URL", field="webhook_url")
        try:
            webhook = check_webhook_url(webhook)
        except ValueError as exc:
            raise _invalid(str(exc), field="webhook_url") from exc
    raw_options = body.get("comfytrio")
    options = _options(raw_options)
    params = options.get("params", {})
    max_shards = options.get("max_shards")
    if max_shards is None and not any(p.get("gpu_scale") for p in params.values()):
        max_shards = 1  # nothing to split: one prompt on the least loaded server
    return Submission(
        workflow=copy.deepcopy(workflow),
        comfytrio=copy.deepcopy(raw_options) if raw_options is not None else None,
        params=params,
        models=options.get("models", ()),
        loras=options.get("loras", ()),
        seed=options.get("seed"),
        same_images=options.get("same_images", False),
        max_shards=max_shards,
        timeout=options.get("timeout"),
        metadata=_metadata(body.get("metadata")),
        webhook_url=webhook,
        assets=tuple(_asset_uses(workflow)),
    )


def check_idempotency_key(key: str | None) -> None:
    """Refuse (422 ``invalid_request``) an ``Idempotency-Key`` that is empty or too long."""
    if key is not None and not 1 <= len(key) <= 255:
        raise ApiProblem(
            422,
            "invalid_request",
            "Idempotency-Key must be 1-255 characters",
            details={"field": "Idempotency-Key"},
        )


def key_reused() -> ApiProblem:
    """The spec's 422 ``idempotency_key_reuse``."""
    return ApiProblem(
        422,
        "idempotency_key_reuse",
        "this Idempotency-Key was used before: keys are single-use; list or poll your jobs "
        "instead of submitting again",
    )
