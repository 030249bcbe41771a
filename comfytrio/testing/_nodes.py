"""The node types one fake ComfyUI knows: the built-in ones and the custom ones declared.

Every built-in node type has its ``object_info`` entry recorded from a real ComfyUI 0.3.64
(``object_info.json``) and a simulation in one node-family module:

- ``_nodes_primitives``: primitives and strings;
- ``_nodes_images``: images and masks, really computed with Pillow;
- ``_nodes_models``: loaders, conditioning, samplers, latents, VAE (simulated);
- ``_nodes_outputs``: SaveImage, PreviewImage, PreviewAny, and SaveImageWebsocket (the
  custom node every stock install ships, so not in ``object_info.json``: it is added after
  the built-ins, as ComfyUI loads ``custom_nodes/`` last).

``_nodes_base`` has what simulations are written against, ``_nodes_values`` the values
that flow between nodes, ``_nodes_custom`` the custom nodes a test declares. A new
built-in node: its recorded entry in ``object_info.json``, its simulation in its family.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from . import _nodes_images, _nodes_models, _nodes_outputs, _nodes_primitives
from ._nodes_base import Family, NodeDef
from ._paths import FakePaths

__all__ = ["NodeRegistry"]

_FAMILIES: tuple[Family, ...] = (
    _nodes_primitives.NODES,
    _nodes_images.NODES,
    _nodes_models.NODES,
    _nodes_outputs.NODES,
)

_BUILTIN_INFO: dict[str, Any] | None = None


def _builtin_info() -> dict[str, Any]:
    global _BUILTIN_INFO
    if _BUILTIN_INFO is None:
        text = (
            resources.files("comfytrio.testing")
            .joinpath("object_info.json")
            .read_text(encoding="utf-8")
        )
        _BUILTIN_INFO = json.loads(text)
    return _BUILTIN_INFO


def _family_of(class_type: str) -> Family:
    for family in _FAMILIES:
        if class_type in family.simulations:
            return family
    raise LookupError(f"object_info.json lists {class_type}, which no node family simulates")


class NodeRegistry:
    """The node types one fake server knows (built-ins plus declared custom nodes)."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeDef] = {}
        for class_type, info in _builtin_info().items():
            entry = json.loads(json.dumps(info))
            self._nodes[class_type] = _family_of(class_type).build(class_type, entry)
        for build in _nodes_outputs.STOCK_CUSTOM_NODES:
            self.add(build())

    def get(self, class_type: Any) -> NodeDef | None:
        """The node type, or None when this server does not have it."""
        return self._nodes.get(class_type)

    def __contains__(self, class_type: object) -> bool:
        return class_type in self._nodes

    def names(self) -> list[str]:
        """Every class_type, in ``object_info`` order."""
        return list(self._nodes)

    def add(self, node: NodeDef) -> None:
        """Add or replace a node type."""
        self._nodes[node.class_type] = node

    def object_info(self, paths: FakePaths) -> dict[str, Any]:
        """The whole ``GET /object_info`` answer."""
        return {name: node.object_info(paths) for name, node in self._nodes.items()}
