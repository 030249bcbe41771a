"""The fake's prompt queue and its worker, after ComfyUI 0.3.64 (and what later versions
changed at ``POST /prompt``, as the server's ``ComfyProfile`` says).

``POST /prompt`` validates (``_validate``) and queues; one worker runs one prompt at a time,
lowest ``number`` first (``front`` prompts get a negative one), through the executor
(``_engine_execution``), then writes the history (``_engine_history``), broadcasts
``status`` and finally sends ``executing {node: null}``. An engine lives as long as one
generation of the server: a crash loses its queue, cache and history.
"""

from __future__ import annotations

import copy
import heapq
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ._engine_execution import Executor
from ._engine_history import SENSITIVE_EXTRA_DATA, History
from ._engine_state import MessageSink, ServerState, Settings
from ._validate import validate_prompt

# ``Settings`` lives in ``_engine_state``; importable from here too, where it used to be.
__all__ = ["Engine", "Queued", "Settings", "is_canonical_uuid", "member"]

logger = logging.getLogger("comfytrio.testing")


_INVALID_PROMPT_ID = {
    "type": "invalid_prompt_id",
    "message": "prompt_id must be a valid UUID",
    "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
    "omit it to let the server generate one",
    "extra_info": {},
}
"""Later versions' answer to a client-chosen ``prompt_id`` that is no canonical UUID."""


