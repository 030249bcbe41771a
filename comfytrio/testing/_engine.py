"""The fake's prompt queue, worker, classic cache and history, after ComfyUI 0.3.64.

One worker runs one prompt at a time, lowest ``number`` first (``front`` prompts get a
negative one). Messages follow ``02_prompt_success.json``: ``execution_start``,
``execution_cached``, ``progress_state``/``executing`` per node, ``executed`` per output,
``execution_success``, then the history is written, ``status`` broadcast and finally
``executing {node: null}``. Only ``status`` (and ``progress_state`` of prompts without a
``client_id``) goes to every socket; the rest goes to the prompt's ``client_id``.

The classic cache keys every node by its inputs and its ancestors' inputs and forgets what
the next prompt does not use, so an identical resubmit of the previous prompt runs nothing.
"""

from __future__ import annotations

import copy
import heapq
import json
import logging
import math
import struct
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio
from PIL import Image

from ._faults import Faults, SimulatedNodeError
from ._nodes import NodeDef, NodeRegistry, encode_preview
from ._paths import FakePaths, disk_work
from ._validate import validate_prompt

__all__ = ["Engine", "MessageSink", "Settings", "Tally"]

logger = logging.getLogger("comfytrio.testing")

T = TypeVar("T")

MAX_HISTORY = 10000
_SENSITIVE_EXTRA_DATA = ("auth_token_comfy_org", "api_key_comfy_org")

BINARY_PREVIEW_IMAGE = 1
BINARY_TEXT = 3
BINARY_PREVIEW_WITH_METADATA = 4


class MessageSink(Protocol):
    """Where the engine's websocket messages go (the server's socket registry)."""

    def send(self, event: str | int, data: Any, sid: str | None) -> None:
        """Queue a message for ``sid``, or for every socket when ``sid`` is None."""
        ...

    def supports_preview_metadata(self, sid: str | None) -> bool:
        """Whether ``sid`` negotiated ``supports_preview_metadata``."""
        ...


@dataclass
class Settings:
    """Knobs a test may change at any time."""

    seconds_per_image: float = 0.0
    seconds_per_step: float = 0.0
    node_seconds: dict[str, float] = field(default_factory=dict)
    disable_metadata: bool = False


@dataclass
class Tally:
    """What a test may inspect, kept across restarts of one fake server."""

    prompts_received: list[Any] = field(default_factory=list)
    executed_count: int = 0
    executed_nodes: list[tuple[str, str]] = field(default_factory=list)


class _Interrupted(Exception):
    pass


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
        and not isinstance(value[1], bool)
    )


def _type_name(exc: BaseException) -> str:
    if isinstance(exc, SimulatedNodeError):
        return exc.type_name
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


def _member(body: Any, key: str, default: Any) -> Any:
    """``body[key]`` when ``key in body`` (also for a list or a string body, like ComfyUI)."""
    return body[key] if key in body else default  # noqa: SIM401


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Queued:
    number: Any
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    seq: int

    def __lt__(self, other: _Queued) -> bool:
        return (self.number, self.prompt_id, self.seq) < (other.number, other.prompt_id, other.seq)

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class _CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None
    meta: dict[str, Any]


