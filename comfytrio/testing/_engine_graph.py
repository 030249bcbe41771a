"""The prompt as a graph, the way ComfyUI 0.3.64 walks it: which node runs next
(``ExecutionList``) and the classic cache's key of every node (``cache_keys``).

A key covers a node's class, its constant inputs, its ``IS_CHANGED`` value and, through
its links, the same of all its ancestors: two nodes with equal keys compute the same thing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from ._nodes import NodeRegistry
from ._paths import FakePaths

__all__ = ["ExecutionList", "cache_keys", "is_link"]


def is_link(value: Any) -> bool:
    """Whether an input value is a link ``[node_id, output_slot]``."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
        and not isinstance(value[1], bool)
    )


class ExecutionList:
    """ComfyUI's order: a topological dissolve that prefers output nodes and their feeders."""

    def __init__(
        self, prompt: dict[str, Any], registry: NodeRegistry, is_cached: Callable[[str], bool]
    ) -> None:
        self.prompt = prompt
        self.registry = registry
        self.is_cached = is_cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, bool]] = {}

    def _is_output(self, node_id: str) -> bool:
        node = self.registry.get(self.prompt[node_id]["class_type"])
        return node is not None and node.output_node

    def add_node(self, node_id: str) -> None:
        """Plan ``node_id`` and every ancestor that is not cached."""
        stack = [node_id]
        links: list[tuple[str, str]] = []
        while stack:
            current = stack.pop()
            if current in self.pending:
                continue
            self.pending[current] = True
            self.block_count[current] = 0
            self.blocking[current] = {}
            for value in self.prompt[current]["inputs"].values():
                if is_link(value) and not self.is_cached(value[0]):
                    stack.append(value[0])
                    links.append((value[0], current))
        for source, target in links:
            self._add_link(source, target)

    def _add_link(self, source: str, target: str) -> None:
        if self.is_cached(source):
            return
        self.add_node(source)
        if target not in self.blocking[source]:
            self.blocking[source][target] = True
            self.block_count[target] += 1

    def is_empty(self) -> bool:
        """Whether every planned node has run."""
        return not self.pending

    def stage(self) -> str | None:
        """The node to run next (None: what is left is a cycle)."""
        ready = [n for n in self.pending if self.block_count[n] == 0]
        if not ready:
            return None
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            for blocked in self.blocking[node_id]:
                if any(self._is_output(b) for b in self.blocking[blocked]):
                    return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        """``node_id`` has run: unblock the nodes waiting for it."""
        del self.pending[node_id]
        for blocked in self.blocking[node_id]:
            self.block_count[blocked] -= 1
        del self.blocking[node_id]


def cache_keys(prompt: dict[str, Any], registry: NodeRegistry, paths: FakePaths) -> dict[str, str]:
    """The classic cache's key of every node of ``prompt``."""
    changed: dict[str, Any] = {}

    def is_changed(node_id: str) -> Any:
        if node_id not in changed:
            node = registry.get(prompt[node_id]["class_type"])
            value: Any = False
            if node is not None and node.is_changed is not None:
                constants = {
                    k: v for k, v in prompt[node_id]["inputs"].items() if not isinstance(v, list)
                }
                try:
                    value = node.is_changed(paths, constants)
                except Exception:
                    value = 0
            changed[node_id] = value
        return changed[node_id]

    def immediate(node_id: str, order: dict[str, int]) -> list[Any]:
        if node_id not in prompt:
            return [math.nan]
        node = prompt[node_id]
        node_def = registry.get(node["class_type"])
        sig: list[Any] = [node["class_type"], is_changed(node_id)]
        if node_def is not None and "UNIQUE_ID" in node_def.hidden.values():
            sig.append(node_id)
        for key in sorted(node["inputs"]):
            value = node["inputs"][key]
            if is_link(value):
                sig.append([key, ["ANCESTOR", order[value[0]], value[1]]])
            else:
                sig.append([key, value])
        return sig

    def ancestry(node_id: str, ancestors: list[str], order: dict[str, int]) -> None:
        if node_id not in prompt:
            return
        inputs = prompt[node_id]["inputs"]
        for key in sorted(inputs):
            value = inputs[key]
            if is_link(value) and value[0] not in order:
                ancestors.append(value[0])
                order[value[0]] = len(ancestors) - 1
                ancestry(value[0], ancestors, order)

    result = {}
    for node_id in prompt:
        ancestors: list[str] = []
        order: dict[str, int] = {}
        ancestry(node_id, ancestors, order)
        parts = [immediate(node_id, order)] + [immediate(a, order) for a in ancestors]
        result[node_id] = json.dumps(parts, sort_keys=True, default=str)
    return result
