"""The fake closes idle keep-alive connections as ComfyUI (aiohttp) does: after 75 s.

A raw TCP client on 127.0.0.1 sends one keep-alive request, reads the answer, then waits;
trio's autojump clock makes the waiting cost no real time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from comfytrio.cli import build_parser
from comfytrio.testing import FakeComfyUI, _main, serve_fake_comfyui
from comfytrio.testing._engine import Settings
from comfytrio.testing._paths import FakePaths
from comfytrio.testing._server import SystemInfo

REQUEST = b"GET /system_stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"


def partial_serve(root: Path, **kwargs: Any) -> functools.partial[Any]:
    """``serve_fake_comfyui`` on ``root`` with ``kwargs``, for ``nursery.start``."""
    return functools.partial(serve_fake_comfyui, root, **kwargs)


async def read_one_response(stream: trio.SocketStream) -> bytes:
    """One whole response (headers and a ``content-length`` body) from ``stream``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        assert chunk, f"the server closed before answering: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = await stream.receive_some()
        assert chunk, "the server closed mid-body"
        body += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return head


async def seconds_until_closed(fake: FakeComfyUI, *, limit: float) -> float | None:
    """Send one keep-alive request, read the answer, then wait (at most ``limit`` seconds)
    for the server to close the connection: how long that took, or None if it stayed open."""
    stream = await trio.open_tcp_stream("127.0.0.1", fake.port)
    async with stream:
        await stream.send_all(REQUEST)
        head = await read_one_response(stream)
        assert b"connection: close" not in head.lower()
        answered = trio.current_time()
        with trio.move_on_after(limit):
            assert await stream.receive_some() == b""  # nothing but the close
            return trio.current_time() - answered
    return None


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    fake: FakeComfyUI = await nursery.start(partial_serve(tmp_path, idle_timeout=1))
    assert fake.idle_timeout == 1
    closed_after = await seconds_until_closed(fake, limit=30)
    assert closed_after is not None
    assert closed_after == pytest.approx(1, abs=0.1)


async def test_by_default_an_idle_connection_stays_open_as_on_comfyui(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    fake: FakeComfyUI = await nursery.start(partial_serve(tmp_path))
    assert fake.idle_timeout == 75
    assert await seconds_until_closed(fake, limit=60) is None
    # ...and it is closed once 75 s have gone by.
    closed_after = await seconds_until_closed(fake, limit=120)
    assert closed_after == pytest.approx(75, abs=0.1)


def test_an_idle_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        FakeComfyUI(
            FakePaths.under(tmp_path),
            host="127.0.0.1",
            port=0,
            settings=Settings(),
            system=SystemInfo(argv=["main.py"]),
            idle_timeout=0,
        )


def test_fake_server_takes_an_idle_timeout() -> None:
    parser = build_parser()
    args = parser.parse_args(["fake-server", "--root", "/tmp/x", "--idle-timeout", "2.5"])
    assert args.idle_timeout == 2.5
    assert parser.parse_args(["fake-server", "--root", "/tmp/x"]).idle_timeout == 75
    with pytest.raises(SystemExit):
        parser.parse_args(["fake-server", "--root", "/tmp/x", "--idle-timeout", "0"])


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 75.0), ("2.5", 2.5), ("0", 75.0), ("x", 75.0)]
)
def test_a_fake_install_reads_its_idle_timeout_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: float
) -> None:
    if raw is None:
        monkeypatch.delenv(_main.ENV_IDLE_TIMEOUT, raising=False)
    else:
        monkeypatch.setenv(_main.ENV_IDLE_TIMEOUT, raw)
    assert _main._idle_timeout() == expected
