"""The prompt state machine: what each piece of news does to the prompts one client has in
flight, and when a prompt has ended.

Pure: no I/O, no socket, no clock of its own. It is driven by plain calls (a websocket
message, what ``/queue`` or ``/history`` answered, a cancel, a lost server), each given the
current time, so settling and reconciling are tested without a server
(``tests/test_prompt_state.py``). The websocket session (``_session.py``) feeds it messages;
the client (``_client.py``) asks the server and feeds it the answers.

Protocol facts it is built on (recorded from a real ComfyUI 0.3.64, see
``comfyui-protocol/README.md``):

* A prompt ends with ``executing`` carrying ``node: null`` and its ``prompt_id``; that message
  comes after ``execution_success``/``execution_error``/``execution_interrupted`` and after the
  history entry is written. ``execution_success`` alone is not enough: ``/history/{id}`` can
  still be ``{}`` right after it.
* Any event of a prompt means it runs: its clock (``started_at``, from which ``wait()``'s
  timeout counts) starts then, not when it was queued.
* A pending prompt that is deleted or cleared (by anyone) vanishes without any event, and
  ``/history/{id}`` answers ``{}`` both for "still queued or running" and for "never heard of
  it". So when the socket drops, or a prompt has been silent too long, it is reconciled:
  ``/queue`` first (``queued``), ``/history/{id}`` second (``history``). ComfyUI writes the
  history entry before it removes the prompt from the running list, so a prompt that is in
  neither has vanished.
* Binary frames (``_frames.py``) are news of a prompt too: an image frame of an output node
  is held as an output until the prompt ends (and checked against the node's progress
  count then), any other image is a preview event. A type 1 frame names no prompt nor node:
  it belongs to the node the last ``executing`` named (ComfyUI runs one prompt at a time).
* A prompt we give up on while the server may still have it (silent too long, the server
  unreachable, a malformed message) is kept in ``abandoned``: the client removes it from
  the server once it answers again, so it never runs there as well as elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from . import _firewall as firewall
from ._errors import (
    ComfyAPIError,
    ExecutionError,
    ExecutionInterruptedError,
    PromptVanishedError,
    ServerLostError,
    ServerProtocolError,
)
from ._events import (
    ComfyEvent,
    NodeActivity,
    NodeOutput,
    NodePreview,
    NodeProgress,
    NodesCached,
    NodeStarted,
    NodeText,
    PromptFinished,
    PromptStarted,
    PromptStatus,
)
from ._frames import STREAMING_OUTPUT_CLASSES, ImageFrame, Streams, TextFrame
from ._results import PromptResult

__all__ = ["Prompts", "Watch"]

logger = logging.getLogger("comfytrio.client")


@attrs.define(eq=False)
class Watch:
    """What we know of one prompt while it is in flight. ``done`` and ``running`` are trio
    events a waiter blocks on; setting them needs no running trio loop."""

    prompt_id: str
    """The prompt."""
    accepted: bool = False
    """``POST /prompt`` answered 200."""
    done: trio.Event = attrs.Factory(trio.Event)
    """Set once ``outcome`` is known."""
    outputs: dict[str, dict[str, Any]] = attrs.Factory(dict)
    """Output node id -> its ``output``, from ``executed`` events."""
    cached: tuple[str, ...] = ()
    """The nodes ``execution_cached`` named."""
    error: firewall.ErrorReport | None = None
    """What ``execution_error`` said, once it came."""
    interrupted: firewall.ErrorReport | None = None
    """What ``execution_interrupted`` said, once it came."""
    started_at: float | None = None
    """When it was first seen running (its clock starts)."""
    running: trio.Event = attrs.Factory(trio.Event)
    """Set once it runs, or once it ended."""
    seen: bool = False
    """The server sent an event for it: it knows the prompt."""
    gap: bool = False
    """The socket dropped while it was in flight: events may be missing."""
    last_activity: float = 0.0
    """When we last had news of it."""
    outcome: PromptResult | ComfyAPIError | None = None
    """Its result, or the error ``wait()`` raises."""
    streams: Streams = attrs.Factory(Streams)
    """Its nodes' classes, and the images its output nodes sent over the websocket."""
    activity: dict[str, str] = attrs.Factory(dict)
    """Node id -> its ``activity`` in the last ``progress_state`` that had one."""


