"""LoRAs: ``lora-downloads`` fetches them, ``lora-loaders`` puts them into the workflow.

Which LoRA goes into which node (documented in ``docs/plugins.md``):

- A ``LoRARef`` with ``node_title`` goes into the node(s) with that title: a
  ``Power Lora Loader (rgthree)`` (several LoRAs may share it), a ``LoraLoader`` or a
  ``LoraLoaderModelOnly`` (one LoRA each). A title that matches no node is an error.
- LoRAs without ``node_title`` go, as the seed library did, into every rgthree node as
  ``lora_1..n``; in a workflow without rgthree nodes they fill the core loader nodes that got
  no titled LoRA, in workflow order, one each (more LoRAs than such nodes is an error).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from comfytrio import LoRARef, ModelNotFoundError, ModelRef, NodeTitleNotFoundError, ParamError
from comfytrio.hookspecs import (
    BaseAssetResolver,
    JobContext,
    check_download_url,
    check_sha256,
    run_concurrently,
    safe_join,
)

from ._models import find_missing, listing_targets

__all__ = [
    "CORE_LORA_LOADERS",
    "RGTHREE_LORA_LOADER",
    "LoraDownloads",
    "LoraLoaders",
    "assign_loras",
]

logger = logging.getLogger("comfytrio_std")

RGTHREE_LORA_LOADER = "Power Lora Loader (rgthree)"
"""rgthree's loader: takes any number of ``lora_<n>: {on, lora, strength}`` inputs."""

CORE_LORA_LOADERS = frozenset({"LoraLoader", "LoraLoaderModelOnly"})
"""ComfyUI's own loaders: one LoRA each (``lora_name``, ``strength_model``[, ``strength_clip``])."""

_PARAM = "loras"  # what errors about the ``loras`` argument name as their param


def _title(node: Mapping[str, Any]) -> str | None:
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, Mapping) else None
    return title if isinstance(title, str) else None


def _nodes(workflow: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(i, n) for i, n in workflow.items() if isinstance(n, Mapping)]


def assign_loras(
    workflow: Mapping[str, Any], loras: Sequence[LoRARef]
) -> tuple[dict[str, list[LoRARef]], list[LoRARef]]:
    """Which LoRAs go into which loader node (node id -> LoRAs, in order), and the LoRAs
    that have no node to go into (a workflow without any loader). Pure.

    Raises ``NodeTitleNotFoundError`` (param ``loras``) for a ``node_title`` that matches no
    node, ``ParamError`` for a titled node that is no LoRA loader, two LoRAs for one core
    loader, or more untitled LoRAs than free core loaders.
    """
    nodes = _nodes(workflow)
    loaders = {
        i: str(n.get("class_type"))
        for i, n in nodes
        if n.get("class_type") in CORE_LORA_LOADERS | {RGTHREE_LORA_LOADER}
    }
    assigned: dict[str, list[LoRARef]] = {}
    untitled: list[LoRARef] = []
    for lora in loras:
        if lora.node_title is None:
            untitled.append(lora)
            continue
        matching = [i for i, n in nodes if _title(n) == lora.node_title]
        if not matching:
            titles = sorted({t for _, n in nodes if (t := _title(n)) is not None})
            raise NodeTitleNotFoundError(_PARAM, lora.node_title, titles)
        for node_id in matching:
            if node_id not in loaders:
                raise ParamError(
                    _PARAM,
                    f"LoRA {lora.name!r}: node {node_id} titled {lora.node_title!r} is "
                    f"a {workflow[node_id].get('class_type')!r}, not a LoRA loader "
                    f"({', '.join(sorted(CORE_LORA_LOADERS | {RGTHREE_LORA_LOADER}))})",
                )
            assigned.setdefault(node_id, []).append(lora)
    unplaced: list[LoRARef] = []
    rgthree = [i for i, kind in loaders.items() if kind == RGTHREE_LORA_LOADER]
    if untitled and rgthree:
        for node_id in rgthree:
            assigned.setdefault(node_id, []).extend(untitled)
    elif untitled:
        free = [i for i, kind in loaders.items() if kind in CORE_LORA_LOADERS and i not in assigned]
        if not loaders:
            unplaced = untitled
        elif len(untitled) > len(free):
            raise ParamError(
                _PARAM,
                f"{len(untitled)} LoRA(s) without node_title but only {len(free)} "
                "LoraLoader node(s) without one: give each LoRA the node_title of its "
                "loader, or add loader nodes",
            )
        for node_id, lora in zip(free, untitled, strict=False):
            assigned[node_id] = [lora]
    for node_id, given in assigned.items():
        if loaders[node_id] in CORE_LORA_LOADERS and len(given) > 1:
            raise ParamError(
                _PARAM,
                f"node {node_id} ({loaders[node_id]}) takes one LoRA, but "
                f"{', '.join(repr(lo.name) for lo in given)} go into it",
            )
    return assigned, unplaced


