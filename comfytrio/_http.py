"""HTTP/1.1 to ComfyUI servers: ``HttpClient``, its pool of kept-alive connections, and the
one request path every ComfyUI client uses (``_rest.py``).

``HttpClient`` sends requests to one server (or any URL given whole) and keeps its
connections alive. Its parts, each in its own module and re-exported here:

- ``_http_wire.py``: one request and its answer on one connection (h11 over a trio stream);
- ``_http_proxy.py``: how a connection is opened: the proxy of the environment (or one given),
  the ``CONNECT`` tunnel, TLS; and ``open_stream``, the websocket's byte stream;
- ``_http_types.py``: the errors, headers, answers and ``multipart/form-data`` bodies.

What this module adds:

- Idle connections are kept per server (at most ``max_idle``). One the server closed while it
  was idle reads as ready (its FIN arrived) and is dropped before it is used.
- RFC 9110 9.2.2: a request that meets a kept-alive connection the server has just closed (its
  idle timeout fired as we sent: ComfyUI's aiohttp closes idle connections after 75 s, proxies
  often much sooner) is sent again, once, on a new connection, when that is safe: the failure
  came before any byte of an answer, on a connection that had served an earlier request, and
  the request is idempotent (``GET``, ``HEAD``, ``PUT``, ``DELETE``, ``OPTIONS``, or
  ``idempotent=True``). Anything else is reported as it failed.
- A cancelled or failed request closes its connection; only an answer read to its end returns
  one to the pool.
"""

from __future__ import annotations

import json as jsonlib
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from types import TracebackType
from typing import Any, TypedDict, Unpack
from urllib.parse import quote, urlencode

import h11

from ._http_proxy import (
    FROM_ENVIRONMENT,
    Origin,
    ProxyRules,
    ProxySetting,
    connect,
    default_ssl_context,
    open_stream,
    split_url,
)
from ._http_types import (
    ConnectError,
    ConnectTimeout,
    Headers,
    HTTPError,
    HttpStatistics,
    HTTPTimeout,
    ReadError,
    RemoteProtocolError,
    Response,
    ResponseTooLarge,
    encode_multipart,
)
from ._http_wire import IN_BODY, Connection, Prepared, exchange, next_event, read_body

__all__ = [
    "FROM_ENVIRONMENT",
    "ConnectError",
    "ConnectTimeout",
    "HTTPError",
    "HTTPTimeout",
    "Headers",
    "HttpClient",
    "HttpStatistics",
    "ProxySetting",
    "ReadError",
    "RemoteProtocolError",
    "RequestOptions",
    "Response",
    "ResponseTooLarge",
    "StreamingResponse",
    "default_ssl_context",
    "encode_multipart",
    "open_stream",
]

logger = logging.getLogger("comfytrio.http")

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_NO_BODY = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_PATH_SAFE = "/%:@!$&'()*+,;=?~"


class RequestOptions(TypedDict, total=False):
    """The keyword arguments of ``HttpClient.request`` and ``HttpClient.stream``."""

    params: Mapping[str, str] | None
    """Added to the path's query."""
    json: Any
    """The body, as compact JSON (``application/json``)."""
    content: bytes | None
    """The body, as given (when ``json`` is not)."""
    headers: Mapping[str, str] | None
    """Sent with this request (replacing the client's of the same names)."""
    idempotent: bool | None
    """Whether a request that met a closed kept-alive connection may be sent again (default:
    by its method)."""
    timeout: float | None
    """Replaces the client's ``timeout`` for this request."""
    new_connection: bool
    """Send it on a new connection, not a kept-alive one."""


