"""Checking a workflow against what one server says it has (``GET /object_info``), without
sending it: the problems ComfyUI's own validation would refuse, all of them at once.

ComfyUI walks back from each output node and stops at the first unknown class; a dry run
wants every problem, so each node is looked at on its own, in the workflow's order. The
rules are ComfyUI 0.3.64's (``docs/client.md``, "Dry run"): an unknown ``class_type``; a
required input that is absent; a link (``[node_id, slot]``) to a node that is not there, to
a slot its class does not have, or of another type; a literal value that cannot be read as
its ``INT``/``FLOAT`` (or that a ``BOOLEAN`` would misread), that is below ``min`` or above
``max``, or that is not in its list (the list of a loader input is the server's model
files). Linked values are not range-checked (ComfyUI does not either); extra inputs are
ignored; a ``LoadImage`` name in a sub-folder or with a ``[type]`` suffix is left to the
server.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import attrs

from ._errors import ComfyAPIError, shown
from ._workflow import title_of

__all__ = ["PROBLEM_KINDS", "WorkflowProblem", "find_problems", "short_list"]

PROBLEM_KINDS = (
    "unknown_node_class",
    "required_input_missing",
    "bad_linked_input",
    "return_type_mismatch",
    "invalid_input_type",
    "value_smaller_than_min",
    "value_bigger_than_max",
    "value_not_in_list",
    "prompt_no_outputs",
    "model_not_found",
    "server_unavailable",
    "param_error",
    "job_error",
)
"""Every ``WorkflowProblem.kind``. Those ComfyUI also reports keep its names (its
``node_errors`` types); ``unknown_node_class`` is its ``invalid_prompt`` "node X does not
exist"."""

_SHOWN = 8
"""How many allowed values a problem lists before saying how many there are."""


@attrs.frozen
class WorkflowProblem:
    """One thing that would stop a job, found by a dry run (``ComfyAPI.check_workflow``).

    Node problems name the node (``node_id``, ``title``, ``class_type``), the input, the
    value found and what is allowed (a short list); problems of a param name the param
    and keep the typed error that ``run_workflow`` would have raised (``error``).
    """

    kind: str
    """What is wrong: one of ``PROBLEM_KINDS`` (``value_not_in_list``, ...)."""
    message: str
    """One sentence that says what is wrong and where."""
    node_id: str | None = None
    """The node at fault, by id (None: not a node's problem)."""
    title: str | None = None
    """Its ``_meta.title`` (None when it has none)."""
    class_type: str | None = None
    """Its ``class_type``."""
    input_name: str | None = None
    """The input at fault (None: the whole node, or no node)."""
    value: Any = None
    """The value found (a link ``[node_id, slot]``, a model name...)."""
    allowed: tuple[str, ...] = ()
    """What would be accepted, shortened (``short_list``): the first names of the list,
    the range, the node's titles or outputs, the close names of a node class."""
    param: str | None = None
    """The param at fault (param problems), or the param whose value a node input got."""
    instances: tuple[str, ...] = ()
    """The servers on which it holds (empty: on all, or before any server is asked)."""
    shards: tuple[int, ...] = ()
    """The shards whose workflow has it (empty: not a shard's problem)."""
    error: ComfyAPIError | None = attrs.field(default=None, eq=False, repr=False)
    """The error ``run_workflow`` raises for it (param and job problems), else None."""


def short_list(values: Collection[Any], limit: int = _SHOWN) -> tuple[str, ...]:
    """At most ``limit`` of ``values`` as text, then ``"... (N in all)"`` when cut."""
    items = [v if isinstance(v, str) else shown(v) for v in values]
    if len(items) <= limit:
        return tuple(items)
    return (*items[:limit], f"... ({len(items)} in all)")


def _declared(
    spec: Mapping[str, Any],
) -> Iterator[tuple[str, bool, str | list[Any], dict[str, Any]]]:
    """(input name, required, type or list of choices, options) of every input a node
    class declares; what is malformed in ``spec`` is skipped."""
    groups = spec.get("input")
    if not isinstance(groups, Mapping):
        return
    for group, required in (("required", True), ("optional", False)):
        entries = groups.get(group)
        if not isinstance(entries, Mapping):
            continue
        for name, entry in entries.items():
            if not isinstance(entry, list | tuple) or not entry:
                continue
            kind = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], Mapping) else {}
            if kind == "COMBO" and isinstance(options.get("options"), list):
                kind = options["options"]  # the newer spelling of a list input
            if isinstance(kind, str | list):
                yield str(name), required, kind, dict(options)


