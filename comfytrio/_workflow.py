"""Pure functions over API-format workflows: find nodes by title.

An API-format workflow maps node ids to ``{"class_type", "inputs", "_meta": {"title"}}``; a
link is ``[node_id, slot]``. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["node_ids_by_title", "title_of", "titles"]


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