class _Progress:
    """ComfyUI's progress registry: every change sends the state of all started nodes."""

    def __init__(self, engine: Engine, prompt_id: str) -> None:
        self.engine = engine
        self.prompt_id = prompt_id
        self.nodes: dict[str, dict[str, Any]] = {}

    def _entry(self, node_id: str) -> dict[str, Any]:
        return self.nodes.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})

    def _send(self) -> None:
        nodes = {
            node_id: {
                "value": st["value"],
                "max": st["max"],
                "state": st["state"],
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, st in self.nodes.items()
            if st["state"] != "pending"
        }
        self.engine.send(
            "progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, self.engine.client_id
        )

    def start(self, node_id: str) -> None:
        self.nodes[node_id] = {"state": "running", "value": 0.0, "max": 1.0}
        self._send()

    def update(self, node_id: str, value: float, total: float) -> None:
        entry = self._entry(node_id)
        entry.update(state="running", value=value, max=total)
        self._send()

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry["state"] = "finished"
        entry["value"] = entry["max"]
        self._send()


class _ExecutionList:
    """ComfyUI's order: a topological dissolve that prefers output nodes and their feeders."""

    def __init__(
        self, prompt: dict[str, Any], registry: NodeRegistry, is_cached: Callable[[str], bool]
    ) -> None:
        self.prompt = prompt
        self.registry = registry
        self.is_cached = is_cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, bool]] = {}

    def _is_output(self, node_id: str) -> bool:
        node = self.registry.get(self.prompt[node_id]["class_type"])
        return node is not None and node.output_node

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, str]] = []
        while stack:
            current = stack.pop()
            if current in self.pending:
                continue
            self.pending[current] = True
            self.block_count[current] = 0
            self.blocking[current] = {}
            for value in self.prompt[current]["inputs"].values():
                if _is_link(value) and not self.is_cached(value[0]):
                    stack.append(value[0])
                    links.append((value[0], current))
        for source, target in links:
            self._add_link(source, target)

    def _add_link(self, source: str, target: str) -> None:
        if self.is_cached(source):
            return
        self.add_node(source)
        if target not in self.blocking[source]:
            self.blocking[source][target] = True
            self.block_count[target] += 1

    def is_empty(self) -> bool:
        return not self.pending

    def stage(self) -> str | None:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        if not ready:
            return None
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            for blocked in self.blocking[node_id]:
                if any(self._is_output(b) for b in self.blocking[blocked]):
                    return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for blocked in self.blocking[node_id]:
            self.block_count[blocked] -= 1
        del self.blocking[node_id]


class _Context:
    """The ``NodeContext`` of one node run."""

    def __init__(
        self,
        engine: Engine,
        node_id: str,
        prompt_id: str,
        prompt: dict[str, Any],
        extra_data: dict[str, Any],
        progress: _Progress,
    ) -> None:
        self.engine = engine
        self.node_id = node_id
        self.prompt_id = prompt_id
        self.prompt = prompt
        self.extra_data = extra_data
        self.paths = engine.paths
        self.disable_metadata = engine.settings.disable_metadata
        self._progress = progress

    @property
    def seconds_per_image(self) -> float:
        return self.engine.settings.seconds_per_image

    @property
    def seconds_per_step(self) -> float:
        return self.engine.settings.seconds_per_step

    async def gpu_sleep(self, seconds: float) -> None:
        await self.engine.simulated_sleep(seconds)

    async def progress(
        self, value: float, total: float, preview: Image.Image | None = None
    ) -> None:
        engine = self.engine
        engine.check_interrupt()
        await engine.faults.gate.wait_open()
        value = min(value, total)
        self._progress.update(self.node_id, value, total)
        sid = engine.client_id
        flags = engine.sink.supports_preview_metadata(sid)
        if preview is not None and flags:
            meta = json.dumps(
                {
                    "node_id": self.node_id,
                    "prompt_id": self.prompt_id,
                    "display_node_id": self.node_id,
                    "parent_node_id": None,
                    "real_node_id": self.node_id,
                    "image_type": "image/png",
                }
            ).encode()
            payload = struct.pack(">I", len(meta)) + meta + encode_preview(preview)
            engine.send(BINARY_PREVIEW_WITH_METADATA, payload, sid)
        engine.send(
            "progress",
            {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.node_id},
            sid,
        )
        if preview is not None and not flags:
            engine.send(BINARY_PREVIEW_IMAGE, struct.pack(">I", 2) + encode_preview(preview), sid)

    def send_text(self, text: str) -> None:
        node = self.node_id.encode()
        self.engine.send(BINARY_TEXT, struct.pack(">I", len(node)) + node + text.encode(), None)

    async def in_thread(self, fn: Callable[[], T]) -> T:
        return await disk_work(fn)


