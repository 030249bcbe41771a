"""Webhooks of ``comfytrio serve``: signed, retried, never in the way (real sockets on
127.0.0.1: a small receiver app on Hypercorn's trio worker)."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.trio import serve
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from comfytrio.serve._webhooks import (
    MAX_BACKOFF,
    SECRET_FILE,
    WebhookSender,
    WebhookStatistics,
    check_webhook_secret,
    check_webhook_url,
    load_or_make_secret,
    make_webhook_secret,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@attrs.frozen
class Received:
    """One request the receiver got."""

    body: bytes
    headers: dict[str, str]
    at: float


@attrs.define(eq=False)
class Receiver:
    """A webhook receiver: answers each request with the next planned reply (then 200)."""

    url: str = ""
    replies: list[int | str | tuple[int, dict[str, str]]] = attrs.field(factory=list)
    received: list[Received] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def handle(self, request: Request) -> Response:
        self.received.append(
            Received(await request.body(), dict(request.headers), trio.current_time())
        )
        self.changed.set()
        self.changed = trio.Event()
        reply = self.replies.pop(0) if self.replies else 200
        if reply == "hang":
            await trio.sleep_forever()
        status, headers = reply if isinstance(reply, tuple) else (int(reply), {})
        return Response(b"", status_code=status, headers=headers)

    async def wait_requests(self, count: int) -> list[Received]:
        with trio.fail_after(10):
            while len(self.received) < count:
                await self.changed.wait()
        return self.received


@asynccontextmanager
async def open_receiver(
    *replies: int | str | tuple[int, dict[str, str]],
) -> AsyncIterator[Receiver]:
    receiver = Receiver(replies=list(replies))
    app = Starlette(routes=[Route("/hook", receiver.handle, methods=["POST"])])
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, config)
        receiver.url = f"{binds[0]}/hook"
        yield receiver
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running(sender: WebhookSender) -> AsyncIterator[WebhookSender]:
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        yield sender
        nursery.cancel_scope.cancel()


async def wait_stats(
    sender: WebhookSender, within: float = 10.0, every: float = 0.005, **expected: int
) -> WebhookStatistics:
    """Polls ``statistics()`` every ``every`` seconds until it shows ``expected``."""
    with trio.fail_after(within):
        while True:
            stats = sender.statistics()
            if all(getattr(stats, k) == v for k, v in expected.items()):
                return stats
            await trio.sleep(every)


def verify(received: Received, secret: str = SECRET) -> Any:
    return Webhook(secret).verify(received.body, received.headers)


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Backoff costs no wall time (for tests with no receiver answering)."""
    return trio.testing.MockClock(autojump_threshold=0.02)


def dead_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


# --------------------------------------------------------------------------- delivery


async def test_a_delivery_verifies_with_standard_webhooks() -> None:
    async with open_receiver() as receiver, running(WebhookSender(SECRET)) as sender:
        assert sender.send(receiver.url, "job.succeeded", {"id": "j1", "n": 1})
        (got,) = await receiver.wait_requests(1)
        stats = await wait_stats(sender, delivered=1, pending=0)
    message = verify(got)
    assert message["type"] == "job.succeeded"
    assert message["data"] == {"id": "j1", "n": 1}
    assert message["timestamp"].endswith("Z")
    datetime.fromisoformat(message["timestamp"])
    assert got.headers["content-type"] == "application/json"
    assert got.headers["webhook-id"].startswith("msg_")
    assert stats == WebhookStatistics(delivered=1, failed=0, retrying=0, dropped=0, pending=0)
    with pytest.raises(WebhookVerificationError):
        Webhook(make_webhook_secret()).verify(got.body, got.headers)


async def test_default_url_and_no_url() -> None:
    async with open_receiver() as receiver:
        sender = WebhookSender(SECRET, default_url=receiver.url)
        nowhere = WebhookSender(SECRET)
        assert not nowhere.send(None, "job.failed", {})
        assert nowhere.statistics() == WebhookStatistics(0, 0, 0, 0, 0)
        assert sender.send(None, "job.failed", {"id": "j2"})  # queued before run starts
        async with running(sender):
            (got,) = await receiver.wait_requests(1)
            await wait_stats(sender, delivered=1)
    assert verify(got)["data"] == {"id": "j2"}


async def test_500_500_200_is_delivered_on_the_third_attempt_under_one_id() -> None:
    sender = WebhookSender(SECRET, first_backoff=0.01)
    async with open_receiver(500, 503) as receiver, running(sender):
        sender.send(receiver.url, "job.succeeded", {"id": "j3"})
        got = await receiver.wait_requests(3)
        stats = await wait_stats(sender, delivered=1, pending=0)
    assert stats.failed == 0
    assert len({r.headers["webhook-id"] for r in got}) == 1
    assert len({r.body for r in got}) == 1  # the payload never changes
    for request in got:
        verify(request)  # each attempt is signed


async def test_400_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    sender = WebhookSender(SECRET, first_backoff=0.01)
    async with open_receiver(400) as receiver, running(sender):
        sender.send(receiver.url, "job.failed", {"id": "j4"})
        await wait_stats(sender, failed=1, pending=0)
        await trio.sleep(0.1)
        assert len(receiver.received) == 1
    assert sender.statistics().delivered == 0
    assert any(
        receiver.url in r.getMessage() and "HTTP 400" in r.getMessage() for r in caplog.records
    )


