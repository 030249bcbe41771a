"""One job's shards on the servers and back: what a shard carries through the queue, the
runner the scheduler calls for it on an instance, the events of its attempts, the
``JobResult`` made of the shards' outcomes, and a prompt found again on its server
(``reattach_prompt``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, TypeAlias

import attrs
import trio
from outcome import Error, Outcome, Value

from . import _firewall as firewall
from ._collect import OutputCollector
from ._errors import (
    ComfyAPIError,
    ComfyUITimeoutError,
    ExecutionError,
    PromptVanishedError,
    ServerLostError,
    ServerProtocolError,
)
from ._frames import STREAMING_OUTPUT_CLASSES
from ._instance import Instance, InstanceState
from ._job_events import JobEvent, ShardFailed, ShardFinished, ShardSubmitted, send_event
from ._plan import ShardPlan
from ._prompts import Prompts
from ._results import PromptResult
from ._shards import ShardTask
from ._types import JobResult, OutputFile, OutputValue, ShardFailure, ShardReport

__all__ = [
    "JOB_MARKER_INPUT",
    "OutputTask",
    "ShardOutputs",
    "ShardWork",
    "job_result",
    "reattach_prompt",
    "run_shard",
    "shard_ended",
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
    events: trio.MemorySendChannel[JobEvent] | None = attrs.field(
        default=None, eq=False, repr=False
    )
    """Where its job's events go (None: nowhere)."""


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
        submitted = ShardSubmitted(
            task.job_id, task.index, task.attempts, instance.name, instance.url, task.prompt_id
        )
        send_event(work.events, submitted)
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


def shard_ended(task: OutputTask, result: Outcome[ShardOutputs], retrying: bool) -> None:
    """The scheduler's ``on_end``: a ``ShardFinished`` or ``ShardFailed`` to the shard's
    job's events."""
    events = task.payload.events
    if events is None:
        return
    where = task.instance or ""
    if isinstance(result, Value):
        done = result.value
        event: JobEvent = ShardFinished(
            task.job_id,
            task.index,
            task.attempts,
            where,
            task.prompt_id,
            tuple(done.files),
            tuple(done.values),
        )
    else:
        assert isinstance(result, Error)
        event = ShardFailed(
            task.job_id, task.index, task.attempts, where, task.prompt_id, result.error, retrying
        )
    send_event(events, event)


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


# --------------------------------------------------------------------------- reattach

_POLL_FIRST = 0.25
"""Seconds between the first looks at a prompt we wait for without its events."""
_POLL_MAX = 2.0
"""The longest wait between two looks (each waits 1.5 times longer than the last)."""


async def reattach_prompt(
    instances: Sequence[Instance],
    prompt_id: str,
    collector: OutputCollector,
    *,
    timeout: float,
) -> ShardOutputs:
    """Find ``prompt_id`` on ``instances`` (in that order), wait while it is queued or
    running there, and collect its outputs as ``run_shard`` does (see
    ``ComfyAPI.reattach``). Its events go to the websocket of the client that posted it,
    so it is watched by polling: ``/api/jobs/{id}`` where the server has it, else
    ``/queue`` then ``/history/{id}``."""
    instance, entry = await _find(instances, prompt_id)
    if entry is None:
        entry = await _wait_ended(instance, prompt_id, timeout)
    folder = re.sub(r"[^A-Za-z0-9_-]", "_", prompt_id)
    try:
        result = _settled(instance, prompt_id, entry)
    except ExecutionError as exc:
        if exc.node_outputs:  # what it wrote before it failed is kept
            partial = PromptResult(instance.name, prompt_id, exc.node_outputs)
            try:
                exc.outputs = tuple(await collector.collect(partial, instance, folder, timeout))
            except ComfyAPIError as missed:
                logger.warning(
                    "prompt %s: the files written before it failed cannot be had: %s",
                    prompt_id,
                    missed,
                )
        raise
    files = await collector.collect(result, instance, folder, timeout)
    values = [
        OutputValue(0, instance.name, prompt_id, node, key, tuple(found))
        for node, keys in result.values.items()
        for key, found in keys.items()
    ]
    logger.info("prompt %s on %s: reattached, %d file(s)", prompt_id, instance.name, len(files))
    return ShardOutputs(files, values)


async def _find(
    instances: Sequence[Instance], prompt_id: str
) -> tuple[Instance, dict[str, Any] | None]:
    """The first of ``instances`` that knows the prompt, and its history entry when it has
    ended there (None: queued or running). ``PromptVanishedError`` (of the first instance)
    when none knows it; a ``ServerError`` of the first that could not say, when none that
    could say knows it."""
    unsure: ServerLostError | ServerProtocolError | None = None
    for instance in instances:
        try:
            state, entry = await _look(instance, prompt_id)
        except (ServerLostError, ServerProtocolError) as exc:
            logger.warning(
                "prompt %s: %s cannot say if it has it: %s", prompt_id, instance.name, exc
            )
            unsure = unsure or exc
            continue
        if state is not None:
            logger.info("prompt %s: found on %s (%s)", prompt_id, instance.name, state)
            return instance, entry
    if unsure is not None:
        unsure.prompt_id = unsure.prompt_id or prompt_id
        raise unsure
    raise PromptVanishedError(instances[0].name if instances else "", prompt_id)


