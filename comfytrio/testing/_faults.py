"""The state of the faults a test switches on while the fake runs: the gate a hang closes,
failing and crashing nodes, and the hostile rules (malformed answers and websocket
messages), with the helpers that build hostile frames.

The handle's ``_fake_faults`` and ``_fake_hostile`` flip these switches; the engine, the
websocket hub and the ``_server_hostile`` middleware consult them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

__all__ = [
    "AnswerRule",
    "AnswerTransform",
    "Faults",
    "Gate",
    "Hostility",
    "RawBytes",
    "SimulatedNodeError",
    "WsMaker",
    "WsMessage",
    "encode_ws_message",
    "exception_type_name",
    "websocket_frame",
]


class Gate:
    """Open unless the server hangs; everything that answers or executes waits here."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()

    @property
    def is_open(self) -> bool:
        """False while hung."""
        return self._open.is_set()

    def close(self) -> None:
        """Start hanging."""
        if self._open.is_set():
            self._open = trio.Event()

    def open(self) -> None:
        """Stop hanging."""
        self._open.set()

    async def wait_open(self) -> None:
        """Return at once when open, else when opened."""
        if not self._open.is_set():
            await self._open.wait()


class SimulatedNodeError(Exception):
    """The error ``fail_node`` makes a node raise; reported with the chosen type name."""

    def __init__(self, message: str, type_name: str) -> None:
        super().__init__(message)
        self.type_name = type_name


def exception_type_name(exc: BaseException) -> str:
    """The ``exception_type`` ComfyUI reports: a builtin's bare name, others module-qualified
    (``fail_node``'s simulated errors: the type name it was given)."""
    if isinstance(exc, SimulatedNodeError):
        return exc.type_name
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class _FailRule:
    node: str
    message: str
    exception_type: str
    times: int | None


# -- hostile mode: answers and messages a real ComfyUI never sends ---------------------------


