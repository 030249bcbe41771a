"""The later-version profile of the fake (``comfyui_version="0.38.1"``) against what ComfyUI's
merged code says (``server.py``, ``comfy_execution/jobs.py``; section 7 of the protocol
notes): the jobs API, cancel, the canonical-UUID ``prompt_id``, ``create_time``, API keys out
of ``/queue``, ``activity`` in ``progress_state``; and 0.3.64 left as it was."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from conftest import Comfy, sampler_workflow, until

from comfytrio.testing import COMFYUI_VERSIONS, FakeComfyUI

Factory = Callable[..., Awaitable[FakeComfyUI]]
LATER = "0.38.1"

JOB_KEYS = {
    "id",
    "status",
    "priority",
    "create_time",
    "execution_start_time",
    "execution_end_time",
    "outputs_count",
    "previewable_outputs_count",
    "preview_output",
}


@pytest.fixture
async def later(fake_comfyui_factory: Factory, comfy_for: Callable[[FakeComfyUI], Comfy]) -> Comfy:
    return comfy_for(await fake_comfyui_factory(comfyui_version=LATER))


def image_prompt(color: int = 0, *, slow: bool = False) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {
            "class_type": "ImageInvert" if slow else "ImageFlip",
            "inputs": {
                "image": ["1", 0],
                **({} if slow else {"flip_method": "x-axis: vertically"}),
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "j"}},
    }


async def submit(comfy: Comfy, prompt: dict[str, Any], **extra: Any) -> str:
    response = await comfy.submit(prompt, **extra)
    assert response.status_code == 200, response.text
    prompt_id: str = response.json()["prompt_id"]
    return prompt_id


def test_versions() -> None:
    assert COMFYUI_VERSIONS == ("0.3.64", LATER)


async def test_the_default_profile_has_no_jobs_api(comfy: Comfy) -> None:
    assert comfy.fake.comfyui_version == "0.3.64"
    for method, path in (
        ("GET", "/api/jobs"),
        ("GET", "/api/jobs/x"),
        ("POST", "/api/jobs/x/cancel"),
        ("POST", "/api/jobs/cancel"),
    ):
        assert (await comfy.http.request(method, path)).status_code == 404
    # Any prompt_id goes, and the API keys show in /queue until the prompt ran.
    comfy.fake.set_node_seconds("ImageInvert", 1000)
    await submit(comfy, image_prompt(slow=True), prompt_id="mine")
    secret = {"api_key_comfy_org": "k"}
    await submit(comfy, image_prompt(1), prompt_id="second", extra_data=dict(secret))
    pending = (await comfy.http.get("/queue")).json()["queue_pending"]
    assert pending[0][3] == {**secret, "client_id": "test-client"}
    await comfy.http.post("/interrupt")
    await comfy.http.post("/queue", json={"clear": True})


async def test_system_stats_and_unknown_versions(
    later: Comfy, fake_comfyui_factory: Factory
) -> None:
    stats = (await later.http.get("/system_stats")).json()["system"]
    assert stats["comfyui_version"] == LATER
    assert later.fake.comfyui_version == LATER
    with pytest.raises(ValueError, match=r"0\.3\.64, 0\.38\.1"):
        await fake_comfyui_factory(comfyui_version="0.99.0")


async def test_a_client_chosen_prompt_id_must_be_a_canonical_uuid(later: Comfy) -> None:
    expected = {
        "error": {
            "type": "invalid_prompt_id",
            "message": "prompt_id must be a valid UUID",
            "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
            "omit it to let the server generate one",
            "extra_info": {},
        },
        "node_errors": {},
    }
    chosen = str(uuid.uuid4())
    for bad in ("mine", chosen.upper(), chosen.replace("-", ""), 12):
        response = await later.submit(image_prompt(), prompt_id=bad)
        assert response.status_code == 400
        assert response.json() == expected
    good = await later.submit(image_prompt(), prompt_id=chosen)
    assert good.json() == {"prompt_id": chosen, "number": 4, "node_errors": {}}  # 4 rejected
    minted = await later.submit(image_prompt(1), prompt_id=None)
    assert uuid.UUID(minted.json()["prompt_id"])


async def test_queue_items_keep_api_keys_apart_and_carry_create_time(later: Comfy) -> None:
    later.fake.set_node_seconds("ImageInvert", 1000)
    running = await submit(later, image_prompt(slow=True))
    secret = {"api_key_comfy_org": "k", "auth_token_comfy_org": "t", "mine": 1}
    pending = await submit(later, image_prompt(1), extra_data=dict(secret))
    await until(lambda: later.fake.running_id == running)
    queue = (await later.http.get("/queue")).json()
    item = queue["queue_pending"][0]
    assert len(item) == 5  # the keys are the server's 6th element, never served
    assert item[1] == pending
    assert set(item[3]) == {"mine", "client_id", "create_time"}
    assert isinstance(item[3]["create_time"], int)
    job = (await later.http.get(f"/api/jobs/{pending}")).json()
    assert job["workflow"]["extra_data"] == item[3]
    await later.http.post("/api/jobs/cancel", json={"job_ids": [running, pending]})


async def test_jobs_in_every_state(later: Comfy) -> None:
    listener = await later.listen()
    done = await submit(later, image_prompt(1))
    await listener.wait_done(done)
    await trio.sleep(0.005)  # create_time is in ms: one job per ms keeps the order known
    later.fake.fail_node("ImageFlip")
    failed = await submit(later, image_prompt(2))
    await listener.wait_done(failed)
    await trio.sleep(0.005)
    later.fake.set_node_seconds("ImageInvert", 1000)
    running = await submit(later, image_prompt(3, slow=True))
    await trio.sleep(0.005)
    pending = await submit(later, image_prompt(4))
    await until(lambda: later.fake.running_id == running)

    jobs = (await later.http.get("/api/jobs")).json()
    assert jobs["pagination"] == {"offset": 0, "limit": None, "total": 4, "has_more": False}
    by_id = {job["id"]: job for job in jobs["jobs"]}
    assert [job["id"] for job in jobs["jobs"]] == [pending, running, failed, done]  # newest first
    assert by_id[pending]["status"] == "pending"
    assert by_id[running]["status"] == "in_progress"
    assert set(by_id[pending]) == {
        "id",
        "status",
        "priority",
        "create_time",
        "outputs_count",
        "previewable_outputs_count",
    }
    assert by_id[failed]["status"] == "failed"
    assert by_id[failed]["execution_error"]["node_type"] == "ImageFlip"
    assert by_id[done]["status"] == "completed"
    assert set(by_id[done]) == JOB_KEYS
    assert by_id[done]["outputs_count"] == 1
    assert by_id[done]["preview_output"] == {
        "filename": "j_00001_.png",
        "subfolder": "",
        "type": "output",
        "nodeId": "3",
        "mediaType": "images",
    }
    assert by_id[done]["priority"] == 0

    one = (await later.http.get(f"/api/jobs/{done}")).json()
    assert set(one) == JOB_KEYS | {"outputs", "execution_status", "workflow"}
    assert one["outputs"] == {
        "3": {"images": [{"filename": "j_00001_.png", "subfolder": "", "type": "output"}]}
    }
    assert one["execution_status"]["status_str"] == "success"
    assert one["workflow"]["prompt"]["3"]["class_type"] == "SaveImage"
    queued = (await later.http.get(f"/api/jobs/{running}")).json()
    assert queued["status"] == "in_progress"
    assert "workflow" in queued
    missing = await later.http.get(f"/api/jobs/{uuid.uuid4()}")
    assert (missing.status_code, missing.json()) == (404, {"error": "Job not found"})

    finished = (await later.http.get("/api/jobs?status=completed,FAILED&sort_order=asc")).json()
    assert [job["id"] for job in finished["jobs"]] == [done, failed]
    page = (await later.http.get("/api/jobs?limit=1&offset=1")).json()
    assert [job["id"] for job in page["jobs"]] == [running]
    assert page["pagination"] == {"offset": 1, "limit": 1, "total": 4, "has_more": True}
    by_duration = (await later.http.get("/api/jobs?sort_by=execution_duration")).json()
    assert len(by_duration["jobs"]) == 4
    await later.http.post("/api/jobs/cancel", json={"job_ids": [running, pending]})


@pytest.mark.parametrize(
    ("query", "error"),
    [
        (
            "status=done",
            "Invalid status value(s): done. Valid values: "
            "pending, in_progress, completed, failed, cancelled",
        ),
        ("sort_by=name", "sort_by must be 'created_at' or 'execution_duration'"),
        ("sort_order=up", "sort_order must be 'asc' or 'desc'"),
        ("limit=0", "limit must be a positive integer"),
        ("limit=x", "limit must be an integer"),
        ("offset=x", "offset must be an integer"),
    ],
)
async def test_jobs_list_rejects_bad_queries(later: Comfy, query: str, error: str) -> None:
    response = await later.http.get(f"/api/jobs?{query}")
    assert (response.status_code, response.json()) == (400, {"error": error})


async def test_cancel_stops_a_running_prompt_and_drops_a_pending_one(later: Comfy) -> None:
    listener = await later.listen()
    later.fake.set_node_seconds("ImageInvert", 1000)
    running = await submit(later, image_prompt(slow=True))
    pending = await submit(later, image_prompt(1, slow=True))
    await until(lambda: later.fake.running_id == running)

    answer = await later.http.post(f"/api/jobs/{pending}/cancel")
    assert (answer.status_code, answer.json()) == (200, {"cancelled": True})
    assert later.fake.queue_ids() == []
    assert (await later.http.get(f"/api/jobs/{pending}")).status_code == 404  # vanished

    answer = await later.http.post(f"/api/jobs/{running}/cancel")
    assert answer.json() == {"cancelled": True}
    await listener.wait_done(running)
    job = (await later.http.get(f"/api/jobs/{running}")).json()
    assert job["status"] == "cancelled"
    assert job["execution_status"]["messages"][-1][0] == "execution_interrupted"
    # Finished or unknown: 200, nothing cancelled.
    for job_id in (running, str(uuid.uuid4()), "not-a-uuid"):
        answer = await later.http.post(f"/api/jobs/{job_id}/cancel")
        assert (answer.status_code, answer.json()) == (200, {"cancelled": False})
    assert (await later.http.post(f"/api/api/jobs/{running}/cancel")).status_code == 200


async def test_cancel_many(later: Comfy) -> None:
    listener = await later.listen()
    later.fake.set_node_seconds("ImageInvert", 1000)
    running = await submit(later, image_prompt(slow=True))
    pending = await submit(later, image_prompt(1, slow=True))
    await until(lambda: later.fake.running_id == running)
    unknown = str(uuid.uuid4())

    for body, error in (
        ("not json", {"error": "Request body must be valid JSON"}),
        ({"job_ids": running}, {"error": "job_ids must be a list"}),
        (
            {"job_ids": [running, "nope", 7]},
            {"error": "job_ids contains invalid id(s)", "invalid_ids": ["nope", "7"]},
        ),
    ):
        kwargs: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
        answer = await later.http.post("/api/jobs/cancel", **kwargs)
        assert (answer.status_code, answer.json()) == (400, error)
    assert later.fake.running_id == running  # nothing cancelled by a rejected batch
    assert later.fake.queue_ids() == [pending]

    answer = await later.http.post("/api/jobs/cancel", json={"job_ids": [unknown]})
    assert answer.json() == {"cancelled": False}
    answer = await later.http.post(
        "/api/jobs/cancel", json={"job_ids": [pending, unknown, running]}
    )
    assert answer.json() == {"cancelled": True}
    await listener.wait_done(running)
    assert later.fake.queue_ids() == []


async def test_progress_state_reports_activity_only_on_the_later_profile(
    comfy: Comfy, later: Comfy
) -> None:
    prompt = {
        **sampler_workflow(width=16, height=16, steps=2, image_output=None),
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }
    seen: dict[str, list[Any]] = {}
    for client in (comfy, later):
        client.fake.add_model("checkpoints", "m.safetensors")
        listener = await client.listen()
        _, messages, _ = await client.run(prompt, listener)
        seen[client.fake.comfyui_version] = [
            m["data"]["nodes"]["4"].get("activity")
            for m in messages
            if isinstance(m, dict) and m["type"] == "progress_state" and "4" in m["data"]["nodes"]
        ]
    assert set(seen["0.3.64"]) == {None}
    assert seen[LATER][:3] == [None, "loading", None]  # started, loading, loaded
    assert "activity" not in str(seen[LATER][3:])


async def test_a_text_only_job_counts_no_outputs(later: Comfy) -> None:
    listener = await later.listen()
    prompt = {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "hi"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    prompt_id, _, entry = await later.run(prompt, listener)
    assert entry["outputs"] == {"2": {"text": ["hi"]}}
    job = (await later.http.get(f"/api/jobs/{prompt_id}")).json()
    # PreviewAny's text is a tuple in ComfyUI's history: jobs.py counts lists only.
    assert (job["outputs_count"], job["previewable_outputs_count"]) == (0, 0)
    assert "preview_output" not in job
    assert job["outputs"] == {"2": {"text": ["hi"]}}


@pytest.mark.comfy_api(fakes=1, comfyui_version=LATER)
async def test_the_comfy_api_marker_picks_the_version(comfy_fakes: list[FakeComfyUI]) -> None:
    assert [fake.comfyui_version for fake in comfy_fakes] == [LATER]
