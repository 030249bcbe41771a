"""Pure functions over API-format workflows: find nodes by title, read what a param names.

An API-format workflow maps node ids to ``{"class_type", "inputs", "_meta": {"title"}}``; a
link is ``[node_id, slot]``. ``check_workflow`` and ``workflow_snapshot`` refuse what is no
workflow, or no JSON (a ``ParamError`` for param ``"workflow"``). Nothing here does I/O.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from ._errors import ParamError, shown

__all__ = [
    "check_workflow",
    "input_names",
    "node_ids_by_title",
    "split_mapping",
    "title_of",
    "titles",
    "workflow_snapshot",
]


def title_of(node: Mapping[str, Any]) -> str | None:
    """The node's ``_meta.title``, or None when it has none."""
    meta = node.get("_meta")
    if isinstance(meta, Mapping):
        title = meta.get("title")
        if isinstance(title, str):
            return title
    return None


def titles(workflow: Mapping[str, Any]) -> list[str]:
    """Every node title in the workflow, sorted, without duplicates."""
    found = {title_of(node) for node in workflow.values() if isinstance(node, Mapping)}
    return sorted(t for t in found if t is not None)


def node_ids_by_title(workflow: Mapping[str, Any], title: str) -> list[str]:
    """The ids of every node whose ``_meta.title`` equals ``title`` (exact match)."""
    return [
        node_id
        for node_id, node in workflow.items()
        if isinstance(node, Mapping) and title_of(node) == title
    ]


def split_mapping(workflow: Mapping[str, Any], mapping: str) -> tuple[str, str | None]:
    """The node title and the input a ``node_mappings`` string names.

    A node titled exactly ``mapping`` wins (titles may hold dots): ``(mapping, None)``.
    Else a string with a ``.`` names an input: the part after its last ``.``, of the nodes
    titled with the part before it (``"KSampler.steps"`` -> ``("KSampler", "steps")``).
    Else, and when either part would be empty, ``(mapping, None)``. Whether that title
    exists is the caller's to check.
    """
    if node_ids_by_title(workflow, mapping):
        return mapping, None
    title, dot, input_name = mapping.rpartition(".")
    if dot and title and input_name:
        return title, input_name
    return mapping, None


def input_names(node: Mapping[str, Any]) -> list[str]:
    """The names of the node's inputs, sorted (none when ``inputs`` is missing or no dict)."""
    inputs = node.get("inputs")
    return sorted(str(name) for name in inputs) if isinstance(inputs, Mapping) else []


def check_workflow(workflow: object) -> None:
    """Refuse, with a ``ParamError`` for param ``"workflow"``, what is no API-format
    workflow: not a dict, a node id that is neither a string nor an int (or two that JSON
    would merge, ``1`` and ``"1"``), a node that is not a dict. Pure; the JSON check of the
    values is ``workflow_snapshot``'s."""
    if not isinstance(workflow, Mapping):
        raise ParamError(
            "workflow",
            f"must be a dict of nodes (ComfyUI's API format), got {type(workflow).__name__}",
        )
    seen: dict[str, object] = {}
    for node_id, node in workflow.items():
        if isinstance(node_id, bool) or not isinstance(node_id, str | int):
            raise ParamError("workflow", f"node id {shown(node_id)} must be a string")
        named = str(node_id)
        if named in seen:
            raise ParamError(
                "workflow", f"node ids {shown(seen[named])} and {shown(node_id)} are one in JSON"
            )
        seen[named] = node_id
        if not isinstance(node, Mapping):
            raise ParamError(
                "workflow",
                f"node {named!r} must be a dict with 'class_type' and 'inputs', "
                f"got {type(node).__name__}",
            )


def workflow_snapshot(workflow: Mapping[str, Any]) -> str:
    """The workflow as compact JSON text, what its shards are built from; ``ParamError``
    (param ``"workflow"``) for what is no workflow (``check_workflow``), or naming the node
    that is not JSON as it is sent: NaN and infinities, lone surrogates (UTF-8 cannot carry
    them), ints of over 4300 digits, cycles and nesting too deep are refused here, not when
    a server takes a shard."""
    check_workflow(workflow)
    try:
        # Interned: the jobs that share one workflow (only their params differ) share its text.
        return sys.intern(_to_json(workflow))
    except _NOT_JSON as exc:
        for node_id, node in workflow.items():
            try:
                _to_json(node)
            except _NOT_JSON:
                title = title_of(node) if isinstance(node, Mapping) else None
                where = f"node {str(node_id)!r}" + (f" ({title!r})" if title else "")
                raise ParamError("workflow", f"{where} is not JSON: {_describe(exc)}") from exc
        raise ParamError("workflow", f"is not JSON: {_describe(exc)}") from exc


_NOT_JSON = (TypeError, ValueError, RecursionError)
"""What ``json.dumps`` raises for what JSON cannot hold (``UnicodeEncodeError`` is a
``ValueError``)."""


def _to_json(value: object) -> str:
    """``value`` as the strict JSON httpx sends (no NaN, valid UTF-8)."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")  # lone surrogates: what httpx's own encode would choke on
    return text


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, RecursionError):
        return "nested too deep"
    return text if len(text) <= 200 else text[:197] + "..."
