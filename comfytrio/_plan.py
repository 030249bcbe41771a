"""Planning a job: validate params, prepare them and the assets once, build every shard.

``plan_job`` knows params, shards and plugins, never what "integer" or "LoRA" means: each
``type`` goes to its ``ParamType`` plugin, models and LoRAs to the ``AssetResolver`` plugins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx

from ._errors import (
    ComfyAPIError,
    NodeTitleNotFoundError,
    ParamError,
    PluginError,
    UnknownParamTypeError,
    shown,
)
from ._plugins import Plugins
from ._types import LoRARef, ModelRef
from ._workflow import node_ids_by_title, title_of, titles
from .hookspecs import (
    AssetResolver,
    InstanceTarget,
    JobContext,
    Param,
    ParamType,
    Shard,
)

__all__ = [
    "MAX_SEED",
    "JobPlan",
    "ShardPlan",
    "check_workflow",
    "job_seed_for",
    "plan_job",
    "plan_validated",
    "validate_params",
    "workflow_snapshot",
]

logger = logging.getLogger("comfytrio.plan")

MAX_SEED = 2**64 - 1
"""The largest seed ComfyUI's samplers accept."""

_RANDOM_SEEDS = 999_999
"""A job seed drawn at random is below this (the seed library's range, 0..999_998)."""

_RESERVED_KEYS = frozenset({"type", "value", "node_mappings", "gpu_scale"})


@attrs.frozen
class _Template:
    """What every shard of one job is built from: the workflow as JSON text (a snapshot taken
    when the job was called: compact while the job waits, and each shard's copy comes from
    ``json.loads``), the checked params with their types, and the resolvers that edit each
    shard."""

    workflow_json: str
    params: tuple[Param, ...]
    types: Mapping[str, ParamType]
    resolvers: tuple[AssetResolver, ...]
    job: JobContext


@attrs.frozen
class ShardPlan:
    """One shard of a job: its values, and how to build its workflow.

    The workflow is built when asked for (``build()``: the scheduler does it when a server
    takes the shard), not when the job is planned, so a job waiting in the queue holds the
    caller's workflow once and a few values per shard, not a copy per shard.
    """

    index: int
    """Its index among the job's ``shard_count`` shards (shards with a zero share are
    dropped, so indexes may stop short of ``shard_count``)."""
    scaled: dict[str, int]
    """Its share of every ``gpu_scale`` param, by param name."""
    seeds: dict[str, int]
    """The seed given to each seed node, by node title."""
    _values: tuple[Any, ...] = attrs.field(repr=False)
    """The value of each of the template's params for this shard, in order."""
    _template: _Template = attrs.field(repr=False, eq=False)
    _built: dict[str, Any] | None = attrs.field(default=None, init=False, repr=False, eq=False)

    def build(self) -> dict[str, Any]:
        """A new copy of the job's workflow with this shard's values injected and every
        resolver's edits applied (the caller's workflow is never changed)."""
        template = self._template
        workflow: dict[str, Any] = json.loads(template.workflow_json)
        for param, value in zip(template.params, self._values, strict=True):
            param_type = template.types[param.type]
            for node_id in param.node_ids:
                with _plugin_contract(f"param type {param_type.name!r} (param {param.name!r})"):
                    param_type.inject(workflow[node_id], value, param)
        for resolver in template.resolvers:
            with _plugin_contract(f"asset resolver {resolver.name!r}"):
                resolver.inject(workflow, template.job)
        return workflow

    @property
    def workflow(self) -> dict[str, Any]:
        """The shard's workflow, built on first access and kept (``build()`` makes a new one
        each time)."""
        if self._built is None:
            object.__setattr__(self, "_built", self.build())  # a cache, not a change of value
        assert self._built is not None
        return self._built


@attrs.frozen
class JobPlan:
    """A job, planned: its shards and the seed that reproduces them."""

    shards: list[ShardPlan]
    """The shards to run (only those with a non-zero share of every ``gpu_scale`` param)."""
    seed: int
    """The job seed used: pass it again (with the same shard count) to get the same seeds."""


