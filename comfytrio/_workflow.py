"""Pure functions over API-format workflows: find nodes by title, read what a param names.

An API-format workflow maps node ids to ``{"class_type", "inputs", "_meta": {"title"}}``; a
link is ``[node_id, slot]``. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["input_names", "node_ids_by_title", "split_mapping", "title_of", "titles"]


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