async def test_429_waits_for_retry_after() -> None:
    sender = WebhookSender(SECRET, first_backoff=0.01)
    async with open_receiver((429, {"Retry-After": "1"})) as receiver, running(sender):
        sender.send(receiver.url, "job.succeeded", {"id": "j5"})
        first, second = await receiver.wait_requests(2)
        await wait_stats(sender, delivered=1)
    assert second.at - first.at >= 0.99


async def test_a_hanging_receiver_times_out_then_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = WebhookSender(SECRET, first_backoff=0.01, timeout=0.3)
    async with open_receiver("hang") as receiver, running(sender):
        sender.send(receiver.url, "job.succeeded", {"id": "j6"})
        first, second = await receiver.wait_requests(2)
        await wait_stats(sender, delivered=1)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert second.at - first.at >= 0.3
    assert any("timed out" in r.getMessage() for r in caplog.records)


async def test_send_never_blocks_while_the_receiver_is_down(
    virtual_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    url = dead_url()
    sender = WebhookSender(SECRET, max_attempts=4, first_backoff=10.0, max_pending=5)
    async with running(sender):
        start = trio.current_time()
        assert all(sender.send(url, "job.succeeded", {"i": i}) for i in range(5))
        assert not sender.send(url, "job.succeeded", {"i": 5})  # over max_pending
        assert trio.current_time() == start  # send is synchronous: no time passes
        # (virtual seconds: a poll costs the autojump threshold of wall time, so poll seldom)
        await wait_stats(sender, every=1.0, retrying=5)
        stats = await wait_stats(sender, within=1000, every=5.0, failed=5, pending=0)
        # 3 waits of 10, 20, 40 s, each jittered down to no less than half
        assert trio.current_time() - start >= 35
    assert stats == WebhookStatistics(delivered=0, failed=5, retrying=0, dropped=1, pending=0)
    assert any(url in r.getMessage() and "given up" in r.getMessage() for r in caplog.records)
    # once run has ended, messages are dropped, not kept forever
    assert not sender.send(url, "job.succeeded", {})
    assert sender.statistics().dropped == 2


async def test_backoff_doubles_up_to_the_cap_and_honours_retry_after() -> None:
    sender = WebhookSender(SECRET, first_backoff=1.0)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (20, MAX_BACKOFF)]:
        for _ in range(20):
            assert base / 2 <= sender._backoff(attempt, None) <= base
    assert sender._backoff(1, 30.0) >= 30.0
    assert sender._backoff(1, 10_000.0) == MAX_BACKOFF


# --------------------------------------------------------------------------- URLs and secrets


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http://",
        "http:///path",
        "https://exa mple.com/",
        "http://example.com/\nX-Injected: 1",
        "http://example.com:99999/",
        "",
        "https://example.com/" + "a" * 3000,
    ],
)
async def test_non_http_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="webhook URL") as info:
        check_webhook_url(url)
    assert repr(url)[:40] in str(info.value) or len(url) > 2048
    with pytest.raises(ValueError, match="webhook URL"):
        WebhookSender(SECRET, default_url=url)
    assert not WebhookSender(SECRET).send(url, "job.succeeded", {})


@pytest.mark.parametrize(
    "url", ["https://example.com/hook?x=1", "http://127.0.0.1:8000/h", "HTTPS://[::1]/h"]
)
async def test_http_urls_are_accepted(url: str) -> None:
    assert check_webhook_url(url) == url


async def test_unserializable_data_is_refused_not_raised() -> None:
    sender = WebhookSender(SECRET, default_url="http://127.0.0.1:1/h")
    assert not sender.send(None, "job.succeeded", {"x": object()})
    assert not sender.send(None, "job.succeeded", {"x": float("nan")})
    assert sender.statistics().pending == 0


async def test_secret_made_once_then_read_back(tmp_path: Path) -> None:
    made = await load_or_make_secret(tmp_path, None)
    assert made.startswith("whsec_")
    assert check_webhook_secret(made) == made
    path = tmp_path / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert await load_or_make_secret(tmp_path, None) == made
    assert os.listdir(tmp_path) == [SECRET_FILE]  # no temp file left
    Webhook(made)  # the package takes it
    assert await load_or_make_secret(tmp_path, SECRET) == SECRET  # configured wins
    assert await load_or_make_secret(tmp_path, None) == made  # and is not written


@pytest.mark.parametrize(
    "secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_", "whsec_AAAA"]
)
async def test_bad_secrets_are_refused(tmp_path: Path, secret: str) -> None:
    with pytest.raises(ValueError, match="webhook secret"):
        await load_or_make_secret(tmp_path, secret)
    with pytest.raises(ValueError, match="webhook secret"):
        WebhookSender(secret)
    assert not (tmp_path / SECRET_FILE).exists()


async def test_a_bad_secret_file_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_text("hunter2\n")
    with pytest.raises(ValueError, match=SECRET_FILE):
        await load_or_make_secret(tmp_path, None)
