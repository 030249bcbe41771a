"""Comfy-Org's own client, ``comfy-sdk``, unchanged, against ``comfytrio serve --fake 2``
(and, last, against two ``serve --broker`` front ends of one ``comfytrio worker``).

``serve`` runs as its own process, as a user starts it; the SDK finds it through
``COMFY_BASE_URL``, as its README says for a self-hosted deployment. These tests are
synchronous: the SDK is.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from comfy_sdk import Comfy, IdempotencyKeyReuse, JobFailed
from comfy_sdk.events import OutputReady, Progress, StatusChange
from conftest import RedisUrl, model_free, start_command, start_serve, stop_serve
from PIL import Image


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``comfytrio serve --fake 2`` (half a second of simulated GPU a picture), its URL
    in ``COMFY_BASE_URL``."""
    process, url = start_serve(tmp_path / "serve", "--fake", "2", "--fake-seconds-per-image", "0.5")
    monkeypatch.setenv("COMFY_BASE_URL", url)
    monkeypatch.delenv("COMFY_API_KEY", raising=False)
    try:
        yield url
    finally:
        stop_serve(process)


@pytest.fixture
def client(served: str) -> Iterator[Comfy]:
    """The SDK's client, as its README makes it (``COMFY_BASE_URL`` names ``serve``)."""
    with Comfy() as made:
        yield made


def picture() -> bytes:
    image = Image.new("RGB", (8, 8), (10, 200, 30))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_upload_an_input_run_and_read_outputs(client: Comfy, served: str) -> None:
    wf = client.workflows.from_json(model_free(batch=2))
    asset = client.assets.from_bytes(picture(), filename="photo.png", content_type="image/png")
    wf.set_input("5", "image", asset)
    job = client.run(wf, timeout=60)
    assert job.status == "succeeded"
    saved = job.get_outputs("4")
    assert len(saved) == 2
    assert all(o.to_bytes().startswith(b"\x89PNG") for o in saved)
    (inverted,) = job.get_outputs("7")
    pixels = Image.open(io.BytesIO(inverted.to_bytes())).convert("RGB")
    # The uploaded picture reached the server that ran the job, and was inverted there.
    assert pixels.size == (8, 8)
    assert pixels.getpixel((0, 0)) == (245, 55, 225)
    assert inverted.to_bytes(range=(0, 7)) == b"\x89PNG\r\n\x1a\n"
    again = client.assets.from_bytes(picture(), filename="again.png", content_type="image/png")
    again.commit()  # the same bytes: minted over the blob the server already has
    assert again.id != asset.id
    assert job.get_workflow().format == "api"


def test_a_running_job_is_cancelled_on_its_server(client: Comfy, served: str) -> None:
    job = client.submit(client.workflows.from_json(model_free(batch=12)))
    deadline = time.monotonic() + 30
    while job.refresh().status != "running":
        assert time.monotonic() < deadline, f"still {job.status}"
        time.sleep(0.05)
    job.cancel()
    assert job.status in ("canceling", "canceled")
    assert job.wait(timeout=30).status == "canceled"
    with pytest.raises(JobFailed):
        job.result()
    health = httpx.get(f"{served}/api/v2/health").json()
    for server in health["servers"]:
        queue_now = httpx.get(f"{server['url']}/queue").json()
        assert queue_now == {"queue_running": [], "queue_pending": []}


def test_follow_a_job_s_events(client: Comfy, served: str) -> None:
    job = client.submit(client.workflows.from_json(model_free(batch=2)))
    statuses: list[str] = []
    outputs: list[str] = []
    progress: list[float] = []
    for event in job.events():
        match event:
            case StatusChange(status=status):
                statuses.append(status)
            case Progress(value=value):
                progress.append(value)
            case OutputReady(output=output):
                outputs.append(output.id)
    assert statuses[-1] == "succeeded"
    assert "running" in statuses
    assert progress
    assert progress == sorted(progress)
    assert sorted(outputs) == sorted(o.id for o in job.refresh().outputs)


def test_a_second_submit_with_the_same_idempotency_key_is_refused(
    client: Comfy, served: str
) -> None:
    wf = client.workflows.from_json(model_free())
    first = client.submit(wf, idempotency_key="order-1234", metadata={"client": "acme"})
    with pytest.raises(IdempotencyKeyReuse):
        client.submit(wf, idempotency_key="order-1234")
    assert first.wait(timeout=60).status == "succeeded"
    listed = list(client.list_jobs(metadata={"client": "acme"}))
    assert [j.id for j in listed] == [first.id]
    assert first.metadata == {"client": "acme"}


@pytest.fixture
def two_front_ends(tmp_path: Path, redis_url: RedisUrl) -> Iterator[tuple[str, str]]:
    """``comfytrio worker --fake 2`` and two ``comfytrio serve --broker`` front ends over one
    Redis and one output folder: their URLs."""
    outputs = (tmp_path / "outputs").as_uri()
    worker, ready = start_command(
        tmp_path / "worker.log",
        "worker",
        *("--broker", redis_url, "--outputs", outputs, "--print-ready"),
        *("--fake", "2", "--fake-seconds-per-image", "0.5", "--worker-dir", str(tmp_path / "w")),
    )
    started = [worker]
    try:
        assert ready == "ready", (tmp_path / "worker.log").read_text()
        urls = []
        for name in ("front-a", "front-b"):
            front, url = start_serve(tmp_path / name, "--broker", redis_url, "--outputs", outputs)
            started.append(front)
            urls.append(url)
        yield urls[0], urls[1]
    finally:
        for process in reversed(started):
            stop_serve(process)


def test_the_official_client_over_two_stateless_front_ends(
    two_front_ends: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two_front_ends
    monkeypatch.delenv("COMFY_API_KEY", raising=False)
    monkeypatch.setenv("COMFY_BASE_URL", first)
    with Comfy() as one:
        wf = one.workflows.from_json(model_free(batch=2))
        wf.set_input("5", "image", one.assets.from_bytes(picture(), filename="p.png"))
        submitted = one.submit(wf, idempotency_key="order-77")
        slow = one.submit(one.workflows.from_json(model_free(batch=12)))
    monkeypatch.setenv("COMFY_BASE_URL", second)
    with Comfy() as other:
        job = other.jobs.get(submitted.id).result()  # followed through the other front end
        assert len(job.get_outputs("4")) == 2
        (inverted,) = job.get_outputs("7")
        pixels = Image.open(io.BytesIO(inverted.to_bytes())).convert("RGB")
        assert pixels.getpixel((0, 0)) == (245, 55, 225)
        with pytest.raises(IdempotencyKeyReuse):
            other.submit(other.workflows.from_json(model_free()), idempotency_key="order-77")
        running = other.jobs.get(slow.id)
        deadline = time.monotonic() + 30
        while running.refresh().status != "running":
            assert time.monotonic() < deadline, f"still {running.status}"
            time.sleep(0.05)
        running.cancel()
        assert running.wait(timeout=30).status == "canceled"