class Engine:
    """Queue, worker, cache and history of one fake server (lives as long as the server)."""

    def __init__(
        self,
        registry: NodeRegistry,
        paths: FakePaths,
        sink: MessageSink,
        settings: Settings,
        faults: Faults,
        tally: Tally | None = None,
        on_crash: Callable[[], None] | None = None,
    ) -> None:
        self.registry = registry
        self.paths = paths
        self.sink = sink
        self.settings = settings
        self.faults = faults
        self.on_crash = on_crash
        self.number = 0
        self._seq = 0
        self.queue: list[_Queued] = []
        self.running: dict[int, _Queued] = {}
        self._task_counter = 0
        self.history: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, Any] = {}
        self.cache: dict[str, _CacheEntry] = {}
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self._interrupted = False
        self._interrupt_event = trio.Event()
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self.tally = tally if tally is not None else Tally()

    # -- messages ------------------------------------------------------------------------

    def send(self, event: str | int, data: Any, sid: str | None) -> None:
        """Send through the sink (at once: the sink queues per socket)."""
        self.sink.send(event, data, sid)

    def queue_info(self) -> dict[str, Any]:
        """``{"exec_info": {"queue_remaining": n}}``."""
        return {"exec_info": {"queue_remaining": len(self.queue) + len(self.running)}}

    def _queue_updated(self) -> None:
        self.send("status", {"status": self.queue_info()}, None)

    # -- HTTP-facing operations ------------------------------------------------------------

    def post_prompt(self, body: Any) -> tuple[int, Any]:
        """``POST /prompt``: (status, JSON answer). Raises on bodies ComfyUI answers with 500."""
        self.tally.prompts_received.append(copy.deepcopy(body))
        if "number" in body:
            number: Any = float(body["number"])
        else:
            number = self.number
            if _member(body, "front", False):
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
        prompt_id = str(body["prompt_id"]) if "prompt_id" in body else str(uuid.uuid4())
        partial = _member(body, "partial_execution_targets", None)
        valid, error, outputs, node_errors = validate_prompt(
            self.registry, self.paths, prompt, partial
        )
        extra_data = _member(body, "extra_data", {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not valid:
            logger.info("fake ComfyUI: invalid prompt: %s", error)
            return 400, {"error": error, "node_errors": node_errors}
        self._seq += 1
        heapq.heappush(
            self.queue, _Queued(number, prompt_id, prompt, extra_data, outputs, self._seq)
        )
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
        self._interrupted = True
        self._interrupt_event.set()

    def set_flag(self, name: str, value: Any) -> None:
        """``/free`` flags, applied by the worker when the current prompt is done."""
        self.flags[name] = value
        self._wake.set()

    def get_history(self, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        """``GET /history`` (the last ``max_items`` by default, oldest first)."""
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        result: dict[str, Any] = {}
        for index, (key, value) in enumerate(self.history.items()):
            if index >= offset:
                result[key] = value
                if max_items is not None and len(result) >= max_items:
                    break
        return result

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
            await self.faults.gate.wait_open()
            if self.queue:
                item = heapq.heappop(self.queue)
                item_id = self._task_counter
                self._task_counter += 1
                self.running[item_id] = copy.deepcopy(item)
                self._queue_updated()
                started = time.perf_counter()
                success, messages, result = await self._execute(item)
                self._task_done(item_id, success, messages, result)
                if self.client_id is not None:
                    self.send(
                        "executing", {"node": None, "prompt_id": item.prompt_id}, self.client_id
                    )
                self.tally.executed_count += 1
                logger.info(
                    "fake ComfyUI: prompt %s executed in %.2f seconds",
                    item.prompt_id,
                    time.perf_counter() - started,
                )
            flags, self.flags = self.flags, {}
            if flags.get("free_memory"):
                self.cache.clear()
            self._maybe_idle()

    def _task_done(
        self, item_id: int, success: bool, messages: list[Any], result: dict[str, Any]
    ) -> None:
        item = self.running.pop(item_id)
        if len(self.history) > MAX_HISTORY:
            self.history.pop(next(iter(self.history)))
        for key in _SENSITIVE_EXTRA_DATA:
            item.extra_data.pop(key, None)
        entry: dict[str, Any] = {
            "prompt": item.as_list(),
            "outputs": {},
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": copy.deepcopy(messages),
            },
        }
        entry.update(result)
        self.history[item.prompt_id] = entry
        self._queue_updated()

    def check_interrupt(self) -> None:
        """Raise when an interrupt is pending (node boundaries, progress ticks, sleeps)."""
        if self._interrupted:
            raise _Interrupted

    async def simulated_sleep(self, seconds: float) -> None:
        """Simulated GPU time: ends early (raising) on an interrupt, pauses while hung."""
        deadline = trio.current_time() + max(seconds, 0.0)
        while True:
            self.check_interrupt()
            await self.faults.gate.wait_open()
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            with trio.move_on_after(remaining):
                await self._interrupt_event.wait()
        self.check_interrupt()

    def _signatures(self, prompt: dict[str, Any]) -> dict[str, str]:
        changed: dict[str, Any] = {}

        def is_changed(node_id: str) -> Any:
            if node_id not in changed:
                node = self.registry.get(prompt[node_id]["class_type"])
                value: Any = False
                if node is not None and node.is_changed is not None:
                    constants = {
                        k: v
                        for k, v in prompt[node_id]["inputs"].items()
                        if not isinstance(v, list)
                    }
                    try:
                        value = node.is_changed(self.paths, constants)
                    except Exception:
                        value = 0
                changed[node_id] = value
            return changed[node_id]

        def immediate(node_id: str, order: dict[str, int]) -> list[Any]:
            if node_id not in prompt:
                return [math.nan]
            node = prompt[node_id]
            node_def = self.registry.get(node["class_type"])
            sig: list[Any] = [node["class_type"], is_changed(node_id)]
            if node_def is not None and "UNIQUE_ID" in node_def.hidden.values():
                sig.append(node_id)
            for key in sorted(node["inputs"]):
                value = node["inputs"][key]
                if _is_link(value):
                    sig.append([key, ["ANCESTOR", order[value[0]], value[1]]])
                else:
                    sig.append([key, value])
            return sig

        def ancestry(node_id: str, ancestors: list[str], order: dict[str, int]) -> None:
            if node_id not in prompt:
                return
            inputs = prompt[node_id]["inputs"]
            for key in sorted(inputs):
                value = inputs[key]
                if _is_link(value) and value[0] not in order:
                    ancestors.append(value[0])
                    order[value[0]] = len(ancestors) - 1
                    ancestry(value[0], ancestors, order)

        result = {}
        for node_id in prompt:
            ancestors: list[str] = []
            order: dict[str, int] = {}
            ancestry(node_id, ancestors, order)
            parts = [immediate(node_id, order)] + [immediate(a, order) for a in ancestors]
            result[node_id] = json.dumps(parts, sort_keys=True, default=str)
        return result

    def _add_message(
        self, messages: list[Any], event: str, data: dict[str, Any], broadcast: bool
    ) -> None:
        data = {**data, "timestamp": _now_ms()}
        messages.append([event, data])
        if self.client_id is not None or broadcast:
            self.send(event, data, self.client_id)

    async def _execute(self, item: _Queued) -> tuple[bool, list[Any], dict[str, Any]]:
        prompt_id, prompt, extra_data = item.prompt_id, item.prompt, item.extra_data
        self._interrupted = False
        self._interrupt_event = trio.Event()
        self.client_id = _member(extra_data, "client_id", None)
        messages: list[Any] = []
        self._add_message(messages, "execution_start", {"prompt_id": prompt_id}, False)
        progress = _Progress(self, prompt_id)
        keys = self._signatures(prompt)
        used = set(keys.values())
        self.cache = {k: v for k, v in self.cache.items() if k in used}
        cached = [n for n in prompt if keys[n] in self.cache]
        self._add_message(
            messages, "execution_cached", {"nodes": cached, "prompt_id": prompt_id}, False
        )
        executed: set[str] = set()
        plan = _ExecutionList(prompt, self.registry, lambda n: keys.get(n) in self.cache)
        for output in item.outputs:
            plan.add_node(output)
        success = True
        while not plan.is_empty():
            node_id = plan.stage()
            if node_id is None:
                success = False
                self._add_message(
                    messages,
                    "execution_error",
                    {
                        "prompt_id": prompt_id,
                        "node_id": next(iter(plan.pending)),
                        "node_type": prompt[next(iter(plan.pending))]["class_type"],
                        "executed": sorted(executed),
                        "exception_message": "Dependency cycle detected",
                        "exception_type": "graph.DependencyCycleError",
                        "traceback": [],
                        "current_inputs": [],
                        "current_outputs": list(prompt),
                    },
                    False,
                )
                break
            error = await self._execute_node(node_id, item, keys, progress, executed)
            if error is not None:
                success = False
                event, data, broadcast = error
                self._add_message(messages, event, data, broadcast)
                break
            plan.complete(node_id)
        else:
            self._add_message(messages, "execution_success", {"prompt_id": prompt_id}, False)
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for node_id in prompt:
            entry = self.cache.get(keys[node_id])
            if entry is not None and entry.ui is not None:
                outputs[node_id] = entry.ui
                meta[node_id] = entry.meta
        self.last_node_id = None
        return success, messages, {"outputs": outputs, "meta": meta}

    def _gather_inputs(
        self,
        node_id: str,
        node: NodeDef,
        prompt: dict[str, Any],
        extra_data: dict[str, Any],
        keys: dict[str, str],
    ) -> dict[str, Any]:
        types = node.info.get("input", {})
        known: set[str] = set()
        for section in ("required", "optional", "hidden"):
            known.update(types.get(section, {}) or {})
        values: dict[str, Any] = {}
        for name, value in prompt[node_id]["inputs"].items():
            if name not in known and not node.wildcard:
                continue
            if _is_link(value):
                entry = self.cache.get(keys.get(value[0], ""))
                slot = int(value[1])
                values[name] = (
                    entry.outputs[slot]
                    if entry is not None and 0 <= slot < len(entry.outputs)
                    else None
                )
            else:
                values[name] = value
        for name, kind in node.hidden.items():
            if kind == "PROMPT":
                values[name] = prompt
            elif kind == "EXTRA_PNGINFO":
                values[name] = extra_data.get("extra_pnginfo")
            elif kind == "UNIQUE_ID":
                values[name] = node_id
        return values

    async def _execute_node(
        self,
        node_id: str,
        item: _Queued,
        keys: dict[str, str],
        progress: _Progress,
        executed: set[str],
    ) -> tuple[str, dict[str, Any], bool] | None:
        prompt, prompt_id = item.prompt, item.prompt_id
        class_type = prompt[node_id]["class_type"]
        node = self.registry.get(class_type)
        assert node is not None
        key = keys[node_id]
        cached = self.cache.get(key)
        if cached is not None:
            if self.client_id is not None:
                self.send(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": cached.ui,
                        "prompt_id": prompt_id,
                    },
                    self.client_id,
                )
            progress.finish(node_id)
            return None
        progress.start(node_id)
        inputs: dict[str, Any] | None = None
        try:
            inputs = self._gather_inputs(node_id, node, prompt, item.extra_data, keys)
            if self.client_id is not None:
                self.last_node_id = node_id
                self.send(
                    "executing",
                    {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                    self.client_id,
                )
            await self.faults.gate.wait_open()
            self.check_interrupt()
            if self.faults.crashes_at(node_id, class_type) and self.on_crash is not None:
                self.on_crash()
                await trio.sleep_forever()
            failure = self.faults.failure_for(node_id, class_type)
            if failure is not None:
                raise failure
            extra = self.settings.node_seconds.get(
                node_id, self.settings.node_seconds.get(class_type, 0.0)
            )
            ctx = _Context(self, node_id, prompt_id, prompt, item.extra_data, progress)
            if extra:
                await ctx.gpu_sleep(extra)
            outputs, ui = await node.run(ctx, inputs)
        except _Interrupted:
            logger.info("fake ComfyUI: processing interrupted")
            return (
                "execution_interrupted",
                {
                    "prompt_id": prompt_id,
                    "node_id": node_id,
                    "node_type": class_type,
                    "executed": sorted(executed),
                },
                True,
            )
        except Exception as exc:
            logger.info("fake ComfyUI: node %s (%s) failed: %r", node_id, class_type, exc)
            formatted = {k: [_format_value(v)] for k, v in (inputs or {}).items()}
            return (
                "execution_error",
                {
                    "prompt_id": prompt_id,
                    "node_id": node_id,
                    "node_type": class_type,
                    "executed": sorted(executed),
                    "exception_message": f"{exc}\n",
                    "exception_type": _type_name(exc),
                    "traceback": traceback.format_tb(exc.__traceback__),
                    "current_inputs": formatted,
                    "current_outputs": list(prompt),
                },
                False,
            )
        self._store(node_id, key, outputs, ui, prompt_id)
        progress.finish(node_id)
        executed.add(node_id)
        self.tally.executed_nodes.append((prompt_id, node_id))
        return None

    def _store(
        self,
        node_id: str,
        key: str,
        outputs: tuple[Any, ...],
        ui: dict[str, Any] | None,
        prompt_id: str,
    ) -> None:
        meta = {
            "node_id": node_id,
            "display_node": node_id,
            "parent_node": None,
            "real_node_id": node_id,
        }
        if ui and self.client_id is not None:
            self.send(
                "executed",
                {
                    "node": node_id,
                    "display_node": node_id,
                    "output": ui,
                    "prompt_id": prompt_id,
                },
                self.client_id,
            )
        self.cache[key] = _CacheEntry(outputs, ui or None, meta)