def validate_params(
    plugins: Plugins, workflow: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
) -> list[Param]:
    """Check every param against its type and the workflow, without I/O.

    The params plugins add (``default_params`` hook: the ``K - SEED`` seed) are checked and
    returned too, after the caller's.

    Raises ``ParamError`` naming the param: not a dict, no ``type`` or ``node_mappings``, an
    unknown key, ``gpu_scale`` on a type that cannot split, a value its type refuses;
    ``UnknownParamTypeError`` listing the known types; ``NodeTitleNotFoundError`` listing the
    workflow's titles; ``ParamError`` (param ``"workflow"``) for a workflow that is not a
    dict of nodes (``check_workflow``); ``PluginError`` for a plugin's ``validate`` or
    ``default_params`` that fails with anything but a ``ComfyAPIError``. Whatever the
    input, nothing else is raised.
    """
    check_workflow(workflow)
    if not isinstance(params, Mapping):
        raise ParamError("params", f"must be a dict of dicts, got {type(params).__name__}")
    types = plugins.param_types()
    extra = plugins.default_params(workflow, params)
    checked: list[Param] = []
    owner_of_title: dict[str, str] = {}
    for name, entry in [*params.items(), *extra.items()]:
        param = _parse(name, entry, workflow, types)
        for title in param.titles:
            if title in owner_of_title:
                raise ParamError(
                    name, f"node title {title!r} already gets param {owner_of_title[title]!r}"
                )
            owner_of_title[title] = name
        checked.append(param)
    return checked


def check_workflow(workflow: object) -> None:
    """Refuse, with a ``ParamError`` for param ``"workflow"``, what is no API-format
    workflow: not a dict, a node id that is neither a string nor an int (or two that JSON
    would merge, ``1`` and ``"1"``), a node that is not a dict. Pure; the JSON check of the
    values is ``workflow_snapshot``'s."""
    if not isinstance(workflow, Mapping):
        raise ParamError(
            "workflow",
            f"must be a dict of nodes (ComfyUI's API format), got {type(workflow).__name__}",
        )
    seen: dict[str, object] = {}
    for node_id, node in workflow.items():
        if isinstance(node_id, bool) or not isinstance(node_id, str | int):
            raise ParamError("workflow", f"node id {shown(node_id)} must be a string")
        named = str(node_id)
        if named in seen:
            raise ParamError(
                "workflow", f"node ids {shown(seen[named])} and {shown(node_id)} are one in JSON"
            )
        seen[named] = node_id
        if not isinstance(node, Mapping):
            raise ParamError(
                "workflow",
                f"node {named!r} must be a dict with 'class_type' and 'inputs', "
                f"got {type(node).__name__}",
            )


def _parse(
    name: object, entry: object, workflow: Mapping[str, Any], types: Mapping[str, ParamType]
) -> Param:
    if not isinstance(name, str):
        raise ParamError(shown(name), "param names must be strings")
    if not isinstance(entry, Mapping):
        raise ParamError(
            name,
            f"must be a dict with 'type', 'value' and 'node_mappings', got {type(entry).__name__}",
        )
    type_name = entry.get("type")
    if not isinstance(type_name, str):
        raise ParamError(name, "needs a 'type' (a string)")
    param_type = types.get(type_name)
    if param_type is None:
        raise UnknownParamTypeError(name, type_name, list(types))
    unknown = sorted(str(k) for k in entry if k not in _RESERVED_KEYS | param_type.options)
    if unknown:
        allowed = sorted(_RESERVED_KEYS | param_type.options)
        raise ParamError(
            name,
            f"unknown key(s) {', '.join(map(repr, unknown))}; a {type_name!r} param "
            f"takes {', '.join(map(repr, allowed))}",
        )
    mappings = entry.get("node_mappings")
    if isinstance(mappings, str):
        wanted: tuple[str, ...] = (mappings,)
    elif isinstance(mappings, Sequence) and mappings and all(isinstance(t, str) for t in mappings):
        wanted = tuple(mappings)
    else:
        raise ParamError(name, "needs 'node_mappings': a node title (or a list of titles)")
    node_ids: list[str] = []
    for title in wanted:
        found = node_ids_by_title(workflow, title)
        if not found:
            raise NodeTitleNotFoundError(name, title, titles(workflow))
        node_ids.extend(str(node_id) for node_id in found)  # as JSON will name them
    gpu_scale = entry.get("gpu_scale", False)
    if not isinstance(gpu_scale, bool):
        raise ParamError(name, f"'gpu_scale' must be true or false, got {shown(gpu_scale)}")
    if gpu_scale and not param_type.scalable:
        raise ParamError(name, f"a {type_name!r} param cannot be split with 'gpu_scale'")
    param = Param(
        name=name,
        type=type_name,
        value=entry.get("value"),
        titles=wanted,
        node_ids=tuple(node_ids),
        gpu_scale=gpu_scale,
        options={k: v for k, v in entry.items() if k not in _RESERVED_KEYS},
    )
    try:
        param_type.validate(param)
    except ComfyAPIError:
        raise
    except Exception as exc:  # a plugin's bug must not look like a crash of the api
        raise PluginError(
            f"param type {param_type.name!r} failed to validate param {name!r}: {exc!r}"
        ) from exc
    return param


