"""The OpenAPI document ``comfytrio serve`` answers to: the official Comfy API v2 plus what
comfytrio adds, only by adding.

The official document is vendored unedited in ``openapi/comfy-api-v2.json`` (MIT, see
``openapi/README.md``). ``openapi_document()`` copies it and adds, through one helper that
refuses to replace anything already there:

- operations: ``GET /api/v2/jobs`` (``listJobs``), ``GET /api/v2/jobs/{id}/logs``
  (``getJobLogs``), ``GET /api/v2/health`` (``getHealth``), ``GET /api/v2/openapi.json``
  (``getOpenApi``);
- optional properties of the ``POST /api/v2/jobs`` body (``metadata``, ``webhook_url``,
  ``comfytrio``) and of ``Job`` (``metadata``, ``comfytrio``); neither object is closed
  (no ``additionalProperties: false``) upstream, so these were already allowed;
- new component schemas, all named ``Comfytrio*``, ``JobList``, ``JobMetadata``, ``Health``,
  ``ServerHealth``.

Every added location is listed, as a JSON pointer, in ``info.x-comfytrio.additions``; an
object that gained properties lists their names in its own ``x-comfytrio-additions``.

``validate_body`` checks a JSON value against one of the document's component schemas, for
tests: the OpenAPI 3.0 schema is turned into JSON Schema 2020-12 (``nullable``, boolean
``exclusiveMinimum``, ``$ref``) and checked with ``jsonschema_rs`` (a dependency of
schemathesis, so of the ``dev`` extra only: imported when first used).
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = [
    "OPENAPI_PATH",
    "official_document",
    "openapi_document",
    "openapi_json_route",
    "to_json_schema",
    "validate_body",
]

OPENAPI_PATH = "/api/v2/openapi.json"
"""Where ``openapi_json_route`` serves the document."""

_VENDORED = ("openapi", "comfy-api-v2.json")

_SCHEMAS = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _SCHEMAS + name}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("ErrorEnvelope")}},
    }


# --------------------------------------------------------------------------- what we add

_METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "String labels of a job (comfytrio addition), at most 32. Given at submit, returned "
        "on the job, and matched by `GET /api/v2/jobs?metadata[key]=value`."
    ),
    "maxProperties": 32,
    "additionalProperties": {"type": "string"},
    "example": {"project": "cats", "batch": "7"},
}

_PARAM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "One comfytrio param: a value set into every node `node_mappings` names (a node "
        "title, or `Title.input`). `type` is a param type a plugin registered (the standard "
        "ones: `integer`, `float`, `string`, `boolean`, `seed`, `image`); a type may take "
        "more keys of its own. See docs/concepts.md, Params."
    ),
    "required": ["type", "node_mappings"],
    "properties": {
        "type": {"type": "string", "example": "integer"},
        "value": {"description": "The value; its shape depends on `type`.", "example": 8},
        "node_mappings": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ],
            "description": "A node title (`_meta.title`), `Title.input`, or a list of them.",
            "example": "Empty Latent Image.batch_size",
        },
        "gpu_scale": {
            "type": "boolean",
            "default": False,
            "description": "Split this value across the job's shards (one per server).",
        },
    },
    "additionalProperties": True,
}

_MODEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A model file that must exist on every server before the workflow runs.",
    "required": ["type", "name"],
    "properties": {
        "type": {
            "type": "string",
            "description": "The models sub-folder: `checkpoints`, `vae`, `loras`, ...",
            "example": "checkpoints",
        },
        "name": {
            "type": "string",
            "description": "The file name in that folder (sub-folders allowed, never `..`).",
            "example": "sd_xl_base_1.0.safetensors",
        },
    },
    "additionalProperties": False,
}

_LORA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A LoRA the workflow uses, downloaded into `loras/` when absent.",
    "required": ["name", "url"],
    "properties": {
        "name": {"type": "string", "description": "File name inside `loras/`."},
        "url": {
            "type": "string",
            "format": "uri",
            "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://",
            "description": "Where to download it from (http or https).",
        },
        "strength": {
            "type": "number",
            "default": 1.0,
            "description": "Model strength (and clip strength unless `strength_clip`).",
        },
        "strength_clip": {
            "type": "number",
            "nullable": True,
            "description": "Clip strength for core `LoraLoader` nodes (default: `strength`).",
        },
        "node_title": {
            "type": "string",
            "nullable": True,
            "description": "Title of the `LoraLoader` node this LoRA goes into.",
        },
        "sha256": {
            "type": "string",
            "nullable": True,
            "pattern": "^[0-9a-fA-F]{64}$",
            "description": "Hex digest the downloaded bytes must match.",
        },
    },
    "additionalProperties": False,
}

_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "How comfytrio runs the workflow across its servers (comfytrio addition); the same "
        "arguments as `ComfyAPI.run_workflow`."
    ),
    "properties": {
        "params": {
            "type": "object",
            "description": "Param name -> param entry.",
            "additionalProperties": _ref("ComfytrioParam"),
        },
        "models": {"type": "array", "items": _ref("ComfytrioModel")},
        "loras": {"type": "array", "items": _ref("ComfytrioLoRA")},
        "seed": {
            "type": "integer",
            "minimum": 0,
            "maximum": 2**64 - 1,
            "nullable": True,
            "description": "The job seed (null or absent: drawn at random, see `Job.comfytrio`).",
        },
        "same_images": {
            "type": "boolean",
            "default": False,
            "description": (
                "Refuse (422) a split that would not make the images one server would make."
            ),
        },
        "max_shards": {
            "type": "integer",
            "minimum": 1,
            "nullable": True,
            "description": (
                "Most shards to split the job into. Default (null or absent): 1 when no "
                "param has `gpu_scale`, else one per server."
            ),
        },
        "timeout": {
            "type": "number",
            "minimum": 0,
            "exclusiveMinimum": True,
            "nullable": True,
            "description": ("Seconds each shard may run (null or absent: the server's setting)."),
        },
    },
    "additionalProperties": False,
}

_SHARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One shard of a job: where its latest attempt runs or ran.",
    "required": ["index", "instance", "prompt_id"],
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "attempt": {"type": "integer", "minimum": 1, "description": "1, then 2 on a retry..."},
        "instance": {"type": "string", "description": "The server's name in the fleet."},
        "prompt_id": {"type": "string", "description": "The prompt's id on that server."},
        "status": {"type": "string", "description": "The shard's own status, when known."},
    },
}

_JOB_INFO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "How comfytrio ran a job (comfytrio addition).",
    "properties": {
        "shards": {"type": "array", "items": _ref("ComfytrioShard")},
        "shard_count": {
            "type": "integer",
            "minimum": 0,
            "nullable": True,
            "description": "How many shards the job was split into (null: not planned yet).",
        },
        "split": {
            "type": "string",
            "nullable": True,
            "description": "How its batch was split (`JobResult.split`; null: not planned yet).",
        },
        "seed": {
            "type": "integer",
            "minimum": 0,
            "maximum": 2**64 - 1,
            "nullable": True,
            "description": "The job seed, to run it again exactly (null: not planned yet).",
        },
    },
}

_JOB_LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One page of jobs, newest first (comfytrio addition).",
    "required": ["jobs"],
    "properties": {
        "jobs": {"type": "array", "items": _ref("Job")},
        "next_cursor": {
            "type": "string",
            "description": "Pass as `cursor` for the next page; absent on the last page.",
        },
    },
}

_SERVER_HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One ComfyUI server behind this API.",
    "required": ["name", "url", "state"],
    "properties": {
        "name": {"type": "string"},
        "url": {"type": "string"},
        "state": {
            "type": "string",
            "description": (
                "`new`, `starting`, `connecting`, `ready`, `hung`, `down`, `failed` or "
                "`stopped` (comfytrio's `InstanceState`)."
            ),
            "example": "ready",
        },
    },
}

_HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Whether this API can run jobs now (comfytrio addition).",
    "required": ["status", "version", "servers", "queued", "running"],
    "properties": {
        "status": {
            "type": "string",
            "enum": ["ok", "degraded"],
            "description": "`ok`: every server is ready; `degraded`: some are not.",
        },
        "version": {"type": "string", "description": "comfytrio's version."},
        "servers": {"type": "array", "items": _ref("ServerHealth")},
        "queued": {"type": "integer", "minimum": 0},
        "running": {"type": "integer", "minimum": 0},
    },
}

_JOB_ID_PARAMETER = {"$ref": "#/components/parameters/JobId"}

_LIST_JOBS: dict[str, Any] = {
    "operationId": "listJobs",
    "tags": ["jobs"],
    "summary": "List jobs (comfytrio addition)",
    "description": (
        "Jobs newest first, one page at a time: follow `next_cursor` until it is absent. "
        "Filters combine with AND: `status` (any of a comma-separated list), and every "
        "`metadata[key]=value` label. The same route and page shape the official client "
        "(comfy-sdk) lists with."
    ),
    "parameters": [
        {
            "name": "status",
            "in": "query",
            "required": False,
            "style": "form",
            "explode": False,
            "schema": {"type": "array", "items": _ref("JobStatus")},
            "description": "Only jobs in one of these statuses (comma-separated).",
            "example": ["queued", "running"],
        },
        {
            "name": "metadata",
            "in": "query",
            "required": False,
            "style": "deepObject",
            "explode": True,
            "schema": {"type": "object", "additionalProperties": {"type": "string"}},
            "description": "Only jobs with every label given: `metadata[project]=cats`.",
        },
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
            "description": "Most jobs on one page.",
        },
        {
            "name": "cursor",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "Opaque: the `next_cursor` of the previous page.",
        },
    ],
    "responses": {
        "200": {
            "description": "One page of jobs.",
            "content": {"application/json": {"schema": _ref("JobList")}},
        },
        "400": _error("`invalid_request` — a malformed query."),
        "401": {"$ref": "#/components/responses/Unauthorized"},
        "422": _error("`invalid_request` — an unknown status, a limit out of range, a bad cursor."),
        "500": {"$ref": "#/components/responses/UpstreamError"},
    },
}

_JOB_LOGS: dict[str, Any] = {
    "operationId": "getJobLogs",
    "tags": ["jobs"],
    "summary": "A job's log lines (comfytrio addition)",
    "description": (
        "What comfytrio noted about the job, one line each: retries, server errors, where "
        "each shard ran. Tied to the job's retention like `GET /api/v2/jobs/{id}`."
    ),
    "parameters": [_JOB_ID_PARAMETER],
    "responses": {
        "200": {
            "description": "The log lines, each ending in a newline.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        "204": {"description": "The job has no log lines."},
        "401": {"$ref": "#/components/responses/Unauthorized"},
        "404": {"$ref": "#/components/responses/NotFound"},
        "500": {"$ref": "#/components/responses/UpstreamError"},
    },
}

_HEALTH: dict[str, Any] = {
    "operationId": "getHealth",
    "tags": ["comfytrio"],
    "summary": "Health of this API and its servers (comfytrio addition)",
    "responses": {
        "200": {
            "description": "Health.",
            "content": {"application/json": {"schema": _ref("Health")}},
        },
        "401": {"$ref": "#/components/responses/Unauthorized"},
        "500": {"$ref": "#/components/responses/UpstreamError"},
    },
}

_OPENAPI: dict[str, Any] = {
    "operationId": "getOpenApi",
    "tags": ["comfytrio"],
    "summary": "This OpenAPI document (comfytrio addition)",
    "responses": {
        "200": {
            "description": "The official Comfy API v2 document plus comfytrio's additions.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    },
}

_BODY_ADDITIONS: dict[str, Any] = {
    "metadata": _ref("JobMetadata"),
    "webhook_url": {
        "type": "string",
        "format": "uri",
        "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://",
        "maxLength": 2048,
        "description": (
            "comfytrio accepts this field, which the official contract reserves and rejects "
            "today: the job's terminal status is POSTed there (Standard Webhooks signed, "
            "retried with backoff). Only http and https URLs. Absent: the server's default "
            "webhook URL, if any."
        ),
        "example": "https://example.com/hooks/comfy",
    },
    "comfytrio": _ref("ComfytrioJobOptions"),
}

_JOB_ADDITIONS: dict[str, Any] = {
    "metadata": _ref("JobMetadata"),
    "comfytrio": _ref("ComfytrioJobInfo"),
}

_NEW_SCHEMAS: dict[str, dict[str, Any]] = {
    "JobMetadata": _METADATA_SCHEMA,
    "JobList": _JOB_LIST_SCHEMA,
    "ComfytrioJobOptions": _OPTIONS_SCHEMA,
    "ComfytrioParam": _PARAM_SCHEMA,
    "ComfytrioModel": _MODEL_SCHEMA,
    "ComfytrioLoRA": _LORA_SCHEMA,
    "ComfytrioJobInfo": _JOB_INFO_SCHEMA,
    "ComfytrioShard": _SHARD_SCHEMA,
    "Health": _HEALTH_SCHEMA,
    "ServerHealth": _SERVER_HEALTH_SCHEMA,
}

_INFO_NOTE = (
    "comfytrio serve implements this API in front of a fleet of ComfyUI servers and adds, "
    "only by adding (no official definition changed): listing jobs, a job's log lines, "
    "health, this document, job metadata labels, `webhook_url`, and the `comfytrio` job "
    "options. Each added location is listed in `additions` as a JSON pointer."
)


# --------------------------------------------------------------------------- the document


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


class _Adder:
    """Adds to a document, refusing to replace anything, and remembers where it added."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.added: list[str] = []

    def add(self, path: tuple[str, ...], key: str, value: Any) -> None:
        node: Any = self.doc
        for part in path:
            node = node[part]
        if not isinstance(node, dict):
            raise TypeError(f"/{'/'.join(map(_escape, path))} is not an object")
        if key in node:
            # Why: the official definitions are the contract; we may only add beside them.
            raise RuntimeError(f"/{'/'.join(map(_escape, (*path, key)))} is already defined")
        node[key] = copy.deepcopy(value)
        self.added.append("/" + "/".join(map(_escape, (*path, key))))

    def add_properties(self, path: tuple[str, ...], properties: dict[str, Any]) -> None:
        for name, schema in properties.items():
            self.add((*path, "properties"), name, schema)
        self.add(path, "x-comfytrio-additions", list(properties))