async def _look(instance: Instance, prompt_id: str) -> tuple[str | None, dict[str, Any] | None]:
    """Where the prompt is on ``instance``: ``("pending" | "running", None)``, ``("ended",
    its history entry)``, or ``(None, None)`` when the server does not know it. Raises
    ``ServerLostError`` or ``ServerProtocolError`` when the server cannot say."""
    client = instance.client
    if client is None or instance.state != InstanceState.READY:
        raise ServerLostError(instance.name, "it is not ready", prompt_id=prompt_id)
    try:
        jobs_api = await client.detect_jobs_api()
    except ServerLostError:
        jobs_api = False
    if jobs_api:
        status = await client.job_status(prompt_id)
        if status is None:
            return None, None
        if status in ("pending", "in_progress"):
            return ("pending" if status == "pending" else "running"), None
    else:
        running, pending = firewall.queue_ids(await client.queue())
        if prompt_id in running:
            return "running", None
        if prompt_id in pending:
            return "pending", None
    # ComfyUI writes the history entry before it takes the prompt off the running list:
    # one that is in neither has vanished.
    entry = await client.history(prompt_id)
    return ("ended" if entry is not None else None), entry


async def _wait_ended(instance: Instance, prompt_id: str, timeout: float) -> dict[str, Any]:
    """Poll until the prompt has ended on ``instance``; its history entry. ``timeout``
    counts from when it was first seen running; past it, the prompt is cancelled and
    ``ComfyUITimeoutError`` raised. A caller cancelled while it waits cancels the prompt on
    the server first. ``PromptVanishedError`` when it leaves the server without an entry;
    ``ServerLostError`` when the server cannot say where it is for its client's
    ``reconnect_timeout`` seconds."""
    interval = _POLL_FIRST
    started_at: float | None = None
    last_answer = trio.current_time()
    finished = False
    try:
        while True:
            now = trio.current_time()
            try:
                state, entry = await _look(instance, prompt_id)
            except (ServerLostError, ServerProtocolError) as exc:
                client = instance.client
                patience = client.reconnect_timeout if client is not None else 0.0
                if trio.current_time() - last_answer > patience:
                    raise ServerLostError(
                        instance.name, f"cannot say where the prompt is: {exc}", prompt_id=prompt_id
                    ) from exc
                state, entry = "unknown", None
            else:
                last_answer = trio.current_time()
            if state is None:
                raise PromptVanishedError(instance.name, prompt_id)
            if entry is not None:
                finished = True
                return entry
            if state == "running" and started_at is None:
                started_at = now
            if started_at is not None and trio.current_time() - started_at >= timeout:
                await _cancel(instance, prompt_id)
                finished = True
                raise ComfyUITimeoutError(
                    f"ComfyUI {instance.name}: prompt {prompt_id} ran for {timeout:g} s without "
                    "finishing (it was interrupted)",
                    instance=instance.name,
                    prompt_id=prompt_id,
                    timeout=timeout,
                )
            pause = interval
            if started_at is not None:
                pause = max(0.0, min(pause, started_at + timeout - trio.current_time()))
            await trio.sleep(pause)
            interval = min(interval * 1.5, _POLL_MAX)
    except ComfyAPIError:
        finished = True
        raise
    finally:
        if not finished:  # cancelled while it waits: it keeps no GPU busy
            await _cancel(instance, prompt_id)


async def _cancel(instance: Instance, prompt_id: str) -> None:
    """Remove the prompt from ``instance`` (deleted if queued, interrupted if running),
    even while our caller is being cancelled, within the client's ``cancel_timeout``."""
    client = instance.client
    if client is None:
        return
    with trio.CancelScope(shield=True, deadline=trio.current_time() + client.cancel_timeout):
        await client.cancel_prompt(prompt_id)
    logger.info("prompt %s: cancelled on %s", prompt_id, instance.name)


def _settled(instance: Instance, prompt_id: str, entry: dict[str, Any]) -> PromptResult:
    """The prompt's result from its history entry; raises ``ExecutionError``
    (``ExecutionInterruptedError``) as a prompt we ran would, ``ServerProtocolError`` for an
    entry ComfyUI never writes."""
    prompts = Prompts(instance.name)
    watch = prompts.watch(prompt_id, trio.current_time())
    try:
        prompts.history(watch, entry)
    except firewall.Malformed as exc:
        raise ServerProtocolError(instance.name, f"/history: {exc}", prompt_id=prompt_id) from None
    outcome = watch.outcome
    if isinstance(outcome, PromptResult):
        return outcome
    assert outcome is not None
    raise outcome
