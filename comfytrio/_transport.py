"""A lean HTTP/1.1 transport for httpx, for the ComfyUI servers' own clients.

httpx's default transport (httpcore and h11) spends about a millisecond of CPU per request on
trio here, more than the rest of what comfytrio does for a job, and a job is one
``POST /prompt`` (plus one ``GET /view`` per output of a remote server). ``ComfyTransport``
speaks the HTTP that ComfyUI's server speaks, through httpx's public transport interface, so
everything above it (requests, responses, streaming, timeouts, errors) is still httpx:

- HTTP/1.1 with keep-alive: idle connections are kept per server (at most ``max_idle``); one
  the server closed while idle is noticed before it is used (its socket reads as ready) and
  dropped; ``Connection: close`` is honoured.
- Bodies framed by ``Content-Length``, ``chunked`` or the end of the connection; request
  bodies are sent whole, with a ``Content-Length``.
- TLS with the caller's ``ssl.SSLContext``; connect, read and write timeouts from httpx's.
- Failures become httpx's own errors (``ConnectError``, ``ReadTimeout``, ``ReadError``,
  ``RemoteProtocolError``, ...), which the client turns into ``ServerLostError``.

- A request that meets a kept-alive connection the server has just closed (its idle timeout
  fired as we sent: ComfyUI's aiohttp closes idle connections after 75 s, proxies often much
  sooner) is sent again, once, on a new connection, when that is safe: the failure came
  before any byte of an answer, on a connection that had served an earlier request, and the
  request is idempotent (``GET``, ``HEAD``, ``PUT``, ``DELETE``, ``OPTIONS``, or any request
  whose ``extensions`` say ``{"idempotent": True}``). Anything else is reported as it failed:
  ``POST /prompt`` is resent by the client, which knows how to check first (it chose the
  prompt id).

Nothing more: no HTTP/2, no proxies (an ``httpx.AsyncClient`` still routes the proxies of
its environment through its own transports).
"""

from __future__ import annotations

import select
import ssl
from typing import Any

import httpx
import trio

__all__ = ["IDEMPOTENT", "ComfyTransport"]

_MAX_HEAD = 64 * 1024
"""A response head (status line and headers) larger than this is refused."""

_RECEIVE = 65536
"""Bytes asked of the socket per read."""

_DEFAULT_PORTS = {"http": 80, "https": 443}

_Key = tuple[str, str, int]

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})

IDEMPOTENT = "idempotent"
"""The request extension that marks a POST as safe to send twice (``/queue``, ``/interrupt``)."""


