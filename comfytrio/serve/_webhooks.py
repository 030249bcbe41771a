"""Webhooks: a job's news POSTed to a URL, signed the Standard Webhooks way, retried.

Each message is ``{"type": event_type, "timestamp": RFC 3339, "data": {...}}`` as JSON, with
the three Standard Webhooks headers (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``, made by the ``standardwebhooks`` package), so a receiver verifies it
with ``standardwebhooks.Webhook(secret).verify(body, headers)``.

Delivery is at least once: a connection error, a timeout, a 429 or a 5xx is retried with
exponential backoff (doubling from ``first_backoff``, capped at ``MAX_BACKOFF``, with jitter,
and never sooner than a ``Retry-After`` asks) up to ``max_attempts`` attempts, under the same
``webhook-id`` so a receiver can drop a duplicate; any other answer but a 2xx (a 3xx, a 4xx)
is final. Every retry is signed afresh: the signed timestamp must be recent (receivers refuse
one over five minutes old), while the payload, its ``timestamp`` included, never changes.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import random
import secrets
import time
import uuid
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import trio
from standardwebhooks import Webhook

from .._files import atomic_file
from ._wire import rfc3339

__all__ = [
    "MAX_BACKOFF",
    "SECRET_FILE",
    "WebhookSender",
    "WebhookStatistics",
    "check_webhook_secret",
    "check_webhook_url",
    "load_or_make_secret",
    "make_webhook_secret",
]

logger = logging.getLogger("comfytrio.serve")

MAX_BACKOFF = 300.0
"""The longest wait between two attempts of one message, in seconds."""

SECRET_FILE = "webhook-secret"
"""The file in the state folder that keeps a secret ``serve`` made."""

MAX_URL_LENGTH = 2048
"""The longest webhook URL accepted."""

_SECRET_PREFIX = "whsec_"
_SECRET_BYTES = (24, 64)  # what the Standard Webhooks spec recommends


def check_webhook_url(url: str) -> str:
    """``url`` if it may receive webhooks: an ``http`` or ``https`` URL with a host, at most
    ``MAX_URL_LENGTH`` characters, no whitespace or control characters. Raises
    ``ValueError`` naming the URL otherwise."""
    if not isinstance(url, str):
        raise ValueError(f"webhook URL {url!r}: must be a string")
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"webhook URL {url[:80]!r}...: longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValueError(f"webhook URL {url!r}: holds whitespace or control characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError as exc:
        raise ValueError(f"webhook URL {url!r}: {exc}") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"webhook URL {url!r}: only http and https URLs are accepted")
    if not host:
        raise ValueError(f"webhook URL {url!r}: has no host")
    return url


def check_webhook_secret(secret: str) -> str:
    """``secret`` if it is a Standard Webhooks secret: ``whsec_`` then the base64 of 24 to 64
    bytes. Raises ``ValueError`` otherwise (without the secret in the message)."""
    if not isinstance(secret, str) or not secret.startswith(_SECRET_PREFIX):
        raise ValueError("webhook secret: must start with 'whsec_' (then base64)")
    try:
        key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook secret: what follows 'whsec_' is not base64") from exc
    low, high = _SECRET_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"webhook secret: must hold {low} to {high} bytes, holds {len(key)}")
    return secret


def make_webhook_secret() -> str:
    """A fresh secret: ``whsec_`` and the base64 of 24 random bytes."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


async def load_or_make_secret(state_dir: Path, configured: str | None) -> str:
    """The webhook secret: ``configured`` when given (checked), else the one kept in
    ``state_dir / SECRET_FILE``, else a new one written there (atomically, mode 0600), so
    receivers keep verifying across restarts.

    Raises ``ValueError`` for a malformed ``configured`` secret or file (naming the file),
    ``OSError`` when the file cannot be read or written.
    """
    if configured is not None:
        return check_webhook_secret(configured)
    path = state_dir / SECRET_FILE
    try:
        text = await trio.Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        pass
    else:
        try:
            return check_webhook_secret(text.strip())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    secret = make_webhook_secret()
    async with atomic_file(path, spill=0, mode=0o600) as out:  # never readable by others
        await out.write(secret.encode("ascii") + b"\n")
        await out.commit()
    logger.info("made a webhook secret, kept in %s", path)
    return secret


@attrs.frozen
class WebhookStatistics:
    """What a ``WebhookSender`` did so far (``WebhookSender.statistics()``)."""

    delivered: int
    """Messages a receiver took (a 2xx)."""
    failed: int
    """Messages given up: a final answer (3xx, 4xx but 429) or every attempt failed."""
    retrying: int
    """Messages now waiting to be tried again."""
    dropped: int
    """Messages never sent: too many pending, or ``send`` after the sender stopped."""
    pending: int
    """Messages accepted and not yet delivered or given up (``retrying`` included)."""


