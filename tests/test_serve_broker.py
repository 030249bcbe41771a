"""``serve --broker``: the Comfy API v2 over jobs on Redis Streams, answered by any front end.

A real ``redis-server``, one ``run_worker`` over two fake ComfyUIs putting outputs into a
shared folder, and two ``serve_broker_api`` front ends that share nothing but Redis and the
folder: a job submitted to one is seen, followed, downloaded and cancelled through the other.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from comfytrio_std import FolderStore
from conftest import RedisUrl, api_on_fakes, empty_to_save, model_free, png_bytes, split_batch
from PIL import Image

from comfytrio import make_plugin_manager
from comfytrio.broker import run_worker
from comfytrio.serve import ServeConfig, serve_broker_api
from comfytrio.serve._openapi import validate_body
from comfytrio.testing import FakeComfyUI


@attrs.frozen
class Fleet:
    """Two front ends over one broker, and the fakes its worker drives."""

    front: httpx.AsyncClient
    other: httpx.AsyncClient
    fakes: list[FakeComfyUI]

    async def wait(self, job_id: str, *, via: httpx.AsyncClient | None = None) -> dict[str, Any]:
        """Poll until the job is terminal; the job."""
        client = via or self.front
        with trio.fail_after(30):
            while True:
                job: dict[str, Any] = (await client.get(f"/api/v2/jobs/{job_id}")).json()
                if job["status"] in ("succeeded", "failed", "canceled"):
                    validate_body("Job", job)
                    return job
                await trio.sleep(0.05)


@asynccontextmanager
async def open_fleet(
    tmp_path: Path, redis_url: RedisUrl, fake_comfyui_factory: Any, seconds_per_image: float = 0.0
) -> AsyncIterator[Fleet]:
    fakes = [await fake_comfyui_factory(seconds_per_image=seconds_per_image) for _ in range(2)]
    for fake in fakes:  # model_free.json loads example.png
        (Path(fake.root) / "input" / "example.png").write_bytes(png_bytes((8, 8), (1, 2, 3)))
    store = FolderStore(tmp_path / "shared")
    plugins = make_plugin_manager()
    async with api_on_fakes(fakes, tmp_path) as api, trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_worker(
                api, redis_url, store=store, name="box-1", lease=5.0, task_status=task_status
            )
        )
        handles = []
        for name in ("front-a", "front-b"):
            config = ServeConfig(state_dir=tmp_path / name, port=0)
            handles.append(
                await nursery.start(
                    lambda task_status, config=config: serve_broker_api(
                        redis_url, store, config, plugins=plugins, task_status=task_status
                    )
                )
            )
        async with (
            httpx.AsyncClient(base_url=handles[0].url) as front,
            httpx.AsyncClient(base_url=handles[1].url) as other,
        ):
            yield Fleet(front, other, fakes)
        nursery.cancel_scope.cancel()


async def test_a_job_submitted_to_one_front_end_is_served_by_another(
    tmp_path: Path, redis_url: RedisUrl, fake_comfyui_factory: Any
) -> None:
    async with open_fleet(tmp_path, redis_url, fake_comfyui_factory) as fleet:
        answer = await fleet.front.post(
            "/api/v2/jobs",
            json={"workflow": model_free(), "comfytrio": split_batch(4), "metadata": {"c": "acme"}},
            headers={"Idempotency-Key": "k-1"},
        )
        assert answer.status_code == 201, answer.text
        validate_body("Job", answer.json())
        job_id = answer.json()["id"]
        job = await fleet.wait(job_id, via=fleet.other)
        assert job["status"] == "succeeded", job["error"]
        batch = [o for o in job["outputs"] if o["node_id"] == "4"]
        assert len(batch) == 4
        assert len({o["id"] for o in job["outputs"]}) == len(job["outputs"])
        for output in job["outputs"]:  # each front end serves each output
            for client in (fleet.front, fleet.other):
                content = await client.get(f"/api/v2/assets/{output['id']}/content")
                assert content.status_code == 200
                assert content.content.startswith(b"\x89PNG")
                assert len(content.content) == output["size_bytes"]
        ranged = await fleet.other.get(
            f"/api/v2/assets/{batch[0]['id']}/content", headers={"Range": "bytes=1-3"}
        )
        assert ranged.status_code == 206
        assert ranged.content == b"PNG"
        again = await fleet.other.post(
            "/api/v2/jobs", json={"workflow": model_free()}, headers={"Idempotency-Key": "k-1"}
        )
        assert again.status_code == 422
        assert again.json()["error"]["code"] == "idempotency_key_reuse"
        listed = (await fleet.other.get("/api/v2/jobs", params={"metadata[c]": "acme"})).json()
        assert [j["id"] for j in listed["jobs"]] == [job_id]
        workflow = (await fleet.other.get(f"/api/v2/jobs/{job_id}/workflow")).json()
        assert workflow == {"workflow": model_free(), "format": "api"}
        hooked = await fleet.other.post(
            "/api/v2/jobs", json={"workflow": model_free(), "webhook_url": "http://x.example/h"}
        )
        assert hooked.status_code == 422
        assert hooked.json()["error"]["details"] == {"field": "webhook_url"}
        health = (await fleet.other.get("/api/v2/health")).json()
        assert health["status"] == "ok"
        assert [s["name"] for s in health["servers"]] == ["box-1"]


async def test_an_uploaded_picture_reaches_the_worker_through_the_shared_store(
    tmp_path: Path, redis_url: RedisUrl, fake_comfyui_factory: Any
) -> None:
    async with open_fleet(tmp_path, redis_url, fake_comfyui_factory) as fleet:
        picture = png_bytes((8, 8), (10, 200, 30))
        upload = await fleet.front.post(
            "/api/v2/assets",
            files={"file": ("photo.png", picture, "image/png")},
            data={"content_type": "image/png", "file_path": "photo.png"},
        )
        assert upload.status_code == 201, upload.text
        workflow = model_free()
        workflow["5"]["inputs"]["image"] = {
            "__type": "core/ASSET",
            "info": {"id": upload.json()["id"]},
        }
        answer = await fleet.front.post("/api/v2/jobs", json={"workflow": workflow})
        assert answer.status_code == 201, answer.text
        job = await fleet.wait(answer.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        (inverted,) = [o for o in job["outputs"] if o["node_id"] == "7"]
        content = await fleet.other.get(f"/api/v2/assets/{inverted['id']}/content")
        pixels = Image.open(io.BytesIO(content.content)).convert("RGB")
        assert pixels.getpixel((0, 0)) == (245, 55, 225)


async def test_events_and_cancel_through_the_broker(
    tmp_path: Path, redis_url: RedisUrl, fake_comfyui_factory: Any
) -> None:
    async with open_fleet(
        tmp_path, redis_url, fake_comfyui_factory, seconds_per_image=0.2
    ) as fleet:
        quick = (await fleet.front.post("/api/v2/jobs", json={"workflow": empty_to_save(2)})).json()
        events: list[tuple[str, dict[str, Any]]] = []
        async with fleet.other.stream("GET", f"/api/v2/jobs/{quick['id']}/events") as stream:
            name = ""
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    name = line[len("event: ") :]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[len("data: ") :])))
        assert events[0][0] == "status"
        assert events[-1] == ("status", {"status": "succeeded"})
        outputs = [data["id"] for kind, data in events if kind == "output"]
        done = await fleet.wait(quick["id"])
        assert sorted(outputs) == sorted(o["id"] for o in done["outputs"])
        assert len(outputs) == 2

        slow = (
            await fleet.front.post("/api/v2/jobs", json={"workflow": empty_to_save(200)})
        ).json()
        with trio.fail_after(30):
            while True:  # polled: the state lives in Redis
                status = (await fleet.other.get(f"/api/v2/jobs/{slow['id']}")).json()["status"]
                if status == "running":
                    break
                await trio.sleep(0.05)
        cancel = await fleet.other.post(f"/api/v2/jobs/{slow['id']}/cancel")
        assert cancel.status_code == 200
        assert cancel.json()["status"] in ("canceling", "canceled")
        assert (await fleet.wait(slow["id"]))["status"] == "canceled"
        async with httpx.AsyncClient() as http:
            for fake in fleet.fakes:  # nothing of it is left running
                queue = (await http.get(f"{fake.url}/queue")).json()
                assert queue == {"queue_running": [], "queue_pending": []}
