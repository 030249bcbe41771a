"""Prompt validation with the answers a real ComfyUI 0.3.64 gives.

The shapes come from ``06_validation_errors.json`` and ``18_missing_models_value_not_in_list.json``:
``invalid_prompt`` (unknown or missing class_type), ``prompt_no_outputs``,
``prompt_outputs_failed_validation`` with per-node errors, and a 200 carrying
``node_errors`` when only some outputs are invalid. Values are coerced and the coerced
prompt is what runs; linked values are not range-checked; extra inputs are ignored. Errors
that ComfyUI reports as Python exceptions (a link to a missing node, a slot out of range)
are real Python exceptions here too, raised by the same kind of lookups.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from ._faults import exception_type_name
from ._nodes import NodeRegistry
from ._nodes_base import NodeDef
from ._paths import FakePaths

__all__ = ["ValidationResult", "validate_prompt"]

logger = logging.getLogger("comfytrio.testing")

ValidationResult = tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]
"""(valid, error, outputs to execute, node_errors), like ``execution.validate_prompt``."""

_Verdict = tuple[bool, list[dict[str, Any]], Any]


def _types_match(received: Any, expected: Any) -> bool:
    if received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    if "*" in (received, expected):
        # ComfyUI's IO.ANY (PreviewAny's input) matches anything; so does a declared node's.
        return True
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return bool(got & want)


class _Validator:
    def __init__(self, registry: NodeRegistry, paths: FakePaths, prompt: Any) -> None:
        self.registry = registry
        self.paths = paths
        self.prompt = prompt
        self.validated: dict[Any, _Verdict] = {}
        self._active: set[Any] = set()
        self._types: dict[str, dict[str, dict[str, Any]]] = {}

    def input_types(self, node: NodeDef) -> dict[str, dict[str, Any]]:
        if node.class_type not in self._types:
            self._types[node.class_type] = node.input_types(self.paths)
        return self._types[node.class_type]

    def check(self, item: Any) -> _Verdict:
        if item in self.validated:
            return self.validated[item]
        if item in self._active:
            # ComfyUI recurses around a cycle until Python's recursion limit; the outcome
            # (every node on the cycle invalid, with no reasons of its own) is the same.
            raise RecursionError("maximum recursion depth exceeded")
        self._active.add(item)
        try:
            verdict = self._check(item)
        finally:
            self._active.discard(item)
        self.validated[item] = verdict
        return verdict

    def _check(self, unique_id: Any) -> _Verdict:
        inputs = self.prompt[unique_id]["inputs"]
        class_type = self.prompt[unique_id]["class_type"]
        node = self.registry.get(class_type)
        if node is None:
            raise KeyError(class_type)
        types = self.input_types(node)
        names: list[tuple[str, str]] = []
        for category in ("required", "optional"):
            names += [(name, category) for name in types.get(category, {})]
        errors: list[dict[str, Any]] = []
        valid = True
        for name, category in names:
            spec = types[category][name]
            input_type = spec[0]
            extra: dict[str, Any] = spec[1] if len(spec) > 1 else {}
            if name not in inputs:
                if category == "required":
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": f"{name}",
                            "extra_info": {"input_name": name},
                        }
                    )
                continue
            value = inputs[name]
            config = [input_type, extra]
            if isinstance(value, list):
                if not self._check_link(node, name, value, input_type, config, errors):
                    valid = False
                continue
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
                inputs[name] = value
            try:
                if input_type == "INT":
                    value = int(value)
                elif input_type == "FLOAT":
                    value = float(value)
                elif input_type == "STRING":
                    value = str(value)
                elif input_type == "BOOLEAN":
                    value = bool(value)
                inputs[name] = value
            except Exception as exc:
                errors.append(
                    {
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{name}, {value}, {exc}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": config,
                            "received_value": value,
                            "exception_message": str(exc),
                        },
                    }
                )
                continue
            if name in node.validate_inputs:
                continue
            error = self._check_value(name, value, input_type, extra, config)
            if error is not None:
                errors.append(error)
        if node.validate is not None and node.validate_inputs:
            given = {
                n: (None if isinstance(inputs.get(n), list) else inputs.get(n))
                for n in node.validate_inputs
            }
            outcome = node.validate(self.paths, given)
            if outcome is not True:
                for name in node.validate_inputs:
                    details = name if outcome is False else f"{name} - {outcome}"
                    errors.append(
                        {
                            "type": "custom_validation_failed",
                            "message": "Custom validation failed for node",
                            "details": details,
                            "extra_info": {"input_name": name},
                        }
                    )
        if errors or not valid:
            return (False, errors, unique_id)
        return (True, [], unique_id)

    def _check_link(
        self,
        node: NodeDef,
        name: str,
        value: list[Any],
        input_type: Any,
        config: list[Any],
        errors: list[dict[str, Any]],
    ) -> bool:
        """Check a linked input; False when the linked node is invalid."""
        if len(value) != 2:
            errors.append(
                {
                    "type": "bad_linked_input",
                    "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    "details": f"{name}",
                    "extra_info": {
                        "input_name": name,
                        "input_config": config,
                        "received_value": value,
                    },
                }
            )
            return True
        source_id = value[0]
        source_class = self.prompt[source_id]["class_type"]
        source = self.registry.get(source_class)
        if source is None:
            raise KeyError(source_class)
        received = source.return_types[value[1]]
        if not _types_match(received, input_type):
            mismatch = f"received_type({received}) mismatch input_type({input_type})"
            errors.append(
                {
                    "type": "return_type_mismatch",
                    "message": "Return type mismatch between linked nodes",
                    "details": f"{name}, {mismatch}",
                    "extra_info": {
                        "input_name": name,
                        "input_config": config,
                        "received_type": received,
                        "linked_node": value,
                    },
                }
            )
            return True
        try:
            verdict = self.check(source_id)
        except Exception as exc:
            self.validated[source_id] = (
                False,
                [
                    {
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(exc),
                        "extra_info": {
                            "input_name": name,
                            "input_config": config,
                            "exception_message": str(exc),
                            "exception_type": exception_type_name(exc),
                            "traceback": traceback.format_tb(exc.__traceback__),
                            "linked_node": value,
                        },
                    }
                ],
                source_id,
            )
            return False
        return verdict[0] is not False

    @staticmethod
    def _check_value(
        name: str, value: Any, input_type: Any, extra: dict[str, Any], config: list[Any]
    ) -> dict[str, Any] | None:
        if "min" in extra and value < extra["min"]:
            return {
                "type": "value_smaller_than_min",
                "message": f"Value {value} smaller than min of {extra['min']}",
                "details": f"{name}",
                "extra_info": {"input_name": name, "input_config": config, "received_value": value},
            }
        if "max" in extra and value > extra["max"]:
            return {
                "type": "value_bigger_than_max",
                "message": f"Value {value} bigger than max of {extra['max']}",
                "details": f"{name}",
                "extra_info": {"input_name": name, "input_config": config, "received_value": value},
            }
        if isinstance(input_type, list) and value not in input_type:
            listed: Any = config
            if len(input_type) > 20:
                shown = f"(list of length {len(input_type)})"
                listed = None
            else:
                shown = str(input_type)
            return {
                "type": "value_not_in_list",
                "message": "Value not in list",
                "details": f"{name}: '{value}' not in {shown}",
                "extra_info": {"input_name": name, "input_config": listed, "received_value": value},
            }
        return None


def validate_prompt(
    registry: NodeRegistry, paths: FakePaths, prompt: Any, partial_targets: Any
) -> ValidationResult:
    """Validate ``prompt`` (coercing its values in place) as ComfyUI does.

    Python errors a real server would hit on malformed input (``prompt`` not a mapping, a
    node that is not an object) propagate; the HTTP layer turns them into ComfyUI's 500.
    """
    outputs: list[Any] = []
    for node_id in prompt:
        if "class_type" not in prompt[node_id]:
            return (
                False,
                {
                    "type": "invalid_prompt",
                    "message": "Cannot execute because a node is missing the class_type property.",
                    "details": f"Node ID '#{node_id}'",
                    "extra_info": {},
                },
                [],
                {},
            )
        class_type = prompt[node_id]["class_type"]
        node = registry.get(class_type)
        if node is None:
            return (
                False,
                {
                    "type": "invalid_prompt",
                    "message": f"Cannot execute because node {class_type} does not exist.",
                    "details": f"Node ID '#{node_id}'",
                    "extra_info": {},
                },
                [],
                {},
            )
        wanted = partial_targets is None or node_id in partial_targets
        if node.output_node and wanted and node_id not in outputs:
            outputs.append(node_id)
    if not outputs:
        return (
            False,
            {
                "type": "prompt_no_outputs",
                "message": "Prompt has no outputs",
                "details": "",
                "extra_info": {},
            },
            [],
            {},
        )

    validator = _Validator(registry, paths, prompt)
    good: list[str] = []
    failed: list[tuple[Any, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for output in outputs:
        try:
            ok, reasons, _ = validator.check(output)
        except Exception as exc:
            ok = False
            reasons = [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(exc),
                    "extra_info": {
                        "exception_type": exception_type_name(exc),
                        "traceback": traceback.format_tb(exc.__traceback__),
                    },
                }
            ]
            validator.validated[output] = (False, reasons, output)
        if ok is True:
            good.append(output)
            continue
        logger.info("fake ComfyUI: output %s failed validation: %s", output, reasons)
        failed.append((output, reasons))
        for node_id, (node_ok, node_reasons, _) in validator.validated.items():
            if node_ok is not True and node_reasons:
                if node_id not in node_errors:
                    node_errors[node_id] = {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    }
                node_errors[node_id]["dependent_outputs"].append(output)
    if not good:
        lines = [f"{e['message']}: {e['details']}" for _, reasons in failed for e in reasons]
        return (
            False,
            {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": "\n".join(lines),
                "extra_info": {},
            },
            [],
            node_errors,
        )
    return (True, None, good, node_errors)
