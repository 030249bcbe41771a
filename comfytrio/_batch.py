"""Splitting a batch so that no image repeats, and, where ComfyUI allows, so that the shards
make exactly the images one GPU would make.

ComfyUI's samplers draw their starting noise with ``comfy.sample.prepare_noise(latent,
seed, latent.get("batch_index"))``: without ``batch_index`` one ``torch.randn`` for the whole
batch, with it one sample at a time for i = 0 .. max(index), keeping those asked for.
``LatentFromBatch(k, m)`` cuts samples k .. k+m-1 out of a batch and sets ``batch_index``
to them. So a shard that keeps the job's ``EmptyLatentImage`` at the whole batch N, keeps
the seed, and reads it through ``LatentFromBatch(k, m)`` draws the noise of samples k ..
k+m-1 of the whole batch: a deterministic sampler then makes exactly those images of the
one-GPU run (equal bit for bit on the CPU when a sample's latent holds a multiple of 16
values, torch drawing normals 16 at a time; always equal to a one-GPU run that reads its
batch through ``LatentFromBatch(0, N)`` too, which strict mode does).

Where that cannot work (the split param does not set an ``EmptyLatentImage`` batch, or the
batch is over 64, ``LatentFromBatch``'s limit), every sampler whose seed the job does not
set gets a seed of its own per shard instead, so the images still differ.

This module plans the shards and rewrites their workflows (``LatentFromBatch`` inserted,
seeds written, strict-mode refusals); ``_samplers`` reads the graph. Pure: no I/O.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs

from ._errors import NotReproducibleError
from ._samplers import (
    DETERMINISTIC_SAMPLERS,
    LATENT_BATCHES,
    STOCHASTIC_SAMPLERS,
    WorkflowGraph,
    is_stochastic,
    link_from,
)
from .hookspecs import Param

__all__ = [
    "DETERMINISTIC_SAMPLERS",
    "MAX_LATENT_BATCH",
    "STOCHASTIC_SAMPLERS",
    "BatchEdits",
    "SplitKind",
    "SplitPlan",
    "plan_split",
]

SplitKind = Literal["single", "same-images", "distinct", "distinct-seeds", "unseeded"]
"""How a job's shards relate to one GPU's run (``JobResult.split``): ``single`` (one shard,
the workflow as given), ``same-images`` (each shard makes its part of the one-GPU batch,
index for index), ``distinct`` (each shard reads its own part of the batch through
``LatentFromBatch``, but a sampler that draws noise while it samples, or a latent size
whose noise torch draws differently, makes other images than one GPU: none repeats),
``distinct-seeds`` (no ``LatentFromBatch``: each shard's samplers got a
seed of their own), ``unseeded`` (a split with no sampler seed to vary, as a model-free
workflow: the shards make what their nodes make)."""

MAX_LATENT_BATCH = 64
"""The largest batch ``LatentFromBatch`` can cut (``batch_index`` at most 63, ``length`` at
most 64): a larger one is split with distinct seeds instead."""


@attrs.frozen
class BatchEdits:
    """What one shard's workflow gets besides its params' values."""

    slices: tuple[tuple[str, int, int], ...] = ()
    """(latent node id, offset k, length m): a ``LatentFromBatch(k, m)`` goes between that
    node and every input it fed."""
    seeds: tuple[tuple[str, str, int], ...] = ()
    """(node id, input, seed): a seed written into a sampler (or ``RandomNoise``)."""
    reported: Mapping[str, int] = attrs.field(factory=dict)
    """The seeds to report for this shard, by sampler title (``ShardPlan.seeds``)."""
    removed: tuple[str, ...] = ()
    """Output nodes the split does not feed, which only the first shard keeps (the others
    would make copies of its files)."""

    def apply(self, workflow: dict[str, Any]) -> None:
        """Edit a shard's workflow (its own copy) in place."""
        for node_id in self.removed:
            workflow.pop(node_id, None)
        for node_id, input_name, seed in self.seeds:
            workflow[node_id].setdefault("inputs", {})[input_name] = seed
        for latent_id, offset, length in self.slices:
            new_id = _fresh_id(workflow)
            for node in workflow.values():
                inputs = node.get("inputs") if isinstance(node, dict) else None
                if not isinstance(inputs, dict):
                    continue
                for name, value in inputs.items():
                    if link_from(value) == latent_id:
                        inputs[name] = [new_id, value[1]]
            workflow[new_id] = {
                "class_type": "LatentFromBatch",
                "inputs": {"samples": [latent_id, 0], "batch_index": offset, "length": length},
                "_meta": {"title": f"comfytrio: batch {offset}..{offset + length - 1}"},
            }


