"""Faults a test switches on while the fake runs: failing nodes, crashes, hangs."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

__all__ = ["Faults", "Gate", "SimulatedNodeError"]


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


@dataclass
class _FailRule:
    node: str
    message: str
    exception_type: str
    times: int | None


@dataclass
class Faults:
    """The switched-on faults of one fake server."""

    gate: Gate = field(default_factory=Gate)
    fail_rules: list[_FailRule] = field(default_factory=list)
    crash_on: set[str] = field(default_factory=set)

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
        self.gate.open()