class _Connection:
    """One connection and the bytes read from it but not consumed yet."""

    def __init__(self, stream: trio.abc.Stream, key: _Key) -> None:
        self.stream = stream
        self.key = key
        self.buffer = bytearray()
        self.reused = False
        """It served a request before this one (a stale keep-alive connection is possible)."""
        self.answered = False
        """A byte of an answer arrived since it was checked out."""

    def alive(self) -> bool:
        """False when the server closed it (or sent something unasked) while it was idle."""
        sock = getattr(self.stream, "socket", None)
        if sock is None:  # TLS: the socket under it
            sock = getattr(getattr(self.stream, "transport_stream", None), "socket", None)
        if sock is None:
            return True
        try:
            poller = select.poll()  # not select.select: it refuses descriptors above 1023
            poller.register(sock.fileno(), select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    async def fill(self, request: httpx.Request, timeout: float | None, what: str) -> None:
        """Read more into the buffer; ``RemoteProtocolError`` at the end of the stream."""
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                chunk = await self.stream.receive_some(_RECEIVE)
        except trio.TooSlowError:
            raise httpx.ReadTimeout(f"no answer in {timeout} s", request=request) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"{what}: {exc!r}", request=request) from exc
        if not chunk:
            raise httpx.RemoteProtocolError(
                f"the server closed the connection {what}", request=request
            )
        self.answered = True
        self.buffer += chunk

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class ComfyTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to a few servers, with keep-alive; see the module's docstring.

    ``ssl_context`` checks the certificates of https servers (default: the system's CAs);
    ``max_idle``: idle connections kept per server.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, max_idle: int = 8) -> None:
        self._ssl_context = ssl_context
        self._max_idle = max_idle
        self._idle: dict[_Key, list[_Connection]] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and read the response's head; its body is read as it is
        consumed (the connection goes back to the pool once it was read to the end)."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"unsupported URL scheme {url.scheme!r}", request=request
            )
        key = (url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme])
        body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        data = _request_head(request, len(body)) + body
        conn = await self._checkout(key, request, timeouts.get("connect"))
        try:
            head = await _exchange(conn, data, request, timeouts)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            await conn.aclose()
            if not (conn.reused and not conn.answered and _idempotent(request)):
                raise
            # The server closed this idle connection as we used it: nothing of the request
            # was acted on, so it goes once more, on a connection of its own.
            conn = await self._connect(key, request, timeouts.get("connect"))
            try:
                head = await _exchange(conn, data, request, timeouts)
            except BaseException:
                await conn.aclose()
                raise
        except BaseException:
            await conn.aclose()
            raise
        status, reason, version, headers, framing, length, reusable = head
        stream = _Body(self, conn, request, framing, length, reusable, timeouts.get("read"))
        if framing == "none":
            await stream.aclose()  # nothing to read: the connection is free again
        return httpx.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={"http_version": version, "reason_phrase": reason},
        )

    async def _checkout(
        self, key: _Key, request: httpx.Request, timeout: float | None
    ) -> _Connection:
        """An idle connection to ``key`` that is still open, or a new one."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.alive():
                conn.reused, conn.answered = True, False
                return conn
            await conn.aclose()
        return await self._connect(key, request, timeout)

    async def _connect(
        self, key: _Key, request: httpx.Request, timeout: float | None
    ) -> _Connection:
        scheme, host, port = key
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                tcp = await trio.open_tcp_stream(host, port)
                if scheme == "http":
                    return _Connection(tcp, key)
                context = self._ssl_context or ssl.create_default_context()
                tls = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tls)
                    raise
                return _Connection(tls, key)
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(
                f"no connection to {host}:{port} in {timeout} s", request=request
            ) from None
        except (OSError, trio.BrokenResourceError) as exc:
            reason = str(exc) or str(exc.__cause__ or "") or repr(exc)  # TLS: the SSLError
            raise httpx.ConnectError(
                f"cannot connect to {host}:{port}: {reason}", request=request
            ) from exc

    async def release(self, conn: _Connection) -> None:
        """A connection whose response was read to the end: keep it for the next request."""
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= self._max_idle:
            await conn.aclose()
        else:
            idle.append(conn)

    async def aclose(self) -> None:
        """Close every idle connection (those of unread responses close with them)."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.aclose()


class _Body(httpx.AsyncByteStream):
    """A response body, read from the connection as it is consumed (an iterator, not a
    generator: a caller that stops early leaves nothing to finalize but the connection,
    which ``aclose`` closes)."""

    def __init__(
        self,
        pool: ComfyTransport,
        conn: _Connection,
        request: httpx.Request,
        framing: str,
        length: int,
        reusable: bool,
        timeout: float | None,
    ) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._request = request
        self._framing = framing
        self._remaining = length  # of the body ("length") or of the current chunk ("chunked")
        self._reusable = reusable
        self._timeout = timeout
        self._complete = framing == "none"

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None or self._complete:
            raise StopAsyncIteration
        if self._framing == "length":
            chunk = await self._take(conn, self._remaining, "in the middle of the body")
        elif self._framing == "chunked":
            chunk = await self._next_chunk(conn)
        else:
            chunk = await self._until_close(conn)
        if not chunk:
            self._complete = True
            raise StopAsyncIteration
        return chunk

    async def _take(self, conn: _Connection, most: int, where: str) -> bytes:
        """Up to ``most`` bytes of the body (b"" once ``_remaining`` is 0)."""
        if most <= 0:
            return b""
        if not conn.buffer:
            await conn.fill(self._request, self._timeout, where)
        chunk = bytes(conn.buffer[:most])
        del conn.buffer[:most]
        self._remaining -= len(chunk)
        return chunk

    async def _next_chunk(self, conn: _Connection) -> bytes:
        if self._remaining == 0:  # at a chunk's size line
            line = await self._line(conn)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise httpx.RemoteProtocolError(
                    f"bad chunk size {line[:40]!r}", request=self._request
                ) from None
            if size == 0:
                while await self._line(conn):  # trailers, up to the empty line
                    pass
                return b""
            self._remaining = size
        chunk = await self._take(conn, self._remaining, "in the middle of a chunk")
        if self._remaining == 0 and await self._line(conn):
            raise httpx.RemoteProtocolError("a chunk is longer than it said", request=self._request)
        return chunk

    async def _line(self, conn: _Connection) -> bytes:
        while (end := conn.buffer.find(b"\r\n")) < 0:
            if len(conn.buffer) > _MAX_HEAD:
                raise httpx.RemoteProtocolError("a chunk line is too long", request=self._request)
            await conn.fill(self._request, self._timeout, "in the middle of the body")
        line = bytes(conn.buffer[:end])
        del conn.buffer[: end + 2]
        return line

    async def _until_close(self, conn: _Connection) -> bytes:
        if not conn.buffer:
            try:
                await conn.fill(self._request, self._timeout, "")
            except httpx.RemoteProtocolError:
                return b""  # the end of the connection is the end of the body
        chunk = bytes(conn.buffer)
        conn.buffer.clear()
        return chunk

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._complete and self._reusable and not conn.buffer:
            await self._pool.release(conn)
        else:
            await conn.aclose()