class RawBytes:
    """Bytes written onto a websocket's TCP stream as they are (frames or garbage)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


WsMessage = RawBytes | str | bytes | Mapping[str, Any] | list[Any] | int | float | bool | None
"""A websocket message to send: ``str`` is one text frame as it is (so it need not be JSON),
``bytes`` one binary frame, ``RawBytes`` bytes written onto the connection as they are (see
``websocket_frame``), anything else is JSON-encoded (``NaN``/``Infinity`` written as
JavaScript would, which strict JSON forbids)."""

WsMaker = Callable[[Any], WsMessage]
"""Makes the message to send from the ``data`` of the real message that triggered it;
returning None leaves that message alone (it does not count toward ``times``)."""

AnswerTransform = Callable[[bytes], bytes | str | None]
"""Makes an answer's new body from the real one; None leaves that answer alone (it does not
count toward ``times``)."""


def encode_ws_message(message: WsMessage) -> str | bytes | RawBytes:
    """The frame payload of ``message`` (see ``WsMessage``)."""
    if isinstance(message, str | bytes | RawBytes):
        return message
    return json.dumps(message)


def websocket_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
) -> bytes:
    """One websocket frame, as RFC 6455 lays it out, with no check at all: any opcode (0-15),
    reserved bits ``rsv`` (0-7), control frames longer than 125 bytes or not final, a text
    frame that is not UTF-8, a ``mask`` (servers must not mask)."""
    if not 0 <= opcode <= 15:
        raise ValueError(f"opcode must be 0-15, got {opcode}")
    if not 0 <= rsv <= 7:
        raise ValueError(f"rsv must be 0-7, got {rsv}")
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    masked = 0x80 if mask is not None else 0
    length = len(payload)
    if length < 126:
        header = bytes((first, masked | length))
    elif length < 1 << 16:
        header = bytes((first, masked | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((first, masked | 127)) + length.to_bytes(8, "big")
    if mask is None:
        return header + payload
    if len(mask) != 4:
        raise ValueError("a mask is 4 bytes")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


@dataclass
class _WsRule:
    event: str | int
    message: WsMessage | WsMaker
    replace: bool
    times: int | None
    drop: bool = False


@dataclass
class AnswerRule:
    """One ``corrupt_answers`` switch: which requests, and what they get instead."""

    route: str
    method: str | None
    body: bytes | None
    transform: AnswerTransform | None
    status: int | None
    content_type: str | None
    times: int | None
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        parts = re.split(r"(\{[^/{}]*\})", self.route)
        regex = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
        self.pattern = re.compile(regex)

    def matches(self, method: str, path: str) -> bool:
        """Whether this rule takes a request (``/api/...`` is the same route)."""
        if self.method is not None and self.method != method:
            return False
        if path.startswith("/api/"):
            path = path[4:]
        return self.pattern.fullmatch(path) is not None


def _count_down(rules: list[Any], rule: Any) -> None:
    if rule.times is not None:
        rule.times -= 1
        if rule.times <= 0 and rule in rules:
            rules.remove(rule)


@dataclass
class Hostility:
    """The hostile switches of one fake server: answers and messages a real ComfyUI never
    sends (kept across restarts, cleared by ``clear``)."""

    ws_rules: list[_WsRule] = field(default_factory=list)
    answer_rules: list[AnswerRule] = field(default_factory=list)
    hits: int = 0
    """How many messages and answers the rules have changed (never reset)."""

    def add_ws_rule(
        self, event: str | int, message: WsMessage | WsMaker, replace: bool, times: int | None
    ) -> None:
        """After (or instead of) the next ``times`` messages of type ``event``, send
        ``message``."""
        self.ws_rules.append(_WsRule(event, message, replace, times))

    def add_ws_drop(self, event: str | int, times: int | None) -> None:
        """Send none of the next ``times`` messages of type ``event``."""
        self.ws_rules.append(_WsRule(event, None, True, times, drop=True))

    def rewrite(
        self, event: str | int, data: Any, frame: str | bytes
    ) -> list[str | bytes | RawBytes]:
        """The frames to send for one real message (``frame``), the ws rules applied."""
        if not self.ws_rules:
            return [frame]
        keep_real = True
        injected: list[str | bytes | RawBytes] = []
        for rule in list(self.ws_rules):
            if rule.event != event:
                continue
            message = rule.message
            if callable(message):
                message = message(data)
                if message is None:
                    continue
            _count_down(self.ws_rules, rule)
            self.hits += 1
            keep_real = keep_real and not rule.replace
            if not rule.drop:
                injected.append(encode_ws_message(message))
        return [frame, *injected] if keep_real else injected

    def answer_rule_for(self, method: str, path: str) -> AnswerRule | None:
        """The first rule that takes this request (not counted down yet)."""
        for rule in self.answer_rules:
            if rule.matches(method, path):
                return rule
        return None

    def used(self, rule: AnswerRule) -> None:
        """``rule`` changed one answer."""
        _count_down(self.answer_rules, rule)
        self.hits += 1

    def clear(self) -> None:
        """Switch every hostile rule off."""
        self.ws_rules.clear()
        self.answer_rules.clear()


@dataclass
class Faults:
    """The switched-on faults of one fake server."""

    gate: Gate = field(default_factory=Gate)
    fail_rules: list[_FailRule] = field(default_factory=list)
    crash_on: set[str] = field(default_factory=set)
    hostile: Hostility = field(default_factory=Hostility)

    def add_failure(self, node: str, message: str, exception_type: str, times: int | None) -> None:
        """Make ``node`` (an id or a class_type) raise when it runs."""
        self.fail_rules.append(_FailRule(node, message, exception_type, times))

    def failure_for(self, node_id: str, class_type: str) -> SimulatedNodeError | None:
        """The error this node must raise now, if any (counts down ``times``)."""
        for rule in self.fail_rules:
            if rule.node in (node_id, class_type):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self.fail_rules.remove(rule)
                return SimulatedNodeError(rule.message, rule.exception_type)
        return None

    def crashes_at(self, node_id: str, class_type: str) -> bool:
        """Whether the server must crash when this node starts."""
        return node_id in self.crash_on or class_type in self.crash_on

    def clear(self) -> None:
        """Switch every fault off (and stop hanging)."""
        self.fail_rules.clear()
        self.crash_on.clear()
        self.hostile.clear()
        self.gate.open()