@functools.cache
def _official_text() -> str:
    return resources.files("comfytrio.serve").joinpath(*_VENDORED).read_text(encoding="utf-8")


def official_document() -> dict[str, Any]:
    """The official Comfy API v2 document as vendored (a fresh copy, unedited)."""
    loaded: dict[str, Any] = json.loads(_official_text())
    return loaded


@functools.cache
def _document_json() -> str:
    doc = official_document()
    adder = _Adder(doc)
    for name, schema in _NEW_SCHEMAS.items():
        adder.add(("components", "schemas"), name, schema)
    jobs_path = ("paths", "/api/v2/jobs")
    adder.add(jobs_path, "get", _LIST_JOBS)
    adder.add(("paths",), "/api/v2/jobs/{id}/logs", {"get": _JOB_LOGS})
    adder.add(("paths",), "/api/v2/health", {"get": _HEALTH})
    adder.add(("paths",), OPENAPI_PATH, {"get": _OPENAPI})
    body = (*jobs_path, "post", "requestBody", "content", "application/json", "schema")
    adder.add_properties(body, _BODY_ADDITIONS)
    adder.add_properties(("components", "schemas", "Job"), _JOB_ADDITIONS)
    assets = ("paths", "/api/v2/assets")
    adder.add(
        (*assets, "post", "responses"),
        "413",
        _error("`invalid_request` (comfytrio): the upload is over the server's size cap."),
    )
    adder.add(
        ("paths", "/api/v2/assets/from-hash", "post", "responses"),
        "422",
        _error(
            "`invalid_request` (comfytrio): a malformed body, `hash` (not `blake3:` and 64 "
            "hex digits), `file_path`, `tags` or `expires_in`."
        ),
    )
    content = ("paths", "/api/v2/assets/{id}/content", "get", "responses")
    for status in ("200", "206"):
        adder.add(
            (*content, status, "content"),
            "*/*",
            {
                "schema": {"type": "string", "format": "binary"},
                "x-comfytrio": "served with the asset's own media type (e.g. image/png)",
            },
        )
    additions = [*adder.added, "/info/x-comfytrio"]
    doc["info"]["x-comfytrio"] = {"description": _INFO_NOTE, "additions": additions}
    return json.dumps(doc, ensure_ascii=False)


