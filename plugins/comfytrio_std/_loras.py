"""LoRAs: ``lora-downloads`` fetches them, ``lora-loaders`` puts them into the workflow.

Which LoRA goes into which node (documented in ``docs/plugins.md``):

- A ``LoRARef`` with ``node_title`` goes into the node(s) with that title: a
  ``Power Lora Loader (rgthree)`` (several LoRAs may share it), a ``LoraLoader`` or a
  ``LoraLoaderModelOnly`` (one LoRA each). A title that matches no node is an error.
- LoRAs without ``node_title`` go, as the seed library did, into every rgthree node as
  ``lora_1..n``; in a workflow without rgthree nodes they fill the core loader nodes that got
  no titled LoRA, in workflow order, one each (more LoRAs than such nodes is an error).

What a LoRA file must look like (``lora_body_problem``, checked on a download and on a file
already in ``loras/``): at least ``MIN_LORA_BYTES``, not text (an HTML page, a JSON error,
a login form answered with 200), and for a ``.safetensors`` name the safetensors layout: an
8-byte little-endian header size, then a JSON header (``{``) that ends inside the file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from comfytrio import LoRARef, ModelNotFoundError, ModelRef, NodeTitleNotFoundError, ParamError
from comfytrio.hookspecs import (
    BaseAssetResolver,
    BodyCheck,
    JobContext,
    check_download_url,
    check_sha256,
    run_concurrently,
    safe_join,
    shown,
)

from ._models import find_missing, listing_targets

__all__ = [
    "CORE_LORA_LOADERS",
    "MAX_SAFETENSORS_HEADER",
    "MIN_LORA_BYTES",
    "RGTHREE_LORA_LOADER",
    "LoraDownloads",
    "LoraLoaders",
    "assign_loras",
    "lora_body_check",
    "lora_body_problem",
]

logger = logging.getLogger("comfytrio_std")

RGTHREE_LORA_LOADER = "Power Lora Loader (rgthree)"
"""rgthree's loader: takes any number of ``lora_<n>: {on, lora, strength}`` inputs."""

CORE_LORA_LOADERS = frozenset({"LoraLoader", "LoraLoaderModelOnly"})
"""ComfyUI's own loaders: one LoRA each (``lora_name``, ``strength_model``[, ``strength_clip``])."""

_PARAM = "loras"  # what errors about the ``loras`` argument name as their param

MIN_LORA_BYTES = 1024
"""The smallest LoRA file taken (the smallest real ones are hundreds of KiB)."""

MAX_SAFETENSORS_HEADER = 100_000_000
"""The largest safetensors header the format allows (the ``safetensors`` library's limit)."""

_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


def _safetensors_problem(head: bytes, size: int) -> str | None:
    """Why ``head`` does not start a safetensors file of ``size`` bytes, or None."""
    if len(head) < 9:
        return "it is too short for a safetensors header"
    length = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{":
        return "it does not start like a safetensors file (an 8-byte header size, then '{')"
    if length < 2 or length > MAX_SAFETENSORS_HEADER or 8 + length > size:
        return f"its safetensors header size {length} does not fit in its {size} bytes"
    return None


def _text_kind(head: bytes) -> str | None:
    """What text ``head`` looks like ("an HTML page", "JSON", "text"), or None for binary."""
    body = head
    for bom in _BOMS:
        if body.startswith(bom):
            # UTF-16 text: its ASCII characters come with a NUL each.
            body = body[len(bom) :].replace(b"\x00", b"") if len(bom) == 2 else body[len(bom) :]
            break
    body = body.lstrip(b" \t\r\n\x0b\x0c")
    if body[:1] == b"<":
        return "an HTML or XML page"
    if body[:1] in (b"{", b"["):
        return "JSON"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:  # the head may cut a character in two
        if exc.start < len(body) - 3:
            return None
        text = body[: exc.start].decode("utf-8")
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text"
    return None


def lora_body_problem(head: bytes, size: int, *, safetensors: bool) -> str | None:
    """Why a body (its first bytes ``head``, its total ``size``) is no LoRA, or None.

    Refused: under ``MIN_LORA_BYTES``; text (an HTML page, JSON, a plain error message:
    weights are binary); with ``safetensors``, anything but the safetensors layout. A body
    in the safetensors layout is never taken for text, whatever its first byte (the low
    byte of its header size may well be ``<`` or ``{``).
    """
    start = head[:32]
    if size < MIN_LORA_BYTES:
        return f"the body is {size} bytes, too small for LoRA weights (starts with {start!r})"
    layout = _safetensors_problem(head, size)
    if layout is None:
        return None
    kind = _text_kind(head)
    if kind is not None:
        return f"the body looks like {kind}, not LoRA weights (starts with {start!r})"
    if safetensors:
        return f"the body is not a safetensors file: {layout} (starts with {start!r})"
    return None


def lora_body_check(name: str) -> BodyCheck:
    """The ``check_body`` of the LoRA file ``name`` (``lora_body_problem``; the safetensors
    layout is required when the name ends with ``.safetensors``)."""
    return partial(lora_body_problem, safetensors=name.lower().endswith(".safetensors"))


def _finite(value: object) -> bool:
    """A number a float holds: not a bool, not NaN or infinite, not an int past 1e308."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_refs(loras: Sequence[object]) -> None:
    """Every entry is a ``LoRARef`` whose ``node_title`` is None or a string."""
    for lora in loras:
        if not isinstance(lora, LoRARef):
            raise ParamError(_PARAM, f"expects LoRARef objects, got {shown(lora)}")
        if lora.node_title is not None and not isinstance(lora.node_title, str):
            raise ParamError(
                _PARAM,
                f"LoRA {shown(lora.name)}: node_title must be a string, "
                f"got {shown(lora.node_title)}",
            )


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
        _check_refs(job.loras)
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

    A LoRA file, downloaded or already there, must pass ``lora_body_problem`` (no HTML page
    saved as ``x.safetensors``) and match its ``sha256`` when one is given.
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
        is not a finite number, a node_title that is no string, or one name with two URLs
        (``ParamError``)."""
        folder = (job.models_path or Path("models")) / "loras"
        seen: dict[str, LoRARef] = {}
        _check_refs(job.loras)
        for lora in job.loras:
            safe_join(folder, lora.name)
            check_download_url(lora.url)
            check_sha256(lora.url, lora.sha256)
            for label, value in (
                ("strength", lora.strength),
                ("strength_clip", lora.strength_clip),
            ):
                if value is None and label == "strength_clip":
                    continue
                if not _finite(value):
                    raise ParamError(
                        _PARAM,
                        f"LoRA {lora.name!r}: {label} must be a finite number, got {shown(value)}",
                    )
            first = seen.setdefault(lora.name, lora)
            if (first.url, (first.sha256 or "").lower()) != (lora.url, (lora.sha256 or "").lower()):
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
                    check_body=lora_body_check(lora.name),
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
