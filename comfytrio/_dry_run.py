"""A dry run (``ComfyAPI.check_workflow``): plan a job as ``run_workflow`` would, check
every shard's workflow against every server's ``/object_info``, and send nothing.

The plan is ``plan_validated``'s own, run with its I/O taken out: a param type whose
``prepare`` does I/O (an image fetched and uploaded) is not prepared (its value goes in
as a placeholder and its inputs are not checked), and no asset resolver resolves (nothing
is downloaded); their ``validate``/``check`` (no I/O) run as in a real job. The servers are
only read: ``GET /object_info`` once per server, ``GET /models/{folder}`` for ``models``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from ._check import WorkflowProblem, find_problems, short_list
from ._dry_plugins import DryPlugins
from ._errors import ComfyAPIError, NodeInputNotFoundError, NodeTitleNotFoundError, ParamError
from ._instance import Instance
from ._plan import (
    JobPlan,
    ShardPlan,
    job_seed_for,
    plan_validated,
    validate_params,
    workflow_snapshot,
)
from ._plugins import Plugins
from ._types import LoRARef, ModelRef
from .hookspecs import Param

__all__ = ["CheckReport", "PlannedShard", "check_job"]

logger = logging.getLogger("comfytrio.check")


@attrs.frozen
class PlannedShard:
    """One shard of a dry run's plan: what it would run with."""

    index: int
    """Its index among the job's shards (``ShardPlan.index``)."""
    params: dict[str, Any]
    """Each param's value as this shard's workflow gets it, by param name (a split
    ``batch_size`` cut by ``LatentFromBatch`` shows the whole batch: see ``scaled``)."""
    scaled: dict[str, int]
    """Its share of every ``gpu_scale`` param (``ShardPlan.scaled``)."""
    seeds: dict[str, int]
    """The seed of each seed node and sampler, by title (``ShardPlan.seeds``)."""
    batch_offset: int | None = None
    """Its first index in the job's whole batch (``ShardPlan.batch_offset``)."""


@attrs.frozen
class CheckReport:
    """What ``ComfyAPI.check_workflow`` found: the planned shards and every problem."""

    shards: tuple[PlannedShard, ...]
    """The shards ``run_workflow`` would run now (empty when the job cannot be planned)."""
    problems: tuple[WorkflowProblem, ...]
    """Every problem found, params first, then per node in the workflow's order (each
    once, naming the servers and shards where it holds)."""
    instances: tuple[str, ...]
    """The servers checked: those ready now, any of which may run any shard."""
    seed: int
    """The job seed of the plan (give it to ``run_workflow`` to run these shards)."""
    split: str | None = None
    """How the shards split the batch (``JobResult.split``); None when not planned."""
    notes: tuple[str, ...] = ()
    """What the dry run could not check, and why (an image that was not uploaded)."""

    @property
    def ok(self) -> bool:
        """True when no problem was found: ``run_workflow`` should accept the job."""
        return not self.problems


def _refused(exc: ComfyAPIError) -> WorkflowProblem:
    """A param or job error as a problem (``error`` keeps it)."""
    kind = "param_error" if isinstance(exc, ParamError) else "job_error"
    param = exc.param if isinstance(exc, ParamError) else None
    if isinstance(exc, NodeTitleNotFoundError):
        return WorkflowProblem(
            kind,
            str(exc),
            value=exc.title,
            allowed=short_list(exc.available),
            param=param,
            error=exc,
        )
    if isinstance(exc, NodeInputNotFoundError):
        return WorkflowProblem(
            kind,
            str(exc),
            exc.node_id,
            exc.title,
            input_name=exc.input_name,
            allowed=short_list(exc.available),
            param=param,
            error=exc,
        )
    return WorkflowProblem(kind, str(exc), param=param, error=exc)


