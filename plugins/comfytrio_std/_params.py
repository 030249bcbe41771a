"""The scalar param types: ``integer``, ``string``, ``float``, ``boolean`` and ``seed``."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from comfytrio import ParamError
from comfytrio.hookspecs import BaseParamType, Param, Shard, shown

__all__ = [
    "DEFAULT_SEED_TITLE",
    "MAX_INTEGER",
    "MIN_INTEGER",
    "BooleanType",
    "FloatType",
    "IntegerType",
    "SeedType",
    "StringType",
    "default_seed_param",
]

logger = logging.getLogger("comfytrio_std")

DEFAULT_SEED_TITLE = "K - SEED"
"""The node title the seed library gives a random seed per GPU without being asked."""

MAX_SEED = 2**64 - 1
"""The largest seed ComfyUI's samplers accept."""

MIN_INTEGER = -(2**63)
"""The smallest ``integer`` value (ComfyUI's ``INT`` inputs are 64-bit)."""

MAX_INTEGER = 2**64 - 1
"""The largest ``integer`` value (the widest ComfyUI takes: a seed)."""


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {shown(value)}"


def _int_from_text(text: str, param_name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ParamError(param_name, f"expects an integer, got {text!r}") from None


class IntegerType(BaseParamType):
    """``integer``: an ``int`` into ``inputs.value``; ``gpu_scale`` splits it with
    ``distribute()`` (then it must be at least 1)."""

    name = "integer"
    scalable = True

    def validate(self, param: Param) -> None:
        """Refuse anything but an ``int`` (``True`` included), one outside ``MIN_INTEGER``
        to ``MAX_INTEGER``, and a split value below 1."""
        super().validate(param)
        if isinstance(param.value, bool) or not isinstance(param.value, int):
            raise ParamError(param.name, f"expects an integer, got {_kind(param.value)}")
        if not MIN_INTEGER <= param.value <= MAX_INTEGER:
            raise ParamError(
                param.name,
                f"an integer must be from {MIN_INTEGER} to {MAX_INTEGER}, got {shown(param.value)}",
            )
        if param.gpu_scale and param.value < 1:
            raise ParamError(param.name, f"a gpu_scale value must be at least 1, got {param.value}")

    def parse_text(self, text: str, param_name: str) -> Any:
        """``"20"`` -> ``20``; refuse what ``int()`` cannot read."""
        return _int_from_text(text, param_name)


class StringType(BaseParamType):
    """``string``: a ``str`` into ``inputs.value``."""

    name = "string"

    def validate(self, param: Param) -> None:
        """Refuse anything but a ``str``, and one holding a NUL or a lone surrogate (which
        UTF-8, so the JSON sent to ComfyUI, cannot carry)."""
        super().validate(param)
        value = param.value
        if not isinstance(value, str):
            raise ParamError(param.name, f"expects a string, got {_kind(value)}")
        if "\x00" in value:
            raise ParamError(param.name, f"a string cannot hold a NUL character: {shown(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ParamError(
                param.name, f"the string is not valid Unicode ({exc.reason}): {shown(value)}"
            ) from exc


class FloatType(BaseParamType):
    """``float``: a finite number into ``inputs.value`` (an ``int`` becomes a float)."""

    name = "float"

    def validate(self, param: Param) -> None:
        """Refuse anything but a finite ``int`` or ``float`` (an ``int`` a float cannot hold,
        such as ``10**400``, included)."""
        super().validate(param)
        value = param.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamError(param.name, f"expects a number, got {_kind(value)}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int past the largest float
            finite = False
        if not finite:
            raise ParamError(param.name, f"expects a finite number, got {shown(value)}")

    def shard_value(self, param: Param, prepared: Any, shard: Shard) -> Any:
        """The value as a ``float``."""
        return float(prepared)

    def parse_text(self, text: str, param_name: str) -> Any:
        """``"0.5"`` -> ``0.5``; refuse what ``float()`` cannot read."""
        try:
            return float(text)
        except ValueError:
            raise ParamError(param_name, f"expects a number, got {text!r}") from None


class BooleanType(BaseParamType):
    """``boolean``: ``True`` or ``False`` into ``inputs.value``."""

    name = "boolean"

    def validate(self, param: Param) -> None:
        """Refuse anything but a ``bool`` (``1`` and ``"true"`` included)."""
        super().validate(param)
        if not isinstance(param.value, bool):
            raise ParamError(param.name, f"expects true or false, got {_kind(param.value)}")

    def parse_text(self, text: str, param_name: str) -> Any:
        """``true``/``yes``/``on``/``1`` -> ``True``, ``false``/``no``/``off``/``0`` ->
        ``False`` (any case); refuse anything else."""
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ParamError(param_name, f"expects true or false, got {text!r}")


class SeedType(BaseParamType):
    """``seed``: a distinct seed per shard, reported in ``ShardPlan.seeds``.

    Shard ``i`` gets ``value + i``; without a value, ``job_seed + i``. So shards that each
    run the whole job never repeat an image, a one-shard job with ``value: 42`` uses exactly
    42, and giving the job seed again (with as many shards) reproduces every seed. When the
    shards cut one ``EmptyLatentImage`` batch (``LatentFromBatch``), the plan asks every
    shard for shard 0's value: each keeps the one-GPU seed and draws the noise of its own
    batch indices. Goes into ``inputs.value``,
    or ``inputs.seed`` / ``inputs.noise_seed`` of a sampler node that has no ``value``.
    """

    name = "seed"
    reports_seed = True
    value_required = False

    def validate(self, param: Param) -> None:
        """Refuse a value that is not an integer from 0 to 2**64 - 1 (None is fine)."""
        value = param.value
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(param.name, f"expects an integer seed, got {_kind(value)}")
        if not 0 <= value <= MAX_SEED:
            raise ParamError(param.name, f"a seed must be from 0 to {MAX_SEED}, got {shown(value)}")

    def shard_value(self, param: Param, prepared: Any, shard: Shard) -> Any:
        """``(value or job seed) + shard index``, wrapped to stay a valid seed."""
        base = shard.job_seed if prepared is None else int(prepared)
        return (base + shard.index) % (MAX_SEED + 1)

    def input_for(self, node: Mapping[str, Any], param: Param) -> str | None:
        """``value``; else a sampler's ``seed`` or ``noise_seed``; ``value`` (which the
        plan then refuses, listing the node's inputs) when the node has none of them."""
        inputs = node.get("inputs")
        for name in ("value", "seed", "noise_seed"):
            if isinstance(inputs, Mapping) and name in inputs:
                return name
        return "value"

    def inject(self, node: dict[str, Any], value: Any, param: Param) -> None:
        """Into ``value``; else into a sampler's ``seed`` or ``noise_seed``."""
        node.setdefault("inputs", {})[self.input_for(node, param)] = value

    def parse_text(self, text: str, param_name: str) -> Any:
        """``"42"`` -> ``42``; refuse what ``int()`` cannot read."""
        return _int_from_text(text, param_name)


def _title(node: object) -> object:
    if isinstance(node, Mapping):
        meta = node.get("_meta")
        if isinstance(meta, Mapping):
            return meta.get("title")
    return None


def _names_seed_node(workflow: Mapping[str, Any], mapping: object) -> bool:
    """Whether a mapping names the ``K - SEED`` node: its title, or one of its inputs
    (``"K - SEED.value"``, when no node has that exact title)."""
    if mapping == DEFAULT_SEED_TITLE:
        return True
    return (
        isinstance(mapping, str)
        and mapping.rpartition(".")[0] == DEFAULT_SEED_TITLE
        and not any(_title(node) == mapping for node in workflow.values())
    )


def default_seed_param(
    workflow: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
) -> dict[str, Mapping[str, Any]] | None:
    """A ``seed`` param for the node titled ``K - SEED`` when the workflow has one and no
    param of the caller goes there, by title or to one of its inputs (the seed library
    seeds it at random per GPU)."""
    if not any(_title(node) == DEFAULT_SEED_TITLE for node in workflow.values()):
        return None
    for entry in params.values():
        if not isinstance(entry, Mapping):
            continue
        mappings = entry.get("node_mappings")
        targets = (
            [mappings]
            if isinstance(mappings, str)
            else (list(mappings) if isinstance(mappings, list | tuple) else [])
        )
        if any(_names_seed_node(workflow, target) for target in targets):
            if entry.get("type") != "seed":
                logger.warning(
                    "a %s param sets %r: every shard gets the same value, so a split batch "
                    "repeats its images (type 'seed' gives each shard its own)",
                    shown(entry.get("type")),
                    DEFAULT_SEED_TITLE,
                )
            return None
    return {DEFAULT_SEED_TITLE: {"type": "seed", "node_mappings": DEFAULT_SEED_TITLE}}
