"""Which standard type ``comfytrio run --param "TITLE=VALUE"`` gives a node it names.

The ``infer_param_type`` hook of the standard plugin: the node titled ``K - SEED`` and
sampler nodes get ``seed``, a node of a known class its type (``PARAM_TYPE_BY_CLASS``),
another node with a ``value`` input the type of its current value, and a title that matches
no node the type the text looks like.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._params import DEFAULT_SEED_TITLE, _title

__all__ = ["PARAM_TYPE_BY_CLASS", "param_type_for", "type_of_text"]

PARAM_TYPE_BY_CLASS: Mapping[str, str] = {
    "PrimitiveInt": "integer",
    "PrimitiveFloat": "float",
    "PrimitiveString": "string",
    "PrimitiveStringMultiline": "string",
    "PrimitiveBoolean": "boolean",
    "LoadImage": "image",
    "LoadImageMask": "image",
}
"""The type ``--param TITLE=VALUE`` gets for a node of each class."""

_SEED_INPUTS = ("seed", "noise_seed")


def type_of_text(text: str) -> str:
    """The type ``text`` looks like: ``20`` integer, ``0.5`` float, ``true``/``false``
    boolean, anything else string."""
    try:
        int(text)
        return "integer"
    except ValueError:
        pass
    try:
        if math.isfinite(float(text)):
            return "float"
    except ValueError:
        pass
    return "boolean" if text.lower() in ("true", "false") else "string"


def _type_of_value(value: object) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    for kind, name in ((int, "integer"), (float, "float"), (str, "string")):
        if isinstance(value, kind):
            return name
    return None


def _first_titled(workflow: Mapping[str, Any], title: str) -> Mapping[str, Any] | None:
    node = next((n for n in workflow.values() if _title(n) == title), None)
    return node if isinstance(node, Mapping) else None


def _inputs(node: Mapping[str, Any]) -> Mapping[str, Any]:
    inputs = node.get("inputs")
    return inputs if isinstance(inputs, Mapping) else {}


def param_type_for(workflow: Mapping[str, Any], title: str, text: str) -> str:
    """The type of ``--param "TITLE=TEXT"``, from the first node titled ``title``.

    ``K - SEED`` and sampler nodes (a ``seed``/``noise_seed`` input and no ``value``) are
    ``seed``; a class of ``PARAM_TYPE_BY_CLASS`` its type; another node with a ``value``
    input the type of that value. ``"KSampler.steps"``, when no node has that title, names
    the ``steps`` input of the node titled ``KSampler``: a ``seed``/``noise_seed`` input is
    ``seed``, another the type of its current value. Else (no such node, a link, none of
    these) ``type_of_text``.
    """
    if title == DEFAULT_SEED_TITLE:
        return "seed"
    node = _first_titled(workflow, title)
    if node is not None:
        class_type = node.get("class_type")
        if isinstance(class_type, str) and class_type in PARAM_TYPE_BY_CLASS:
            return PARAM_TYPE_BY_CLASS[class_type]
        inputs = _inputs(node)
        if "value" not in inputs and any(name in inputs for name in _SEED_INPUTS):
            return "seed"
        return _type_of_value(inputs.get("value")) or type_of_text(text)
    head, dot, input_name = title.rpartition(".")
    node = _first_titled(workflow, head) if dot and head and input_name else None
    if node is not None:
        if input_name in _SEED_INPUTS:
            return "seed"
        return _type_of_value(_inputs(node).get(input_name)) or type_of_text(text)
    return type_of_text(text)
