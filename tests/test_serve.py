"""``comfytrio serve`` in process: the Comfy API v2 over a fleet of two fake ComfyUI servers,
spoken to with httpx over real sockets on 127.0.0.1 (every JSON body checked against the
OpenAPI document's schemas)."""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from conftest import (
    api_on_fakes,
    image_pixels,
    model_free,
    png_bytes,
    sampler_workflow,
    split_batch,
    until,
)
from hypercorn.config import Config
from hypercorn.trio import serve
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from comfytrio.serve import (
    JobBoard,
    ServeConfig,
    ServeHandle,
    build_serve_app,
    openapi_document,
    serve_comfy_api,
)
from comfytrio.serve._assets import AssetStore
from comfytrio.serve._openapi import validate_body
from comfytrio.serve._records import JobRecord
from comfytrio.serve._store import open_store
from comfytrio.serve._wire import rfc3339
from comfytrio.testing import FakeComfyUI, serve_fake_comfyui

TERMINAL = {"succeeded", "failed", "canceled", "expired"}


@attrs.define(eq=False)
class Served:
    """A running serve over fakes, and a client for it."""

    handle: ServeHandle[JobBoard]
    fakes: list[FakeComfyUI]
    http: httpx.AsyncClient

    async def submit(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        return await self.http.post("/api/v2/jobs", json=body, headers=headers)

    async def job(self, job_id: str) -> dict[str, Any]:
        answer = await self.http.get(f"/api/v2/jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        return checked("Job", answer.json())

    async def wait(self, job_id: str, statuses: set[str] = TERMINAL) -> dict[str, Any]:
        with trio.fail_after(30):
            while (job := await self.job(job_id))["status"] not in statuses:  # noqa: ASYNC110 (polled over HTTP, as a client does)
                await trio.sleep(0.02)
        return job

    async def run(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = await self.submit(body)
        assert answer.status_code == 201, answer.text
        return await self.wait(checked("Job", answer.json())["id"])

    async def queues(self) -> list[Any]:
        """Every prompt running or pending on the fakes."""
        found: list[Any] = []
        for fake in self.fakes:
            async with httpx.AsyncClient(base_url=fake.url) as http:
                queue = (await http.get("/queue")).json()
            found += queue["queue_running"] + queue["queue_pending"]
        return found


def checked(schema: str, value: Any) -> dict[str, Any]:
    """``value``, after checking it against the OpenAPI schema ``schema``."""
    validate_body(schema, value)
    assert isinstance(value, dict)
    return value


def problem(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error envelope's ``error`` of a refusal with this status and code."""
    assert answer.status_code == status, answer.text
    body = checked("ErrorEnvelope", answer.json())
    assert body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


async def start_fake(nursery: trio.Nursery, root: Path, **options: Any) -> FakeComfyUI:
    """A fake whose root holds ``input/example.png`` (model_free.json's LoadImage)."""
    (root / "input").mkdir(parents=True, exist_ok=True)
    (root / "input" / "example.png").write_bytes(png_bytes((32, 32), (200, 40, 10)))
    fake: FakeComfyUI = await nursery.start(
        lambda task_status: serve_fake_comfyui(root, task_status=task_status, **options)
    )
    return fake


@asynccontextmanager
async def open_served(
    tmp_path: Path, *, fakes: int = 2, seconds_per_image: float = 0.0, **config: Any
) -> AsyncIterator[Served]:
    """``fakes`` fake servers, a ``ComfyAPI`` over them and ``serve`` in front of it."""
    async with trio.open_nursery() as nursery:
        servers = [
            await start_fake(nursery, tmp_path / f"fake{i}", seconds_per_image=seconds_per_image)
            for i in range(fakes)
        ]
        async with api_on_fakes(servers, tmp_path) as api:
            handle: ServeHandle[JobBoard] = await nursery.start(
                serve_comfy_api, api, ServeConfig(state_dir=tmp_path / "serve", port=0, **config)
            )
            async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
                yield Served(handle, servers, http)
            nursery.cancel_scope.cancel()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with open_served(tmp_path) as s:
        yield s


# --------------------------------------------------------------------------- splitting


async def test_a_gpu_scale_batch_is_split_over_both_servers(served: Served) -> None:
    job = await served.run({"workflow": model_free(), "comfytrio": split_batch(4)})
    assert job["status"] == "succeeded", job
    assert job["comfytrio"]["shard_count"] == 2
    assert {s["instance"] for s in job["comfytrio"]["shards"]} == {
        i.name for i in served.handle.board.api.instances
    }
    batch = [o for o in job["outputs"] if o["node_id"] == "4"]
    assert len(batch) == 4
    # the branch without the batch (LoadImage "5" inverted, saved by "7") runs once
    assert [o["node_id"] for o in job["outputs"] if o not in batch] == ["7"]
    assert all(o["type"] == "image" for o in batch)
    ids = [o["id"] for o in job["outputs"]]
    assert len(set(ids)) == len(ids)
    for output in job["outputs"]:
        content = await served.http.get(output["url"])
        assert content.status_code == 200
        assert len(content.content) == output["size_bytes"]
        assert content.headers["content-type"].startswith(output["content_type"])


async def test_without_the_comfytrio_object_a_job_is_one_prompt(served: Served) -> None:
    job = await served.run({"workflow": model_free(4)})
    assert job["status"] == "succeeded", job
    assert job["comfytrio"]["shard_count"] == 1
    assert sum(len(fake.prompts_received) for fake in served.fakes) == 1
    assert len(job["comfytrio"]["shards"]) == 1
    assert len([o for o in job["outputs"] if o["node_id"] == "4"]) == 4


# --------------------------------------------------------------------------- validation


async def test_a_ui_format_workflow_is_refused(served: Served) -> None:
    answer = await served.submit({"workflow": {"nodes": [], "links": [], "version": 0.4}})
    problem(answer, 422, "workflow_format_ui")


async def test_an_unknown_node_class_is_named(served: Served) -> None:
    workflow = model_free()
    workflow["6"]["class_type"] = "NoSuchNode"
    error = problem(await served.submit({"workflow": workflow}), 422, "invalid_workflow")
    assert set(error["details"]["node_errors"]) == {"6"}


async def test_a_wrong_model_name_is_named(served: Served) -> None:
    workflow = sampler_workflow()  # its checkpoint m.safetensors is on no fake
    error = problem(await served.submit({"workflow": workflow}), 422, "invalid_workflow")
    assert "1" in error["details"]["node_errors"]
    assert "m.safetensors" in error["message"]


async def test_a_body_that_is_not_json_is_a_422(served: Served) -> None:
    answer = await served.http.post(
        "/api/v2/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    problem(answer, 422, "invalid_request")


async def test_inputs_are_refused(served: Served) -> None:
    answer = await served.submit({"workflow": model_free(), "inputs": {"x": 1}})
    error = problem(answer, 422, "invalid_request")
    assert "inputs" in error["message"]


@pytest.mark.parametrize(
    ("comfytrio", "field"),
    [
        ({"bogus": 1}, "comfytrio"),
        ({"params": ["batch"]}, "comfytrio.params"),
        ({"seed": -1}, "comfytrio.seed"),
        ({"same_images": "yes"}, "comfytrio.same_images"),
        ({"max_shards": 0}, "comfytrio.max_shards"),
        ({"timeout": 0}, "comfytrio.timeout"),
        ({"models": [{"kind": "checkpoints"}]}, "comfytrio.models[0]"),
    ],
)
async def test_bad_comfytrio_keys_are_named(
    served: Served, comfytrio: dict[str, Any], field: str
) -> None:
    answer = await served.submit({"workflow": model_free(), "comfytrio": comfytrio})
    error = problem(answer, 422, "invalid_request")
    assert error["details"]["field"] == field
    assert field.split("[")[0] in error["message"]


@pytest.mark.parametrize(
    ("extra_data", "field"),
    [
        ({"client_id": "x"}, "extra_data"),
        ([], "extra_data"),
        ({"api_key_comfy_org": "k"}, "extra_data.api_key_comfy_org"),
    ],
)
async def test_extra_data_is_a_closed_object(served: Served, extra_data: Any, field: str) -> None:
    answer = await served.submit({"workflow": model_free(), "extra_data": extra_data})
    assert problem(answer, 422, "invalid_request")["details"]["field"] == field


async def test_an_unknown_param_title_is_an_invalid_workflow(served: Served) -> None:
    params = {"params": {"n": {"type": "integer", "value": 2, "node_mappings": "NO SUCH"}}}
    answer = await served.submit({"workflow": model_free(), "comfytrio": params})
    error = problem(answer, 422, "invalid_workflow")
    assert "NO SUCH" in error["message"]


def asset_ref(asset_id: str) -> dict[str, Any]:
    return {"__type": "core/ASSET", "info": {"id": asset_id}}


async def test_a_missing_asset_is_listed(served: Served) -> None:
    workflow = model_free()
    workflow["5"]["inputs"]["image"] = asset_ref("no-such-asset")
    error = problem(await served.submit({"workflow": workflow}), 422, "missing_asset")
    assert error["details"]["missing_ids"] == ["no-such-asset"]


async def upload(served: Served, data: bytes, name: str = "photo.png") -> dict[str, Any]:
    answer = await served.http.post(
        "/api/v2/assets",
        data={"content_type": "image/png", "file_path": name},
        files={"file": (name, data, "image/png")},
    )
    assert answer.status_code == 201, answer.text
    return checked("Asset", answer.json())


async def test_an_uploaded_asset_feeds_load_image(served: Served, tmp_path: Path) -> None:
    picture = png_bytes((24, 16), (10, 100, 250))
    asset = await upload(served, picture)
    workflow = model_free()
    workflow["5"]["inputs"]["image"] = asset_ref(asset["id"])
    job = await served.run({"workflow": workflow})
    assert job["status"] == "succeeded", job
    (inverted,) = [o for o in job["outputs"] if o["node_id"] == "7"]
    content = (await served.http.get(inverted["url"])).content
    (tmp_path / "in.png").write_bytes(picture)
    (tmp_path / "out.png").write_bytes(content)
    assert image_pixels(tmp_path / "out.png") != image_pixels(tmp_path / "in.png")
    from PIL import Image

    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (24, 16)
        assert image.convert("RGB").getpixel((0, 0)) == (245, 155, 5)


# --------------------------------------------------------------------------- idempotency


async def test_an_idempotency_key_is_single_use(served: Served) -> None:
    body = {"workflow": model_free()}
    first = await served.submit(body, **{"Idempotency-Key": "k-1"})
    assert first.status_code == 201, first.text
    again = await served.submit(body, **{"Idempotency-Key": "k-1"})
    problem(again, 422, "idempotency_key_reuse")
    listed = (await served.http.get("/api/v2/jobs")).json()["jobs"]
    assert [j["id"] for j in listed] == [first.json()["id"]]
    await served.wait(first.json()["id"])


async def test_concurrent_submits_with_one_key_make_one_job(served: Served) -> None:
    answers: list[httpx.Response] = []

    async def submit() -> None:
        answers.append(await served.submit({"workflow": model_free()}, **{"Idempotency-Key": "k"}))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(submit)
    assert sorted(a.status_code for a in answers) == [201, 422, 422, 422]
    for answer in answers:
        if answer.status_code == 422:
            problem(answer, 422, "idempotency_key_reuse")
        else:
            await served.wait(answer.json()["id"])
    assert len((await served.http.get("/api/v2/jobs")).json()["jobs"]) == 1


async def test_a_refused_submit_leaves_its_key_free(served: Served) -> None:
    workflow = model_free()
    workflow["6"]["class_type"] = "NoSuchNode"
    refused = await served.submit({"workflow": workflow}, **{"Idempotency-Key": "k-2"})
    problem(refused, 422, "invalid_workflow")
    fixed = await served.submit({"workflow": model_free()}, **{"Idempotency-Key": "k-2"})
    assert fixed.status_code == 201, fixed.text
    await served.wait(fixed.json()["id"])


@pytest.mark.parametrize("key", ["", "k" * 256])
async def test_a_bad_idempotency_key_is_a_422(served: Served, key: str) -> None:
    answer = await served.submit({"workflow": model_free()}, **{"Idempotency-Key": key})
    problem(answer, 422, "invalid_request")


# --------------------------------------------------------------------------- queue, cancel


SLOW = 60.0
"""Seconds per image of a fake that keeps a job running until it is cancelled."""


async def test_a_full_queue_is_a_429_and_frees_the_key(tmp_path: Path) -> None:
    async with open_served(tmp_path, fakes=1, seconds_per_image=SLOW, max_queued=1) as served:
        first = await served.submit({"workflow": model_free()})
        assert first.status_code == 201, first.text
        second = await served.submit({"workflow": model_free()}, **{"Idempotency-Key": "q"})
        problem(second, 429, "queue_full")
        assert int(second.headers["retry-after"]) > 0
        cancel = await served.http.post(f"/api/v2/jobs/{first.json()['id']}/cancel")
        assert cancel.status_code == 200, cancel.text
        await served.wait(first.json()["id"])
        served.fakes[0].set_seconds_per_image(0.0)
        again = await served.submit({"workflow": model_free()}, **{"Idempotency-Key": "q"})
        assert again.status_code == 201, again.text
        assert (await served.wait(again.json()["id"]))["status"] == "succeeded"


async def test_concurrent_submits_respect_the_queue_bound(tmp_path: Path) -> None:
    async with open_served(tmp_path, fakes=1, seconds_per_image=SLOW, max_queued=1) as served:
        # Each new job's first write waits (at most 2 s) until every submit has got that
        # far, or been refused: the window between the count and the write, made certain.
        store = served.handle.board.store
        put_job = store.put_job
        submits = 4
        arrived: list[str] = []
        all_in = trio.Event()

        async def gated_put_job(record: JobRecord) -> None:
            if record.status == "queued" and record.id not in arrived:
                arrived.append(record.id)
                if len(arrived) + refused() == submits:
                    all_in.set()
                with trio.move_on_after(2):
                    await all_in.wait()
            await put_job(record)

        answers: list[httpx.Response] = []

        def refused() -> int:
            return sum(1 for a in answers if a.status_code == 429)

        async def submit() -> None:
            answers.append(await served.submit({"workflow": model_free()}))
            if len(arrived) + refused() == submits:
                all_in.set()

        store.put_job = gated_put_job  # type: ignore[method-assign,assignment]
        async with trio.open_nursery() as nursery:
            for _ in range(submits):
                nursery.start_soon(submit)
        created = [a for a in answers if a.status_code == 201]
        for answer in created:
            await served.http.post(f"/api/v2/jobs/{answer.json()['id']}/cancel")
        assert len(created) == 1, sorted(a.status_code for a in answers)
        for answer in answers:
            if answer.status_code != 201:
                problem(answer, 429, "queue_full")


async def test_cancel_a_queued_and_a_running_job(tmp_path: Path) -> None:
    async with open_served(tmp_path, fakes=1, seconds_per_image=SLOW) as served:
        jobs = []
        for _ in range(3):
            answer = await served.submit({"workflow": model_free()})
            assert answer.status_code == 201, answer.text
            jobs.append(checked("Job", answer.json()))
        running, pending, queued = jobs
        await served.wait(running["id"], {"running"})
        # The fleet keeps each server's queue fed: the second job's prompt waits on the
        # server (the job is `running` for v2), the third waits in serve, `queued`.
        await served.wait(pending["id"], {"running"})
        behind = await served.job(queued["id"])
        assert (behind["status"], behind["queue_position"]) == ("queued", 1), behind
        assert len(await served.queues()) == 2
        for job in (queued, pending, running):
            answer = await served.http.post(f"/api/v2/jobs/{job['id']}/cancel")
            assert answer.status_code == 200, answer.text
            assert checked("Job", answer.json())["status"] in ("canceling", "canceled")
            done = await served.wait(job["id"])
            assert done["status"] == "canceled", done
            assert done["completed_at"] is not None
            again = await served.http.post(f"/api/v2/jobs/{job['id']}/cancel")
            assert again.status_code == 200
            assert checked("Job", again.json()) == done
        assert (await served.job(queued["id"]))["comfytrio"]["shards"] == []
        with trio.fail_after(10):
            while await served.queues():  # noqa: ASYNC110 (the fakes' queues, over HTTP)
                await trio.sleep(0.02)
        logs = await served.http.get(f"/api/v2/jobs/{running['id']}/logs")
        assert logs.status_code == 200
        assert logs.headers["content-type"].startswith("text/plain")
        assert "cancel requested" in logs.text


async def test_cancel_of_an_unknown_job_is_a_404(served: Served) -> None:
    problem(await served.http.post("/api/v2/jobs/nope/cancel"), 404, "not_found")
    problem(await served.http.get("/api/v2/jobs/nope"), 404, "not_found")


# --------------------------------------------------------------------------- listing


async def test_list_filter_and_page(served: Served) -> None:
    ids = []
    for n in range(5):
        body = {"workflow": model_free(), "metadata": {"n": str(n), "group": "ab"[n % 2]}}
        ids.append((await served.run(body))["id"])
    newest_first = ids[::-1]
    everything = checked("JobList", (await served.http.get("/api/v2/jobs")).json())
    assert [j["id"] for j in everything["jobs"]] == newest_first
    assert "next_cursor" not in everything or everything["next_cursor"] is None

    async def listed(**query: str) -> list[str]:
        answer = await served.http.get("/api/v2/jobs", params=query)
        assert answer.status_code == 200, answer.text
        return [j["id"] for j in checked("JobList", answer.json())["jobs"]]

    assert await listed(status="succeeded") == newest_first
    assert await listed(status="failed,canceled") == []
    assert await listed(**{"metadata[group]": "a"}) == [ids[4], ids[2], ids[0]]
    assert await listed(**{"metadata[group]": "b", "metadata[n]": "3"}) == [ids[3]]
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        query = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = checked("JobList", (await served.http.get("/api/v2/jobs", params=query)).json())
        pages.append([j["id"] for j in page["jobs"]])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    for bad in ("0", "201", "x", "-1"):
        answer = await served.http.get("/api/v2/jobs", params={"limit": bad})
        problem(answer, 400, "invalid_request")
    problem(
        await served.http.get("/api/v2/jobs", params={"status": "done"}), 400, "invalid_request"
    )


# --------------------------------------------------------------------------- events


async def read_events(served: Served, job_id: str) -> list[tuple[str, Any]]:
    """Every event of the job's SSE stream until the server ends it."""
    events: list[tuple[str, Any]] = []
    with trio.fail_after(30):
        async with served.http.stream("GET", f"/api/v2/jobs/{job_id}/events") as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            name = None
            async for line in answer.aiter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    assert name is not None
                    events.append((name, json.loads(line.removeprefix("data: "))))
                    name = None
    return events


SCHEMA_OF_EVENT = {
    "status": "StatusEvent",
    "progress": "Progress",
    "output": "Output",
    "preview": "PreviewEvent",
    "log": "LogEvent",
}


async def test_events_follow_a_job_to_its_end(tmp_path: Path) -> None:
    async with open_served(tmp_path, seconds_per_image=0.3, progress_interval=0.0) as served:
        answer = await served.submit({"workflow": model_free(), "comfytrio": split_batch(4)})
        job_id = answer.json()["id"]
        events = await read_events(served, job_id)
        job = await served.job(job_id)
        assert job["status"] == "succeeded", job
        for name, data in events:
            checked(SCHEMA_OF_EVENT[name], data)
        assert events[0][0] == "status"
        assert events[0][1]["status"] in ("queued", "running"), events[0]
        assert events[-1] == ("status", {"status": "succeeded", "queue_position": None})
        assert "progress" in [name for name, _ in events]
        outputs = [data for name, data in events if name == "output"]
        assert sorted(o["id"] for o in outputs) == sorted(o["id"] for o in job["outputs"])
        # a finished job: its snapshot, then the end
        after = await read_events(served, job_id)
        assert after[0] == ("status", {"status": "succeeded", "queue_position": None})
        assert [name for name, _ in after] in (["status"], ["status", "progress"])
        problem(await served.http.get("/api/v2/jobs/nope/events"), 404, "not_found")


# --------------------------------------------------------------------------- the rest


async def test_workflow_logs_health_and_openapi(served: Served) -> None:
    workflow = model_free()
    job = await served.run({"workflow": workflow, "comfytrio": split_batch(4)})
    answer = await served.http.get(f"/api/v2/jobs/{job['id']}/workflow")
    assert answer.status_code == 200
    assert checked("JobWorkflowResponse", answer.json()) == {"workflow": workflow, "format": "api"}
    logs = await served.http.get(f"/api/v2/jobs/{job['id']}/logs")
    assert logs.status_code == 204
    assert logs.content == b""
    problem(await served.http.get("/api/v2/jobs/nope/workflow"), 404, "not_found")
    problem(await served.http.get("/api/v2/jobs/nope/logs"), 404, "not_found")
    health = checked("Health", (await served.http.get("/api/v2/health")).json())
    assert health["status"] == "ok"
    assert sorted(s["url"] for s in health["servers"]) == sorted(f.url for f in served.fakes)
    assert {s["state"] for s in health["servers"]} == {"ready"}
    document = await served.http.get("/api/v2/openapi.json")
    assert document.status_code == 200
    assert document.json() == openapi_document()


async def test_a_failed_shard_fails_the_job_and_keeps_the_others_outputs(served: Served) -> None:
    served.fakes[1].fail_node("EmptyImage", message="out of ink")  # a node of every shard
    job = await served.run({"workflow": model_free(), "comfytrio": split_batch(4)})
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "shard_failed"
    assert "out of ink" in job["error"]["message"]
    assert job["comfytrio"]["shard_count"] == 2
    # the shard on the first server ran to its end: its 2 pictures of the batch are kept
    assert len([o for o in job["outputs"] if o["node_id"] == "4"]) == 2
    for output in job["outputs"]:
        assert (await served.http.get(output["url"])).status_code == 200
    logs = await served.http.get(f"/api/v2/jobs/{job['id']}/logs")
    assert logs.status_code == 200
    assert logs.headers["content-type"].startswith("text/plain")
    failed_on = served.fakes[1].url.removeprefix("http://")
    lines = logs.text.splitlines()
    assert any(f"on {failed_on}" in line and "out of ink" in line for line in lines), lines
    assert lines[-1].split(" ", 1)[1].startswith("shard_failed: "), lines


async def test_unknown_routes_and_methods_are_envelopes(served: Served) -> None:
    problem(await served.http.get("/api/v2/nothing"), 404, "not_found")
    problem(await served.http.delete("/api/v2/jobs"), 405, "method_not_allowed")


# --------------------------------------------------------------------------- auth


async def test_a_token_guards_every_route(tmp_path: Path) -> None:
    async with open_served(tmp_path, fakes=1, token="s3cret") as served:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for path in ("/api/v2/health", "/api/v2/jobs", "/api/v2/openapi.json"):
                answer = await served.http.get(path, headers=headers)
                problem(answer, 401, "unauthorized")
                assert answer.headers["www-authenticate"] == "Bearer"
        right = {"Authorization": "Bearer s3cret"}
        assert (await served.http.get("/api/v2/health", headers=right)).status_code == 200
        answer = await served.http.post(
            "/api/v2/jobs", json={"workflow": model_free()}, headers=right
        )
        assert answer.status_code == 201, answer.text
        served.http.headers["Authorization"] = "Bearer s3cret"
        assert (await served.wait(answer.json()["id"]))["status"] == "succeeded"


async def test_listening_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, tmp_path / "fake")
        async with api_on_fakes([fake], tmp_path) as api:
            with pytest.raises(ValueError, match="token"):
                await serve_comfy_api(
                    api, ServeConfig(state_dir=tmp_path / "serve", host="0.0.0.0", port=0)
                )
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "serve").exists()


# --------------------------------------------------------------------------- expiry


async def test_a_job_past_its_retention_expires_with_its_outputs(tmp_path: Path) -> None:
    # ServeConfig has no sweep interval (the board sweeps every 60 s), so the app is built
    # here from its parts, with a sweeper that looks every 10 ms and a clock of our own.
    now = [time.time()]
    readings = [0]

    def clock() -> float:
        readings[0] += 1  # with no job running, only the sweeper reads it: once a sweep
        return now[0]

    config = ServeConfig(state_dir=tmp_path / "serve", port=0, retention=3600.0)
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, tmp_path / "fake")
        async with (
            api_on_fakes([fake], tmp_path) as api,
            open_store(tmp_path / "serve.sqlite3") as store,
        ):
            assets = AssetStore(store, tmp_path / "assets", max_bytes=1024**2)
            board = JobBoard(api, store, assets, retention=3600.0, sweep_interval=0.01, clock=clock)
            await nursery.start(board.run)
            hconfig = Config()
            hconfig.bind = ["127.0.0.1:0"]
            hconfig.accesslog = None
            hconfig.errorlog = logging.getLogger("tests.serve.hypercorn")
            app = build_serve_app(board, config)
            binds = await nursery.start(serve, app, hconfig)
            async with httpx.AsyncClient(base_url=binds[0]) as http:
                served = Served(ServeHandle(binds[0], board, app), [fake], http)
                job = await served.run({"workflow": model_free()})
                assert job["status"] == "succeeded"
                assert job["expires_at"] == rfc3339(now[0] + 3600.0)
                (output, *_) = job["outputs"]
                assert (await http.get(output["url"])).status_code == 200
                now[0] += 3599.0
                seen = readings[0]
                await until(lambda: readings[0] >= seen + 2)  # a whole sweep at that time
                assert (await served.job(job["id"]))["status"] == "succeeded"
                now[0] += 2.0
                expired = await served.wait(job["id"], {"expired"})
                assert expired["outputs"] == []
                problem(await http.get(output["url"]), 404, "not_found")
                problem(await http.get(f"/api/v2/assets/{output['id']}"), 404, "not_found")
                problem(await http.get(f"/api/v2/jobs/{job['id']}/workflow"), 404, "not_found")
                listed = (await http.get("/api/v2/jobs", params={"status": "expired"})).json()
                assert [j["id"] for j in listed["jobs"]] == [job["id"]]
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- webhooks


@attrs.define(eq=False)
class Receiver:
    """A webhook receiver (Hypercorn on 127.0.0.1): keeps every request, answers 204."""

    url: str = ""
    received: list[tuple[str, bytes, dict[str, str]]] = attrs.field(factory=list)

    async def handle(self, request: Request) -> Response:
        self.received.append((request.url.path, await request.body(), dict(request.headers)))
        return Response(status_code=204)

    async def wait(self, count: int) -> list[tuple[str, bytes, dict[str, str]]]:
        await until(lambda: len(self.received) >= count, timeout=30)
        return self.received


@asynccontextmanager
async def open_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/{name}", receiver.handle, methods=["POST"])])
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tests.serve.receiver")
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, config)
        receiver.url = binds[0]
        yield receiver
        nursery.cancel_scope.cancel()


async def test_a_terminal_status_is_posted_signed(tmp_path: Path) -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    async with (
        open_receiver() as receiver,
        open_served(
            tmp_path, webhook_url=f"{receiver.url}/default", webhook_secret=secret
        ) as served,
    ):
        job = await served.run({"workflow": model_free()})
        ((path, body, headers),) = await receiver.wait(1)
        assert path == "/default"
        message = Webhook(secret).verify(body, headers)
        assert message["type"] == "job.succeeded"
        assert checked("Job", message["data"])["id"] == job["id"]
        assert message["data"]["status"] == "succeeded"
        assert [o["id"] for o in message["data"]["outputs"]] == [o["id"] for o in job["outputs"]]
        mine = await served.run({"workflow": model_free(), "webhook_url": f"{receiver.url}/mine"})
        _, (path, body, headers) = await receiver.wait(2)
        assert path == "/mine"
        assert Webhook(secret).verify(body, headers)["data"]["id"] == mine["id"]
