"""The asset endpoints of the Comfy API v2 (``/api/v2/assets...``), as Starlette routes.

Refusals are raised as ``ApiProblem``; the app's handler renders the error envelope. Two
answers are made here instead, because they need headers or no body: ``HEAD .../by-hash``
(a status only) and 416 (with ``Content-Range: bytes */size``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from ._assets import HASH_PATTERN, AssetStore, check_file_path, check_hash
from ._problems import ApiProblem, error_envelope
from ._records import AssetRecord
from ._wire import FAR_FUTURE, rfc3339

__all__ = ["asset_json", "asset_routes", "base_url_of", "parse_range"]

MIN_EXPIRES_IN = 60
"""Least ``expires_in`` the spec allows (seconds)."""
MAX_EXPIRES_IN = 604800
"""Largest ``expires_in`` the spec allows (seven days)."""

_FORM_OVERHEAD = 1024 * 1024
"""Bytes of a multipart body allowed beyond ``max_bytes`` (boundaries, headers, fields)."""

_DRAIN_BYTES = 4 * 1024**3
"""Most bytes of an over-large body read (and dropped) before answering 413."""

_JSON_BYTES = 64 * 1024
"""Largest JSON body of ``from-hash``."""

_READ_CHUNK = 256 * 1024
"""Bytes read from a blob per worker-thread call while serving its content."""

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def asset_json(
    record: AssetRecord, base_url: str, *, created_new: bool | None = None
) -> dict[str, Any]:
    """The spec's ``Asset`` object for ``record``: ``url`` is absolute, under ``base_url``
    (``scheme://host``); ``created_new`` only when given (create responses); ``job_id``
    only for a job's output (the spec: absent for uploads)."""
    body: dict[str, Any] = {
        "id": record.id,
        "hash": record.hash,
        "size_bytes": record.size_bytes,
        "content_type": record.content_type,
        "file_path": record.file_path,
    }
    if created_new is not None:
        body["created_new"] = created_new
    body["created_at"] = rfc3339(record.created_at)
    body["url"] = f"{base_url}/api/v2/assets/{urllib.parse.quote(record.id, safe='')}/content"
    body["url_expires_at"] = rfc3339(record.expires_at or FAR_FUTURE)  # the URL is ours
    body["expires_at"] = None if record.expires_at is None else rfc3339(record.expires_at)
    if record.job_id is not None:
        body["job_id"] = record.job_id
    return body


def base_url_of(request: Request) -> str:
    """``scheme://host[:port]`` the request was sent to (from its ``Host`` header)."""
    return f"{request.url.scheme}://{request.url.netloc}"


def _invalid(field: str, message: str) -> ApiProblem:
    return ApiProblem(422, "invalid_request", f"{field}: {message}", details={"field": field})


def _expires_in(value: object) -> int | None:
    """A valid ``expires_in`` (None when absent); ``ApiProblem`` (422) otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]+", value.strip()):
            raise _invalid("expires_in", "must be an integer number of seconds")
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid("expires_in", "must be an integer number of seconds")
    if not MIN_EXPIRES_IN <= value <= MAX_EXPIRES_IN:
        raise _invalid("expires_in", f"must be between {MIN_EXPIRES_IN} and {MAX_EXPIRES_IN}")
    return value


def _form_text(form: Any, field: str, *, required: bool) -> str | None:
    values = form.getlist(field)
    if not values:
        if required:
            raise _invalid(field, "is required")
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise _invalid(field, "must be given once, as text")
    return str(values[0])


def parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """``(first, last)`` inclusive for a satisfiable single range; None when the header is
    to be ignored (malformed, several ranges, another unit); False when unsatisfiable."""
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            return False
        return max(0, size - suffix), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last < first or first >= size:
        return False
    return first, min(last, size - 1)


def _content_disposition(record: AssetRecord) -> str:
    name = (record.file_path or record.id).rsplit("/", 1)[-1]
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    quoted = urllib.parse.quote(name, safe="")
    return f"inline; filename=\"{ascii_name}\"; filename*=UTF-8''{quoted}"


async def _drain(receive: Callable[[], Awaitable[Message]]) -> None:
    """Read and drop the rest of a request body (up to ``_DRAIN_BYTES``).

    Why: an HTTP/1.1 client (httpx among them) reads the answer only once it has sent the
    whole body; answering 413 mid-body would leave it blocked on its write. The bytes are
    discarded as they come, never kept."""
    dropped = 0
    while dropped <= _DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _too_large(max_bytes: int) -> Response:
    """413 for a body over the limit (drained first), closing the connection after it."""
    problem = ApiProblem(
        413,
        "invalid_request",
        f"file: larger than the {max_bytes} bytes this server takes",
        details={"field": "file", "max_bytes": max_bytes},
    )
    return JSONResponse(problem.envelope(), status_code=413, headers={"Connection": "close"})


def asset_routes(
    assets: AssetStore,
    *,
    retention: float,
    clock: Callable[[], float] = time.time,
) -> list[Route]:
    """The routes of ``/api/v2/assets...`` over ``assets``: upload, from-hash, by-hash,
    metadata, delete and content (with ranges). An asset minted here expires after
    ``expires_in`` when the request gives one, else after ``retention`` seconds; ``clock``
    tells the time (Unix seconds)."""

    async def upload(request: Request) -> Response:
        limit = assets.max_bytes + _FORM_OVERHEAD
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _drain(request.receive)
            return _too_large(assets.max_bytes)
        received = 0
        outer_receive = request.receive

        async def capped_receive() -> Message:
            # Why: without a Content-Length (chunked), the form parser would spool any
            # amount to disk before we could look at the file's size.
            nonlocal received
            message = await outer_receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise ApiProblem(413, "invalid_request", "the body is too large")
            return message

        capped = Request(request.scope, receive=capped_receive)
        if not capped.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiProblem(422, "invalid_request", "the body must be multipart/form-data")
        try:
            form = await capped.form(max_files=1, max_fields=1000)
        except HTTPException as exc:
            raise ApiProblem(422, "invalid_request", f"malformed form: {exc.detail}") from exc
        except ApiProblem as exc:
            if exc.status != 413:
                raise
            await _drain(outer_receive)
            return _too_large(assets.max_bytes)
        try:
            files = form.getlist("file")
            if len(files) != 1 or not isinstance(files[0], UploadFile):
                raise _invalid("file", "one file part is required")
            upload_file = files[0]
            content_type = _form_text(form, "content_type", required=True)
            file_path = _form_text(form, "file_path", required=True)
            expected_hash = _form_text(form, "expected_hash", required=False)
            tags = form.getlist("tags")
            if not all(isinstance(tag, str) for tag in tags):
                raise _invalid("tags", "must be text")
            expires_in = _expires_in(_form_text(form, "expires_in", required=False))
            assert content_type is not None
            assert file_path is not None
            check_file_path(file_path)
            if expected_hash is not None:
                check_hash(expected_hash, "expected_hash")
            now = clock()

            async def chunks() -> AsyncIterator[bytes]:
                while data := await upload_file.read(_READ_CHUNK * 4):
                    yield data

            record, created = await assets.add_stream(
                chunks(),
                content_type=content_type,
                file_path=file_path,
                expected_hash=expected_hash,
                tags=[str(tag) for tag in tags],
                expires_at=now + (retention if expires_in is None else expires_in),
                now=now,
            )
        finally:
            with trio.CancelScope(shield=True):
                await form.close()
        return JSONResponse(
            asset_json(record, base_url_of(request), created_new=created),
            status_code=201 if created else 200,
        )

    async def from_hash(request: Request) -> Response:
        raw = bytearray()
        async with contextlib.aclosing(request.stream()) as stream:
            async for data in stream:
                raw += data
                if len(raw) > _JSON_BYTES:
                    break
        if len(raw) > _JSON_BYTES:
            await _drain(request.receive)
            raise ApiProblem(413, "invalid_request", f"the body is larger than {_JSON_BYTES} bytes")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiProblem(422, "invalid_request", "the body must be a JSON object") from exc
        if not isinstance(body, dict):
            raise ApiProblem(422, "invalid_request", "the body must be a JSON object")
        hash_ = check_hash(body.get("hash"))
        file_path = body.get("file_path")
        if file_path is not None:
            check_file_path(file_path)
        tags = body.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise _invalid("tags", "must be a list of strings")
        expires_in = _expires_in(body.get("expires_in"))
        now = clock()
        record, created = await assets.from_hash(
            hash_,
            file_path=file_path,
            tags=tags,
            expires_at=now + (retention if expires_in is None else expires_in),
            now=now,
        )
        return JSONResponse(
            asset_json(record, base_url_of(request), created_new=created),
            status_code=201 if created else 200,
        )

    async def by_hash(request: Request) -> Response:
        hash_ = request.path_params["hash"]
        if not HASH_PATTERN.fullmatch(hash_):
            return Response(status_code=404)
        return Response(status_code=200 if await assets.has_blob(hash_) else 404)

    async def get_asset(request: Request) -> Response:
        record = await assets.get(request.path_params["id"])
        return JSONResponse(asset_json(record, base_url_of(request)))

    async def delete_asset(request: Request) -> Response:
        await assets.delete(request.path_params["id"])
        return Response(status_code=204)

    async def content(request: Request) -> Response:
        record = await assets.get(request.path_params["id"])
        path = assets.blob_path(record)
        try:
            handle = await trio.open_file(path, "rb")
        except FileNotFoundError as exc:
            raise ApiProblem(404, "not_found", "no asset with this id") from exc
        try:
            size = (await trio.to_thread.run_sync(os.fstat, handle.fileno())).st_size
            headers = {
                "Accept-Ranges": "bytes",
                "ETag": f'"{record.hash}"',
                "Content-Disposition": _content_disposition(record),
            }
            wanted = request.headers.get("range")
            span = parse_range(wanted, size) if wanted is not None else None
            if span is False:
                await handle.aclose()
                return JSONResponse(
                    error_envelope("invalid_request", "range not satisfiable"),
                    status_code=416,
                    headers={"Content-Range": f"bytes */{size}"},
                )
            if isinstance(span, tuple):
                first, last = span
                status = 206
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            else:
                first, last = 0, size - 1
                status = 200
            headers["Content-Length"] = str(last - first + 1)
            await handle.seek(first)
        except BaseException:
            with trio.CancelScope(shield=True):
                await handle.aclose()
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                left = last - first + 1
                while left > 0:
                    data = await handle.read(min(_READ_CHUNK, left))
                    if not data:
                        break
                    left -= len(data)
                    yield data
            finally:
                with trio.CancelScope(shield=True):
                    await handle.aclose()

        return StreamingResponse(
            body(), status_code=status, headers=headers, media_type=record.content_type
        )

    return [
        Route("/api/v2/assets", upload, methods=["POST"]),
        Route("/api/v2/assets/from-hash", from_hash, methods=["POST"]),
        Route("/api/v2/assets/by-hash/{hash}", by_hash, methods=["HEAD"]),
        Route("/api/v2/assets/{id}", get_asset, methods=["GET"]),
        Route("/api/v2/assets/{id}", delete_asset, methods=["DELETE"]),
        Route("/api/v2/assets/{id}/content", content, methods=["GET"]),
    ]
