"""The ``image`` param reads only regular files, caps what it reads, and stays cancellable."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from comfytrio_std import _image
from test_plugins_support import LocalTarget, load_workflow, plan, png, std_plugins

from comfytrio import ParamError


def picture(value: Any) -> dict[str, Any]:
    return {"picture": {"type": "image", "value": value, "node_mappings": "API - PICTURE"}}


async def plan_picture(value: Any, tmp_path: Path) -> Any:
    target = LocalTarget("local", tmp_path / "input")
    return await plan(std_plugins(), load_workflow("model_free"), picture(value), targets=[target])


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero here")
async def test_dev_zero_is_refused_without_reading_it(tmp_path: Path) -> None:
    with trio.fail_after(5), pytest.raises(ParamError) as caught:
        await plan_picture("/dev/zero", tmp_path)
    assert caught.value.param == "picture"
    assert "/dev/zero is a character device, not a regular file" in str(caught.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
async def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with trio.fail_after(5), pytest.raises(ParamError) as caught:
        await plan_picture(str(fifo), tmp_path)
    assert caught.value.param == "picture"
    assert f"{fifo} is a FIFO, not a regular file" in str(caught.value)


async def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ParamError, match="is a directory, not a regular file") as caught:
        await plan_picture(tmp_path, tmp_path)
    assert caught.value.param == "picture"


async def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    image = tmp_path / "real.png"
    image.write_bytes(png("red"))
    (tmp_path / "link.png").symlink_to(image)
    job = await plan_picture(tmp_path / "link.png", tmp_path)
    assert job.shards[0].workflow["5"]["inputs"]["image"].startswith("comfytrio_")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc here")
def test_the_cap_is_on_the_bytes_read_not_on_what_stat_says() -> None:
    # /proc files say they are 0 bytes long, and hold more.
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(_image._TooBigError):
        _image._read_capped("/proc/self/status", 10, threading.Event())
    assert _image._read_capped("/proc/self/status", 1 << 20, threading.Event())


def test_a_read_stops_once_told(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * (3 << 20))
    stop = threading.Event()
    stop.set()
    assert _image._read_capped(str(big), 64 << 20, stop) == b""  # the result is dropped


async def test_a_read_that_hangs_is_abandoned_on_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read that never returns (a hung network file system): the job's cancel must win.
    image = tmp_path / "a.png"
    image.write_bytes(png("red"))
    release = threading.Event()
    finished = threading.Event()
    stopped: list[bool] = []

    def hanging(path: str, cap: int, stop: threading.Event) -> bytes:
        release.wait(10)
        stopped.append(stop.is_set())
        finished.set()
        return b""

    monkeypatch.setattr(_image, "_read_capped", hanging)
    with trio.CancelScope() as scope:

        async def cancel_when_blocked() -> None:
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_blocked)
            with trio.fail_after(5):
                await plan_picture(str(image), tmp_path)
    assert scope.cancelled_caught
    release.set()
    # The abandoned thread ends on its own, told to stop.
    assert await trio.to_thread.run_sync(finished.wait, 5)
    assert stopped == [True]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a\x00b.png", "cannot hold a NUL"),
        ("http://[::1/a.png", "malformed"),
        ("http://127.0.0.1:99999/a.png", "malformed"),
        ("http:///a.png", "no host"),
        (Path("/nonexistent/a.png"), "cannot read /nonexistent/a.png"),
        (memoryview(b""), "empty"),
    ],
    ids=["nul", "bad-ipv6", "bad-port", "no-host", "missing", "empty-view"],
)
async def test_odd_image_values_are_param_errors(tmp_path: Path, value: Any, message: str) -> None:
    with pytest.raises(ParamError, match=message) as caught:
        await plan_picture(value, tmp_path)
    assert caught.value.param == "picture"


async def test_a_file_of_the_wrong_size_under_the_hashed_name_is_replaced(tmp_path: Path) -> None:
    data = png("red")
    job = await plan_picture(data, tmp_path)
    name = job.shards[0].workflow["5"]["inputs"]["image"]
    placed = tmp_path / "input" / name
    placed.write_bytes(b"truncated")
    await plan_picture(data, tmp_path)
    assert placed.read_bytes() == data
    assert sorted(p.name for p in placed.parent.iterdir()) == [name]
