"""The values of the HTTP client (``_http.py``): its errors, the headers and answers it hands
out, the ``multipart/form-data`` bodies it sends, and the limits its parts share.

Every failure is an ``HTTPError``: ``ConnectError`` (nothing was sent; ``ConnectTimeout``
when in time), ``HTTPTimeout``, ``ReadError``, ``RemoteProtocolError``, ``ResponseTooLarge``.
"""

from __future__ import annotations

import json as jsonlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import trio

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "HTTPError",
    "HTTPTimeout",
    "Headers",
    "HttpStatistics",
    "ReadError",
    "RemoteProtocolError",
    "Response",
    "ResponseTooLarge",
    "encode_multipart",
]

MAX_HEAD = 64 * 1024
"""A response head (or a chunk line, or trailers) larger than this is refused."""

MAX_INFORMATIONAL = 8
"""More 1xx answers than this before the real one are refused."""

RECEIVE = 65536
"""Bytes asked of a stream per read."""

GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
"""What a stream raises when its connection broke or was closed."""


# ---------------------------------------------------------------------------- errors


class HTTPError(Exception):
    """A request failed; the base of every error of the HTTP client.

    ``method`` and ``url`` say which request (empty for ``open_stream``), ``message`` what
    went wrong.
    """

    def __init__(self, message: str, *, method: str = "", url: str = "") -> None:
        self.message = message
        self.method = method
        self.url = url
        where = f"{method} {url}".strip()
        super().__init__(f"{where}: {message}" if where else message)


class ConnectError(HTTPError):
    """No connection: the name did not resolve, the server refused, TLS failed, or the proxy
    refused the tunnel. Nothing of the request was sent."""


class HTTPTimeout(HTTPError):
    """The connection, the request or the answer made no progress in time."""


class ConnectTimeout(ConnectError, HTTPTimeout):
    """No connection in ``connect_timeout`` seconds (nothing of the request was sent)."""


class RemoteProtocolError(HTTPError):
    """The server broke HTTP/1.1: a malformed head or body, an oversized head, endless 1xx
    answers."""


class ReadError(HTTPError):
    """The connection broke or closed before the whole answer came: while the request was
    sent, before the answer, or in the middle of its body."""


class ResponseTooLarge(HTTPError):
    """The answer's body is longer than ``max_bytes``."""


# ---------------------------------------------------------------------------- answers


class Headers:
    """The headers of an answer: ``get(name)`` ignores case and joins repeated headers with
    ``", "``; iterating gives ``(name, value)`` pairs, names in lower case."""

    __slots__ = ("_raw",)

    def __init__(self, raw: Sequence[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of the header ``name`` (any case), or ``default``."""
        key = name.lower().encode("latin-1")
        values = [value.decode("latin-1") for found, value in self._raw if found == key]
        return ", ".join(values) if values else default

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for name, value in self._raw:
            yield name.decode("latin-1"), value.decode("latin-1")

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"


@attrs.frozen(eq=False)
class Response:
    """A whole answer: status, headers and body."""

    status_code: int
    """The HTTP status, e.g. 200."""
    reason: str
    """The status line's reason phrase, e.g. ``OK``."""
    headers: Headers
    """The answer's headers."""
    content: bytes
    """The body."""

    @property
    def text(self) -> str:
        """The body decoded with the charset of its ``Content-Type`` (default UTF-8;
        undecodable bytes are replaced)."""
        return _decode(self.content, self.headers)

    def json(self) -> Any:
        """The body parsed as JSON (``ValueError`` when it is not)."""
        return jsonlib.loads(self.content)


def _decode(content: bytes, headers: Headers) -> str:
    charset = "utf-8"
    for param in (headers.get("content-type") or "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"') or charset
    try:
        return content.decode(charset, errors="replace")
    except LookupError:  # a charset Python does not know
        return content.decode("utf-8", errors="replace")


@attrs.frozen
class HttpStatistics:
    """What an ``HttpClient`` did with its connections."""

    opened: int
    """Connections opened."""
    reused: int
    """Requests sent on a kept-alive connection."""
    resent: int
    """Requests sent a second time (their kept-alive connection was closed as it was used)."""
    idle: int
    """Connections idle in the pool now."""


# ---------------------------------------------------------------------------- bodies


def encode_multipart(
    fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes, str]]
) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body (RFC 7578) of ``fields`` (name -> value) and
    ``files`` (name -> (file name, data, content type)), and its ``Content-Type``."""
    boundary = os.urandom(16).hex()
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_form(name)}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, (filename, data, content_type) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_form(name)}"; '
            f'filename="{_form(filename)}"\r\nContent-Type: {content_type}\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _form(value: str) -> str:
    """A name or file name quoted for a ``Content-Disposition`` (as browsers do)."""
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