@attrs.frozen
class SplitPlan:
    """How a job's batch is split: its kind, and each kept shard's edits."""

    kind: SplitKind
    """See ``SplitKind``."""
    whole_batch: frozenset[str]
    """The ``gpu_scale`` params each shard gets whole (cut by ``LatentFromBatch`` instead)."""
    edits: Mapping[int, BatchEdits]
    """By shard index."""
    offsets: Mapping[int, int]
    """Each shard's first index in the whole batch, by shard index (when there is one
    ``gpu_scale`` param)."""
    shared_seeds: bool
    """True when every shard keeps the one-GPU seed of each ``seed`` param (a
    ``LatentFromBatch`` split)."""


def plan_split(
    workflow: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    params: Sequence[Param],
    shares: Mapping[str, Sequence[int]],
    kept: Sequence[int],
    *,
    seed_params: frozenset[str],
    job_seed: int,
    same_images: bool,
) -> SplitPlan:
    """How to split the job (``workflow``, or a function that reads it when it must be
    read): ``shares`` of each ``gpu_scale`` param by shard, the ``kept``
    shard indexes, the names of the params that set seeds (``seed`` type).

    ``same_images`` (strict mode): raise ``NotReproducibleError`` naming the param, node and
    sampler, for whatever would not make the one-GPU images; a single shard then reads its
    batch through ``LatentFromBatch(0, N)`` too."""
    offsets = _offsets(params, shares, kept)
    if len(kept) <= 1 and not same_images:  # the one-GPU run itself, no graph to read
        return SplitPlan("single", frozenset(), {}, offsets, shared_seeds=False)
    graph = WorkflowGraph(workflow() if callable(workflow) else workflow)
    args = (graph, params, shares, kept, seed_params, job_seed, offsets)
    if len(kept) <= 1:  # strict mode cuts the one-GPU run as it would a split
        with contextlib.suppress(NotReproducibleError):
            return _latent_split(*args, strict=True)
        return SplitPlan("single", frozenset(), {}, offsets, shared_seeds=False)
    return _latent_split(*args, strict=same_images)


def _latent_split(
    graph: WorkflowGraph,
    params: Sequence[Param],
    shares: Mapping[str, Sequence[int]],
    kept: Sequence[int],
    seed_params: frozenset[str],
    job_seed: int,
    offsets: Mapping[int, int],
    *,
    strict: bool,
) -> SplitPlan:
    """``plan_split`` for several shards (or one, in strict mode)."""
    batches = _latent_batches(graph, params, shares, kept, strict)
    if batches is None:
        if strict:
            raise NotReproducibleError(
                "workflow",
                None,
                None,
                None,
                "no gpu_scale param splits an EmptyLatentImage batch: every server would run "
                "the whole job",
            )
        return _distinct_seeds(graph, params, kept, seed_params, job_seed, offsets)
    fed = {s for latent_id, _ in batches for s in graph.downstream(latent_id) if graph.samples(s)}
    reproducible = strict or all(graph.noise_aligned(latent_id) for latent_id, _ in batches)
    for sampler_id in sorted(fed):
        name = graph.sampler_name(sampler_id)
        if name in DETERMINISTIC_SAMPLERS:
            continue
        reproducible = False
        if strict:
            why = "draws new noise at every step" if is_stochastic(name) else "is not known"
            raise NotReproducibleError(
                batches[0][1], sampler_id, graph.title(sampler_id), name, f"its sampler {why}"
            )
    kept_seeds = graph.seed_holders(sorted(fed), params, seed_params)
    removed = _unsplit_outputs(graph, params)
    edits: dict[int, BatchEdits] = {}
    for index in kept:
        slices = []
        for latent_id, name in batches:
            before = sum(shares[name][j] for j in kept if j < index)
            slices.append((latent_id, before, shares[name][index]))
        reported: dict[str, int] = {}
        for node_id, input_name in kept_seeds:
            value = graph.int_value(graph.input(node_id, input_name))
            if value is not None:
                reported[graph.label(node_id)] = value
        gone = removed if index != kept[0] else ()
        edits[index] = BatchEdits(tuple(slices), (), reported, gone)
    kind: SplitKind = "same-images" if reproducible else "distinct"
    whole = frozenset(name for _, name in batches)
    return SplitPlan(kind, whole, edits, offsets, shared_seeds=True)


