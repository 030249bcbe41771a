"""The OpenAPI document of ``comfytrio serve``: the official Comfy API v2, vendored unedited,
plus additions only; and ``validate_body``, which the serve tests check bodies with."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR
from starlette.applications import Starlette

import comfytrio.serve
from comfytrio.serve._openapi import (
    OPENAPI_PATH,
    official_document,
    openapi_document,
    openapi_json_route,
    to_json_schema,
    validate_body,
)

VENDORED = Path(comfytrio.serve.__file__).parent / "openapi"

OFFICIAL_OPERATIONS = {
    "postAssets",
    "assetFromHash",
    "headAssetByHash",
    "getAsset",
    "deleteAsset",
    "getAssetContent",
    "postJobs",
    "getJob",
    "getJobWorkflow",
    "getJobEvents",
    "cancelJob",
}
ADDED_OPERATIONS = {"listJobs", "getJobLogs", "getHealth", "getOpenApi"}


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def additions(official: Any, ours: Any, at: str = "") -> Iterator[str]:
    """JSON pointers of what ``ours`` adds to ``official``; fails on anything changed or
    removed."""
    if isinstance(official, dict) and isinstance(ours, dict):
        missing = set(official) - set(ours)
        assert not missing, f"{at or '/'}: official keys removed: {sorted(missing)}"
        for key, value in ours.items():
            where = f"{at}/{_escape(key)}"
            if key in official:
                yield from additions(official[key], value, where)
            else:
                yield where
    else:
        # a list or a scalar: exactly upstream's (an addition inside a list is a change)
        assert json.dumps(ours) == json.dumps(official), f"{at}: official value changed"


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------- vendored


def test_the_vendored_document_is_shipped_with_its_license() -> None:
    doc = json.loads((VENDORED / "comfy-api-v2.json").read_text(encoding="utf-8"))
    assert doc == official_document()
    assert doc["openapi"] == "3.0.3"
    assert doc["info"]["title"] == "Comfy API v2"
    license_text = (VENDORED / "LICENSE").read_text()
    assert "MIT License" in license_text
    assert "Copyright (c) 2026 Comfy Org" in license_text
    readme = (VENDORED / "README.md").read_text()
    assert "Comfy-Org/comfy-python-sdk" in readme
    assert "2c1bded79aacfcc4ad3cf25e7ff77db2e65af87c" in readme
    assert "not edited" in readme


def test_additions_only_every_official_definition_is_kept() -> None:
    official, ours = official_document(), openapi_document()
    added = sorted(additions(official, ours))
    assert added == sorted(ours["info"]["x-comfytrio"]["additions"])
    assert ours["info"]["title"] == official["info"]["title"]
    assert ours["info"]["description"] == official["info"]["description"]
    # Every addition taken away again, what is left is the official document, byte for byte.
    stripped = copy.deepcopy(ours)
    for pointer in sorted(ours["info"]["x-comfytrio"]["additions"], key=len, reverse=True):
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]
        node = stripped
        for part in parents:
            node = node[part]
        del node[last]
    assert canonical(stripped) == canonical(official)
    # What the two extended objects gained, and nothing else of theirs.
    job = ours["components"]["schemas"]["Job"]
    assert job["x-comfytrio-additions"] == ["metadata", "comfytrio"]
    body = ours["paths"]["/api/v2/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["x-comfytrio-additions"] == ["metadata", "webhook_url", "comfytrio"]
    assert body["schema"]["required"] == ["workflow"]
    assert "webhook_url" in official["paths"]["/api/v2/jobs"]["post"]["description"]
    assert "accepts" in body["schema"]["properties"]["webhook_url"]["description"]


def test_copies_are_fresh() -> None:
    doc = openapi_document()
    doc["paths"].clear()
    official = official_document()
    official["paths"].clear()
    assert openapi_document()["paths"]
    assert official_document()["paths"]


def test_the_document_is_valid_openapi_3_0() -> None:
    OPENAPI_30_VALIDATOR.validate(official_document())
    OPENAPI_30_VALIDATOR.validate(openapi_document())


def test_schemathesis_loads_every_operation() -> None:
    schema = schemathesis.openapi.from_dict(openapi_document())
    ids = set()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        ids.add(operation.definition.raw["operationId"])
    assert ids == OFFICIAL_OPERATIONS | ADDED_OPERATIONS


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/api/v2/jobs", "GET"),
        ("/api/v2/jobs", "POST"),
        ("/api/v2/jobs/{id}/logs", "GET"),
        ("/api/v2/health", "GET"),
        (OPENAPI_PATH, "GET"),
    ],
)
def test_schemathesis_makes_requests_for_the_additions(path: str, method: str) -> None:
    operation = schemathesis.openapi.from_dict(openapi_document())[path][method]
    cases: list[Any] = []

    @given(operation.as_strategy())
    @settings(
        max_examples=10,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def draw(case: Any) -> None:
        cases.append(case)

    draw()
    assert cases
    if (path, method) == ("/api/v2/jobs", "GET"):
        for case in cases:
            for status in (case.query or {}).get("status", "").split(","):
                assert status in (
                    "",
                    *openapi_document()["components"]["schemas"]["JobStatus"]["enum"],
                )
            assert 1 <= int((case.query or {}).get("limit", 50)) <= 200


async def test_the_route_serves_the_document() -> None:
    app = Starlette(routes=[openapi_json_route()])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get(OPENAPI_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == openapi_document()


# --------------------------------------------------------------------------- validate_body

NOW = "2026-11-28T09:50:00.123456Z"


def a_job(**changes: Any) -> dict[str, Any]:
    link = "/api/v2/jobs/7f3d2c1b-9a8e-4d6f-b012-3c4d5e6f7a8b"
    job: dict[str, Any] = {
        "id": "7f3d2c1b-9a8e-4d6f-b012-3c4d5e6f7a8b",
        "status": "queued",
        "created_at": NOW,
        "started_at": None,
        "completed_at": None,
        "expires_at": "2026-11-29T09:50:00Z",
        "queue_position": 0,
        "progress": None,
        "outputs": [],
        "error": None,
        "metrics": {"queue_ms": None, "execution_ms": None},
        "urls": {"self": link, "events": f"{link}/events", "cancel": f"{link}/cancel"},
    }
    job.update(changes)
    return job


AN_OUTPUT = {
    "node_id": "9",
    "name": "ComfyUI_00001_.png",
    "type": "image",
    "content_type": "image/png",
    "size_bytes": 1848320,
    "id": "9f8a1c0d-2b3e-4f56-8a7b-1c2d3e4f5a6b",
    "hash": None,
    "url": "http://127.0.0.1:8189/api/v2/assets/9f8a1c0d-2b3e-4f56-8a7b-1c2d3e4f5a6b/content",
    "url_expires_at": "9999-12-31T23:59:59Z",
    "job_id": "7f3d2c1b-9a8e-4d6f-b012-3c4d5e6f7a8b",
}

GOOD_JOBS = [
    a_job(),
    a_job(
        status="running",
        started_at=NOW,
        queue_position=None,
        progress={
            "value": 0.42,
            "nodes_done": 11,
            "nodes_total": 31,
            "current_node": None,
            "current_node_class": None,
            "step": None,
            "steps": None,
            "message": None,
        },
    ),
    a_job(
        status="succeeded",
        started_at=NOW,
        completed_at=NOW,
        queue_position=None,
        outputs=[AN_OUTPUT],
        metrics={"queue_ms": 9000, "execution_ms": 42000},
        metadata={"project": "cats"},
        comfytrio={
            "shards": [{"index": 0, "attempt": 1, "instance": "gpu0", "prompt_id": "p-1"}],
            "shard_count": 1,
            "split": "single",
            "seed": 2**64 - 1,
        },
    ),
    a_job(
        status="failed",
        error={
            "code": "node_execution_error",
            "message": "boom",
            "node_id": None,
            "class_type": None,
            "traceback": None,
        },
        comfytrio={"shards": [], "shard_count": None, "split": None, "seed": None},
    ),
]


@pytest.mark.parametrize("job", GOOD_JOBS)
def test_good_jobs_pass(job: dict[str, Any]) -> None:
    validate_body("Job", job)


def without(job: dict[str, Any], key: str) -> dict[str, Any]:
    job = copy.deepcopy(job)
    del job[key]
    return job


@pytest.mark.parametrize(
    ("job", "named"),
    [
        (a_job(status="done"), "/status"),
        (a_job(created_at="yesterday"), "/created_at"),
        (a_job(completed_at="2026-11-28 09:50"), "/completed_at"),
        (a_job(progress={"value": 2, "nodes_done": 1, "nodes_total": 1}), "/progress"),
        (a_job(progress={"value": 0.5}), "/progress"),
        (a_job(error={"message": "no code"}), "/error"),
        (a_job(queue_position="first"), "/queue_position"),
        (a_job(outputs=[{**AN_OUTPUT, "url": "no uri"}]), "/outputs/0/url"),
        (a_job(outputs=[{**AN_OUTPUT, "type": "mesh"}]), "/outputs/0/type"),
        (a_job(metrics={"queue_ms": 1.5}), "/metrics/queue_ms"),
        (a_job(metadata={"n": 1}), "/metadata/n"),
        (a_job(comfytrio={"seed": -1}), "/comfytrio/seed"),
        (a_job(comfytrio={"shards": [{"index": 0}]}), "/comfytrio/shards/0"),
        (without(a_job(), "urls"), '/: "urls" is a required'),
    ],
)
def test_bad_jobs_fail_naming_the_field(job: dict[str, Any], named: str) -> None:
    with pytest.raises(AssertionError, match=f"^Job at {named}"):
        validate_body("Job", job)


def test_assets_errors_and_the_other_additions() -> None:
    asset = {
        "id": "9f8a1c0d-2b3e-4f56-8a7b-1c2d3e4f5a6b",
        "hash": None,
        "size_bytes": 4,
        "content_type": "image/png",
        "file_path": None,
        "created_new": True,
        "created_at": NOW,
        "url": "http://127.0.0.1:8189/api/v2/assets/9f8a1c0d/content",
        "url_expires_at": NOW,
        "expires_at": None,
        "job_id": None,
    }
    validate_body("Asset", asset)
    validate_body("Asset", {**asset, "hash": "blake3:" + "0" * 64, "expires_at": NOW})
    with pytest.raises(AssertionError, match=r"^Asset at /size_bytes"):
        validate_body("Asset", {**asset, "size_bytes": "4"})
    with pytest.raises(AssertionError, match=r"^Asset at /url_expires_at"):
        validate_body("Asset", {**asset, "url_expires_at": None})

    validate_body(
        "ErrorEnvelope", {"error": {"code": "not_found", "message": "x", "details": None}}
    )
    validate_body("ErrorEnvelope", {"error": {"code": "x", "message": "y", "details": {"a": [1]}}})
    with pytest.raises(AssertionError, match=r"^ErrorEnvelope at /error"):
        validate_body("ErrorEnvelope", {"error": {"code": "not_found"}})
    with pytest.raises(AssertionError, match=r"^ErrorEnvelope at /error/details"):
        validate_body("ErrorEnvelope", {"error": {"code": "x", "message": "y", "details": []}})

    validate_body("JobList", {"jobs": GOOD_JOBS, "next_cursor": "abc"})
    validate_body("JobList", {"jobs": []})
    with pytest.raises(AssertionError, match=r"^JobList at /jobs/0/status"):
        validate_body("JobList", {"jobs": [a_job(status="nope")]})

    health = {
        "status": "degraded",
        "version": "0.1.0",
        "servers": [{"name": "gpu0", "url": "http://127.0.0.1:8188", "state": "down"}],
        "queued": 0,
        "running": 1,
    }
    validate_body("Health", health)
    with pytest.raises(AssertionError, match=r"^Health at /status"):
        validate_body("Health", {**health, "status": "bad"})
    with pytest.raises(AssertionError, match=r"^Health at /servers/0"):
        validate_body("Health", {**health, "servers": [{"name": "gpu0"}]})

    with pytest.raises(KeyError, match="NoSuchSchema"):
        validate_body("NoSuchSchema", {})


GOOD_OPTIONS = {
    "params": {
        "steps": {"type": "integer", "value": 20, "node_mappings": "KSampler.steps"},
        "batch": {
            "type": "integer",
            "value": 8,
            "gpu_scale": True,
            "node_mappings": ["Empty Latent Image.batch_size"],
        },
        "photo": {"type": "image", "value": "https://example.com/a.png", "node_mappings": "In"},
    },
    "models": [{"type": "checkpoints", "name": "sd15.safetensors"}],
    "loras": [
        {"name": "a.safetensors", "url": "https://example.com/a.safetensors"},
        {
            "name": "b.safetensors",
            "url": "http://example.com/b.safetensors",
            "strength": 0.5,
            "strength_clip": None,
            "node_title": "LoRA 2",
            "sha256": "a" * 64,
        },
    ],
    "seed": 0,
    "same_images": True,
    "max_shards": 2,
    "timeout": 0.5,
}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": -1}, "/seed"),
        ({"seed": 2**64}, "/seed"),
        ({"max_shards": 0}, "/max_shards"),
        ({"timeout": 0}, "/timeout"),
        ({"same_images": "yes"}, "/same_images"),
        ({"shards": 2}, ""),
        ({"params": {"x": {"value": 1, "node_mappings": "X"}}}, "/params/x"),
        ({"params": {"x": {"type": "integer", "node_mappings": []}}}, "/params/x/node_mappings"),
        ({"models": [{"type": "vae"}]}, "/models/0"),
        ({"loras": [{"name": "a", "url": "ftp://example.com/a"}]}, "/loras/0/url"),
        ({"loras": [{"name": "a", "url": "https://e.com/a", "sha256": "xyz"}]}, "/loras/0/sha256"),
    ],
)
def test_comfytrio_options(change: dict[str, Any], named: str) -> None:
    validate_body("ComfytrioJobOptions", GOOD_OPTIONS)
    validate_body(
        "ComfytrioJobOptions", {**GOOD_OPTIONS, "seed": None, "max_shards": None, "timeout": None}
    )
    validate_body("ComfytrioJobOptions", {})
    with pytest.raises(AssertionError, match=f"^ComfytrioJobOptions at {named}/?:"):
        validate_body("ComfytrioJobOptions", {**GOOD_OPTIONS, **change})


def test_metadata_holds_at_most_32_labels() -> None:
    validate_body("JobMetadata", {f"k{i}": "v" for i in range(32)})
    with pytest.raises(AssertionError, match=r"^JobMetadata at /"):
        validate_body("JobMetadata", {f"k{i}": "v" for i in range(33)})


@given(st.sampled_from(["string", "integer", "number", "boolean", "array", "object"]))
def test_to_json_schema_admits_null_only_when_nullable(kind: str) -> None:
    assert to_json_schema({"type": kind}) == {"type": kind}
    assert to_json_schema({"type": kind, "nullable": True, "example": 1}) == {
        "type": [kind, "null"]
    }
    assert to_json_schema({"allOf": [{"$ref": "#/components/schemas/X"}], "nullable": True}) == {
        "anyOf": [{"type": "null"}, {"allOf": [{"$ref": "#/$defs/X"}]}]
    }
    assert to_json_schema({"type": kind, "properties": {"nullable": {"type": "string"}}}) == {
        "type": kind,
        "properties": {"nullable": {"type": "string"}},
    }
    assert to_json_schema({"minimum": 0, "exclusiveMinimum": True}) == {"exclusiveMinimum": 0}
    assert to_json_schema({"maximum": 9, "exclusiveMaximum": False}) == {"maximum": 9}
