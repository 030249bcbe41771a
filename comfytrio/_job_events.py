"""A job's life as frozen values: what ``ComfyAPI.run_workflow(..., events=channel)`` sends.

In order, for a job of ``n`` shards: one ``JobPlanned``; then per shard, for each attempt, a
``ShardSubmitted`` just before its prompt is posted, and a ``ShardFinished`` (its outputs
collected) or a ``ShardFailed`` (``retrying``: another attempt, with a new
``ShardSubmitted``, follows). The shards of a job run at the same time, so their events
interleave; each shard's are in order.

Events are sent with ``send_nowait``: one that finds the channel full or closed is dropped
(with a warning on the ``comfytrio`` logger). A job never waits for its listener, and never
closes the channel: the caller owns it.
"""

from __future__ import annotations

import logging

import attrs
import trio

from ._types import OutputFile, OutputValue

__all__ = [
    "JobEvent",
    "JobPlanned",
    "ShardFailed",
    "ShardFinished",
    "ShardSubmitted",
    "send_event",
]

logger = logging.getLogger("comfytrio")


@attrs.frozen
class JobEvent:
    """Base class of a job's events."""

    job_id: str
    """The job (``run_workflow``'s ``job_id``)."""


@attrs.frozen
class JobPlanned(JobEvent):
    """The job was planned: its shards go to the queue now."""

    shard_count: int
    """How many shards it has (a shard whose ``gpu_scale`` share is 0 is not counted)."""
    split: str
    """How its batch was split (``JobResult.split``)."""
    seed: int
    """The job seed (``JobResult.seed``)."""


@attrs.frozen
class ShardSubmitted(JobEvent):
    """A shard's prompt is about to be posted to a server (sent just before the POST, so a
    listener that records it can always find the prompt again)."""

    index: int
    """The shard's index in the job's split."""
    attempt: int
    """Which attempt this is (1 first; more after a shard was lost with its server)."""
    instance: str
    """The server's name."""
    url: str
    """The server's base URL (``http://127.0.0.1:8188``): what ``ComfyAPI.reattach`` takes."""
    prompt_id: str
    """The prompt's id on that server (``shard_prompt_id(job_id, index, attempt)``)."""


@attrs.frozen
class ShardFinished(JobEvent):
    """A shard succeeded: its outputs are collected (sent before the whole job ends)."""

    index: int
    """The shard's index in the job's split."""
    attempt: int
    """The attempt that succeeded."""
    instance: str
    """The server that ran it."""
    prompt_id: str
    """Its prompt."""
    files: tuple[OutputFile, ...]
    """Its output files here (as ``JobResult.outputs`` has them)."""
    values: tuple[OutputValue, ...]
    """What its output nodes reported that is not a file."""


@attrs.frozen
class ShardFailed(JobEvent):
    """An attempt of a shard failed: it runs again (``retrying``), or the shard ends with
    ``error`` (as ``JobResult.failures`` has it)."""

    index: int
    """The shard's index in the job's split."""
    attempt: int
    """The attempt that failed."""
    instance: str
    """The server it failed on; ``""`` when it never reached one (its job was cancelled, or
    no server could take it, while it waited in the queue)."""
    prompt_id: str
    """The prompt of that attempt."""
    error: BaseException
    """Why (a ``ComfyAPIError``)."""
    retrying: bool
    """True when the shard is sent again (a retryable ``ServerError``: a new attempt with a
    new prompt id follows); False when this is its end."""


def send_event(channel: trio.MemorySendChannel[JobEvent] | None, event: JobEvent) -> None:
    """Send ``event`` on ``channel`` without waiting (None: nowhere). A full or closed
    channel drops it, with a warning."""
    if channel is None:
        return
    try:
        channel.send_nowait(event)
    except trio.WouldBlock:
        logger.warning("job %s: event channel full: %s dropped", event.job_id, type(event).__name__)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        logger.warning(
            "job %s: event channel closed: %s dropped", event.job_id, type(event).__name__
        )