def _unsplit_outputs(graph: WorkflowGraph, params: Sequence[Param]) -> tuple[str, ...]:
    """The nodes that end a branch (no input takes their outputs: the output nodes) and
    that no ``gpu_scale`` param feeds: every shard would make the same files there. None
    when no param is split, or when no branch would be left."""
    split = [p for p in params if p.gpu_scale]
    fed: set[str] = set()
    for param in split:
        for node_id in param.node_ids:
            fed |= {node_id, *graph.downstream(node_id)}
    ends = [n for n in graph.nodes if not graph.consumers(n)]
    removed = tuple(n for n in ends if n not in fed)
    return removed if split and len(removed) < len(ends) else ()


def _offsets(
    params: Sequence[Param], shares: Mapping[str, Sequence[int]], kept: Sequence[int]
) -> dict[int, int]:
    """Each shard's first index in the whole batch, when one param is split."""
    split = [p.name for p in params if p.gpu_scale]
    if len(split) != 1:
        return {}
    share = shares[split[0]]
    return {i: sum(share[j] for j in kept if j < i) for i in kept}


def _latent_batches(
    graph: WorkflowGraph,
    params: Sequence[Param],
    shares: Mapping[str, Sequence[int]],
    kept: Sequence[int],
    same_images: bool,
) -> list[tuple[str, str]] | None:
    """(latent node id, param name) for every empty latent whose batch a ``gpu_scale``
    param sets; None when a ``gpu_scale`` param sets anything else or a batch is over
    ``MAX_LATENT_BATCH`` (strict mode raises ``NotReproducibleError`` there)."""
    found: list[tuple[str, str]] = []
    split = [p for p in params if p.gpu_scale]
    for param in split:
        total = sum(shares[param.name][j] for j in kept)
        for node_id, input_name in graph.targets(param):
            node_class = graph.class_type(node_id)
            if node_class in LATENT_BATCHES and input_name == "batch_size":
                found.append((node_id, param.name))
                continue
            if not same_images:
                return None
            raise NotReproducibleError(
                param.name,
                node_id,
                graph.title(node_id),
                None,
                f"the split sets {input_name!r} of a {node_class}, not the batch_size of an "
                "EmptyLatentImage",
            )
        if total > MAX_LATENT_BATCH:
            if not same_images:
                return None
            latent_id = found[-1][0] if found else None
            raise NotReproducibleError(
                param.name,
                latent_id,
                graph.title(latent_id) if latent_id else None,
                None,
                f"a batch of {total} is over {MAX_LATENT_BATCH}, what LatentFromBatch can cut",
            )
    return found or None


def _distinct_seeds(
    graph: WorkflowGraph,
    params: Sequence[Param],
    kept: Sequence[int],
    seed_params: frozenset[str],
    job_seed: int,
    offsets: Mapping[int, int],
) -> SplitPlan:
    """No ``LatentFromBatch``: every sampler the split feeds (each one, when nothing is
    split) whose seed the job does not set gets its own seed per shard."""
    split = [p for p in params if p.gpu_scale]
    fed = {
        n for p in split for node_id in p.node_ids for n in {node_id, *graph.downstream(node_id)}
    }
    samplers = [
        s
        for s in graph.nodes
        if (graph.samples(s) or graph.seed_inputs_of(s)) and (not split or s in fed)
    ]
    holders = graph.seed_holders(samplers, params, seed_params)
    removed = _unsplit_outputs(graph, params)
    edits = {}
    for index in kept:
        seeds, reported = _shard_seeds(graph, holders, index, job_seed)
        gone = removed if index != kept[0] else ()
        edits[index] = BatchEdits((), seeds, reported, gone)
    by_param = any(p.name in seed_params for p in params)  # varies per shard on its own
    kind: SplitKind = "distinct-seeds" if holders or by_param else "unseeded"
    return SplitPlan(kind, frozenset(), edits, offsets, shared_seeds=False)


def _shard_seeds(
    graph: WorkflowGraph, holders: Sequence[tuple[str, str]], index: int, job_seed: int
) -> tuple[tuple[tuple[str, str, int], ...], dict[str, int]]:
    """Shard ``index``'s seed for each (node, input): the seed it had (or the job seed when
    it cannot be read) plus the shard index, as the ``seed`` param type does."""
    seeds = []
    reported: dict[str, int] = {}
    for node_id, input_name in holders:
        base = graph.int_value(graph.input(node_id, input_name))
        seed = ((job_seed if base is None else base) + index) % 2**64
        seeds.append((node_id, input_name, seed))
        reported[graph.label(node_id)] = seed
    return tuple(seeds), reported


def _fresh_id(workflow: Mapping[str, Any]) -> str:
    """A numeric node id no node has yet."""
    numbers = [int(k) for k in map(str, workflow) if k.isdigit()]
    return str(max(numbers, default=0) + 1)
