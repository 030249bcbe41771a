"""One job's shards on the servers and back: what a shard carries through the queue, the
runner the scheduler calls for it on an instance, and the ``JobResult`` made of the shards'
outcomes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeAlias

import attrs
import trio
from outcome import Error, Value

from ._collect import OutputCollector
from ._errors import ComfyAPIError, ExecutionError
from ._frames import STREAMING_OUTPUT_CLASSES
from ._instance import Instance
from ._plan import ShardPlan
from ._results import PromptResult
from ._shards import ShardTask
from ._types import JobResult, OutputFile, OutputValue, ShardFailure, ShardReport

__all__ = [
    "JOB_MARKER_INPUT",
    "OutputTask",
    "ShardOutputs",
    "ShardWork",
    "job_result",
    "run_shard",
]

logger = logging.getLogger("comfytrio")

JOB_MARKER_INPUT = "comfytrio_prompt"
"""An extra input we add to every output node, set to the prompt id: ComfyUI ignores unknown
inputs but counts them in its cache key, so an output node never replays the files of another
job, another shard of the same job, or an earlier attempt of the same shard."""


@attrs.frozen
class ShardWork:
    """What one shard of a job carries through the queue to its runner."""

    plan: ShardPlan
    """Its values, and how to build its workflow."""
    timeout: float
    """Seconds its prompt may run once it started on its server (then as long again for
    its downloads)."""


@attrs.frozen
class ShardOutputs:
    """What one shard that succeeded produced."""

    files: list[OutputFile]
    """Its outputs as files here (downloaded, read in place, or sent over the websocket)."""
    values: list[OutputValue]
    """What its output nodes reported that is not a file."""


OutputTask: TypeAlias = ShardTask[ShardWork, ShardOutputs]
"""A shard of a job, as the api's scheduler carries it."""


async def run_shard(
    instance: Instance, task: OutputTask, collector: OutputCollector
) -> ShardOutputs:
    """Run one shard on ``instance`` and return its outputs as files here, and its other
    outputs as values. Its workflow is built now, when a server took it, not while it
    waited in the queue. A prompt that failed keeps the files it wrote before it failed
    (``ExecutionError.outputs``)."""
    work = task.payload
    output_classes = await instance.output_node_classes()
    client = instance.client
    assert client is not None
    streamed = output_classes | STREAMING_OUTPUT_CLASSES
    if client.output_node_classes != streamed:  # set once per client, not per shard
        client.output_node_classes = streamed
    if client.max_image_bytes != collector.max_bytes:
        client.max_image_bytes = collector.max_bytes
    try:
        prompt = work.plan.build()
        for node in prompt.values():
            if isinstance(node, dict) and node.get("class_type") in output_classes:
                node.setdefault("inputs", {})[JOB_MARKER_INPUT] = task.prompt_id
        try:
            result = await client.run(prompt, prompt_id=task.prompt_id, timeout=work.timeout)
        except ExecutionError as exc:
            if exc.node_outputs:  # what it wrote before it failed is kept
                exc.outputs = tuple(await _written_before(exc, instance, task, collector))
            raise
        files = await collector.collect(result, instance, task.job_id, work.timeout)
        values = [
            OutputValue(task.index, instance.name, task.prompt_id, node, key, tuple(found))
            for node, keys in result.values.items()
            for key, found in keys.items()
        ]
        return ShardOutputs(numbered(files, work.plan), values)
    except ComfyAPIError as exc:
        logger.error(
            "job %s: shard %d failed on %s: %s", task.job_id, task.index, instance.name, exc
        )
        raise


async def _written_before(
    error: ExecutionError, instance: Instance, task: OutputTask, collector: OutputCollector
) -> list[OutputFile]:
    """The files a failed prompt wrote before it failed; none when they cannot be had (the
    prompt's error is the one to report)."""
    partial = PromptResult(instance.name, task.prompt_id, error.node_outputs)
    try:
        files = await collector.collect(partial, instance, task.job_id, task.payload.timeout)
    except ComfyAPIError as exc:
        logger.warning(
            "job %s: shard %d: the files written before it failed cannot be had: %s",
            task.job_id,
            task.index,
            exc,
        )
        return []
    logger.info(
        "job %s: shard %d failed after writing %d file(s)", task.job_id, task.index, len(files)
    )
    return files


def numbered(files: Sequence[OutputFile], plan: ShardPlan) -> list[OutputFile]:
    """``files`` with their ``batch_index``: an output node that wrote one file per item of
    the shard's share (``plan.scaled``) wrote items ``batch_offset`` .. in order."""
    if plan.batch_offset is None or len(plan.scaled) != 1:
        return list(files)
    (share,) = plan.scaled.values()
    by_node: dict[str, int] = {}
    for file in files:
        by_node[file.node_id] = by_node.get(file.node_id, 0) + 1
    seen: dict[str, int] = {}
    out: list[OutputFile] = []
    for file in files:
        position = seen[file.node_id] = seen.get(file.node_id, -1) + 1
        if by_node[file.node_id] == share:
            file = attrs.evolve(file, batch_index=plan.batch_offset + position)
        out.append(file)
    return out


def job_result(
    job_id: str,
    tasks: Sequence[OutputTask],
    *,
    seed: int,
    started_at: float,
    split: str = "single",
) -> JobResult:
    """The ``JobResult`` of a job whose shards all ended, its outputs ordered by
    ``batch_index`` (those without one last, shard by shard).

    Some shards failing: their errors are logged and listed. Every shard failing: the first
    error is raised, with the others in its ``other_errors``.
    """
    outputs: list[OutputFile] = []
    values: list[OutputValue] = []
    failures: list[ShardFailure] = []
    for task in tasks:
        match task.outcome:
            case Value(value=done):
                outputs.extend(done.files)
                values.extend(done.values)
            case Error(error=error):
                written = tuple(error.outputs) if isinstance(error, ExecutionError) else ()
                where = task.instance or ""
                failures.append(ShardFailure(task.index, where, task.prompt_id, error, written))
    reports = tuple(_report(task) for task in tasks)
    finished_at = trio.current_time()
    outputs.sort(key=lambda o: (o.batch_index is None, o.batch_index or 0))  # stable
    result = JobResult(
        job_id,
        tuple(outputs),
        tuple(failures),
        reports,
        seed,
        started_at,
        finished_at,
        split,
        values=tuple(values),
    )
    if failures and len(failures) == len(tasks):
        first = failures[0].error
        if isinstance(first, ComfyAPIError):
            first.other_errors = [f.error for f in failures[1:]]
        raise first
    if failures:
        logger.warning(
            "job %s: %d/%d shard(s) failed; returning %d file(s)",
            job_id,
            len(failures),
            len(tasks),
            len(outputs),
        )
    logger.info(
        "job %s: done, %d file(s) in %.2f s", job_id, len(outputs), finished_at - started_at
    )
    return result


def _report(task: OutputTask) -> ShardReport:
    """How ``task`` went."""
    return ShardReport(
        task.index,
        task.instance or "",
        task.prompt_id,
        dict(task.payload.plan.scaled),
        dict(task.payload.plan.seeds),
        task.payload.plan.batch_offset,
        task.started_at or task.enqueued_at,
        task.finished_at or trio.current_time(),
        isinstance(task.outcome, Value),
    )