def _outputs(spec: Mapping[str, Any]) -> list[Any]:
    outputs = spec.get("output")
    return list(outputs) if isinstance(outputs, list | tuple) else []


def _types_meet(given: Any, wanted: Any) -> bool:
    """Whether an output of type ``given`` may feed an input of type ``wanted``: the same
    name, a ``*`` on either side, or one name in common (``"IMAGE,MASK"``). Lists and other
    non-strings are not judged here (True)."""
    if not isinstance(given, str) or not isinstance(wanted, str) or given == wanted:
        return True
    if "*" in (given, wanted):
        return True
    return not {t.strip() for t in given.split(",")}.isdisjoint(
        t.strip() for t in wanted.split(",")
    )


class _Node:
    """One node of the workflow being checked, and the problems found in it."""

    def __init__(self, node_id: str, node: Mapping[str, Any], found: list[WorkflowProblem]) -> None:
        self.node_id = node_id
        self.title = title_of(node)
        self.class_type = str(node.get("class_type"))
        raw = node.get("inputs")
        self.inputs: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        self.found = found

    @property
    def label(self) -> str:
        shown_title = f"{self.title!r} " if self.title is not None else ""
        return f"node {shown_title}(id {self.node_id}, {self.class_type})"

    def problem(
        self,
        kind: str,
        text: str,
        input_name: str | None = None,
        value: Any = None,
        allowed: tuple[str, ...] = (),
    ) -> None:
        where = f"{self.label}, input {input_name!r}" if input_name else self.label
        self.found.append(
            WorkflowProblem(
                kind,
                f"{where}: {text}",
                self.node_id,
                self.title,
                self.class_type,
                input_name,
                value,
                allowed,
            )
        )


def find_problems(
    workflow: Mapping[str, Any],
    object_info: Mapping[str, Any],
    *,
    unchecked: Collection[tuple[str, str]] = (),
    present: Collection[str] = (),
) -> list[WorkflowProblem]:
    """Every problem of ``workflow`` (API format) on a server whose ``/object_info`` is
    ``object_info``, in the workflow's order (none: ComfyUI would accept it).

    ``unchecked``: (node id, input) pairs whose values are not checked (an image a dry run
    did not upload). ``present``: names that count as listed in every list input (LoRAs
    that the job downloads before it runs). Pure: no I/O, and ``workflow`` is not changed.
    """
    found: list[WorkflowProblem] = []
    known = sorted(str(k) for k, v in object_info.items() if isinstance(v, Mapping))
    has_output = any_unknown = False
    for node_id, raw in workflow.items():
        if not isinstance(raw, Mapping):
            continue
        node = _Node(str(node_id), raw, found)
        spec = object_info.get(node.class_type)
        if not isinstance(spec, Mapping):
            any_unknown = True
            close = difflib.get_close_matches(node.class_type, known, n=_SHOWN)
            node.problem(
                "unknown_node_class",
                "the server has no such node class (a custom node that is not installed?)",
                allowed=tuple(close),
            )
            continue
        has_output = has_output or spec.get("output_node") is True
        for name, required, kind, options in _declared(spec):
            if name not in node.inputs:
                if required:
                    node.problem(
                        "required_input_missing",
                        "required input is missing: link it or set it",
                        name,
                        allowed=(kind if isinstance(kind, str) else "one of its list",),
                    )
                continue
            value = node.inputs[name]
            if (node.node_id, name) in unchecked:
                continue
            if isinstance(value, list):
                _check_link(node, name, value, kind, workflow, object_info)
            else:
                _check_value(node, name, value, kind, options, present)
    if not has_output and not any_unknown and workflow:
        found.append(
            WorkflowProblem(
                "prompt_no_outputs",
                "the workflow has no output node (SaveImage, PreviewImage...): ComfyUI "
                "refuses a prompt with nothing to output",
            )
        )
    return found


