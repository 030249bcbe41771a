"""What a job is made of, from text: the workflow file, a params file, ``--param`` and
``--scale`` assignments, ``--model`` and ``--lora``.

The command line knows no param type: the type of ``--param "TITLE=VALUE"`` comes from the
plugins (``infer_param_type`` hook), and the value from the type's ``parse_text``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .. import LoRARef, ModelRef, ParamError, Plugins, UnknownParamTypeError
from .._workflow import node_ids_by_title, split_mapping
from ._common import UsageError

__all__ = [
    "build_params",
    "load_param_file",
    "load_workflow",
    "parse_lora",
    "parse_model",
]


def _read_json(path: Path, what: str) -> Any:
    """The JSON in ``path``; ``UsageError`` (starting with ``what``) when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{what}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"{what}: not valid JSON ({exc})") from None


def load_workflow(path: Path) -> dict[str, Any]:
    """Read an API-format workflow (exported with "Save (API)"); a ``{"prompt": {...}}``
    body is accepted too.

    Raises ``UsageError`` for a missing file, bad JSON, or a UI-format workflow.
    """
    data = _read_json(path, f"workflow {path}")
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise UsageError(
            f"workflow {path} is in ComfyUI's UI format: export it with "
            '"Save (API)" (Workflow menu > Export (API)) and give that file'
        )
    if (
        not isinstance(data, dict)
        or not data
        or not all(isinstance(n, dict) and "class_type" in n for n in data.values())
    ):
        raise UsageError(
            f"workflow {path} is not an API-format workflow (node id -> "
            '{"class_type", "inputs", "_meta"}): export it with "Save (API)"'
        )
    return data


def load_param_file(path: Path) -> dict[str, dict[str, Any]]:
    """Read a params file in the seed library's format::

        {"steps": {"type": "integer", "value": 20, "node_mappings": "API - STEP",
                   "gpu_scale": false}}

    Raises ``UsageError`` when it cannot be read or is not a JSON object of objects (each
    entry is checked later, with the workflow, by ``validate_params``).
    """
    data = _read_json(path, f"--param-file {path}")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError(
            f"--param-file {path}: expects a JSON object of params, e.g. "
            '{"steps": {"type": "integer", "value": 20, "node_mappings": "API - STEP"}}'
        )
    return {str(k): dict(v) for k, v in data.items()}


def _split_assignment(flag: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f'{flag} expects TITLE=VALUE (e.g. {flag} "API - STEP=20"), got {text!r}')
    return key, value


def _names_a_node(workflow: Mapping[str, Any], mapping: str) -> bool:
    """True when ``mapping`` is a node title of the workflow, or ``TITLE.INPUT`` of one."""
    return bool(node_ids_by_title(workflow, split_mapping(workflow, mapping)[0]))


def _new_param(
    workflow: Mapping[str, Any], plugins: Plugins, flag: str, key: str, text: str
) -> tuple[str, dict[str, Any]]:
    """The name and entry (type and ``node_mappings``) of a param for ``KEY=TEXT``."""
    types = plugins.param_types()
    head, colon, tail = key.rpartition(":")
    if colon and not _names_a_node(workflow, key):
        if tail in types:
            return head, {"type": tail, "node_mappings": head}
        if _names_a_node(workflow, head):  # TITLE:TYPE with a type not installed
            raise UnknownParamTypeError(head, tail, sorted(types))
    type_name = plugins.infer_param_type(workflow, key, text)
    if type_name is None:
        raise ParamError(
            key,
            f'no plugin says which type it takes: write {flag} "{key}:TYPE={text}" with a '
            f"TYPE of: {', '.join(sorted(types)) or 'none installed'}",
        )
    return key, {"type": type_name, "node_mappings": key}


def build_params(
    workflow: Mapping[str, Any],
    assignments: Iterable[tuple[str, str]],
    *,
    plugins: Plugins,
    file_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The ``params`` dict from a params file plus ``--param``/``--scale`` assignments.

    ``assignments`` are ``(flag, "KEY=VALUE")`` pairs in command-line order, ``flag`` being
    ``--param`` or ``--scale`` (``--scale`` also sets ``gpu_scale``). ``KEY`` is, in order:
    the name of a params-file entry (its value is replaced), the title an entry maps to (the
    same), ``TITLE:TYPE`` with ``TYPE`` a type of ``plugins`` (a new param of that type), or
    a node title of the workflow (a new param of that name, of the type the plugins infer:
    ``Plugins.infer_param_type``). A key that is none of these becomes a param for that
    title, so ``validate_params`` reports it with the titles that exist. ``VALUE`` becomes
    the value through the param type's ``parse_text``.

    Raises ``UsageError`` for an assignment without ``=``, ``UnknownParamTypeError`` for
    ``TITLE:TYPE`` with a title of the workflow and a type no plugin provides (listing those
    installed), ``ParamError`` for a value its type refuses or a title no plugin can type,
    ``PluginError`` for a plugin that fails.
    """
    params: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (file_params or {}).items()}
    by_title: dict[str, str] = {}
    for name, entry in params.items():
        mappings = entry.get("node_mappings")
        for title in [mappings] if isinstance(mappings, str) else mappings or []:
            if isinstance(title, str):
                by_title.setdefault(title, name)
    for flag, text in assignments:
        key, raw = _split_assignment(flag, text)
        found = key if key in params else by_title.get(key)
        if found is None:
            found, new = _new_param(workflow, plugins, flag, key, raw)
            params[found] = new
            by_title[found] = found
        entry = params[found]
        type_name = entry.get("type")
        # A params-file entry without a str type keeps the text: validate_params says why.
        entry["value"] = (
            plugins.parse_text(type_name, raw, found) if isinstance(type_name, str) else raw
        )
        if flag == "--scale":
            entry["gpu_scale"] = True
    return params


def parse_model(text: str) -> ModelRef:
    """``--model checkpoints/juggernaut_xl.safetensors`` -> ``ModelRef("checkpoints", ...)``;
    raises ``UsageError`` without a folder."""
    folder, sep, name = text.partition("/")
    if not sep or not folder or not name:
        raise UsageError(
            f"--model expects FOLDER/NAME (e.g. checkpoints/juggernaut_xl.safetensors), "
            f"got {text!r}"
        )
    return ModelRef(type=folder, name=name)


def parse_lora(text: str) -> LoRARef:
    """``--lora NAME=URL[@STRENGTH]`` -> ``LoRARef``; raises ``UsageError``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise UsageError(
            "--lora expects NAME=URL[@STRENGTH] (e.g. detail.safetensors="
            f"https://example.com/detail.safetensors@0.8), got {text!r}"
        )
    url, strength = rest, 1.0
    head, at, tail = rest.rpartition("@")
    if at:
        try:
            strength = float(tail)
            url = head
        except ValueError:
            pass  # an @ inside the URL (user@host), not a strength
    if not math.isfinite(strength):
        raise UsageError(f"--lora {name}: the strength must be a finite number, got {tail!r}")
    return LoRARef(name=name, url=url, strength=strength)