def is_canonical_uuid(value: Any) -> bool:
    """Whether ``value`` is a UUID string in canonical lower-case hyphenated form (later
    versions' ``validate_job_id``)."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def member(body: Any, key: str, default: Any) -> Any:
    """``body[key]`` when ``key in body`` (also for a list or a string body, like ComfyUI)."""
    return body[key] if key in body else default  # noqa: SIM401


@dataclass
class Queued:
    """A prompt in the queue (also the one running): what ``GET /queue`` lists."""

    number: Any
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    seq: int
    sensitive: dict[str, Any] = field(default_factory=dict)
    """The API keys held apart from ``extra_data`` (later versions' 6th element)."""

    def __lt__(self, other: Queued) -> bool:
        return (self.number, self.prompt_id, self.seq) < (other.number, other.prompt_id, other.seq)

    def as_list(self) -> list[Any]:
        """``[number, prompt_id, prompt, extra_data, outputs]``."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class Engine:
    """Queue and worker of one server generation; its executor and history."""

    def __init__(
        self,
        state: ServerState,
        sink: MessageSink,
        on_crash: Callable[[], None] | None = None,
    ) -> None:
        self.state = state
        self.sink = sink
        self.executor = Executor(state, sink, on_crash)
        self.history = History()
        self.number = 0
        self._seq = 0
        self.queue: list[Queued] = []
        self.running: dict[int, Queued] = {}
        self._task_counter = 0
        self.flags: dict[str, Any] = {}
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    def queue_info(self) -> dict[str, Any]:
        """``{"exec_info": {"queue_remaining": n}}``."""
        return {"exec_info": {"queue_remaining": len(self.queue) + len(self.running)}}

    def _queue_updated(self) -> None:
        self.sink.send("status", {"status": self.queue_info()}, None)

    # -- HTTP-facing operations ------------------------------------------------------------

    def post_prompt(self, body: Any) -> tuple[int, Any]:
        """``POST /prompt``: (status, JSON answer). Raises on bodies ComfyUI answers with 500."""
        self.state.tally.prompts_received.append(copy.deepcopy(body))
        if "number" in body:
            number: Any = float(body["number"])
        else:
            number = self.number
            if member(body, "front", False):
                number = -number
            self.number += 1
        if "prompt" not in body:
            no_prompt: dict[str, Any] = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return 400, {"error": no_prompt, "node_errors": {}}
        prompt = body["prompt"]
        profile = self.state.profile
        if not profile.canonical_prompt_ids:
            prompt_id = str(body["prompt_id"]) if "prompt_id" in body else str(uuid.uuid4())
        elif body.get("prompt_id") is None:
            prompt_id = str(uuid.uuid4())
        elif is_canonical_uuid(body["prompt_id"]):
            prompt_id = body["prompt_id"]
        else:
            return 400, {"error": dict(_INVALID_PROMPT_ID), "node_errors": {}}
        partial = member(body, "partial_execution_targets", None)
        valid, error, outputs, node_errors = validate_prompt(
            self.state.registry, self.state.paths, prompt, partial
        )
        extra_data = member(body, "extra_data", {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not valid:
            logger.info("fake ComfyUI: invalid prompt: %s", error)
            return 400, {"error": error, "node_errors": node_errors}
        self._seq += 1
        sensitive: dict[str, Any] = {}
        if profile.queue_hides_api_keys:
            for key in SENSITIVE_EXTRA_DATA:
                if key in extra_data:
                    sensitive[key] = extra_data.pop(key)
        if profile.create_time:
            extra_data["create_time"] = int(time.time() * 1000)
        queued = Queued(number, prompt_id, prompt, extra_data, outputs, self._seq, sensitive)
        heapq.heappush(self.queue, queued)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._queue_updated()
        self._wake.set()
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def queue_snapshot(self) -> dict[str, Any]:
        """``GET /queue``."""
        return {
            "queue_running": [q.as_list() for q in self.running.values()],
            "queue_pending": [q.as_list() for q in self.queue],
        }

    def delete_queued(self, prompt_id: Any) -> bool:
        """Remove one pending prompt (silently: no history, only a ``status``)."""
        for index, item in enumerate(self.queue):
            if item.prompt_id == prompt_id:
                if len(self.queue) == 1:
                    self.clear_queue()
                else:
                    self.queue.pop(index)
                    heapq.heapify(self.queue)
                self._queue_updated()
                self._maybe_idle()
                return True
        return False

    def clear_queue(self) -> None:
        """Drop every pending prompt (the running one goes on)."""
        self.queue = []
        self._queue_updated()
        self._maybe_idle()

    def interrupt(self, prompt_id: Any = None) -> None:
        """Global interrupt, or only when ``prompt_id`` is the running prompt."""
        if prompt_id and not any(q.prompt_id == prompt_id for q in self.running.values()):
            logger.info("fake ComfyUI: prompt %s is not running, no interrupt", prompt_id)
            return
        self.executor.interrupt()

    def cancel(self, prompt_id: Any) -> str:
        """Cancel one job in any state (later versions' ``/api/jobs`` cancel): interrupt it
        when running, drop it when pending; ``"running"``, ``"pending"``, ``"terminal"``
        (finished: nothing done) or ``"unknown"``."""
        if any(q.prompt_id == prompt_id for q in self.running.values()):
            self.executor.interrupt()
            return "running"
        if self.delete_queued(prompt_id):
            return "pending"
        return "terminal" if prompt_id in self.history.entries else "unknown"

    def set_flag(self, name: str, value: Any) -> None:
        """``/free`` flags, applied by the worker when the current prompt is done."""
        self.flags[name] = value
        self._wake.set()

    @property
    def running_id(self) -> str | None:
        """The prompt being executed, if any."""
        for item in self.running.values():
            return item.prompt_id
        return None

    def queue_ids(self) -> list[str]:
        """Pending prompt ids in the order they will run."""
        return [q.prompt_id for q in sorted(self.queue)]

    async def wait_idle(self) -> None:
        """Until nothing is queued or running."""
        await self._idle.wait()

    def _maybe_idle(self) -> None:
        if not self.queue and not self.running:
            self._idle.set()

    # -- worker ------------------------------------------------------------------------

    async def run(self) -> None:
        """The worker loop (runs until cancelled)."""
        while True:
            while not self.queue and not self.flags:
                self._maybe_idle()
                await self._wake.wait()
                self._wake = trio.Event()
            await self.state.faults.gate.wait_open()
            if self.queue:
                await self._run_next()
            flags, self.flags = self.flags, {}
            if flags.get("free_memory"):
                self.executor.cache.clear()
            self._maybe_idle()

    async def _run_next(self) -> None:
        item = heapq.heappop(self.queue)
        item_id = self._task_counter
        self._task_counter += 1
        self.running[item_id] = copy.deepcopy(item)
        self._queue_updated()
        started = time.perf_counter()
        client_id = member(item.extra_data, "client_id", None)
        success, messages, result = await self.executor.execute(item, client_id)
        self.history.record(self.running.pop(item_id).as_list(), success, messages, result)
        self._queue_updated()
        if client_id is not None:
            self.sink.send("executing", {"node": None, "prompt_id": item.prompt_id}, client_id)
        self.state.tally.executed_count += 1
        logger.info(
            "fake ComfyUI: prompt %s executed in %.2f seconds",
            item.prompt_id,
            time.perf_counter() - started,
        )
