"""``comfytrio serve`` killed with SIGKILL in the middle of a job, then started again on the
same state folder: the job is still there and ends; its idempotency key is still used.

Two fleets: ``--fake 2`` (the fakes live in serve's process and die with it, so the job's
prompts are gone: it fails, saying so) and two ``comfytrio fake-server`` processes by
``--url`` (they keep running the prompts: the restarted serve reattaches to them and the job
succeeds with every output).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import model_free, split_batch, start_serve, stop_serve


def wait_status(url: str, job_id: str, wanted: set[str], timeout: float = 60) -> dict[str, Any]:
    """Poll the job until its status is one of ``wanted``."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{url}/api/v2/jobs/{job_id}").json()
        if job["status"] in wanted:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.05)


def submit(url: str, batch: int, key: str) -> dict[str, Any]:
    body = {"workflow": model_free(), "comfytrio": split_batch(batch)}
    answer = httpx.post(f"{url}/api/v2/jobs", json=body, headers={"Idempotency-Key": key})
    assert answer.status_code == 201, answer.text
    job: dict[str, Any] = answer.json()
    return job


def kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


def assert_key_refused(url: str, key: str) -> None:
    again = httpx.post(
        f"{url}/api/v2/jobs", json={"workflow": model_free()}, headers={"Idempotency-Key": key}
    )
    assert again.status_code == 422
    assert again.json()["error"]["code"] == "idempotency_key_reuse"


def test_in_process_fakes_die_with_serve_and_the_job_fails_saying_why(tmp_path: Path) -> None:
    state = tmp_path / "serve"
    fleet = ("--fake", "2", "--fake-seconds-per-image", "1")
    process, url = start_serve(state, *fleet)
    job = submit(url, batch=8, key="key-before-the-kill")
    wait_status(url, job["id"], {"running"})
    kill(process)

    process, url = start_serve(state, *fleet)
    try:
        ended = wait_status(url, job["id"], {"failed", "succeeded", "canceled"})
        assert ended["status"] == "failed"
        assert ended["error"]["code"] == "lost_on_restart"
        assert "submit it again" in ended["error"]["message"]
        logs = httpx.get(f"{url}/api/v2/jobs/{job['id']}/logs")
        assert "none of the job's prompts were found" in logs.text
        assert_key_refused(url, "key-before-the-kill")
    finally:
        stop_serve(process)


@pytest.fixture
def fake_servers(tmp_path: Path) -> Iterator[list[str]]:
    """Two ``comfytrio fake-server`` processes (one second of simulated GPU a picture)."""
    processes: list[subprocess.Popen[str]] = []
    urls: list[str] = []
    try:
        for i in range(2):
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "comfytrio",
                    "fake-server",
                    "--root",
                    str(tmp_path / f"fake-{i}"),
                    "--port",
                    "0",
                    "--seconds-per-image",
                    "1",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            processes.append(process)
            assert process.stdout is not None
            found = re.search(r"serving (http://\S+)", process.stdout.readline())
            assert found, "the fake server did not say where it listens"
            urls.append(found.group(1))
        (tmp_path / "fake-0" / "input").mkdir(parents=True, exist_ok=True)
        yield urls
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


def test_remote_servers_keep_running_and_serve_reattaches(
    tmp_path: Path, fake_servers: list[str]
) -> None:
    from comfytrio.cli._demo import demo_picture

    for i in range(2):  # model_free.json loads example.png
        (tmp_path / f"fake-{i}" / "input" / "example.png").write_bytes(demo_picture())
    state = tmp_path / "serve"
    fleet = [arg for url in fake_servers for arg in ("--url", url)]
    process, url = start_serve(state, *fleet)
    job = submit(url, batch=6, key="key-before-the-kill")
    running = wait_status(url, job["id"], {"running"})
    kill(process)

    process, url = start_serve(state, *fleet)
    try:
        ended = wait_status(url, job["id"], {"failed", "succeeded", "canceled"})
        assert ended["status"] == "succeeded", json.dumps(ended["error"])
        saved = [o for o in ended["outputs"] if o["node_id"] == "4"]
        assert len(saved) == 6  # every image of the batch, once
        assert len({o["id"] for o in ended["outputs"]}) == len(ended["outputs"])
        before = {s["prompt_id"] for s in running["comfytrio"]["shards"]}
        assert before <= {s["prompt_id"] for s in ended["comfytrio"]["shards"]}
        logs = httpx.get(f"{url}/api/v2/jobs/{job['id']}/logs").text
        assert "reattached" in logs
        for output in saved:
            content = httpx.get(output["url"])
            assert content.status_code == 200
            assert content.content.startswith(b"\x89PNG")
        assert_key_refused(url, "key-before-the-kill")
    finally:
        stop_serve(process)
