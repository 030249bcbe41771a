"""Running one prompt, after ComfyUI 0.3.64's ``execution.py``, and the classic cache.

Messages follow ``02_prompt_success.json``: ``execution_start``, ``execution_cached``,
``progress_state``/``executing`` per node, ``executed`` per output, then
``execution_success``, or ``execution_error``/``execution_interrupted`` at the node that
failed. Only ``status`` (and ``progress_state`` of prompts without a ``client_id``) goes to
every socket; the rest goes to the prompt's ``client_id``. The cache forgets what the next
prompt does not use, so an identical resubmit of the previous prompt runs nothing.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ._engine_context import LATENT_PREVIEW_NODES, NodeRun, Progress
from ._engine_graph import ExecutionList, cache_keys, is_link
from ._faults import exception_type_name
from ._nodes_base import NodeDef

if TYPE_CHECKING:
    from ._engine import Queued
    from ._engine_state import MessageSink, ServerState

__all__ = ["CacheEntry", "Executor"]

logger = logging.getLogger("comfytrio.testing")


@dataclass
class CacheEntry:
    """What the cache keeps of a node run: its outputs, UI output and history ``meta``."""

    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None
    meta: dict[str, Any]


class _Interrupted(Exception):
    pass


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Run:
    """One prompt's execution: what it has said and run so far."""

    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    progress: Progress
    keys: dict[str, str] = field(default_factory=dict)
    messages: list[Any] = field(default_factory=list)
    executed: set[str] = field(default_factory=set)

    def failure(self, node_id: str, **details: Any) -> dict[str, Any]:
        """The data of an ``execution_error`` or ``execution_interrupted`` at ``node_id``."""
        return {
            "prompt_id": self.prompt_id,
            "node_id": node_id,
            "node_type": self.prompt[node_id]["class_type"],
            "executed": sorted(self.executed),
            **details,
        }


