"""One Redis connection (a coredis pool) whose every call is retried while Redis is away."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import coredis
import coredis.exceptions
import trio

from .._errors import BrokerUnavailableError
from . import _scripts

__all__ = ["RETRYABLE", "Conn", "entry_fields", "flat_mapping", "open_conn", "pairs"]

logger = logging.getLogger("comfytrio.broker")

T = TypeVar("T")

RETRYABLE: tuple[type[BaseException], ...] = (
    coredis.exceptions.ConnectionError,  # refused, reset, LOADING after a restart
    TimeoutError,
    OSError,
)
"""What a call meets while Redis is down or restarting: tried again."""

_FIRST_DELAY = 0.05
_MAX_DELAY = 1.0


class Conn:
    """A coredis client and its scripts; ``call`` retries with backoff for
    ``reconnect_timeout`` seconds, then raises ``BrokerUnavailableError``."""

    def __init__(self, client: coredis.Redis[str], url: str, reconnect_timeout: float) -> None:
        self.client = client
        """The coredis client (responses decoded as text)."""
        self.url = url
        """The Redis URL (errors name it)."""
        self.reconnect_timeout = reconnect_timeout
        """How long a call is retried while Redis does not answer."""
        self.scripts = {
            name: client.register_script(getattr(_scripts, name)) for name in _scripts.__all__
        }

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()``, again while Redis is unreachable (each try makes a new request).

        Why only these errors: a reply Redis gave (a script error, a wrong type) would be
        the same again. Raises ``BrokerUnavailableError`` after ``reconnect_timeout``."""
        deadline: float | None = None
        delay = _FIRST_DELAY
        while True:
            try:
                return await fn()
            except RETRYABLE as exc:
                now = trio.current_time()
                if deadline is None:
                    deadline = now + self.reconnect_timeout
                    logger.warning("Redis at %s: %s; retrying", self.url, exc or type(exc))
                if now >= deadline:
                    raise BrokerUnavailableError(self.url, str(exc) or type(exc).__name__) from exc
                await trio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, _MAX_DELAY)

    async def script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one of ``_scripts`` (retried as ``call``)."""
        script = self.scripts[name]
        values = [str(a) for a in args]
        return await self.call(lambda: script(keys=list(keys), args=values))


def pairs(flat: Sequence[Any]) -> dict[str, str]:
    """A flat ``[field, value, ...]`` Lua reply as a dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


_BUFFERS = (
    "_write_buffer_in",
    "_write_buffer_out",
    "_push_message_buffer_in",
    "_push_message_buffer_out",
    "_streamed_message_buffer_in",
    "_streamed_message_buffer_out",
)


def _closing_on_failure(cls: type[Any]) -> type[Any]:
    """``cls`` (a coredis connection class) whose failed connect closes its buffers.

    Why: coredis 6.9 creates a connection's anyio memory streams in ``__init__`` and
    closes them only once connected, so every refused connect while Redis is down leaks
    six of them (a ``ResourceWarning`` each when collected)."""
    if getattr(cls, "_comfytrio_closing", False):
        return cls

    async def _connect(self: Any) -> Any:
        try:
            return await super(closing, self)._connect()
        except BaseException:
            for name in _BUFFERS:
                buffer = getattr(self, name, None)
                if buffer is not None:
                    buffer.close()
            raise

    closing: type[Any] = type(
        cls.__name__, (cls,), {"_connect": _connect, "_comfytrio_closing": True}
    )
    return closing


@asynccontextmanager
async def open_conn(url: str, reconnect_timeout: float) -> AsyncIterator[Conn]:
    """A ``Conn`` to ``url`` (``redis://``, ``rediss://``, ``unix://``); closed on exit.

    Nothing is sent on entry: the first call connects (and retries while Redis is away).
    Raises ``ValueError`` for a URL coredis cannot parse."""
    client: coredis.Redis[str] = coredis.Redis.from_url(url, decode_responses=True)
    pool = client.connection_pool
    pool.connection_class = _closing_on_failure(pool.connection_class)
    async with client:
        yield Conn(client, url, reconnect_timeout)


def flat_mapping(values: Mapping[str, Any]) -> list[str]:
    """A mapping as ``[k, v, ...]`` strings (for a script's ARGV)."""
    out: list[str] = []
    for key, value in values.items():
        out += [key, str(value)]
    return out


def entry_fields(entry: Any) -> tuple[str, dict[str, str]]:
    """A stream entry's id and fields, as text."""
    return str(entry.identifier), {str(k): str(v) for k, v in entry.field_values.items()}
