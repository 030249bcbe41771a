"""Hostile answers: the ASGI middleware that hands a request a ``corrupt_answers`` rule
takes the rule's answer instead of the real one (a fixed body that never reaches the
routes, a rewrite of the real body, or a refused websocket handshake)."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ._faults import AnswerRule, Gate, Hostility

__all__ = ["HostileAnswers"]


class HostileAnswers:
    """ASGI middleware: requests a ``corrupt_answers`` rule takes get its answer instead."""

    def __init__(self, app: ASGIApp, hostile: Hostility, gate: Gate) -> None:
        self.app = app
        self.hostile = hostile
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule: AnswerRule | None = None
        if scope["type"] in ("http", "websocket") and self.hostile.answer_rules:
            method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
            rule = self.hostile.answer_rule_for(method, scope["path"])
        if rule is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.gate.wait_open()
            self.hostile.used(rule)
            await _refuse_websocket(rule, send)
        elif rule.body is not None:
            self.hostile.used(rule)
            await _drain(receive)
            await _send_answer(send, rule.status or 200, [], rule.content_type, rule.body)
        else:
            await self._transform(rule, scope, receive, send)

    async def _transform(
        self, rule: AnswerRule, scope: Scope, receive: Receive, send: Send
    ) -> None:
        assert rule.transform is not None
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
            else:
                await send(message)

        await self.app(scope, receive, capture)
        real = b"".join(chunks)
        new = rule.transform(real)
        headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
        if new is None:
            await send(
                {"type": "http.response.start", "status": start["status"], "headers": headers}
            )
            await send({"type": "http.response.body", "body": real})
            return
        self.hostile.used(rule)
        body = new.encode() if isinstance(new, str) else new
        await _send_answer(send, rule.status or start["status"], headers, rule.content_type, body)


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send_answer(
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]],
    content_type: str | None,
    body: bytes,
) -> None:
    drop = {b"content-length"} | ({b"content-type"} if content_type is not None else set())
    kept = [(k, v) for k, v in headers if k.lower() not in drop]
    if content_type is not None or not headers:
        kept.append((b"content-type", (content_type or "application/json; charset=utf-8").encode()))
    if status in (204, 304):
        body = b""  # HTTP/1.1 answers with these codes have no body
    else:
        kept.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": body})


async def _refuse_websocket(rule: AnswerRule, send: Send) -> None:
    body = rule.body or b""
    headers = [
        (b"content-type", (rule.content_type or "text/html; charset=utf-8").encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send(
        {"type": "websocket.http.response.start", "status": rule.status or 200, "headers": headers}
    )
    await send({"type": "websocket.http.response.body", "body": body})