def openapi_document() -> dict[str, Any]:
    """The official document plus comfytrio's additions (a fresh copy; see the module's
    docstring for what is added). Raises ``RuntimeError`` if an addition would replace an
    official definition (a newer vendored document that defines it itself)."""
    doc: dict[str, Any] = json.loads(_document_json())
    return doc


async def _serve_document(request: Request) -> Response:
    return Response(_document_json().encode(), media_type="application/json")


def openapi_json_route() -> Route:
    """A Starlette ``Route`` answering ``GET /api/v2/openapi.json`` with
    ``openapi_document()``."""
    return Route(OPENAPI_PATH, _serve_document, methods=["GET"], name="openapi_json")


# --------------------------------------------------------------------------- validation

_SCHEMA_MAPS = frozenset({"properties", "patternProperties"})
_SCHEMA_VALUES = frozenset({"items", "additionalProperties", "not"})
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf"})
_OPENAPI_ONLY = frozenset({"nullable", "example", "discriminator", "xml", "externalDocs"})


def to_json_schema(schema: Any) -> Any:
    """An OpenAPI 3.0 schema object as JSON Schema 2020-12: ``nullable: true`` admits
    ``null``, a boolean ``exclusiveMinimum``/``exclusiveMaximum`` becomes a number,
    ``#/components/schemas/X`` refers to ``#/$defs/X``, and OpenAPI-only keywords go."""
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:  # OpenAPI 3.0: a $ref's siblings are ignored
        ref = str(schema["$ref"])
        return {"$ref": "#/$defs/" + ref.removeprefix(_SCHEMAS)}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _OPENAPI_ONLY or key.startswith("x-"):
            continue
        if key in _SCHEMA_MAPS:
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_VALUES:
            out[key] = to_json_schema(value)
        elif key in _SCHEMA_LISTS:
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = out.get(bound)
        if isinstance(flag, bool):
            del out[bound]
            if flag and limit in out:
                out[bound] = out.pop(limit)
    if schema.get("nullable") is True:
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        elif "type" not in out:
            out = {"anyOf": [{"type": "null"}, out]}
    return out


@functools.cache
def _validator(schema_name: str) -> Any:
    import jsonschema_rs  # only tests validate: a dev dependency (through schemathesis)

    schemas = openapi_document()["components"]["schemas"]
    if schema_name not in schemas:
        raise KeyError(f"no schema {schema_name!r} in the document; it has {sorted(schemas)}")
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": {name: to_json_schema(s) for name, s in schemas.items()},
        "$ref": "#/$defs/" + schema_name,
    }
    return jsonschema_rs.Draft202012Validator(root, validate_formats=True)


def validate_body(schema_name: str, value: Any) -> None:
    """Check ``value`` (parsed JSON) against the component schema ``schema_name`` of
    ``openapi_document()``, formats (``date-time``, ``uri``) included.

    Raises ``AssertionError`` naming the JSON pointer of the first mismatch and what is
    wrong there (and how many more there are), ``KeyError`` for an unknown schema name.
    """
    errors = list(_validator(schema_name).iter_errors(value))
    if errors:
        first = errors[0]
        where = "/" + "/".join(_escape(str(p)) for p in first.instance_path)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise AssertionError(f"{schema_name} at {where}: {first.message}{more}")
