"""An example third-party comfytrio plugin: the ``size`` param type.

``{"type": "size", "value": "832x1216", "node_mappings": "Empty Latent Image"}`` sets
``inputs.width`` and ``inputs.height`` of the node (an ``EmptyLatentImage``, an
``EmptyImage``...). The value may also be a ``[width, height]`` pair; both must be positive
multiples of 8, as latent sizes are.

On the command line: ``comfytrio run --param "Empty Latent Image:size=832x1216"`` (the text
goes through ``SizeType.parse_text``), or just ``--param "Empty Latent Image=832x1216"``
for a node of a latent class (``infer_param_type``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import comfytrio
from comfytrio.hookspecs import BaseParamType, Param, ParamType, Shard

__all__ = ["LATENT_CLASSES", "SizeType", "infer_param_type", "parse_size", "register_param_types"]

_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")

LATENT_CLASSES = frozenset({"EmptyLatentImage", "EmptySD3LatentImage", "EmptyImage"})
"""The node classes ``--param "TITLE=WIDTHxHEIGHT"`` gives the ``size`` type."""


def parse_size(value: Any) -> tuple[int, int] | None:
    """``"832x1216"`` or ``[832, 1216]`` as ``(832, 1216)``; None when it is neither."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        return (int(match[1]), int(match[2])) if match else None
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return (value[0], value[1])
    return None


class SizeType(BaseParamType):
    """``size``: ``"WIDTHxHEIGHT"`` into ``inputs.width`` and ``inputs.height``."""

    name = "size"

    def validate(self, param: Param) -> None:
        """Refuse anything but two positive multiples of 8."""
        super().validate(param)
        size = parse_size(param.value)
        if size is None:
            raise comfytrio.ParamError(
                param.name, f"expects 'WIDTHxHEIGHT' or [width, height], got {param.value!r}"
            )
        if any(side < 8 or side % 8 for side in size):
            raise comfytrio.ParamError(
                param.name, f"width and height must be positive multiples of 8, got {size}"
            )

    def shard_value(self, param: Param, prepared: Any, shard: Shard) -> Any:
        """The parsed ``(width, height)``."""
        return parse_size(prepared)

    def inject(self, node: dict[str, Any], value: Any, param: Param) -> None:
        """``inputs.width, inputs.height = value``."""
        inputs = node.setdefault("inputs", {})
        inputs["width"], inputs["height"] = value

    def parse_text(self, text: str, param_name: str) -> Any:
        """``"832x1216"`` (from ``--param``) as ``[832, 1216]``; refuse other text at once."""
        size = parse_size(text)
        if size is None:
            raise comfytrio.ParamError(param_name, f"expects WIDTHxHEIGHT, got {text!r}")
        return list(size)


@comfytrio.hookimpl
def register_param_types(register: Callable[[ParamType], None]) -> None:
    """Register ``size``."""
    register(SizeType())


@comfytrio.hookimpl
def infer_param_type(workflow: Mapping[str, Any], title: str, text: str) -> str | None:
    """``size`` for ``WIDTHxHEIGHT`` text on a node of ``LATENT_CLASSES``; else no opinion."""
    nodes = [n for n in workflow.values() if (n.get("_meta") or {}).get("title") == title]
    if nodes and nodes[0].get("class_type") in LATENT_CLASSES and parse_size(text) is not None:
        return "size"
    return None
