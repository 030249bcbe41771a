"""Custom node types a test declares (``FakeComfyUI.declare_node``), as if a node pack were
installed: their ``object_info`` entry built from a short description, and a default run
that passes inputs on to outputs of the same type."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

from ._nodes_base import NodeContext, NodeDef, NodeResult, RunFn
from ._nodes_outputs import save_image_websocket
from ._nodes_values import SimObject

__all__ = ["NodeDeclaration", "declared_node"]


class NodeDeclaration(TypedDict, total=False):
    """The keywords of ``FakeComfyUI.declare_node`` (and of a fake install's ``nodes``)."""

    inputs: Mapping[str, Any] | None
    """Required inputs: name to type (``"MODEL"``), spec (``["INT", {"min": 0}]``) or
    combo options (``["a", "b"]``)."""
    optional: Mapping[str, Any] | None
    """Optional inputs, the same way."""
    outputs: Sequence[str]
    """The return types."""
    output_names: Sequence[str] | None
    """The outputs' names (the types by default)."""
    output_node: bool
    """Whether it is an output node (False by default)."""
    category: str
    """Its category (``"custom"`` by default)."""
    display_name: str | None
    """Its display name (the class_type by default)."""
    run: Callable[[dict[str, Any]], Any] | None
    """``run(inputs)``, sync or async, returns the outputs (a tuple, or ``{"result":
    (...), "ui": {...}}``); by default each output passes on the first input of its type."""
    seconds: float
    """Simulated time per run."""
    info: Mapping[str, Any] | None
    """A whole ``object_info`` entry, instead of the above."""


def _normalize_input(spec: Any) -> list[Any]:
    """``"MODEL"`` / ``["INT", {...}]`` / ``["a", "b"]`` (combo) into ComfyUI's spec list."""
    if isinstance(spec, str):
        return [spec]
    items = list(spec)
    if not items:
        raise ValueError("an input spec cannot be empty")
    if isinstance(items[0], (list, tuple)):
        return [list(items[0]), *items[1:]]
    if len(items) == 1:
        return [items[0]]
    if len(items) == 2 and isinstance(items[1], Mapping):
        return [items[0], dict(items[1])]
    return [[str(x) for x in items]]


def _entry(class_type: str, declaration: NodeDeclaration) -> dict[str, Any]:
    """The ``object_info`` entry of a declared node."""
    info = declaration.get("info")
    if info is not None:
        entry: dict[str, Any] = json.loads(json.dumps(info))
        entry.setdefault("name", class_type)
        return entry
    required = {k: _normalize_input(v) for k, v in (declaration.get("inputs") or {}).items()}
    opt = {k: _normalize_input(v) for k, v in (declaration.get("optional") or {}).items()}
    input_section: dict[str, Any] = {"required": required}
    order: dict[str, Any] = {"required": list(required)}
    if opt:
        input_section["optional"] = opt
        order["optional"] = list(opt)
    outputs = list(declaration.get("outputs", ()))
    return {
        "input": input_section,
        "input_order": order,
        "output": outputs,
        "output_is_list": [False] * len(outputs),
        "output_name": list(declaration.get("output_names") or outputs),
        "name": class_type,
        "display_name": declaration.get("display_name") or class_type,
        "description": "",
        "python_module": "custom_nodes.comfytrio_fake",
        "category": declaration.get("category", "custom"),
        "output_node": declaration.get("output_node", False),
    }


def declared_node(class_type: str, declaration: NodeDeclaration) -> NodeDef:
    """Build a custom node type (see ``FakeComfyUI.declare_node``)."""
    for keyword in declaration:
        if keyword not in NodeDeclaration.__optional_keys__:
            raise TypeError(f"declare_node() got an unexpected keyword argument {keyword!r}")
    if (
        class_type == "SaveImageWebsocket"
        and declaration.get("inputs") is None
        and declaration.get("info") is None
    ):
        return save_image_websocket()
    entry = _entry(class_type, declaration)
    runner = _declared_runner(entry, declaration.get("run"), declaration.get("seconds", 0.0))
    return NodeDef(class_type, entry, runner, wildcard=True)


def _declared_runner(
    entry: Mapping[str, Any], run: Callable[[dict[str, Any]], Any] | None, seconds: float
) -> RunFn:
    outputs = list(entry.get("output", []))
    declared: dict[str, Any] = {}
    for section in ("required", "optional"):
        declared.update(entry.get("input", {}).get(section, {}) or {})

    async def runner(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
        if seconds:
            await ctx.gpu_sleep(seconds)
        if run is not None:
            result = run(dict(inputs))
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, Mapping):
                ui = result.get("ui")
                return tuple(result.get("result", ())), dict(ui) if ui else None
            if result is None:
                return (), None
            return tuple(result), None
        values: list[Any] = []
        for kind in outputs:
            found = _NO_VALUE
            for name, spec in declared.items():
                if name in inputs and spec and spec[0] == kind:
                    found = inputs[name]
                    break
            if found is _NO_VALUE:
                found = _default_for(kind, str(entry.get("name", "custom")))
            values.append(found)
        return tuple(values), None

    return runner


_NO_VALUE = object()


def _default_for(kind: Any, label: str) -> Any:
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(
        kind if isinstance(kind, str) else "", SimObject(str(kind), label)
    )