def job_seed_for(seed: int | None) -> int:
    """``seed`` checked (``ValueError`` outside 0..``MAX_SEED``), or a random one for None."""
    if seed is None:
        return secrets.randbelow(_RANDOM_SEEDS)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return seed


async def plan_job(
    plugins: Plugins,
    workflow: Mapping[str, Any],
    *,
    params: Mapping[str, Mapping[str, Any]],
    models: Sequence[ModelRef],
    loras: Sequence[LoRARef],
    targets: Sequence[InstanceTarget],
    shard_count: int,
    models_path: Path | None,
    http: httpx.AsyncClient,
    seed: int | None = None,
) -> JobPlan:
    """Validate, prepare and split one job into the workflows of its shards.

    In order: every param is validated and every resolver checks the job (no I/O yet); then,
    one after another, each param is prepared once (images fetched, written or uploaded to
    every target) and each resolver resolves (models checked, LoRAs downloaded); then each
    shard gets its values. A shard is kept only when its share of every ``gpu_scale`` param
    is above zero; without such a param there are ``shard_count`` shards. ``seed`` None
    draws a job seed (reported in ``JobPlan.seed``). ``workflow`` is read here and never
    changed: each ``ShardPlan.build()`` makes a new copy from a snapshot taken here.

    Raises ``ParamError`` and its subclasses, ``UnsafeNameError``, ``ModelNotFoundError``,
    ``DownloadError``, ``PluginError`` (a plugin broke its contract), ``ValueError`` (a bad
    ``shard_count`` or ``seed``); ``ParamError`` (param ``"workflow"``) when the workflow is
    not JSON.
    """
    if isinstance(shard_count, bool) or not isinstance(shard_count, int) or shard_count < 1:
        raise ValueError(f"shard_count must be a positive integer, got {shard_count!r}")
    job_seed = job_seed_for(seed)
    checked = validate_params(plugins, workflow, params)
    return await plan_validated(
        plugins,
        workflow_snapshot(workflow),
        checked,
        models=models,
        loras=loras,
        targets=targets,
        shard_count=shard_count,
        models_path=models_path,
        http=http,
        job_seed=job_seed,
    )


