"""A job's progress as the v2 ``Progress`` snapshot, from its servers' events (pure: events
in, snapshots out).

Each shard counts the nodes of the workflow: a node is done once the next one starts (or it
was cached), the running node counts its sampler steps as a fraction, a shard that ended
counts whole. The job's ``value`` is the mean over its shards.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import attrs

from .._events import ComfyEvent, NodePreview, NodeProgress, NodesCached, NodeStarted

__all__ = ["JobProgress", "ShardProgress"]


@attrs.define(eq=False)
class ShardProgress:
    """Progress of one shard's current prompt."""

    nodes_total: int
    """Nodes in its workflow."""
    done: set[str] = attrs.field(factory=set)
    """Nodes that ran or were cached."""
    node: str | None = None
    """The node running now."""
    step: int | None = None
    """Its steps done."""
    steps: int | None = None
    """Its steps in all."""
    finished: bool = False
    """The shard ended."""

    def fraction(self) -> float:
        """How much of it is done, 0 to 1."""
        if self.finished:
            return 1.0
        partial = self.step / self.steps if self.step is not None and self.steps else 0.0
        return min(1.0, (len(self.done) + partial) / max(1, self.nodes_total))


@attrs.define(eq=False)
class JobProgress:
    """Progress of one job over its shards."""

    class_types: Mapping[str, Any]
    """The workflow's ``class_type`` by node id (for ``current_node_class``)."""
    shard_count: int = 1
    """How many shards it was split into."""
    shards: dict[int, ShardProgress] = attrs.field(factory=dict)
    """By shard index."""
    preview: dict[str, Any] | None = None
    """The latest ``preview`` event payload."""

    def _shard(self, index: int) -> ShardProgress:
        found = self.shards.get(index)
        if found is None:
            found = self.shards[index] = ShardProgress(len(self.class_types))
        return found

    def planned(self, shard_count: int) -> None:
        """The job was split into ``shard_count`` shards."""
        self.shard_count = max(1, shard_count)

    def submitted(self, index: int) -> None:
        """Shard ``index`` sent a prompt (again): it starts over."""
        self.shards[index] = ShardProgress(len(self.class_types))

    def finished(self, index: int) -> None:
        """Shard ``index`` ended with its outputs."""
        self._shard(index).finished = True

    def apply(self, index: int, event: ComfyEvent) -> str | None:
        """Take in a server event of shard ``index``'s prompt; the name of the SSE event it
        changes (``progress``, ``preview``), or None."""
        shard = self._shard(index)
        match event:
            case NodeStarted(node_id=node):
                if shard.node is not None:
                    shard.done.add(shard.node)
                shard.node, shard.step, shard.steps = node, None, None
                return "progress"
            case NodesCached(nodes=nodes):
                shard.done.update(nodes)
                return "progress"
            case NodeProgress(value=value, max=steps):
                shard.step, shard.steps = value, steps
                return "progress"
            case NodePreview(node_id=node, image=image, image_type=kind):
                self.preview = {
                    "node_id": node,
                    "content_type": kind,
                    "data_base64": base64.b64encode(image).decode(),
                }
                return "preview"
        return None

    def snapshot(self, *, complete: bool = False) -> dict[str, Any]:
        """The v2 ``Progress`` object now (``complete``: the job succeeded, all done)."""
        shards = list(self.shards.values())
        total = max(len(shards), self.shard_count)
        nodes_total = max(1, len(self.class_types)) * total
        if complete:
            return {
                "value": 1.0,
                "nodes_done": nodes_total,
                "nodes_total": nodes_total,
                "current_node": None,
                "current_node_class": None,
                "step": None,
                "steps": None,
                "message": None,
            }
        value = sum(s.fraction() for s in shards) / total
        current = next((s for s in shards if s.node and not s.finished), None)
        class_type = self.class_types.get(current.node) if current and current.node else None
        if not isinstance(class_type, str):
            class_type = None
        nodes_done = sum(s.nodes_total if s.finished else len(s.done) for s in shards)
        message = None
        if current is not None and current.steps:
            message = f"{class_type or current.node} {current.step}/{current.steps}"
        return {
            "value": round(min(1.0, value), 4),
            "nodes_done": min(nodes_done, nodes_total),
            "nodes_total": nodes_total,
            "current_node": current.node if current else None,
            "current_node_class": class_type,
            "step": current.step if current else None,
            "steps": current.steps if current else None,
            "message": message,
        }
