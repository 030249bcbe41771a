"""One request and its answer on one connection: h11 (RFC 9112) driven over a trio stream.

h11 writes each request and parses each answer: the status line and headers, a body framed
by ``Content-Length``, ``chunked`` or the end of the connection, trailers, and
``Connection: close`` and HTTP/1.0 (the connection then is not used again). It refuses a head,
a chunk line or trailers longer than ``MAX_HEAD``; we refuse more than ``MAX_INFORMATIONAL``
1xx answers before the real one. Request bodies are sent whole, with a ``Content-Length``.
Each read and write gets ``timeout`` seconds (``HTTPTimeout``); a connection that breaks or
closes early is a ``ReadError``, a server that breaks HTTP/1.1 a ``RemoteProtocolError``.
The pool that keeps connections between requests is ``HttpClient``'s (``_http.py``).
"""

from __future__ import annotations

from typing import cast

import attrs
import h11
import trio

from ._http_proxy import Origin, Route
from ._http_types import (
    GONE,
    MAX_HEAD,
    MAX_INFORMATIONAL,
    RECEIVE,
    HTTPTimeout,
    ReadError,
    RemoteProtocolError,
    ResponseTooLarge,
)

__all__ = ["IN_BODY", "Connection", "Prepared", "exchange", "next_event", "read_body"]

_BEFORE_ANSWER = "before answering"

IN_BODY = "in the middle of the body"
"""Where ``next_event`` reads when it reads a body (for its errors)."""


@attrs.frozen
class Prepared:
    """A request ready to be sent on any connection to its server."""

    method: str
    """Its method, e.g. ``GET``."""
    url: str
    """Its whole URL (for errors)."""
    origin: Origin
    """The server it goes to."""
    route: Route
    """How a connection to that server is made."""
    event: h11.Request
    """Its head, for h11."""
    body: bytes
    """Its body (empty for none)."""


class Connection:
    """One connection and its h11 state."""

    __slots__ = ("answered", "h11", "reused", "socket", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.socket = _socket_of(stream)
        self.reused = False
        """It served a request before this one (a stale keep-alive connection is possible)."""
        self.answered = False
        """A byte of an answer arrived since it was checked out."""

    def closed_by_server(self) -> bool:
        """True when the server closed it (or sent something unasked) while it was idle:
        its socket reads as ready (trio's ``is_readable`` asks the system portably)."""
        if self.socket is None:
            return False
        try:
            return self.socket.is_readable()
        except (OSError, ValueError):
            return True

    async def aclose(self) -> None:
        """Close it at once (no goodbye owed to an HTTP server)."""
        await trio.aclose_forcefully(self.stream)


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under ``stream`` (and its TLS layers), if it has one."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


async def exchange(conn: Connection, request: Prepared, timeout: float) -> h11.Response:
    """Send ``request`` on ``conn`` and read the head of its answer (1xx ones skipped)."""
    state = conn.h11
    data = state.send(request.event)
    if request.body:
        data += state.send(h11.Data(data=request.body))
    data += state.send(h11.EndOfMessage())
    try:
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            await conn.stream.send_all(data)
    except GONE as exc:
        raise ReadError(
            f"the connection broke as the request was sent: {exc!r}", **_at(request)
        ) from exc
    if scope.cancelled_caught:
        raise HTTPTimeout(f"could not send the request in {timeout:g} s", **_at(request))
    informational = 0
    while True:
        event = await next_event(conn, request, timeout, _BEFORE_ANSWER)
        if isinstance(event, h11.Response):
            return event
        informational += 1  # 100 Continue and friends: the real answer follows
        if informational > MAX_INFORMATIONAL:
            raise RemoteProtocolError(
                f"more than {MAX_INFORMATIONAL} informational (1xx) answers", **_at(request)
            )


async def read_body(
    conn: Connection, request: Prepared, head: h11.Response, timeout: float, max_bytes: int | None
) -> bytes:
    """The whole body of the answer whose head is ``head``; ``ResponseTooLarge`` for one
    longer than ``max_bytes`` (refused before it is read when its length is announced)."""
    if max_bytes is not None:
        for name, value in head.headers:
            if name == b"content-length" and int(value) > max_bytes:
                raise _too_large(max_bytes, request)
    parts: list[bytes | bytearray] = []
    size = 0
    while True:
        event = await next_event(conn, request, timeout, IN_BODY)
        if not isinstance(event, h11.Data):
            return b"".join(parts)  # EndOfMessage
        size += len(event.data)
        if max_bytes is not None and size > max_bytes:
            raise _too_large(max_bytes, request)
        parts.append(event.data)


async def next_event(conn: Connection, request: Prepared, timeout: float, where: str) -> h11.Event:
    """The next thing h11 parses out of the answer, reading as it needs; ``where`` says
    where in the answer we are, for errors."""
    state = conn.h11
    ended = False
    while True:
        try:
            event = state.next_event()
        except h11.RemoteProtocolError as exc:
            if ended:  # h11: "peer closed connection without sending complete message body"
                raise ReadError(
                    f"the server closed the connection {where}", **_at(request)
                ) from exc
            raise RemoteProtocolError(f"not valid HTTP/1.1: {exc}", **_at(request)) from exc
        if isinstance(event, h11.Event):
            return event
        if ended:  # NEED_DATA after the end: a body cut short
            raise ReadError(f"the server closed the connection {where}", **_at(request))
        try:  # a cancel scope, not fail_after: two context managers fewer per read
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                data = await conn.stream.receive_some(RECEIVE)
        except GONE as exc:
            raise ReadError(f"the connection broke {where}: {exc!r}", **_at(request)) from exc
        if scope.cancelled_caught:
            raise HTTPTimeout(f"nothing came in {timeout:g} s {where}", **_at(request))
        if data:
            conn.answered = True
        elif where == _BEFORE_ANSWER:
            raise ReadError(f"the server closed the connection {where}", **_at(request))
        else:
            ended = True  # the end of a body framed by the connection's end, or an error
        state.receive_data(cast("bytes", data))  # trio's streams may give a bytearray


def _at(request: Prepared) -> dict[str, str]:
    return {"method": request.method, "url": request.url}


def _too_large(max_bytes: int, request: Prepared) -> ResponseTooLarge:
    return ResponseTooLarge(f"the body is longer than {max_bytes} bytes", **_at(request))