class Executor:
    """Runs the prompts of one server generation, one at a time, with the classic cache;
    interrupts and simulated GPU time are its business too."""

    def __init__(
        self, state: ServerState, sink: MessageSink, on_crash: Callable[[], None] | None
    ) -> None:
        self.state = state
        self.sink = sink
        self.on_crash = on_crash
        self.cache: dict[str, CacheEntry] = {}
        self.client_id: str | None = None
        """The ``client_id`` of the prompt running (or that ran last)."""
        self.last_node_id: str | None = None
        """The node running now (told again to a socket of ``client_id`` that reconnects)."""
        self._interrupted = False
        self._interrupt_event = trio.Event()

    # -- interrupts and simulated time ---------------------------------------------------

    def interrupt(self) -> None:
        """Interrupt the running prompt at its next check."""
        self._interrupted = True
        self._interrupt_event.set()

    def check_interrupt(self) -> None:
        """Raise when an interrupt is pending (node boundaries, progress ticks, sleeps)."""
        if self._interrupted:
            raise _Interrupted

    async def simulated_sleep(self, seconds: float) -> None:
        """Simulated GPU time: ends early (raising) on an interrupt, pauses while hung."""
        deadline = trio.current_time() + max(seconds, 0.0)
        while True:
            self.check_interrupt()
            await self.state.faults.gate.wait_open()
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            with trio.move_on_after(remaining):
                await self._interrupt_event.wait()
        self.check_interrupt()

    # -- one prompt ------------------------------------------------------------------------

    async def execute(
        self, item: Queued, client_id: str | None
    ) -> tuple[bool, list[Any], dict[str, Any]]:
        """Run ``item``: whether it succeeded, the messages its history ``status`` lists,
        and its history ``outputs`` and ``meta``."""
        self._interrupted = False
        self._interrupt_event = trio.Event()
        self.client_id = client_id
        prompt_id, prompt = item.prompt_id, item.prompt
        run = _Run(prompt_id, prompt, item.extra_data, Progress(self.sink, client_id, prompt_id))
        self._message(run, "execution_start", {"prompt_id": prompt_id})
        run.keys = keys = cache_keys(prompt, self.state.registry, self.state.paths)
        used = set(keys.values())
        self.cache = {k: v for k, v in self.cache.items() if k in used}
        cached = [n for n in prompt if keys[n] in self.cache]
        self._message(run, "execution_cached", {"nodes": cached, "prompt_id": prompt_id})
        plan = ExecutionList(prompt, self.state.registry, lambda n: keys.get(n) in self.cache)
        for output in item.outputs:
            plan.add_node(output)
        success = await self._run_plan(run, plan)
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for node_id in prompt:
            entry = self.cache.get(keys[node_id])
            if entry is not None and entry.ui is not None:
                outputs[node_id] = entry.ui
                meta[node_id] = entry.meta
        self.last_node_id = None
        return success, run.messages, {"outputs": outputs, "meta": meta}

    def _message(
        self, run: _Run, event: str, data: dict[str, Any], broadcast: bool = False
    ) -> None:
        """A message the history keeps too (with a timestamp)."""
        data = {**data, "timestamp": _now_ms()}
        run.messages.append([event, data])
        if self.client_id is not None or broadcast:
            self.sink.send(event, data, self.client_id)

    async def _run_plan(self, run: _Run, plan: ExecutionList) -> bool:
        while not plan.is_empty():
            node_id = plan.stage()
            if node_id is None:
                cycle = run.failure(
                    next(iter(plan.pending)),
                    exception_message="Dependency cycle detected",
                    exception_type="graph.DependencyCycleError",
                    traceback=[],
                    current_inputs=[],
                    current_outputs=list(run.prompt),
                )
                self._message(run, "execution_error", cycle)
                return False
            error = await self._execute_node(run, node_id)
            if error is not None:
                event, data, broadcast = error
                self._message(run, event, data, broadcast)
                return False
            plan.complete(node_id)
        self._message(run, "execution_success", {"prompt_id": run.prompt_id})
        return True

    # -- one node --------------------------------------------------------------------------

    def _gather_inputs(self, run: _Run, node_id: str, node: NodeDef) -> dict[str, Any]:
        types = node.info.get("input", {})
        known: set[str] = set()
        for section in ("required", "optional", "hidden"):
            known.update(types.get(section, {}) or {})
        values: dict[str, Any] = {}
        for name, value in run.prompt[node_id]["inputs"].items():
            if name not in known and not node.wildcard:
                continue
            if is_link(value):
                entry = self.cache.get(run.keys.get(value[0], ""))
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
                values[name] = run.prompt
            elif kind == "EXTRA_PNGINFO":
                values[name] = run.extra_data.get("extra_pnginfo")
            elif kind == "UNIQUE_ID":
                values[name] = node_id
        return values

    async def _execute_node(
        self, run: _Run, node_id: str
    ) -> tuple[str, dict[str, Any], bool] | None:
        """Run one node (or take it from the cache); the failure message if it fails."""
        class_type = run.prompt[node_id]["class_type"]
        node = self.state.registry.get(class_type)
        assert node is not None
        key = run.keys[node_id]
        cached = self.cache.get(key)
        if cached is not None:
            if self.client_id is not None:
                self._send_executed(node_id, cached.ui, run.prompt_id)
            run.progress.finish(node_id)
            return None
        run.progress.start(node_id)
        inputs: dict[str, Any] | None = None
        try:
            inputs = self._gather_inputs(run, node_id, node)
            if self.client_id is not None:
                self.last_node_id = node_id
                self.sink.send(
                    "executing",
                    {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id},
                    self.client_id,
                )
            outputs, ui = await self._run_node(run, node_id, node, inputs)
        except _Interrupted:
            logger.info("fake ComfyUI: processing interrupted")
            return "execution_interrupted", run.failure(node_id), True
        except Exception as exc:
            logger.info("fake ComfyUI: node %s (%s) failed: %r", node_id, class_type, exc)
            error = run.failure(
                node_id,
                exception_message=f"{exc}\n",
                exception_type=exception_type_name(exc),
                traceback=traceback.format_tb(exc.__traceback__),
                current_inputs={k: [_format_value(v)] for k, v in (inputs or {}).items()},
                current_outputs=list(run.prompt),
            )
            return "execution_error", error, False
        if ui and self.client_id is not None:
            self._send_executed(node_id, ui, run.prompt_id)
        meta = {
            "node_id": node_id,
            "display_node": node_id,
            "parent_node": None,
            "real_node_id": node_id,
        }
        self.cache[key] = CacheEntry(outputs, ui or None, meta)
        run.progress.finish(node_id)
        run.executed.add(node_id)
        self.state.tally.executed_nodes.append((run.prompt_id, node_id))
        return None

    async def _run_node(
        self, run: _Run, node_id: str, node: NodeDef, inputs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        """The node's simulation, after the faults a test switched on for it."""
        faults, settings = self.state.faults, self.state.settings
        await faults.gate.wait_open()
        self.check_interrupt()
        if faults.crashes_at(node_id, node.class_type) and self.on_crash is not None:
            self.on_crash()
            await trio.sleep_forever()
        failure = faults.failure_for(node_id, node.class_type)
        if failure is not None:
            raise failure
        extra = settings.node_seconds.get(node_id, settings.node_seconds.get(node.class_type, 0.0))
        latent = inputs.get("latent_image")
        size = (int(getattr(latent, "width", 64)), int(getattr(latent, "height", 64)))
        ctx = NodeRun(self, node_id, run.prompt_id, run.progress, node.class_type, size)
        if extra:
            await ctx.gpu_sleep(extra)
        if self.state.profile.progress_activity and node.class_type in LATENT_PREVIEW_NODES:
            # Later servers say when a sampler loads its models; the fake loads at once.
            run.progress.set_activity(node_id, "loading")
            run.progress.set_activity(node_id, None)
        return await node.run(ctx, inputs)

    def _send_executed(self, node_id: str, ui: dict[str, Any] | None, prompt_id: str) -> None:
        self.sink.send(
            "executed",
            {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id},
            self.client_id,
        )