@attrs.frozen
class _Message:
    id: str
    url: str
    event_type: str
    payload: str


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@attrs.define(eq=False)
class WebhookSender:
    """Sends webhooks in the background: ``send`` queues, ``run`` delivers.

    Start it with ``await nursery.start(sender.run)``; messages sent before it runs wait for
    it. Cancelling ``run`` abandons the messages not yet delivered.
    """

    secret: str = attrs.field(validator=lambda _, __, value: check_webhook_secret(value))
    """The Standard Webhooks secret (``whsec_...``) every message is signed with."""
    default_url: str | None = attrs.field(
        default=None,
        validator=lambda _, __, value: value is None or check_webhook_url(value),
    )
    """Where a message goes when ``send`` names no URL (None: nowhere)."""
    max_attempts: int = 8
    """Attempts per message, the first included."""
    first_backoff: float = 1.0
    """Seconds before the second attempt; each later wait doubles, up to ``MAX_BACKOFF``."""
    timeout: float = 10.0
    """Seconds one attempt may take, from connecting to the status line."""
    max_pending: int = 1000
    """Messages pending at most; ``send`` drops any more (with a warning)."""

    _webhook: Webhook = attrs.field(init=False)
    _send_channel: trio.MemorySendChannel[_Message] = attrs.field(init=False)
    _receive_channel: trio.MemoryReceiveChannel[_Message] = attrs.field(init=False)
    _delivered: int = attrs.field(init=False, default=0)
    _failed: int = attrs.field(init=False, default=0)
    _retrying: int = attrs.field(init=False, default=0)
    _dropped: int = attrs.field(init=False, default=0)
    _pending: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._webhook = Webhook(self.secret)
        self._send_channel, self._receive_channel = trio.open_memory_channel[_Message](math.inf)

    def statistics(self) -> WebhookStatistics:
        """Counts of messages so far."""
        return WebhookStatistics(
            delivered=self._delivered,
            failed=self._failed,
            retrying=self._retrying,
            dropped=self._dropped,
            pending=self._pending,
        )

    def send(self, url: str | None, event_type: str, data: dict[str, Any]) -> bool:
        """Queue one message for ``url`` (None: ``default_url``); never blocks, never raises.

        Returns whether it was queued: False when there is no URL at all, the URL is not
        http(s), ``data`` is not JSON, ``max_pending`` messages are pending, or ``run`` has
        ended (each but the first logged as a warning).
        """
        target = url if url is not None else self.default_url
        if target is None:
            return False
        try:
            check_webhook_url(target)
            payload = json.dumps(
                {"type": event_type, "timestamp": rfc3339(time.time()), "data": data},
                ensure_ascii=False,
                separators=(",", ":"),
                allow_nan=False,
            )
        except (ValueError, TypeError) as exc:
            logger.warning("webhook %s not sent: %s", event_type, exc)
            return False
        if self._pending >= self.max_pending:
            self._dropped += 1
            logger.warning(
                "webhook %s to %s dropped: %d messages already pending",
                event_type,
                target,
                self._pending,
            )
            return False
        message = _Message(f"msg_{uuid.uuid4().hex}", target, event_type, payload)
        try:
            self._send_channel.send_nowait(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._dropped += 1
            logger.warning("webhook %s to %s dropped: the sender has stopped", event_type, target)
            return False
        self._pending += 1
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver messages until cancelled (each in its own task, over one HTTP client).

        Ready (``task_status.started()``) at once. Once it ends, ``send`` drops.
        """
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
        try:
            async with (
                httpx.AsyncClient(
                    timeout=self.timeout, limits=limits, follow_redirects=False
                ) as client,
                trio.open_nursery() as nursery,
            ):
                task_status.started()
                async for message in self._receive_channel:
                    nursery.start_soon(self._deliver, client, message)
        finally:
            self._receive_channel.close()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """The wait after failed attempt number ``attempt`` (1 for the first)."""
        base = min(MAX_BACKOFF, self.first_backoff * 2.0 ** (attempt - 1))
        wait = base / 2 + random.uniform(0, base / 2)  # jitter: no thundering herd
        if retry_after is not None:
            wait = max(wait, min(retry_after, MAX_BACKOFF))
        return wait

    async def _attempt(
        self, client: httpx.AsyncClient, message: _Message
    ) -> tuple[str, bool, float | None]:
        """One POST: what went wrong (``""``: nothing), whether a retry may help, and the
        seconds a ``Retry-After`` asked for."""
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": message.id,
            "webhook-timestamp": str(math.floor(now.timestamp())),
            "webhook-signature": self._webhook.sign(message.id, now, message.payload),
        }
        with trio.move_on_after(self.timeout) as scope:
            try:
                async with client.stream(
                    "POST", message.url, content=message.payload.encode(), headers=headers
                ) as response:
                    status = response.status_code
                    retry_after = _retry_after(response.headers.get("retry-after"))
            except httpx.TimeoutException:
                return f"timed out after {self.timeout:g} s", True, None
            except httpx.HTTPError as exc:  # connection refused, reset, bad answer...
                return f"{type(exc).__name__}: {exc}", True, None
        if scope.cancelled_caught:
            return f"timed out after {self.timeout:g} s", True, None
        if 200 <= status < 300:
            return "", False, None
        return f"HTTP {status}", status == 429 or status >= 500, retry_after

    async def _deliver(self, client: httpx.AsyncClient, message: _Message) -> None:
        try:
            for attempt in range(1, self.max_attempts + 1):
                failure, retry, retry_after = await self._attempt(client, message)
                if not failure:
                    self._delivered += 1
                    logger.debug("webhook %s delivered to %s", message.id, message.url)
                    return
                if not retry or attempt == self.max_attempts:
                    self._failed += 1
                    logger.error(
                        "webhook %s (%s) to %s given up after %d attempt(s): %s",
                        message.id,
                        message.event_type,
                        message.url,
                        attempt,
                        failure,
                    )
                    return
                wait = self._backoff(attempt, retry_after)
                logger.warning(
                    "webhook %s (%s) to %s: attempt %d failed (%s); retrying in %.1f s",
                    message.id,
                    message.event_type,
                    message.url,
                    attempt,
                    failure,
                    wait,
                )
                self._retrying += 1
                try:
                    await trio.sleep(wait)
                finally:
                    self._retrying -= 1
        finally:
            self._pending -= 1
