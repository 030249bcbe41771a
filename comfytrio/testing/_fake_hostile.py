"""The hostile switches of the ``FakeComfyUI`` handle: answers and websocket messages a
real ComfyUI never sends (garbage, malformed frames, corrupted bodies and histories), so
that a client's defences can be tested. The rules they add live in ``_faults.Hostility``;
the websocket hub and the ``_server_hostile`` middleware apply them."""

from __future__ import annotations

import json
import re
from typing import Any

from ._fake_serving import ServedFake
from ._faults import AnswerRule, AnswerTransform, WsMaker, WsMessage, websocket_frame

__all__ = ["HostileControls"]


def _check_times(times: int | None) -> None:
    if times is not None and times < 1:
        raise ValueError(f"times must be at least 1 (or None), got {times}")


class HostileControls(ServedFake):
    """Hostile mode: what a real ComfyUI never sends."""

    def send_ws(self, message: WsMessage, *, to: str | None = None) -> int:
        """Push ``message`` now to every connected websocket, or to the one whose
        ``clientId`` is ``to``; returns how many sockets it goes to.

        A ``str`` is sent as one text frame exactly as given (``'{"type": "status", "data":
        {"status": {"exec_info": {"queue_remaining": Infinity}}}}'``, or not JSON at all),
        ``bytes`` as one binary frame, anything else JSON-encoded (``{"type": "progress",
        "data": "boom"}``; ``float("nan")`` is written ``NaN``). It follows the messages
        already queued for each socket, and waits like them while the server hangs.
        """
        gen = self._live()
        return gen.hub.send_message(message, to) if gen is not None else 0

    def send_ws_after(
        self,
        event: str | int,
        message: WsMessage | WsMaker,
        *,
        replace: bool = False,
        times: int | None = 1,
    ) -> None:
        """Each time the server sends a message of type ``event`` (``"executed"``; an int
        for a binary event), send ``message`` right after it to the same sockets, or instead
        of it with ``replace=True``: ``times`` times (None: until ``clear_faults``).

        ``message`` is as for ``send_ws``, or a function of the real message's ``data``
        that makes it (so it can name the prompt that runs: ``lambda d: {"type":
        "executed", "data": {"prompt_id": d["prompt_id"], "node": "9", "output": []}}``);
        a function that returns None leaves that message alone, uncounted.
        """
        _check_times(times)
        self.faults.hostile.add_ws_rule(event, message, replace, times)

    def drop_ws_messages(self, event: str | int, *, times: int | None = 1) -> None:
        """Never send the next ``times`` messages of type ``event`` (None: none until
        ``clear_faults``), as if the server forgot them: ``"executing"`` takes away the end
        signal ``{"node": null}`` too, so clients must ask ``/queue`` and ``/history``."""
        _check_times(times)
        self.faults.hostile.add_ws_drop(event, times)

    def send_ws_frame(
        self,
        opcode: int,
        payload: bytes = b"",
        *,
        fin: bool = True,
        rsv: int = 0,
        mask: bytes | None = None,
        to: str | None = None,
    ) -> int:
        """Write one websocket frame exactly as given, unchecked, onto every websocket's
        connection (or ``to``'s): control frames (8-10) longer than 125 bytes or not
        final, unknown opcodes (3-7, 11-15), reserved bits, a text frame (1) that is not
        UTF-8, a lone continuation (0), a masked frame. Returns how many sockets."""
        return self.send_ws_bytes(
            websocket_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask), to=to
        )

    def ping_ws(self, payload: bytes = b"", *, to: str | None = None) -> int:
        """Send a ping frame with ``payload``, of any length (126-255 bytes makes the oversized
        control frame RFC 6455 forbids). ASGI gives an app no way to ping, so the frame is
        written raw onto the connection, between two of Hypercorn's writes. Returns how many
        sockets."""
        return self.send_ws_frame(0x9, payload, to=to)

    def send_ws_bytes(self, data: bytes, *, to: str | None = None) -> int:
        """Write ``data`` onto every websocket's TCP stream (or ``to``'s) as it is, between
        two frames: half a frame, a frame header promising more than follows, noise.
        Returns how many sockets."""
        gen = self._live()
        return gen.hub.send_raw(data, to) if gen is not None else 0

    @property
    def hostile_hits(self) -> int:
        """How many messages and answers the hostile switches (``send_ws_after``,
        ``drop_ws_messages``, ``corrupt_answers``, ``corrupt_history``) have changed so far:
        a test can check that its garbage was delivered."""
        return self.faults.hostile.hits

    @property
    def websocket_client_ids(self) -> list[str]:
        """The ``clientId`` of every connected websocket (for ``to=``)."""
        gen = self._live()
        return list(gen.hub.sockets) if gen is not None else []

    def corrupt_answers(
        self,
        route: str,
        *,
        body: bytes | str | AnswerTransform,
        status: int | None = None,
        content_type: str | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer the next ``times`` requests of ``route`` (None: all, until
        ``clear_faults``) with ``body`` instead of the real answer.

        ``route`` is a path (``"/prompt"``, ``"/history/abc"``) or a route template whose
        ``{name}`` parts match any one segment (``"/history/{prompt_id}"``); ``/api/...``
        is the same route; ``method`` (``"GET"``, ``"POST"``) narrows it. A fixed ``body``
        (bytes, or str sent as UTF-8) is the whole answer, with ``status`` (200) and
        ``content_type`` (``application/json; charset=utf-8``), and the request never
        reaches the server (no prompt is queued). A function of the real body makes the
        new body from it: the request is served, then its answer rewritten (``status``
        and ``content_type`` default to the real ones; returning None leaves that answer
        alone, uncounted). ``"/ws"`` refuses websocket handshakes with this answer
        instead (a fixed body only; HTML by default).
        """
        if not route.startswith("/"):
            raise ValueError(f"a route starts with '/', got {route!r}")
        if status is not None and not 200 <= status <= 599:
            raise ValueError(f"status must be 200-599, got {status}")
        _check_times(times)
        fixed: bytes | None = None
        transform: AnswerTransform | None = None
        if isinstance(body, str):
            fixed = body.encode()
        elif isinstance(body, bytes):
            fixed = body
        else:
            transform = body
        if transform is not None and route.rstrip("/").endswith("/ws"):
            raise ValueError("a websocket handshake is refused with a fixed body")
        self.faults.hostile.answer_rules.append(
            AnswerRule(
                route,
                method.upper() if method is not None else None,
                fixed,
                transform,
                status,
                content_type,
                times,
            )
        )

    def corrupt_history(
        self,
        entry: Any,
        *,
        prompt_id: str | None = None,
        times: int | None = None,
    ) -> None:
        """Once a prompt (``prompt_id``, or any) has run, ``GET /history`` and
        ``GET /history/{id}`` report ``entry`` as its history entry instead of the real one
        (JSON-encoded: ``{"outputs": "boom"}``, a list, NaN...), in the real outer shape
        ``{prompt_id: entry}``. ``entry`` may be a function of the real entry (a dict) that
        makes it. ``times`` answers (None: until ``clear_faults``); answers that hold no
        such prompt are left alone and not counted."""

        def rewrite(real: bytes) -> bytes | None:
            try:
                answer = json.loads(real)
            except ValueError:
                return None
            if not isinstance(answer, dict):
                return None
            hit = False
            for key in list(answer):
                if prompt_id is None or key == prompt_id:
                    answer[key] = entry(answer[key]) if callable(entry) else entry
                    hit = True
            return json.dumps(answer).encode() if hit else None

        self.corrupt_answers("/history", body=rewrite, method="GET", times=times)
        # One rule (one budget of ``times``) for both routes.
        self.faults.hostile.answer_rules[-1].pattern = re.compile(r"/history(?:/[^/]+)?")