@attrs.define(eq=False)
class Prompts:
    """Every prompt one client has in flight, and what each piece of news does to them."""

    name: str
    """The server's name, for results, errors and events."""
    silence_timeout: float = 30.0
    """After this many seconds without news, a prompt is ``silent``: ask the server."""
    reconnect_timeout: float = 30.0
    """A prompt silent for ``silence_timeout`` plus this, that the server cannot place, is
    given up."""
    emit: Callable[[ComfyEvent], None] | None = None
    """Called with each event of our prompts; None when no one listens (then none is made)."""
    watches: dict[str, Watch] = attrs.Factory(dict)
    """Prompt id -> its watch, from before ``POST /prompt`` until ``wait()`` returns."""
    abandoned: set[str] = attrs.Factory(set)
    """Ids given up on that the server may still have: to remove from it."""
    output_node_classes: frozenset[str] = STREAMING_OUTPUT_CLASSES
    """The node classes whose image frames are outputs (the server's output nodes)."""
    max_image_bytes: int | None = None
    """The largest image an output node may send over the websocket (None: no cap)."""
    max_held_bytes: int | None = 2 * 1024**3
    """The most bytes of images one prompt's output nodes may send in all (held in memory
    until it ends)."""
    current: tuple[str, str] | None = None
    """(prompt id, node id) of the last ``executing`` with a node: what a frame without
    metadata belongs to."""

    # ------------------------------------------------------------------ a prompt's life

    def watch(self, prompt_id: str, now: float) -> Watch:
        """Watch a prompt before it is submitted, so no event of it can be missed. Raises
        ``ValueError`` for an id already in flight."""
        if prompt_id in self.watches:
            raise ValueError(f"prompt id {prompt_id} is already in flight on {self.name}")
        watch = self.watches[prompt_id] = Watch(prompt_id, last_activity=now)
        return watch

    @staticmethod
    def accepted(watch: Watch, now: float) -> None:
        """``POST /prompt`` answered 200: the prompt is in flight."""
        watch.accepted = True
        watch.last_activity = now

    def forget(self, prompt_id: str) -> None:
        """Stop watching a prompt (its waiter has its outcome, or its submission failed)."""
        self.watches.pop(prompt_id, None)

    def get(self, prompt_id: str | None) -> Watch | None:
        """The watch of ``prompt_id``; None for another client's prompt, or none."""
        return self.watches.get(prompt_id) if prompt_id is not None else None

    def in_flight(self) -> int:
        """How many prompts were accepted and are not yet waited for."""
        return sum(1 for w in self.watches.values() if w.accepted)

    def take_abandoned(self) -> set[str]:
        """The abandoned ids, handed over to be removed from the server (and forgotten here)."""
        abandoned, self.abandoned = self.abandoned, set()
        return abandoned

    # ------------------------------------------------------------------ websocket messages

    def message(self, kind: str, data: dict[str, Any], now: float) -> Watch | None:
        """Act on one execution message (``firewall.message`` checked; ``status`` is the
        session's). Messages of other clients' prompts are ignored.

        Returns the prompt to reconcile when it ended while events may have been lost (the
        socket dropped while it ran). Raises ``firewall.Malformed`` for what ComfyUI never
        sends.
        """
        if kind == "executing":
            self._executing(data)
        watch = self.get(data.get("prompt_id"))
        if watch is None:
            return None  # another client's prompt, or a message of no prompt
        prompt_id = watch.prompt_id
        watch.last_activity = now
        watch.seen = True
        if watch.started_at is None:  # any event of a prompt means it runs
            self._start(watch, now)
        emit = self.emit
        if kind == "executing":
            node = data.get("node")
            if node is None:
                return self._ended(watch)
            node = firewall.node_id(node)
            if emit is not None:
                emit(NodeStarted(self.name, prompt_id, node))
        elif kind == "progress":
            node = firewall.node_id(data.get("node"))
            value = firewall.number(data.get("value", 0), "progress value")
            top = firewall.number(data.get("max", 0), "progress max")
            watch.streams.progress(node, int(top))
            if emit is not None:
                emit(NodeProgress(self.name, prompt_id, node, int(value), int(top)))
        elif kind == "progress_state":
            self._progress_state(watch, data)
        elif kind == "executed":
            node = firewall.node_id(data.get("node"))
            output = firewall.output(data.get("output", {}), node)
            watch.outputs[node] = output
            if emit is not None:
                emit(NodeOutput(self.name, prompt_id, node, output))
        elif kind == "execution_start":
            watch.streams.missed = False  # every frame of its run comes from now on
            if emit is not None:
                emit(PromptStarted(self.name, prompt_id))
        elif kind == "execution_cached":
            watch.cached = firewall.cached_nodes(data.get("nodes"))
            if emit is not None:
                emit(NodesCached(self.name, prompt_id, watch.cached))
        elif kind == "execution_error":
            watch.error = firewall.error_report(data)
        elif kind == "execution_interrupted":
            watch.interrupted = firewall.error_report(data)
        return None

    def _executing(self, data: dict[str, Any]) -> None:
        """Note which node runs now (frames without metadata are its)."""
        prompt_id, node = data.get("prompt_id"), data.get("node")
        if isinstance(prompt_id, str) and isinstance(node, str | int) and node != "":
            self.current = (prompt_id, str(node))
        elif self.current is not None and self.current[0] == prompt_id:
            self.current = None

    def _progress_state(self, watch: Watch, data: dict[str, Any]) -> None:
        """``progress_state``: each node's ``activity`` (later ComfyUI versions) that
        changed becomes a ``NodeActivity`` event."""
        for node, activity in firewall.activities(data):
            if watch.activity.get(node) == activity:
                continue
            if activity is None:
                watch.activity.pop(node, None)
            else:
                watch.activity[node] = activity
            if self.emit is not None:
                self.emit(NodeActivity(self.name, watch.prompt_id, node, activity))

    # ------------------------------------------------------------------ binary frames

    def owner(self, frame: ImageFrame | TextFrame) -> tuple[Watch, str] | None:
        """The prompt of ours a frame belongs to, and its node; None for another client's
        prompt, or a frame without metadata while none of ours runs."""
        if isinstance(frame, ImageFrame) and frame.prompt_id is not None:
            watch = self.get(frame.prompt_id)
            return None if watch is None or frame.node_id is None else (watch, frame.node_id)
        if self.current is None:
            return None
        prompt_id, running = self.current
        watch = self.get(prompt_id)
        if watch is None:
            return None
        node = frame.node_id if frame.node_id is not None else running
        return watch, node

    def frame(self, watch: Watch, node: str, frame: ImageFrame | TextFrame, now: float) -> None:
        """Act on a binary frame of ``watch``'s ``node``: an output node's image is held as
        an output, any other image is a ``NodePreview``, text a ``NodeText``. Raises
        ``firewall.Malformed`` for an image over the caps."""
        if watch.done.is_set():
            return  # it ended (a cap was hit, say): what follows is of no use
        watch.last_activity = now
        watch.seen = True
        if watch.started_at is None:
            self._start(watch, now)
        emit = self.emit
        if isinstance(frame, TextFrame):
            if emit is not None:
                emit(NodeText(self.name, watch.prompt_id, node, frame.text))
            return
        if watch.streams.node_class(frame, node) in self.output_node_classes:
            watch.streams.add(
                node, frame, max_image=self.max_image_bytes, max_held=self.max_held_bytes
            )
        elif emit is not None:
            emit(NodePreview(self.name, watch.prompt_id, node, frame.data, frame.image_type))

    def _ended(self, watch: Watch) -> Watch | None:
        if watch.gap and watch.error is None and watch.interrupted is None:
            return watch  # the socket dropped while it ran: some `executed` may be lost
        self._settle_from(watch, watch.error, watch.interrupted, watch.outputs, watch.cached)
        return None

    def disconnected(self) -> None:
        """The websocket dropped: events of every prompt in flight may be lost."""
        for watch in self.watches.values():
            watch.gap = True
            watch.streams.missed = True

    def malformed(self, watch: Watch, detail: str) -> bool:
        """The server sent, about this prompt, what ComfyUI never sends: it ends with
        ``ServerProtocolError`` (and runs elsewhere). True when it was given up while the
        server may still run it (it is then ``abandoned``)."""
        given_up = watch.accepted and not watch.done.is_set()
        if given_up:
            self.abandoned.add(watch.prompt_id)
        protocol_error = ServerProtocolError(self.name, detail, prompt_id=watch.prompt_id)
        self._settle(watch, protocol_error, "error")
        return given_up

    # ------------------------------------------------------------------ reconciling

    def silent(self, now: float) -> list[Watch]:
        """The prompts in flight with no news for more than ``silence_timeout`` seconds."""
        return [
            w
            for w in self.watches.values()
            if w.accepted and not w.done.is_set() and now - w.last_activity > self.silence_timeout
        ]

    @staticmethod
    def unsettled(watches: Iterable[Watch]) -> list[Watch]:
        """Those of ``watches`` accepted and not yet ended: the ones worth reconciling."""
        return [w for w in watches if w.accepted and not w.done.is_set()]

    def queued(self, watch: Watch, running: set[str], pending: set[str], now: float) -> bool:
        """What ``/queue`` (its running and pending ids) says of a prompt: True when the
        server still has it (one running has started, if we missed its start), False when
        ``/history`` must say whether it finished or vanished."""
        if watch.prompt_id in running and watch.started_at is None:
            self._start(watch, now)  # its start event was missed
        if watch.prompt_id in running or watch.prompt_id in pending:
            watch.last_activity = now
            return True
        return False

    def history(self, watch: Watch, entry: dict[str, Any] | None) -> None:
        """Settle a prompt ``/queue`` no longer has from its ``/history`` entry: finished as
        the entry says, or vanished when there is none. Raises ``firewall.Malformed`` for an
        entry ComfyUI never writes."""
        if watch.done.is_set():
            return
        if entry is None:
            logger.warning("%s: prompt %s vanished", self.name, watch.prompt_id)
            self._settle(watch, PromptVanishedError(self.name, watch.prompt_id), "vanished")
            return
        error, interrupted, outputs, cached = firewall.history_entry(entry)
        self._settle_from(watch, error, interrupted, outputs, cached)

    def history_malformed(self, watch: Watch, error: ServerProtocolError) -> None:
        """``/history`` answered this prompt with what ComfyUI never sends: it ends with
        ``error`` and is ``abandoned``."""
        self._settle(watch, error, "error")
        self.abandoned.add(watch.prompt_id)

    def unplaceable(self, watches: Iterable[Watch], why: ComfyAPIError, now: float) -> None:
        """The server cannot say where these prompts are (``why``): try again later, but one
        silent for ``silence_timeout`` + ``reconnect_timeout`` seconds is given up (it runs
        elsewhere, and is removed from this server once it answers again), as when the
        websocket stays down that long."""
        logger.warning("%s: cannot reconcile yet: %s", self.name, why)
        limit = self.silence_timeout + self.reconnect_timeout
        for watch in watches:
            silent = now - watch.last_activity
            if silent > limit and not watch.done.is_set():
                self.abandoned.add(watch.prompt_id)
                text = f"prompt silent for {silent:.0f} s, and the server cannot say where it is"
                self._lost(watch, f"{text} ({why})")

    def fail_all(self, why: str) -> None:
        """The server is lost: every prompt in flight ends with ``ServerLostError`` and is
        ``abandoned``."""
        for watch in list(self.watches.values()):
            if watch.accepted and not watch.done.is_set():
                self.abandoned.add(watch.prompt_id)
                self._lost(watch, why)

    def cancelled(self, prompt_id: str) -> None:
        """We removed the prompt from the server: unless it had ended, it ends as
        interrupted."""
        watch = self.watches.get(prompt_id)
        if watch is not None and watch.outcome is None:
            stopped = ExecutionInterruptedError(
                instance=self.name, prompt_id=prompt_id, node_id=None, node_type=None
            )
            self._settle(watch, stopped, "cancelled")

    # ------------------------------------------------------------------ outcomes

    @staticmethod
    def _start(watch: Watch, now: float) -> None:
        watch.started_at = now
        watch.running.set()

    def _lost(self, watch: Watch, why: str) -> None:
        self._settle(watch, ServerLostError(self.name, why, prompt_id=watch.prompt_id), "lost")

    def _settle(
        self, watch: Watch, outcome: PromptResult | ComfyAPIError, status: PromptStatus
    ) -> None:
        """The prompt's outcome is known: wake its waiter. The first outcome wins."""
        if watch.done.is_set():
            return
        watch.outcome = outcome
        watch.done.set()
        watch.running.set()
        if self.emit is not None:
            self.emit(PromptFinished(self.name, watch.prompt_id, status))

    def _settle_from(
        self,
        watch: Watch,
        error: firewall.ErrorReport | None,
        interrupted: firewall.ErrorReport | None,
        outputs: dict[str, dict[str, Any]],
        cached: tuple[str, ...],
    ) -> None:
        """Settle from what the events or the history entry said: a node's error first, an
        interruption second, else success."""
        if error is not None:
            self._settle(watch, self._failure(watch, error, outputs, stopped=False), "error")
        elif interrupted is not None:
            failure = self._failure(watch, interrupted, outputs, stopped=True)
            self._settle(watch, failure, "interrupted")
        elif watch.streams.lost(self.output_node_classes):
            self._lost(watch, "the websocket was down while it ran: images it sent are lost")
        elif (short := watch.streams.shortfall(self.output_node_classes)) is not None:
            short_error = ServerProtocolError(self.name, short, prompt_id=watch.prompt_id)
            self._settle(watch, short_error, "error")
        else:
            images = tuple(watch.streams.images)
            result = PromptResult(self.name, watch.prompt_id, outputs, cached, images)
            self._settle(watch, result, "success")

    def _failure(
        self,
        watch: Watch,
        report: firewall.ErrorReport,
        outputs: dict[str, dict[str, Any]],
        *,
        stopped: bool,
    ) -> ExecutionError:
        """The error of a prompt a node failed (or, ``stopped``, that was interrupted), with
        what its output nodes reported before."""
        kind = ExecutionInterruptedError if stopped else ExecutionError
        return kind(
            instance=self.name,
            prompt_id=watch.prompt_id,
            node_id=report.node_id,
            node_type=report.node_type,
            exception_type="interrupted" if stopped else report.exception_type,
            exception_message="" if stopped else report.exception_message,
            traceback=() if stopped else report.traceback,
            node_outputs=outputs,
        )