class StreamingResponse:
    """An answer whose body is read as it is consumed (``HttpClient.stream``)::

        async with http.stream("GET", "/view", params=...) as response:
            async for chunk in response.aiter_bytes():
                ...

    Once the body was read to its end the connection goes back to the pool; ``aclose()``
    (leaving the ``async with``) closes it otherwise.
    """

    def __init__(
        self,
        client: HttpClient,
        request: Prepared,
        conn: Connection,
        head: h11.Response,
        timeout: float,
    ) -> None:
        self.status_code: int = head.status_code
        """The HTTP status, e.g. 200."""
        self.reason: str = head.reason.decode("latin-1")
        """The status line's reason phrase."""
        self.headers = Headers(head.headers)
        """The answer's headers."""
        self._client = client
        self._request = request
        self._conn: Connection | None = conn
        self._timeout = timeout

    def aiter_bytes(self) -> StreamingResponse:
        """The body, chunk by chunk, as it arrives (``async for``; the response itself)."""
        return self

    def __aiter__(self) -> StreamingResponse:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        try:
            event = await next_event(conn, self._request, self._timeout, IN_BODY)
        except BaseException:
            self._conn = None
            await conn.aclose()
            raise
        if isinstance(event, h11.Data):
            return bytes(event.data)
        self._conn = None  # the end of the body
        await self._client._release(self._request.origin, conn)
        raise StopAsyncIteration

    async def aread(self) -> bytes:
        """The rest of the body, whole."""
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        """Close the connection unless the body was read to its end (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()


class HttpClient:
    """HTTP/1.1 requests to the server at ``base_url`` (see the module's docstring).

    ``ssl_context`` checks https servers' certificates (default: ``default_ssl_context()``);
    ``timeout``: seconds each read or write of a request may take, ``connect_timeout``: for
    a connection (TCP, proxy tunnel and TLS); ``max_idle``: idle connections kept per
    server; ``proxy``: a proxy URL, None for none, or ``FROM_ENVIRONMENT`` (the default);
    ``headers``: sent with every request. Use it in ``async with`` or call ``aclose()``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        max_idle: int = 16,
        proxy: ProxySetting = FROM_ENVIRONMENT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        """The server's URL; request paths are relative to it."""
        origin, host, path = split_url(self.base_url)
        self._base = (origin, host, _quote(path.rstrip("/")))
        self._timeout = timeout
        self._dial = partial(connect, ssl_context=ssl_context, timeout=connect_timeout)
        self._max_idle = max_idle
        self._proxies = ProxyRules.from_setting(proxy)
        self._headers = _merge([(b"User-Agent", b"comfytrio")], headers)
        self._idle: dict[Origin, list[Connection]] = {}
        self._closed = False
        self._opened = self._reused = self._resent = 0

    async def request(
        self,
        method: str,
        path: str,
        *,
        max_bytes: int | None = None,
        **options: Unpack[RequestOptions],
    ) -> Response:
        """Send a request and read its whole answer.

        ``path`` is relative to ``base_url`` (or a whole ``http(s)://`` URL); ``options``
        (``RequestOptions``): ``params`` added to its query, the body (``json`` or
        ``content``), ``headers``, ``idempotent``, ``timeout``, ``new_connection``. A body
        longer than ``max_bytes`` is refused (``ResponseTooLarge``). Raises ``HTTPError``.
        """
        request = self._prepare(method, path, options)
        timeout = self._timeout_of(options)
        conn, head = await self._send(request, options, timeout)
        try:
            content = await read_body(conn, request, head, timeout, max_bytes)
        except BaseException:
            await conn.aclose()
            raise
        await self._release(request.origin, conn)
        return Response(
            head.status_code, head.reason.decode("latin-1"), Headers(head.headers), content
        )

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, **options: Unpack[RequestOptions]
    ) -> AsyncIterator[StreamingResponse]:
        """Like ``request``, for ``async with``: a ``StreamingResponse`` whose body is read
        as it is consumed."""
        request = self._prepare(method, path, options)
        timeout = self._timeout_of(options)
        conn, head = await self._send(request, options, timeout)
        response = StreamingResponse(self, request, conn, head, timeout)
        try:
            yield response
        finally:
            await response.aclose()

    @property
    def is_closed(self) -> bool:
        """Whether ``aclose()`` was called."""
        return self._closed

    def statistics(self) -> HttpStatistics:
        """Connections opened and reused, requests resent, connections idle now."""
        idle = sum(len(conns) for conns in self._idle.values())
        return HttpStatistics(self._opened, self._reused, self._resent, idle)

    async def aclose(self) -> None:
        """Close every idle connection; requests after this raise ``RuntimeError``."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.aclose()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    def _timeout_of(self, options: RequestOptions) -> float:
        timeout = options.get("timeout")
        return self._timeout if timeout is None else timeout

    def _prepare(self, method: str, path: str, options: RequestOptions) -> Prepared:
        """Everything about a request that does not depend on its connection."""
        if path.startswith(("http://", "https://")):
            origin, host, raw_path = split_url(path)
            target = _quote(raw_path)
        else:
            origin, host, prefix = self._base
            target = prefix + _quote(path)
        params = options.get("params")
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params, quote_via=quote)
        url = f"{origin[0]}://{host}{target}"
        route = self._proxies.route(origin, method, url)
        json = options.get("json")
        if json is not None:
            body = jsonlib.dumps(
                json, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
            content_type: bytes | None = b"application/json"
        else:
            body, content_type = options.get("content") or b"", None
        fields = [(b"Host", host.encode("ascii")), *self._headers]
        headers = options.get("headers")
        if headers:
            fields = _merge(fields, headers)
            if "content-type" in (name.lower() for name in headers):
                content_type = None
        if content_type is not None:
            fields.append((b"Content-Type", content_type))
        if body or method not in _NO_BODY:
            fields.append((b"Content-Length", b"%d" % len(body)))
        if route.forward:  # to the proxy, which forwards it: the whole URL is the target
            target = url
            if route.proxy is not None and route.proxy.authorization is not None:
                fields.append((b"Proxy-Authorization", route.proxy.authorization))
        try:
            event = h11.Request(method=method, target=target, headers=fields)
        except h11.LocalProtocolError as exc:
            raise ValueError(f"cannot send {method} {url}: {exc}") from None
        return Prepared(method, url, origin, route, event, body)

    async def _send(
        self, request: Prepared, options: RequestOptions, timeout: float
    ) -> tuple[Connection, h11.Response]:
        """Send ``request`` and read the head of its answer, on a kept-alive connection or
        a new one; again on a new one when the kept-alive one was closed under us."""
        if options.get("new_connection"):
            conn = await self._connect(request)
        else:
            conn = await self._checkout(request)
        try:
            return conn, await exchange(conn, request, timeout)
        except ReadError:
            await conn.aclose()
            idempotent = options.get("idempotent")
            resend = request.method in _IDEMPOTENT if idempotent is None else idempotent
            if not (conn.reused and not conn.answered and resend):
                raise
            logger.debug(
                "%s %s: the kept-alive connection was closed: sent again",
                request.method,
                request.url,
            )
            self._resent += 1
        except BaseException:
            await conn.aclose()
            raise
        conn = await self._connect(request)
        try:
            return conn, await exchange(conn, request, timeout)
        except BaseException:
            await conn.aclose()
            raise

    async def _checkout(self, request: Prepared) -> Connection:
        """An idle connection to the request's server that is still open, or a new one."""
        idle = self._idle.get(request.origin)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if not conn.closed_by_server():
                conn.reused, conn.answered = True, False
                self._reused += 1
                return conn
            await conn.aclose()
        return await self._connect(request)

    async def _connect(self, request: Prepared) -> Connection:
        """A new connection to the request's server."""
        if self._closed:
            raise RuntimeError("the HTTP client is closed")
        stream = await self._dial(request.origin, request.route, request.method, request.url)
        self._opened += 1
        return Connection(stream)

    async def _release(self, origin: Origin, conn: Connection) -> None:
        """A connection whose answer was read to its end: kept for the next request when
        both sides allow it (``Connection: close``, HTTP/1.0 and extra bytes forbid it)."""
        state = conn.h11
        idle = self._idle.setdefault(origin, [])
        if (
            self._closed
            or len(idle) >= self._max_idle
            or state.our_state is not h11.DONE
            or state.their_state is not h11.DONE
            or state.trailing_data[0]
        ):
            await conn.aclose()
            return
        state.start_next_cycle()
        idle.append(conn)


def _quote(path: str) -> str:
    """``path`` with what may not appear in a request target percent-encoded."""
    return quote(path, safe=_PATH_SAFE)


def _merge(
    fields: list[tuple[bytes, bytes]], headers: Mapping[str, str] | None
) -> list[tuple[bytes, bytes]]:
    """``fields`` with ``headers`` added, replacing those of the same names."""
    if not headers:
        return fields
    extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    replaced = {name.lower() for name, _ in extra}
    return [field for field in fields if field[0].lower() not in replaced] + extra