def _params(
    plugins: Plugins, workflow: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
) -> tuple[list[Param] | None, list[WorkflowProblem]]:
    """The params that pass ``validate_params``, and a problem for each that does not (each
    param alone first, so that every bad one is named; then the good ones together)."""
    try:
        return validate_params(plugins, workflow, params), []
    except ComfyAPIError as exc:
        first = exc
    if (isinstance(first, ParamError) and first.param == "workflow") or not isinstance(
        params, Mapping
    ):
        return None, [_refused(first)]
    problems: dict[str, WorkflowProblem] = {}
    good: dict[str, Mapping[str, Any]] = {}
    for name, entry in params.items():
        try:
            validate_params(plugins, workflow, {name: entry})
            good[name] = entry
        except ComfyAPIError as exc:
            problems.setdefault(str(exc), _refused(exc))
    for fallback in (good, {}):
        try:
            checked = validate_params(plugins, workflow, fallback)
            break
        except ComfyAPIError as exc:
            problems.setdefault(str(exc), _refused(exc))
    else:
        return None, list(problems.values())
    if not problems:
        problems[str(first)] = _refused(first)
    return checked, list(problems.values())


async def _object_infos(
    instances: Sequence[Instance], problems: list[WorkflowProblem]
) -> dict[str, Mapping[str, Any]]:
    """Each server's ``/object_info``, asked once and all at once; a server that does not
    answer is a problem."""
    infos: dict[str, Mapping[str, Any]] = {}

    async def ask(instance: Instance) -> None:
        try:
            if instance.client is None:
                raise ComfyAPIError("not connected")
            infos[instance.name] = await instance.client.object_info()
        except ComfyAPIError as exc:
            problems.append(
                WorkflowProblem(
                    "server_unavailable",
                    f"ComfyUI {instance.name}: /object_info failed, nothing was checked "
                    f"there: {exc}",
                    instances=(instance.name,),
                )
            )

    async with trio.open_nursery() as nursery:
        for instance in instances:
            nursery.start_soon(ask, instance)
    return infos


async def _missing_models(
    instances: Sequence[Instance], models: Sequence[ModelRef]
) -> list[WorkflowProblem]:
    """A problem for each model some server does not list in ``/models/{type}``."""
    missing: dict[ModelRef, tuple[list[str], list[str]]] = {}  # -> (servers, what they list)

    async def ask(instance: Instance, folder: str) -> None:
        try:
            listed = [n.replace("\\", "/") for n in await instance.list_models(folder)]
        except (ComfyAPIError, RuntimeError):
            return  # its /object_info failure says it already
        for ref in models:
            if ref.type == folder and ref.name not in listed:
                servers, _ = missing.setdefault(ref, ([], listed))
                servers.append(instance.name)

    async with trio.open_nursery() as nursery:
        for instance in instances:
            for folder in dict.fromkeys(ref.type for ref in models):
                nursery.start_soon(ask, instance, folder)
    return [
        WorkflowProblem(
            "model_not_found",
            f"model {ref.type}/{ref.name} is not listed by ComfyUI {', '.join(sorted(servers))}",
            input_name=ref.type,
            value=ref.name,
            allowed=short_list(listed),
            instances=tuple(sorted(servers)),
        )
        for ref in models
        if ref in missing
        for servers, listed in [missing[ref]]
    ]


def _written(
    plugins: Plugins, workflow: Mapping[str, Any], checked: Sequence[Param]
) -> dict[tuple[str, str], str]:
    """(node id, input) -> the param that sets it."""
    written: dict[tuple[str, str], str] = {}
    for param in checked:
        for node_id in param.node_ids:
            node = workflow.get(node_id)
            name = param.inputs.get(node_id)
            if name is None and isinstance(node, Mapping):
                name = plugins.param_types()[param.type].input_for(node, param)
            if name is not None:
                written[(node_id, name)] = param.name
    return written


def _shard(
    shard: ShardPlan, built: Mapping[str, Any], written: dict[tuple[str, str], str]
) -> PlannedShard:
    values: dict[str, Any] = {}
    for (node_id, name), param in written.items():
        inputs = built.get(node_id, {}).get("inputs", {})
        if name in inputs:
            values.setdefault(param, inputs[name])
    return PlannedShard(
        shard.index, values, dict(shard.scaled), dict(shard.seeds), shard.batch_offset
    )