def _idempotent(request: httpx.Request) -> bool:
    return request.method in _IDEMPOTENT or request.extensions.get(IDEMPOTENT) is True


async def _exchange(
    conn: _Connection, data: bytes, request: httpx.Request, timeouts: dict[str, Any]
) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]], str, int, bool]:
    """Send a request and read the head of its answer: status, reason, version, headers,
    and how its body is framed."""
    await _send(conn, data, request, timeouts)
    status, reason, version, headers = await _read_head(conn, request, timeouts.get("read"))
    return (status, reason, version, headers, *_framing(request, status, version, headers))


def _request_head(request: httpx.Request, length: int) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    for name, value in request.headers.raw:
        if name.lower() not in (b"content-length", b"transfer-encoding"):
            lines.append(name + b": " + value)
    if length or request.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _send(
    conn: _Connection, data: bytes, request: httpx.Request, timeouts: dict[str, Any]
) -> None:
    timeout = timeouts.get("write")
    try:
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            await conn.stream.send_all(data)
    except trio.TooSlowError:
        raise httpx.WriteTimeout(f"could not send in {timeout} s", request=request) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise httpx.WriteError(f"sending the request: {exc!r}", request=request) from exc


async def _read_head(
    conn: _Connection, request: httpx.Request, timeout: float | None
) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    """Status, reason, HTTP version and headers of the response (1xx answers skipped)."""
    while True:
        while (end := conn.buffer.find(b"\r\n\r\n")) < 0:
            if len(conn.buffer) > _MAX_HEAD:
                raise httpx.RemoteProtocolError("the response head is too large", request=request)
            await conn.fill(request, timeout, "before answering")
        lines = bytes(conn.buffer[:end]).split(b"\r\n")
        del conn.buffer[: end + 4]
        try:
            version, status_text, *rest = lines[0].split(b" ", 2)
            status = int(status_text)
            headers = [_header(line) for line in lines[1:]]
        except ValueError:
            raise httpx.RemoteProtocolError(
                f"not an HTTP response: {lines[0][:60]!r}", request=request
            ) from None
        if not version.startswith(b"HTTP/1."):
            raise httpx.RemoteProtocolError(f"not HTTP/1: {lines[0][:60]!r}", request=request)
        if 100 <= status < 200 and status != 101:
            continue  # 100 Continue and friends: the real answer follows
        return status, rest[0] if rest else b"", version, headers


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, sep, value = line.partition(b":")
    if not sep or not name or name != name.strip():
        raise ValueError(line)
    return name, value.strip()


def _framing(
    request: httpx.Request, status: int, version: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[str, int, bool]:
    """How the body ends (``none``, ``length``, ``chunked``, ``close``), its length, and
    whether the connection can be used again after it."""
    values: dict[bytes, bytes] = {}
    for name, value in headers:
        lowered = name.lower()
        values[lowered] = values[lowered] + b"," + value if lowered in values else value
    tokens = {t.strip().lower() for t in values.get(b"connection", b"").split(b",")}
    reusable = (
        b"close" not in tokens
        and (version == b"HTTP/1.1" or b"keep-alive" in tokens)
        and request.headers.get("connection", "").lower() != "close"
    )
    if request.method == "HEAD" or status in (204, 304):
        return "none", 0, reusable
    if b"chunked" in values.get(b"transfer-encoding", b"").lower():
        return "chunked", 0, reusable
    if b"content-length" in values:
        try:
            length = int(values[b"content-length"].split(b",")[0])
        except ValueError:
            raise httpx.RemoteProtocolError(
                f"bad Content-Length {values[b'content-length']!r}", request=request
            ) from None
        if length < 0:
            raise httpx.RemoteProtocolError("negative Content-Length", request=request)
        return ("length" if length else "none"), length, reusable
    return "close", 0, False