def _check_link(
    node: _Node,
    name: str,
    link: list[Any],
    kind: str | list[Any],
    workflow: Mapping[str, Any],
    object_info: Mapping[str, Any],
) -> None:
    ids = sorted(str(k) for k in workflow)
    if len(link) != 2 or not isinstance(link[1], int) or isinstance(link[1], bool):
        node.problem(
            "bad_linked_input", "a link must be [node_id, output_slot]", name, link, short_list(ids)
        )
        return
    source_id, slot = link
    source = workflow.get(source_id, workflow.get(str(source_id)))
    if not isinstance(source, Mapping):
        node.problem(
            "bad_linked_input",
            f"links to node {source_id!r}, which is not in the workflow",
            name,
            link,
            short_list(ids),
        )
        return
    source_spec = object_info.get(str(source.get("class_type")))
    if not isinstance(source_spec, Mapping):
        return  # its unknown class is a problem of its own
    outputs = _outputs(source_spec)
    if not 0 <= slot < len(outputs):
        slots = tuple(f"{i}: {t}" for i, t in enumerate(outputs))
        node.problem(
            "bad_linked_input",
            f"links to output {slot} of node {source_id!r} ({source.get('class_type')}), "
            f"which has {len(outputs)} output(s)",
            name,
            link,
            slots,
        )
        return
    if not _types_meet(outputs[slot], kind):
        node.problem(
            "return_type_mismatch",
            f"links to a {outputs[slot]} output of node {source_id!r}, where {kind} is expected",
            name,
            link,
            (str(kind),),
        )


def _check_value(
    node: _Node,
    name: str,
    value: Any,
    kind: str | list[Any],
    options: Mapping[str, Any],
    present: Collection[str],
) -> None:
    if isinstance(value, Mapping) and "__value__" in value:
        value = value["__value__"]  # how the frontend wraps a list value
    if isinstance(kind, list):
        _check_choice(node, name, value, kind, options, present)
        return
    number: float | None = None
    if kind in ("INT", "FLOAT"):
        try:
            number = int(value) if kind == "INT" else float(value)
        except (TypeError, ValueError, OverflowError):
            node.problem(
                "invalid_input_type",
                f"{shown(value)} cannot be read as {kind}",
                name,
                value,
                (kind,),
            )
            return
    elif kind == "BOOLEAN" and isinstance(value, str):
        node.problem(
            "invalid_input_type",
            f"{shown(value)} is a string: ComfyUI reads any non-empty string as true",
            name,
            value,
            ("true", "false"),
        )
        return
    elif kind in ("STRING", "BOOLEAN") and isinstance(value, Mapping):
        node.problem(
            "invalid_input_type", f"a JSON object where {kind} is expected", name, value, (kind,)
        )
        return
    if number is None:
        return
    low, high = options.get("min"), options.get("max")
    span = _span(low, high)
    if isinstance(low, int | float) and number < low:
        node.problem(
            "value_smaller_than_min",
            f"{shown(value)} is below the minimum {low}",
            name,
            value,
            span,
        )
    elif isinstance(high, int | float) and number > high:
        node.problem(
            "value_bigger_than_max",
            f"{shown(value)} is above the maximum {high}",
            name,
            value,
            span,
        )


def _span(low: object, high: object) -> tuple[str, ...]:
    if isinstance(low, int | float) and isinstance(high, int | float):
        return (f"from {low} to {high}",)
    if isinstance(low, int | float):
        return (f"at least {low}",)
    return (f"at most {high}",) if isinstance(high, int | float) else ()


def _check_choice(
    node: _Node,
    name: str,
    value: Any,
    choices: list[Any],
    options: Mapping[str, Any],
    present: Collection[str],
) -> None:
    try:
        if value in choices or (isinstance(value, str) and value in present):
            return
    except Exception:  # a value that cannot be compared (an unhashable oddity)
        pass
    uploads = any(k.endswith("_upload") and options[k] for k in options)
    if uploads and isinstance(value, str) and ("/" in value or value.endswith("]")):
        return  # a sub-folder or "name [input]": only the server can tell
    if uploads:
        text = f"{shown(value)} is not in the server's input folder"
    elif not choices:
        text = f"{shown(value)}: the server lists nothing for this input (no files in its folder?)"
    else:
        text = f"{shown(value)} is not one of the {len(choices)} the server lists"
    close = (
        difflib.get_close_matches(value, [str(c) for c in choices], n=1, cutoff=0.8)
        if isinstance(value, str)
        else []
    )
    if close:
        text += f" (did you mean {close[0]!r}?)"
    node.problem("value_not_in_list", text, name, value, short_list(choices))