def _inject(node: dict[str, Any], loras: list[LoRARef]) -> None:
    inputs = node.setdefault("inputs", {})
    if node.get("class_type") == RGTHREE_LORA_LOADER:
        # The seed library's format; entries past lora_<n> stay as exported.
        for n, lora in enumerate(loras, start=1):
            entry: dict[str, Any] = {"on": True, "lora": lora.name, "strength": lora.strength}
            if lora.strength_clip is not None:
                entry["strengthTwo"] = lora.strength_clip
            inputs[f"lora_{n}"] = entry
        return
    (lora,) = loras
    inputs["lora_name"] = lora.name
    inputs["strength_model"] = lora.strength
    if node.get("class_type") == "LoraLoader":
        inputs["strength_clip"] = (
            lora.strength if lora.strength_clip is None else lora.strength_clip
        )


class LoraLoaders(BaseAssetResolver):
    """``lora-loaders``: puts each LoRA into its loader node (see the module docstring)."""

    name = "lora-loaders"

    def check(self, job: JobContext) -> None:
        """Refuse a mapping that cannot work; warn about LoRAs with no loader to go into."""
        _, unplaced = assign_loras(job.workflow, job.loras)
        if unplaced:
            logger.warning(
                "the workflow has no LoRA loader node: LoRA(s) %s are downloaded but not injected",
                ", ".join(lo.name for lo in unplaced),
            )

    def inject(self, workflow: dict[str, Any], job: JobContext) -> None:
        """Write ``lora_1..n`` into rgthree nodes, ``lora_name`` and strengths into core ones."""
        assigned, _ = assign_loras(workflow, job.loras)
        for node_id, loras in assigned.items():
            _inject(workflow[node_id], loras)


class LoraDownloads(BaseAssetResolver):
    """``lora-downloads``: each LoRA absent from ``models_path/loras/`` is downloaded there,
    once however many jobs ask at once (through the api's ``Downloader``). Remote servers
    cannot receive files, so there each LoRA must already be listed by ``/models/loras``.
    """

    name = "lora-downloads"

    def __init__(self, *, max_bytes: int | None = None, timeout: float | None = None) -> None:
        self.max_bytes = max_bytes
        """The size cap of one LoRA; None uses the downloader's."""
        self.timeout = timeout
        """Seconds one LoRA download may take; None uses the downloader's (an hour)."""

    def check(self, job: JobContext) -> None:
        """Refuse, before any I/O: a name that could escape ``loras/`` (``UnsafeNameError``),
        a URL that is not http(s) or a malformed sha256 (``DownloadError``), a strength that
        is not a finite number or one name with two URLs (``ParamError``)."""
        folder = (job.models_path or Path("models")) / "loras"
        seen: dict[str, LoRARef] = {}
        for lora in job.loras:
            if not isinstance(lora, LoRARef):
                raise ParamError(_PARAM, f"expects LoRARef objects, got {lora!r}")
            safe_join(folder, lora.name)
            check_download_url(lora.url)
            check_sha256(lora.url, lora.sha256)
            for label, value in (
                ("strength", lora.strength),
                ("strength_clip", lora.strength_clip),
            ):
                if value is None and label == "strength_clip":
                    continue
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not math.isfinite(value)
                ):
                    raise ParamError(
                        _PARAM,
                        f"LoRA {lora.name!r}: {label} must be a finite number, got {value!r}",
                    )
            first = seen.setdefault(lora.name, lora)
            if (first.url, first.sha256) != (lora.url, lora.sha256):
                raise ParamError(
                    _PARAM, f"LoRA {lora.name!r} is given twice with different URLs or sha256"
                )

    async def resolve(self, job: JobContext) -> None:
        """Download the missing LoRAs, then check the remote servers list every one.

        Raises ``DownloadError`` or ``ModelNotFoundError``.
        """
        unique = list({lora.name: lora for lora in job.loras}.values())
        if not unique:
            return
        if job.models_path is not None:
            folder = job.models_path / "loras"

            def fetching(lora: LoRARef) -> Callable[[], Awaitable[bool]]:
                return lambda: job.download(
                    lora.url,
                    safe_join(folder, lora.name),
                    sha256=lora.sha256,
                    max_bytes=self.max_bytes,
                    timeout=self.timeout,
                )

            await run_concurrently(fetching(lora) for lora in unique)
        refs = [ModelRef("loras", lora.name) for lora in unique]
        # Local files were just made sure of; only the remote listings are left to check.
        missing, where = await find_missing(refs, root=None, targets=listing_targets(job))
        if missing:
            raise ModelNotFoundError(
                missing,
                f"{where} (a remote server cannot receive downloads: put the LoRA "
                "in its models/loras folder)",
            )
