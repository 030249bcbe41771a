"""Node family: primitives and strings (constants a workflow feeds into other nodes)."""

from __future__ import annotations

from typing import Any

from ._nodes_base import Family, NodeContext, NodeResult

__all__ = ["NODES"]

NODES = Family()
"""The primitive and string nodes."""


@NODES.node(
    "PrimitiveInt",
    "PrimitiveFloat",
    "PrimitiveString",
    "PrimitiveStringMultiline",
    "PrimitiveBoolean",
)
async def _primitive(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return (inputs["value"],), None


@NODES.node("StringConcatenate")
async def _string_concatenate(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return (f"{inputs['string_a']}{inputs['delimiter']}{inputs['string_b']}",), None


@NODES.node("StringLength")
async def _string_length(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return (len(str(inputs["string"])),), None
