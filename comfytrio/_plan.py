"""Planning a job: validate params, prepare them and the assets once, build every shard.

``plan_job`` knows params, shards and plugins, never what "integer" or "LoRA" means: each
``type`` goes to its ``ParamType`` plugin, models and LoRAs to the ``AssetResolver`` plugins.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack

import attrs
import httpx

from ._batch import BatchEdits, SplitKind, plan_split
from ._errors import (
    ComfyAPIError,
    NodeInputNotFoundError,
    NodeTitleNotFoundError,
    ParamError,
    PluginError,
    UnknownParamTypeError,
    shown,
)
from ._plugins import Plugins
from ._types import LoRARef, ModelRef
from ._workflow import (
    check_workflow,
    input_names,
    node_ids_by_title,
    split_mapping,
    titles,
    workflow_snapshot,
)
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
    "PlanArgs",
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
    """The seed given to each seed node, by node title (and each sampler's seed where the
    job does not set it: see ``ShardReport.seeds``)."""
    _values: tuple[Any, ...] = attrs.field(repr=False)
    """The value of each of the template's params for this shard, in order."""
    _template: _Template = attrs.field(repr=False, eq=False)
    batch_offset: int | None = None
    """Its first index in the job's whole batch (None without one ``gpu_scale`` param)."""
    _edits: BatchEdits = attrs.field(factory=BatchEdits, repr=False)
    """Its ``LatentFromBatch`` nodes and sampler seeds (``plan_split``)."""
    _built: dict[str, Any] | None = attrs.field(default=None, init=False, repr=False, eq=False)

    def build(self) -> dict[str, Any]:
        """A new copy of the job's workflow with this shard's values injected and every
        resolver's edits applied (the caller's workflow is never changed)."""
        template = self._template
        workflow: dict[str, Any] = json.loads(template.workflow_json)
        for param, value in zip(template.params, self._values, strict=True):
            param_type = template.types[param.type]
            who = partial(_injector, param_type, param)  # formatted only on a failure
            for node_id in param.node_ids:
                node, input_name = workflow[node_id], param.inputs.get(node_id)
                with _plugin_contract(who, "inject"):
                    if input_name is None:
                        param_type.inject(node, value, param)
                    else:
                        param_type.inject_input(node, input_name, value, param)
        for resolver in template.resolvers:
            with _plugin_contract(f"asset resolver {resolver.name!r}", "inject"):
                resolver.inject(workflow, template.job)
        self._edits.apply(workflow)
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
    split: SplitKind = "single"
    """How the shards relate to one GPU's run (``JobResult.split``)."""


def validate_params(
    plugins: Plugins, workflow: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
) -> list[Param]:
    """Check every param against its type and the workflow, without I/O.

    The params plugins add (``default_params`` hook: the ``K - SEED`` seed) are checked and
    returned too, after the caller's.

    A ``node_mappings`` string is a node title (exact match), or ``"TITLE.INPUT"`` (split at
    the last ``.``) when no node has that title: the value then goes into that input of the
    nodes titled ``TITLE`` (a link there is replaced by the value).

    Raises ``ParamError`` naming the param: not a dict, no ``type`` or ``node_mappings``, an
    unknown key, ``gpu_scale`` on a type that cannot split, a value its type refuses, an
    input two params write, a node one param maps with two inputs;
    ``UnknownParamTypeError`` listing the known types; ``NodeTitleNotFoundError`` listing the
    workflow's titles; ``NodeInputNotFoundError`` listing a node's inputs when it lacks the
    input named (``"KSampler.stpes"``) or the one its type writes (``input_for``: an
    ``integer`` mapped by title to a node without ``value``); ``ParamError`` (param
    ``"workflow"``) for a workflow that is not a dict of nodes (``check_workflow``);
    ``PluginError`` for a plugin's ``validate``, ``input_for`` or ``default_params`` that
    fails with anything but a ``ComfyAPIError``. Whatever the input, nothing else is raised.
    """
    check_workflow(workflow)
    if not isinstance(params, Mapping):
        raise ParamError("params", f"must be a dict of dicts, got {type(params).__name__}")
    types = plugins.param_types()
    extra = plugins.default_params(workflow, params)
    checked: list[Param] = []
    owners: dict[tuple[str, str | None], str] = {}  # (node id, input written) -> param
    for name, entry in [*params.items(), *extra.items()]:
        param, written = _parse(name, entry, workflow, types)
        for node_id, (title, input_name) in written.items():
            owner = owners.setdefault((node_id, input_name), param.name)
            if owner != param.name:
                where = f"input {input_name!r} of node title" if input_name else "node title"
                raise ParamError(name, f"{where} {title!r} already gets param {owner!r}")
        checked.append(param)
    return checked


# node id (as JSON names it) -> its title, the input a mapping names (None: a plain title), node
_Mapped = dict[str, tuple[str, str | None, Mapping[str, Any]]]


