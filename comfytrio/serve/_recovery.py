"""What a restarted ``serve`` does with a job its previous life left unfinished.

Its prompts are looked for on the servers by id: those it recorded, and every id it may have
posted without recording it (prompt ids are ``shard_prompt_id(job, shard, attempt)``, so a
``serve`` killed between posting a prompt and writing it down still knows what to look for).

- ``canceling``: every such prompt is deleted or interrupted; the job is ``canceled``.
- a prompt still queued or running: we wait for it (reattach) and collect its outputs.
- a prompt that ended: its outputs are collected (or its error reported).
- nothing found and the job never reached a server: it is run again from the start.
- nothing found for a job that had reached a server (its server restarted, or was an
  in-process fake that died with us): ``failed`` with code ``lost_on_restart``.

No job stays ``running`` for ever: every path ends in a terminal status or a fresh run.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from .._api import ComfyAPI
from .._errors import ComfyAPIError, ExecutionError, PromptVanishedError
from .._instance import InstanceState
from .._shards import shard_prompt_id
from .._types import OutputFile, OutputValue
from ._records import JobRecord
from ._wire import job_error

__all__ = ["Recovery", "recover_job"]

logger = logging.getLogger("comfytrio.serve")


@attrs.frozen
class Recovery:
    """How an unfinished job ends after a restart."""

    status: str
    """``succeeded``, ``failed``, ``canceled``, or ``rerun`` (run it again)."""
    error: dict[str, Any] | None = None
    """The v2 ``JobError`` of a failed job."""
    files: list[OutputFile] = attrs.field(factory=list)
    """Outputs collected from the prompts found."""
    values: list[OutputValue] = attrs.field(factory=list)
    """Non-file outputs of those prompts."""
    logs: list[str] = attrs.field(factory=list)
    """What was found, for the job's log."""


def _candidates(api: ComfyAPI, record: JobRecord) -> dict[str, tuple[int, int, str | None]]:
    """prompt id -> (shard index, attempt, the server's URL if recorded)."""
    found: dict[str, tuple[int, int, str | None]] = {}
    shard_count = record.shard_count or len(api.instances)
    for index in range(shard_count):
        for attempt in range(1, api.faults.max_shard_attempts + 1):
            found[shard_prompt_id(record.id, index, attempt)] = (index, attempt, None)
    for prompt in record.prompts:
        found[prompt.prompt_id] = (prompt.index, prompt.attempt, prompt.url)
    return found


def _lost(message: str) -> dict[str, Any]:
    return {
        "code": "lost_on_restart",
        "message": message,
        "node_id": None,
        "class_type": None,
        "traceback": None,
    }


async def _cancel_everywhere(api: ComfyAPI, prompt_ids: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        for instance in api.instances:
            client = instance.client
            if instance.state != InstanceState.READY or client is None:
                continue
            for prompt_id in prompt_ids:
                nursery.start_soon(client.cancel_prompt, prompt_id)


async def recover_job(api: ComfyAPI, record: JobRecord) -> Recovery:
    """Find the job's prompts on the servers and say how the job ends (see the module's
    docstring). Waits as long as found prompts run; cancelling it cancels them."""
    candidates = _candidates(api, record)
    if record.status == "canceling":
        await _cancel_everywhere(api, list(candidates))
        return Recovery("canceled", logs=["serve restarted while canceling: prompts removed"])
    outcomes: dict[str, Any] = {}

    async def probe(prompt_id: str, url: str | None) -> None:
        try:
            outcomes[prompt_id] = await api.reattach(prompt_id, url=url)
        except PromptVanishedError:
            return  # not on any server
        except ComfyAPIError as exc:
            outcomes[prompt_id] = exc

    async with trio.open_nursery() as nursery:
        for prompt_id, (_, _, url) in candidates.items():
            nursery.start_soon(probe, prompt_id, url)
    if not outcomes:
        if record.status == "queued" and not record.prompts:
            return Recovery("rerun", logs=["serve restarted before the job reached a server"])
        return Recovery(
            "failed",
            _lost(
                "serve restarted and no ComfyUI server holds this job's prompts any more "
                "(the server restarted, or it was an in-process fake): submit it again"
            ),
            logs=["serve restarted: none of the job's prompts were found on the servers"],
        )
    # The best outcome of each shard: a success, else its last attempt's error.
    best: dict[int, tuple[int, Any]] = {}
    for prompt_id, outcome in outcomes.items():
        index, attempt, _ = candidates[prompt_id]
        ok = not isinstance(outcome, BaseException)
        held = best.get(index)
        if held is None or (ok, attempt) > (not isinstance(held[1], BaseException), held[0]):
            best[index] = (attempt, outcome)
    files: list[OutputFile] = []
    values: list[OutputValue] = []
    errors: list[BaseException] = []
    for index in sorted(best):
        outcome = best[index][1]
        if isinstance(outcome, BaseException):
            errors.append(outcome)
            if isinstance(outcome, ExecutionError):
                files.extend(outcome.outputs)
        else:
            files.extend(outcome.files)
            values.extend(outcome.values)
    logs = [f"serve restarted: reattached to {len(outcomes)} prompt(s) of {len(best)} shard(s)"]
    expected = record.shard_count or len(best)
    if errors:
        return Recovery("failed", job_error(errors[0]), files, values, logs)
    if len(best) < expected:
        missing = sorted(set(range(expected)) - set(best))
        return Recovery(
            "failed",
            _lost(
                f"serve restarted and shard(s) {missing} of {expected} were found on no "
                "server; the others' outputs are kept"
            ),
            files,
            values,
            logs,
        )
    return Recovery("succeeded", None, files, values, logs)
