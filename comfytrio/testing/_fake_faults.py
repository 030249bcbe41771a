"""The fault switches of the ``FakeComfyUI`` handle: failures a real ComfyUI can have
(a node that raises, a crash at a node, a hang, websockets cut, a queue cleared by someone
else). ``crash`` and ``restart`` themselves are in ``_fake_serving``; the switches that make
it answer like no ComfyUI would are in ``_fake_hostile``."""

from __future__ import annotations

from ._fake_serving import ServedFake

__all__ = ["FaultControls"]


class FaultControls(ServedFake):
    """Faults a test switches on and off while the fake runs."""

    def fail_node(
        self,
        node: str,
        *,
        message: str = "Simulated failure (comfytrio fake ComfyUI)",
        exception_type: str = "RuntimeError",
        times: int | None = None,
    ) -> None:
        """Make ``node`` (an id or a class_type) fail with an ``execution_error`` when it runs
        (``times`` runs, or until ``clear_faults``)."""
        self.faults.add_failure(node, message, exception_type, times)

    def crash_on_node(self, node: str) -> None:
        """Crash when ``node`` (an id or a class_type) starts executing (once)."""
        self.faults.crash_on.add(node)

    def hang(self) -> None:
        """Stop answering: connections are accepted, HTTP never answers, websockets go
        silent, execution pauses. ``unhang()`` resumes everything."""
        self.faults.gate.close()

    def unhang(self) -> None:
        """End a ``hang()``."""
        self.faults.gate.open()

    def drop_websockets(self) -> None:
        """Cut every websocket without a close frame (clients see 1006); HTTP keeps working."""
        gen = self._generation
        if gen is not None:
            gen.cut(websockets_only=True)

    def clear_queue(self) -> None:
        """Someone else cleared the queue: pending prompts vanish (no history, no event)."""
        gen = self._live()
        if gen is not None:
            gen.engine.clear_queue()

    def clear_faults(self) -> None:
        """Switch off ``fail_node``/``crash_on_node`` rules, any hang, and every hostile
        switch (``corrupt_answers``, ``corrupt_history``, ``send_ws_after``,
        ``drop_ws_messages``)."""
        self.faults.clear()