def _mapped(name: str, mappings: object, workflow: Mapping[str, Any]) -> _Mapped:
    """Every node ``node_mappings`` names (see ``validate_params``)."""
    wanted = [mappings] if isinstance(mappings, str) else mappings
    if not (isinstance(wanted, Sequence) and wanted and all(isinstance(t, str) for t in wanted)):
        raise ParamError(name, "needs 'node_mappings': a node title (or a list of titles)")
    mapped: _Mapped = {}
    for mapping in wanted:
        title, input_name = split_mapping(workflow, mapping)
        ids = node_ids_by_title(workflow, title)
        if not ids:
            raise NodeTitleNotFoundError(name, mapping, titles(workflow))
        for node_id in ids:
            key, node = str(node_id), workflow[node_id]
            if input_name is not None and input_name not in input_names(node):
                raise NodeInputNotFoundError(name, title, key, input_name, input_names(node))
            if key in mapped and mapped[key][1] != input_name:
                raise ParamError(
                    name, f"maps node {title!r} (id {key!r}) twice: use one param per input"
                )
            mapped[key] = (title, input_name, node)
    return mapped


def _parse(
    name: object, entry: object, workflow: Mapping[str, Any], types: Mapping[str, ParamType]
) -> tuple[Param, dict[str, tuple[str, str | None]]]:
    """The checked param, and (title, input written) by node id (None: ``inject`` decides)."""
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
    mapped = _mapped(name, entry.get("node_mappings"), workflow)
    gpu_scale = entry.get("gpu_scale", False)
    if not isinstance(gpu_scale, bool):
        raise ParamError(name, f"'gpu_scale' must be true or false, got {shown(gpu_scale)}")
    if gpu_scale and not param_type.scalable:
        raise ParamError(name, f"a {type_name!r} param cannot be split with 'gpu_scale'")
    param = Param(
        name=name,
        type=type_name,
        value=entry.get("value"),
        titles=tuple(dict.fromkeys(title for title, _, _ in mapped.values())),
        node_ids=tuple(mapped),
        gpu_scale=gpu_scale,
        options={k: v for k, v in entry.items() if k not in _RESERVED_KEYS},
        inputs={node_id: i for node_id, (_, i, _) in mapped.items() if i is not None},
    )
    plugin = f"param type {param_type.name!r}"
    with _plugin_contract(plugin, f"validate param {name!r}"):
        param_type.validate(param)
    written: dict[str, tuple[str, str | None]] = {}
    for node_id, (title, input_name, node) in mapped.items():
        if input_name is None:
            with _plugin_contract(plugin, f"name the input of param {name!r}"):
                input_name = param_type.input_for(node, param)
                if not isinstance(input_name, str | None):
                    raise TypeError(f"input_for returned {shown(input_name)}")
            if input_name is not None and input_name not in input_names(node):
                hint = f" (what a {type_name!r} param writes; to set another: '{title}.INPUT')"
                raise NodeInputNotFoundError(
                    name, title, node_id, input_name, input_names(node), hint=hint
                )
        written[node_id] = (title, input_name)
    return param, written


def job_seed_for(seed: int | None) -> int:
    """``seed`` checked (``ValueError`` outside 0..``MAX_SEED``), or a random one for None."""
    if seed is None:
        return secrets.randbelow(_RANDOM_SEEDS)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return seed


class PlanArgs(TypedDict):
    """The keyword arguments ``plan_job`` and ``plan_validated`` share (all required):
    what a job needs and where it runs."""

    models: Sequence[ModelRef]
    """The models the job needs (checked on every target)."""
    loras: Sequence[LoRARef]
    """The LoRAs the job needs (downloaded when missing)."""
    targets: Sequence[InstanceTarget]
    """Every server that may run a shard."""
    shard_count: int
    """How many shards to split the job into (a positive integer)."""
    models_path: Path | None
    """The local models root; None when every target is remote."""
    http: httpx.AsyncClient
    """The HTTP client for downloads and uploads."""


