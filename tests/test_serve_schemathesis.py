"""Property tests of a running ``comfytrio serve`` from its own OpenAPI document
(schemathesis): every operation, with generated requests, must answer with a documented
status code, a documented content type and headers, a body that matches the documented
schema, and never a 5xx.

Schemathesis is synchronous (requests), so it runs in a worker thread while trio serves the
app (two fake ComfyUI servers behind it) on 127.0.0.1. Hypothesis is derandomized and
bounded: the same examples every run, a few seconds in all.

No operation is left out (``test_every_operation_is_covered``). Each runs twice when its
path has an ``{id}`` or ``{hash}``: with generated ids (which name nothing: the 404s) and
with those of a real job, asset and blob (the 200s).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import attrs
import hypothesis
import pytest
import schemathesis
import trio
from conftest import model_free, png_bytes
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_serve import open_served

from comfytrio.serve import openapi_document

EXAMPLES = 25
"""Generated requests per operation (and per pass)."""

CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)


@attrs.frozen
class Run:
    """One property test: an operation, what is fixed in its requests, what is not checked
    (and why, in the comment where it is made)."""

    label: str
    """``METHOD /path``."""
    headers: dict[str, str] | None = None
    """Headers sent as given instead of generated."""
    unchecked: tuple[Any, ...] = ()
    """Checks left out."""
    known_ids: bool = True
    """Also run with the ids of a real job, asset and blob."""

    @property
    def id(self) -> str:
        extra = [f"{k}={v}" for k, v in (self.headers or {}).items()]
        extra += [f"no {c.__name__}" for c in self.unchecked]
        return self.label + (f" ({', '.join(extra)})" if extra else "")


def operations() -> dict[str, Any]:
    """Every operation schemathesis loads from the document, by ``METHOD /path`` (a part of
    the document it cannot load fails here)."""
    schema = schemathesis.openapi.from_dict(openapi_document())
    loaded = {}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operation = result.ok()
        loaded[f"{operation.method.upper()} {operation.path}"] = operation
    return loaded


def operation_labels() -> list[str]:
    """``METHOD /path`` of every operation the document holds."""
    return [
        f"{method.upper()} {path}"
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in ("get", "head", "post", "put", "patch", "delete")
    ]


RUNS = [
    *(Run(label) for label in operation_labels() if label != "GET /api/v2/jobs/{id}/events"),
    # The document describes the SSE stream's 200 as `type: string`; schemathesis checks each
    # event ({"event", "data"}) against that schema, which no event can match. The 404s of
    # generated ids are checked in full; the stream of a real (finished) job is checked for
    # its status, content type and headers here, and event by event against StatusEvent,
    # Progress and Output in tests/test_serve.py::test_events_follow_a_job_to_its_end.
    Run("GET /api/v2/jobs/{id}/events", known_ids=False),
    Run("GET /api/v2/jobs/{id}/events", unchecked=(response_schema_conformance,)),
    # The rest of the known bugs' operations, around the bug:
    Run("POST /api/v2/jobs", headers={"Idempotency-Key": "schemathesis"}),
    Run("GET /api/v2/assets/{id}/content", unchecked=(content_type_conformance,)),
]


def run_operation(run: Run, base_url: str, known: dict[str, str]) -> list[str]:
    """The operation of ``run``, generated; then, with an ``{id}`` or ``{hash}`` in its path,
    again with the ids of a real job, asset or blob (``known``). Returns each failure found
    (hypothesis's report, with a curl command to reproduce it)."""
    operation = operations()[run.label]
    path_ids: dict[str, Any] = {}
    if "{hash}" in operation.path:
        path_ids["hash"] = known["hash"]
    if "{id}" in operation.path:
        path_ids["id"] = known["asset_id" if "/assets/" in operation.path else "job_id"]
    checks = [c for c in CHECKS if c not in run.unchecked]
    failures: list[str] = []
    passes: list[dict[str, Any] | None] = [None]
    if path_ids and run.known_ids:
        passes.append(path_ids)
    for fixed in passes:

        @given(case=operation.as_strategy(path_parameters=fixed, headers=run.headers))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def check(case: Any) -> None:
            response = case.call(base_url=base_url, timeout=30)
            case.validate_response(response, checks=checks)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # every distinct failure, with curl
            failures.append(f"{run.label} {fixed or ''}: {exc}")
    return failures


@pytest.mark.parametrize(
    "run",
    [pytest.param(run, id=run.id) for run in RUNS],
)
async def test_every_response_conforms_to_the_document(tmp_path: Path, run: Run) -> None:
    async with open_served(tmp_path) as served:
        job = await served.run({"workflow": model_free(), "metadata": {"k": "v"}})
        assert job["status"] == "succeeded"
        upload = await served.http.post(
            "/api/v2/assets",
            data={"content_type": "image/png", "file_path": "p.png"},
            files={"file": ("p.png", png_bytes(), "image/png")},
        )
        assert upload.status_code == 201, upload.text
        asset = upload.json()
        known = {"job_id": job["id"], "asset_id": asset["id"], "hash": asset["hash"]}
        failures = await trio.to_thread.run_sync(
            functools.partial(run_operation, run, served.handle.url, known)
        )
    assert not failures, "\n\n".join(failures)


def test_every_operation_is_covered() -> None:
    loaded = set(operations())
    assert loaded == set(operation_labels())
    assert {run.label for run in RUNS} == loaded