async def plan_validated(
    plugins: Plugins,
    workflow_json: str,
    checked: Sequence[Param],
    *,
    models: Sequence[ModelRef],
    loras: Sequence[LoRARef],
    targets: Sequence[InstanceTarget],
    shard_count: int,
    models_path: Path | None,
    http: httpx.AsyncClient,
    job_seed: int,
) -> JobPlan:
    """``plan_job`` after its checks, from what they returned: the workflow's JSON text
    (``workflow_snapshot``), its params (``validate_params``) and the job seed
    (``job_seed_for``). The api checks a job when it is called and plans it when its turn
    comes, so what runs is the workflow as it was at the call."""
    types = plugins.param_types()
    resolvers = plugins.asset_resolvers()
    job = JobContext(
        workflow=json.loads(workflow_json),
        params={p.name: p for p in checked},
        models=tuple(models),
        loras=tuple(loras),
        targets=tuple(targets),
        shard_count=shard_count,
        models_path=models_path,
        seed=job_seed,
        http=http,
        downloader=plugins.downloader,
    )
    for resolver in resolvers:
        resolver.check(job)

    # One after another: each plugin fans its own I/O out (an image to every target at once,
    # every LoRA at once), and a job costs no task while it is planned.
    prepared: dict[str, Any] = {}
    for param in checked:
        prepared[param.name] = await types[param.type].prepare(param, job)
    for resolver in resolvers:
        await resolver.resolve(job)

    shares: dict[str, list[int]] = {}
    for param in checked:
        if param.gpu_scale:
            shares[param.name] = _split(types[param.type], param, prepared[param.name], shard_count)
    kept = [i for i in range(shard_count) if all(s[i] > 0 for s in shares.values())]
    dropped = {
        name: sum(s[i] for i in range(shard_count) if i not in kept) for name, s in shares.items()
    }
    for name, lost in dropped.items():
        if lost:
            logger.warning(
                "param %r: %d of its total are dropped, because another gpu_scale "
                "param gives those shards nothing",
                name,
                lost,
            )

    template = _Template(workflow_json, tuple(checked), types, tuple(resolvers), job)
    shards: list[ShardPlan] = []
    for index in kept:
        shard = Shard(index=index, count=shard_count, job_seed=job_seed)
        values: list[Any] = []
        scaled: dict[str, int] = {}
        seeds: dict[str, int] = {}
        for param in checked:
            param_type = types[param.type]
            value: Any
            if param.gpu_scale:
                value = scaled[param.name] = shares[param.name][index]
            else:
                value = param_type.shard_value(param, prepared[param.name], shard)
            values.append(value)
            if param_type.reports_seed:
                for title in param.titles:
                    seeds[title] = int(value)
        shards.append(ShardPlan(index, scaled, seeds, tuple(values), template))
    logger.debug("planned %d shard(s) of %d, job seed %d", len(shards), shard_count, job_seed)
    return JobPlan(shards=shards, seed=job_seed)


def workflow_snapshot(workflow: Mapping[str, Any]) -> str:
    """The workflow as compact JSON text, what its shards are built from; ``ParamError``
    (param ``"workflow"``) for what is no workflow (``check_workflow``), or naming the node
    that is not JSON as it is sent: NaN and infinities, lone surrogates (UTF-8 cannot carry
    them), ints of over 4300 digits, cycles and nesting too deep are refused here, not when
    a server takes a shard."""
    check_workflow(workflow)
    try:
        # Interned: the jobs that share one workflow (only their params differ) share its text.
        return sys.intern(_to_json(workflow))
    except _NOT_JSON as exc:
        for node_id, node in workflow.items():
            try:
                _to_json(node)
            except _NOT_JSON:
                title = title_of(node) if isinstance(node, Mapping) else None
                where = f"node {str(node_id)!r}" + (f" ({title!r})" if title else "")
                raise ParamError("workflow", f"{where} is not JSON: {_describe(exc)}") from exc
        raise ParamError("workflow", f"is not JSON: {_describe(exc)}") from exc


_NOT_JSON = (TypeError, ValueError, RecursionError)
"""What ``json.dumps`` raises for what JSON cannot hold (``UnicodeEncodeError`` is a
``ValueError``)."""


def _to_json(value: object) -> str:
    """``value`` as the strict JSON httpx sends (no NaN, valid UTF-8)."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")  # lone surrogates: what httpx's own encode would choke on
    return text


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, RecursionError):
        return "nested too deep"
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _plugin_contract(who: str) -> Iterator[None]:
    """Turn an unexpected exception of a plugin's ``inject`` into a ``PluginError`` (a
    shard is built when a server takes it, where anything else would stop the scheduler)."""
    try:
        yield
    except ComfyAPIError:
        raise
    except Exception as exc:
        raise PluginError(f"{who} failed to inject: {exc!r}") from exc


def _split(param_type: ParamType, param: Param, prepared: Any, count: int) -> list[int]:
    shares = param_type.split(param, prepared, count)
    if len(shares) != count or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shares
    ):
        raise PluginError(
            f"param type {param_type.name!r} split param {param.name!r} into {shares!r}, "
            f"not {count} non-negative integers"
        )
    return list(shares)