async def plan_job(
    plugins: Plugins,
    workflow: Mapping[str, Any],
    *,
    params: Mapping[str, Mapping[str, Any]],
    seed: int | None = None,
    same_images: bool = False,
    **args: Unpack[PlanArgs],
) -> JobPlan:
    """Validate, prepare and split one job into the workflows of its shards.

    ``args``: the ``PlanArgs``. In order: every param is validated and every resolver
    checks the job (no I/O yet); then, one after another, each param is prepared once
    (images fetched, written or uploaded to every target) and each resolver resolves (models
    checked, LoRAs downloaded); then each shard gets its values. A shard is kept only when
    its share of every ``gpu_scale`` param is above zero; without such a param there are
    ``shard_count`` shards. ``seed`` None draws a job seed (reported in ``JobPlan.seed``).
    A split batch never repeats an image (``plan_split``): an ``EmptyLatentImage`` batch
    is cut per shard with ``LatentFromBatch`` (the one-GPU images, where the samplers allow),
    else each shard's samplers get seeds of their own; ``same_images`` refuses, with a
    ``NotReproducibleError``, a split that would not make the one-GPU images.
    ``workflow`` is read here and never changed: each ``ShardPlan.build()`` makes a new
    copy from a snapshot taken here.

    Raises ``ParamError`` and its subclasses, ``UnsafeNameError``, ``ModelNotFoundError``,
    ``DownloadError``, ``PluginError`` (a plugin broke its contract), ``ValueError`` (a bad
    ``shard_count`` or ``seed``), ``TypeError`` (a keyword missing or unknown);
    ``ParamError`` (param ``"workflow"``) when the workflow is not JSON.
    """
    wrong = set(args) ^ PlanArgs.__required_keys__  # what mypy would say, for the others
    if wrong:
        raise TypeError(f"plan_job() keywords missing or unknown: {', '.join(sorted(wrong))}")
    count = args["shard_count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"shard_count must be a positive integer, got {count!r}")
    job_seed = job_seed_for(seed)
    checked = validate_params(plugins, workflow, params)
    snapshot = workflow_snapshot(workflow)
    return await plan_validated(
        plugins, snapshot, checked, job_seed=job_seed, same_images=same_images, **args
    )


async def plan_validated(
    plugins: Plugins,
    workflow_json: str,
    checked: Sequence[Param],
    *,
    job_seed: int,
    same_images: bool = False,
    **args: Unpack[PlanArgs],
) -> JobPlan:
    """``plan_job`` after its checks, from what they returned: the workflow's JSON text
    (``workflow_snapshot``), its params (``validate_params``) and the job seed
    (``job_seed_for``). The api checks a job when it is called and plans it when its turn
    comes, so what runs is the workflow as it was at the call."""
    types = plugins.param_types()
    resolvers = plugins.asset_resolvers()
    shard_count = args["shard_count"]
    job = JobContext(
        workflow=json.loads(workflow_json),
        params={p.name: p for p in checked},
        models=tuple(args["models"]),
        loras=tuple(args["loras"]),
        targets=tuple(args["targets"]),
        shard_count=shard_count,
        models_path=args["models_path"],
        seed=job_seed,
        http=args["http"],
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
    seed_params = frozenset(p.name for p in checked if types[p.type].reports_seed)
    split = plan_split(
        partial(json.loads, workflow_json),  # read only when the job is split
        checked,
        shares,
        kept,
        seed_params=seed_params,
        job_seed=job_seed,
        same_images=same_images,
    )
    shards: list[ShardPlan] = []
    for index in kept:
        shard = Shard(index=index, count=shard_count, job_seed=job_seed)
        # A cut batch keeps the one-GPU seeds: shard 0's (the value, or the job seed).
        first = Shard(index=0, count=shard_count, job_seed=job_seed)
        values: list[Any] = []
        scaled: dict[str, int] = {}
        seeds: dict[str, int] = {}
        for param in checked:
            param_type = types[param.type]
            value: Any
            if param.gpu_scale:
                value = scaled[param.name] = shares[param.name][index]
                if param.name in split.whole_batch:  # LatentFromBatch cuts the share
                    value = sum(shares[param.name][j] for j in kept)
            else:
                seeded = split.shared_seeds and param_type.reports_seed
                value = param_type.shard_value(
                    param, prepared[param.name], first if seeded else shard
                )
            values.append(value)
            if param_type.reports_seed:
                for title in param.titles:
                    seeds[title] = int(value)
        edits = split.edits.get(index, BatchEdits())
        seeds.update(edits.reported)
        offset = split.offsets.get(index)
        shards.append(ShardPlan(index, scaled, seeds, tuple(values), template, offset, edits))
    logger.debug(
        "planned %d shard(s) of %d, job seed %d, split %s",
        len(shards),
        shard_count,
        job_seed,
        split.kind,
    )
    return JobPlan(shards=shards, seed=job_seed, split=split.kind)


class _plugin_contract:
    """Turn an unexpected exception of a plugin into a ``PluginError`` saying who failed
    ``doing`` what: a plugin's bug must not look like a crash of the api (and a shard is
    built when a server takes it, where anything else would stop the scheduler).

    ``who`` may be a function that says it, called only on a failure. A class, not a
    ``contextlib`` generator: it is entered for every injection of every shard."""

    __slots__ = ("_doing", "_who")

    def __init__(self, who: str | Callable[[], str], doing: str) -> None:
        self._who = who
        self._doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not isinstance(exc, Exception) or isinstance(exc, ComfyAPIError):
            return  # none, one of ours, or a cancellation: it goes on as it is
        who = self._who if isinstance(self._who, str) else self._who()
        raise PluginError(f"{who} failed to {self._doing}: {exc!r}") from exc


def _injector(param_type: ParamType, param: Param) -> str:
    return f"param type {param_type.name!r} (param {param.name!r})"


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
