"""Turns to be planned: jobs are planned just in time, first come first served.

A job waits for its turn (``async with admission.turn(name):``) until fewer shards are being
planned than there is room for (``room()``: the scheduler's ``plan_ahead`` less the shards
queued now). Until then it holds only what its caller passed and its turn, so 10,000
waiting jobs cost 10,000 parked calls, not 10,000 plans, uploads and shard records. It
plans and queues its shards inside the block; leaving the block, however (shards queued,
planning failed, cancelled), gives its turn back. A job still inside after
``slow_planning`` seconds (waiting on a LoRA that trickles in, say) stops counting, so the
jobs behind it that need no download are planned and keep the GPUs busy meanwhile.

All the bookkeeping is here: a turn is counted in ``planning`` by ``_count`` and uncounted
by ``_uncount``, once each.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator

import attrs
import trio
from outcome import Error

from ._errors import ComfyAPIError

__all__ = ["Admission", "Turn", "closed_error"]

logger = logging.getLogger("comfytrio.scheduler")


def closed_error() -> ComfyAPIError:
    """What a job meets once the api is closed."""
    return ComfyAPIError("the ComfyAPI was closed")


@attrs.define(eq=False)
class Turn:
    """One job's turn to be planned; use as ``async with``.

    Entering waits for the turn (first come first served) and raises ``ComfyAPIError`` when
    the admission is closed, before or while waiting; cancelled while waiting, the turn is
    forgotten. Leaving gives the turn back.
    """

    _admission: Admission
    name: str
    """The job's name."""
    asked_at: float = attrs.field(factory=trio.current_time)
    """When it asked for its turn (``trio.current_time()``)."""
    counted: bool = False
    """Counted in ``Admission.planning`` now (let in, not left, not found slow)."""
    _timer: trio.CancelScope | None = None

    async def __aenter__(self) -> Turn:
        """Wait for the turn."""
        if self._admission._ask(self):
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        self._admission._enter(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Give the turn back, whatever happened inside."""
        self._admission._leave(self)

    def _abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        """Cancelled while waiting: forgotten."""
        del self._admission._waiting[self]
        return trio.lowlevel.Abort.SUCCEEDED


class Admission:
    """First come first served turns to be planned, while ``room()`` allows.

    ``room``: how many shards may be planned now (``planning`` counts one per turn).
    ``slow_planning``: seconds after which a turn stops counting (None: never).
    """

    def __init__(self, room: Callable[[], int], *, slow_planning: float | None) -> None:
        if slow_planning is not None and not slow_planning > 0:
            raise ValueError(f"slow_planning must be positive seconds, got {slow_planning}")
        self._room = room
        self.slow_planning = slow_planning
        """Seconds of planning after which a job stops holding back the next (None: never)."""
        self._waiting: collections.OrderedDict[Turn, trio.lowlevel.Task] = collections.OrderedDict()
        self._inside: dict[str, Turn] = {}
        self._planning = 0
        self._closed = False

    @property
    def planning(self) -> int:
        """Turns counting now: let in, not left yet, and not found slow."""
        return self._planning

    def turn(self, name: str) -> Turn:
        """A turn for the job ``name``, to enter with ``async with``."""
        return Turn(self, name)

    def turns(self) -> Iterator[Turn]:
        """Every turn waiting or inside (being planned, slow ones too), in that order."""
        yield from self._waiting
        yield from self._inside.values()

    def inside(self, name: str) -> Turn | None:
        """The turn of the job ``name`` if it is inside now."""
        return self._inside.get(name)

    def let_in(self) -> None:
        """Let waiting turns in, in order, while there is room (call it whenever the room
        may have grown)."""
        while self._waiting and self._planning < self._room():
            turn, task = self._waiting.popitem(last=False)
            self._count(turn)
            trio.lowlevel.reschedule(task)

    def close(self) -> None:
        """Every turn waiting, and every one asked for later, raises ``ComfyAPIError``."""
        self._closed = True
        while self._waiting:
            _, task = self._waiting.popitem(last=False)
            trio.lowlevel.reschedule(task, Error(closed_error()))

    def _ask(self, turn: Turn) -> bool:
        """``turn`` asks to come in: True when it must wait (``let_in`` or ``close`` will
        wake it); False when it is let in at once."""
        if self._closed:
            raise closed_error()
        if self._waiting or self._planning >= self._room():
            self._waiting[turn] = trio.lowlevel.current_task()
            return True
        self._count(turn)
        return False

    def _enter(self, turn: Turn) -> None:
        """``turn`` is in: its planning is timed from now."""
        self._inside[turn.name] = turn
        if self._closed:  # let in, then closed before it ran
            self._leave(turn)
            raise closed_error()
        if self.slow_planning is not None:
            # The job plans in its own task: a task of trio's times it, so none of ours
            # has to poll (cancelled when the turn is given back, and with the run).
            turn._timer = trio.CancelScope()
            trio.lowlevel.spawn_system_task(
                self._time, turn, turn._timer, self.slow_planning, name=f"planning {turn.name}"
            )

    def _leave(self, turn: Turn) -> None:
        """``turn`` is given back."""
        self._inside.pop(turn.name, None)
        self._uncount(turn)

    async def _time(self, turn: Turn, scope: trio.CancelScope, seconds: float) -> None:
        """After ``seconds`` inside, ``turn`` stops counting."""
        with scope:
            await trio.sleep(seconds)
            logger.info(
                "job %s: still planning after %g s; planning the next job meanwhile",
                turn.name,
                seconds,
            )
            self._uncount(turn)

    def _count(self, turn: Turn) -> None:
        turn.counted = True
        self._planning += 1

    def _uncount(self, turn: Turn) -> None:
        """``turn`` no longer counts (it left, or it is slow): the one decrement that
        matches the ``_count`` that let it in; then the next turns may come in."""
        if turn._timer is not None:
            turn._timer.cancel()
            turn._timer = None
        if turn.counted:
            turn.counted = False
            self._planning -= 1
        self.let_in()