async def _planned(
    plugins: Plugins,
    snapshot: str,
    checked: Sequence[Param],
    problems: list[WorkflowProblem],
    *,
    job_seed: int,
    same_images: bool,
    loras: Sequence[LoRARef],
    **args: Any,
) -> JobPlan | None:
    """``plan_validated``'s plan, or None with a problem; a job refused for its split or its
    LoRAs is planned again without them, to show its shards all the same."""
    for same, job_loras in ((same_images, loras), (False, ())):
        try:
            return await plan_validated(
                plugins,
                snapshot,
                checked,
                job_seed=job_seed,
                same_images=same,
                loras=job_loras,
                **args,
            )
        except ComfyAPIError as exc:
            if str(exc) not in {p.message for p in problems}:
                problems.append(_refused(exc))
    return None


def _server_problems(
    built: Sequence[tuple[int | None, Mapping[str, Any]]],
    instances: Sequence[Instance],
    infos: Mapping[str, Mapping[str, Any]],
    *,
    unchecked: set[tuple[str, str]],
    present: set[str],
) -> list[WorkflowProblem]:
    """``find_problems`` of every shard's workflow on every server, each problem once with
    the servers and shards where it holds."""
    grouped: dict[Any, tuple[WorkflowProblem, list[str], list[int]]] = {}
    for instance in instances:
        info = infos.get(instance.name)
        listed = present if (instance.owned or instance.is_local) else set()
        for index, shard_workflow in built if info is not None else []:
            assert info is not None
            for problem in find_problems(shard_workflow, info, unchecked=unchecked, present=listed):
                key = (problem.kind, problem.message, problem.allowed)
                _, servers, indexes = grouped.setdefault(key, (problem, [], []))
                if instance.name not in servers:
                    servers.append(instance.name)
                if index is not None and index not in indexes:
                    indexes.append(index)
    return [
        attrs.evolve(problem, instances=tuple(servers), shards=tuple(indexes))
        for problem, servers, indexes in grouped.values()
    ]


async def check_job(
    plugins: Plugins,
    workflow: Mapping[str, Any],
    *,
    params: Mapping[str, Mapping[str, Any]],
    models: Sequence[ModelRef],
    loras: Sequence[LoRARef],
    seed: int | None,
    same_images: bool,
    instances: Sequence[Instance],
    models_path: Path | None,
    http: httpx.AsyncClient,
    shard_count: int | None = None,
) -> CheckReport:
    """The dry run behind ``ComfyAPI.check_workflow`` (see there), on ``instances``, in
    ``shard_count`` shards (None: one per instance)."""
    job_seed = job_seed_for(seed)
    names = tuple(i.name for i in instances)
    checked, problems = _params(plugins, workflow, params)
    if checked is None:
        return CheckReport((), tuple(problems), names, job_seed)
    notes: dict[str, str] = {}
    plan: JobPlan | None = None
    try:
        snapshot = workflow_snapshot(workflow)
        plan = await _planned(
            DryPlugins(plugins, notes),
            snapshot,
            checked,
            problems,
            job_seed=job_seed,
            same_images=same_images,
            loras=loras,
            models=models,
            targets=instances,
            shard_count=len(instances) if shard_count is None else shard_count,
            models_path=models_path,
            http=http,
        )
    except ParamError as exc:  # the workflow is not JSON
        problems.append(_refused(exc))
    infos = await _object_infos(instances, problems)
    problems += await _missing_models(instances, models) if models else []
    written = _written(plugins, workflow, checked)
    shards: list[PlannedShard] = []
    built: list[tuple[int | None, Mapping[str, Any]]] = []
    for shard in plan.shards if plan is not None else []:
        try:
            built.append((shard.index, shard.build()))
        except ComfyAPIError as exc:
            problems.append(_refused(exc))
            continue
        shards.append(_shard(shard, built[-1][1], written))
    if plan is None:
        built.append((None, workflow))
    found = _server_problems(
        built,
        instances,
        infos,
        unchecked={key for key, param in written.items() if param in notes},
        present={lo.name for lo in loras} if models_path is not None else set(),
    )
    for problem in found:
        param = written.get((problem.node_id or "", problem.input_name or ""))
        problems.append(attrs.evolve(problem, param=param) if param else problem)
    logger.info("dry run: %d shard(s), %d problem(s)", len(shards), len(problems))
    return CheckReport(
        tuple(shards),
        tuple(problems),
        names,
        plan.seed if plan else job_seed,
        plan.split if plan else None,
        tuple(notes.values()),
    )
