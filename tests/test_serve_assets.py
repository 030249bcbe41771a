"""Assets: the store on disk and the ``/api/v2/assets`` routes over a real socket."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import blake3
import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from comfytrio.serve._asset_routes import asset_json, asset_routes, base_url_of
from comfytrio.serve._assets import AssetStore
from comfytrio.serve._problems import ApiProblem
from comfytrio.serve._records import AssetRecord, JobRecord
from comfytrio.serve._store import Store, open_store
from comfytrio.serve._wire import rfc3339

NOW = 1_800_000_000.0
RETENTION = 3600.0
MAX_BYTES = 64 * 1024


def digest(data: bytes) -> str:
    return "blake3:" + blake3.blake3(data).hexdigest()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@attrs.define
class Served:
    client: httpx.AsyncClient
    assets: AssetStore
    store: Store
    root: Path
    clock: list[float]
    base: str

    def blobs(self) -> list[Path]:
        return files_under(self.root / "blobs")

    def temps(self) -> list[Path]:
        return files_under(self.root / "tmp")


def problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiProblem)
    return JSONResponse(
        exc.envelope(),
        status_code=exc.status,
        headers={"Retry-After": str(exc.retry_after)} if exc.retry_after else None,
    )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    clock = [NOW]
    async with open_store(tmp_path / "serve.sqlite3") as store:
        assets = AssetStore(store, tmp_path / "assets", max_bytes=MAX_BYTES)
        app = Starlette(
            routes=asset_routes(assets, retention=RETENTION, clock=lambda: clock[0]),
            exception_handlers={ApiProblem: problem_handler},
        )
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = logging.getLogger("tests.serve_assets.hypercorn")
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, app, config)
            async with httpx.AsyncClient(base_url=binds[0]) as client:
                yield Served(client, assets, store, tmp_path / "assets", clock, binds[0])
            nursery.cancel_scope.cancel()


async def upload(
    served: Served,
    data: bytes,
    *,
    file_path: str = "photo.png",
    content_type: str = "image/png",
    **fields: Any,
) -> httpx.Response:
    form: dict[str, Any] = {"content_type": content_type, "file_path": file_path, **fields}
    return await served.client.post(
        "/api/v2/assets", data=form, files={"file": ("photo.png", data, "image/png")}
    )


# --------------------------------------------------------------------------- upload


async def test_upload_then_dedup(served: Served) -> None:
    data = os.urandom(5000)
    first = await upload(served, data, tags=["input", "x"], expires_in="120")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["created_new"] is True
    assert body["hash"] == digest(data)
    assert body["size_bytes"] == 5000
    assert body["content_type"] == "image/png"
    assert body["file_path"] == "photo.png"
    assert body["created_at"] == rfc3339(NOW)
    assert body["expires_at"] == rfc3339(NOW + 120)
    assert body["url"] == f"{served.base}/api/v2/assets/{body['id']}/content"
    assert "job_id" not in body
    second = await upload(served, data, file_path="again.png")
    assert second.status_code == 200, second.text
    again = second.json()
    assert again["created_new"] is False
    assert again["id"] != body["id"]
    assert again["hash"] == body["hash"]
    assert again["expires_at"] == rfc3339(NOW + RETENTION)
    assert len(served.blobs()) == 1
    assert served.temps() == []
    record = await served.assets.get(body["id"])
    assert record.tags == ("input", "x")
    assert served.assets.blob_path(record).read_bytes() == data


async def test_upload_large_file_streams(served: Served) -> None:
    served.assets.max_bytes = 8 * 1024 * 1024
    data = os.urandom(3 * 1024 * 1024 + 17)  # spooled to disk by the form parser
    response = await upload(served, data)
    assert response.status_code == 201, response.text
    assert response.json()["hash"] == digest(data)
    content = await served.client.get(response.json()["url"])
    assert content.content == data


async def test_expected_hash_mismatch_leaves_nothing(served: Served) -> None:
    response = await upload(served, b"hello", expected_hash=digest(b"other"))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "hash_mismatch"
    assert served.blobs() == []
    assert served.temps() == []
    assert await served.store.asset_by_hash(digest(b"hello")) is None
    good = await upload(served, b"hello", expected_hash=digest(b"hello"))
    assert good.status_code == 201


async def test_over_max_bytes_is_413_and_leaves_nothing(served: Served) -> None:
    response = await upload(served, b"x" * (MAX_BYTES + 1))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "invalid_request"
    assert served.blobs() == []
    assert served.temps() == []
    exact = await upload(served, b"x" * MAX_BYTES)
    assert exact.status_code == 201


@pytest.mark.parametrize(
    "bad", ["../x.png", "/etc/passwd", "a/../../x", "a\\..\\x", "C:x", "", "a//b", "./a"]
)
async def test_unsafe_file_path_refused(served: Served, bad: str) -> None:
    response = await upload(served, b"data", file_path=bad)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "file_path" in error["message"]
    assert served.blobs() == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"expected_hash": "blake3:XYZ"}, "expected_hash"),
        ({"expected_hash": "sha256:" + "0" * 64}, "expected_hash"),
        ({"expires_in": "59"}, "expires_in"),
        ({"expires_in": "604801"}, "expires_in"),
        ({"expires_in": "soon"}, "expires_in"),
    ],
)
async def test_bad_fields_refused(served: Served, fields: dict[str, str], field: str) -> None:
    response = await upload(served, b"data", **fields)
    assert response.status_code == 422
    assert field in response.json()["error"]["message"]


async def test_missing_parts_refused(served: Served) -> None:
    no_file = await served.client.post(
        "/api/v2/assets",
        data={"content_type": "image/png", "file_path": "a.png"},
        files={"other": ("a", b"x")},
    )
    assert no_file.status_code == 422
    assert "file" in no_file.json()["error"]["message"]
    no_path = await served.client.post(
        "/api/v2/assets", data={"content_type": "image/png"}, files={"file": ("a", b"x")}
    )
    assert no_path.status_code == 422
    assert "file_path" in no_path.json()["error"]["message"]
    not_form = await served.client.post("/api/v2/assets", json={"file": "x"})
    assert not_form.status_code == 422
    assert "multipart/form-data" in not_form.json()["error"]["message"]


# --------------------------------------------------------------------------- by hash


async def test_from_hash_hit_miss_and_head(served: Served) -> None:
    data = b"some bytes"
    hash_ = digest(data)
    head = await served.client.head(f"/api/v2/assets/by-hash/{hash_}")
    assert head.status_code == 404
    miss = await served.client.post("/api/v2/assets/from-hash", json={"hash": hash_})
    assert miss.status_code == 404
    assert miss.json()["error"]["code"] == "blob_not_found"
    original = (await upload(served, data, content_type="text/plain")).json()
    head = await served.client.head(f"/api/v2/assets/by-hash/{hash_}")
    assert head.status_code == 200
    assert head.content == b""
    minted = await served.client.post(
        "/api/v2/assets/from-hash",
        json={"hash": hash_, "file_path": "copy.txt", "tags": ["input"], "expires_in": 60},
    )
    assert minted.status_code == 201, minted.text
    body = minted.json()
    assert body["id"] != original["id"]
    assert body["content_type"] == "text/plain"
    assert body["size_bytes"] == len(data)
    assert body["created_new"] is True
    assert body["expires_at"] == rfc3339(NOW + 60)
    # the same reference again: returned as-is, its retention extended, never shortened
    served.clock[0] = NOW + 10
    same = await served.client.post(
        "/api/v2/assets/from-hash",
        json={"hash": hash_, "file_path": "copy.txt", "tags": ["input"], "expires_in": 600},
    )
    assert same.status_code == 200
    assert same.json()["id"] == body["id"]
    assert same.json()["created_new"] is False
    assert same.json()["expires_at"] == rfc3339(NOW + 610)
    shorter = await served.client.post(
        "/api/v2/assets/from-hash",
        json={"hash": hash_, "file_path": "copy.txt", "tags": ["input"], "expires_in": 60},
    )
    assert shorter.json()["expires_at"] == rfc3339(NOW + 610)
    assert len(served.blobs()) == 1


async def test_from_hash_validation(served: Served) -> None:
    bad_hash = await served.client.post("/api/v2/assets/from-hash", json={"hash": "blake3:AB"})
    assert bad_hash.status_code == 422
    not_json = await served.client.post("/api/v2/assets/from-hash", content=b"{")
    assert not_json.status_code == 422
    bad_path = await served.client.post(
        "/api/v2/assets/from-hash", json={"hash": digest(b""), "file_path": "../x.png"}
    )
    assert bad_path.status_code == 422
    head = await served.client.head("/api/v2/assets/by-hash/nonsense")
    assert head.status_code == 404


# --------------------------------------------------------------------------- get / delete


async def test_get_and_delete(served: Served) -> None:
    data = b"shared bytes"
    a = (await upload(served, data)).json()
    b = (await upload(served, data, file_path="b.png")).json()
    got = await served.client.get(f"/api/v2/assets/{a['id']}")
    assert got.status_code == 200
    assert "created_new" not in got.json()
    assert got.json()["id"] == a["id"]
    assert (await served.client.delete(f"/api/v2/assets/{a['id']}")).status_code == 204
    assert (await served.client.get(f"/api/v2/assets/{a['id']}")).status_code == 404
    second = await served.client.delete(f"/api/v2/assets/{a['id']}")
    assert second.status_code == 404
    assert second.json()["error"]["code"] == "not_found"
    # the other asset over the blob still has its bytes
    assert len(served.blobs()) == 1
    assert (await served.client.get(b["url"])).content == data
    assert (await served.client.delete(f"/api/v2/assets/{b['id']}")).status_code == 204
    assert served.blobs() == []
    assert (await served.client.get("/api/v2/assets/unknown")).status_code == 404


async def test_job_outputs_cannot_be_deleted_while_the_job_is_kept(
    served: Served, tmp_path: Path
) -> None:
    job = JobRecord(id="job-1", status="succeeded", created_at=NOW, expires_at=NOW + 9, workflow={})
    await served.store.put_job(job)
    output = tmp_path / "ComfyUI_0001.png"
    output.write_bytes(b"png bytes")
    record = await served.assets.add_file(
        output,
        content_type="image/png",
        file_path="out/ComfyUI_0001.png",
        job_id=job.id,
        node_id="9",
        kind="image",
        expires_at=job.expires_at,
        move=False,
    )
    assert output.exists()
    got = (await served.client.get(f"/api/v2/assets/{record.id}")).json()
    assert got["job_id"] == job.id
    assert got["hash"] == digest(b"png bytes")
    refused = await served.client.delete(f"/api/v2/assets/{record.id}")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "asset_in_use"
    await served.store.put_job(attrs.evolve(job, status="expired"))
    assert (await served.client.delete(f"/api/v2/assets/{record.id}")).status_code == 204
    assert served.blobs() == []


async def test_add_file_move_and_dedup(served: Served, tmp_path: Path) -> None:
    first = tmp_path / "a.txt"
    first.write_bytes(b"same")
    second = tmp_path / "b.txt"
    second.write_bytes(b"same")
    a = await served.assets.add_file(
        first, content_type="text/plain", file_path="a.txt", kind="text", move=True
    )
    b = await served.assets.add_file(
        second, content_type="text/plain", file_path="b.txt", kind="text", move=True
    )
    assert not first.exists()
    assert not second.exists()
    assert a.hash == b.hash
    assert a.size_bytes == 4
    assert len(served.blobs()) == 1
    assert served.temps() == []
    with pytest.raises(ValueError, match="kind"):
        await served.assets.add_file(
            first, content_type="text/plain", file_path="a.txt", kind="nonsense"
        )


# --------------------------------------------------------------------------- content


async def test_content_and_ranges(served: Served) -> None:
    data = bytes(range(256)) * 4  # 1024 bytes
    asset = (await upload(served, data, file_path="dir/pic ü.png")).json()
    url = f"/api/v2/assets/{asset['id']}/content"
    full = await served.client.get(url)
    assert full.status_code == 200
    assert full.content == data
    assert full.headers["content-type"] == "image/png"
    assert full.headers["content-length"] == "1024"
    assert full.headers["accept-ranges"] == "bytes"
    assert full.headers["etag"] == f'"{asset["hash"]}"'
    disposition = full.headers["content-disposition"]
    assert 'filename="pic _.png"' in disposition
    assert "filename*=UTF-8''pic%20%C3%BC.png" in disposition

    cases = [
        ("bytes=0-9", 0, 9),
        ("bytes=1000-", 1000, 1023),
        ("bytes=-24", 1000, 1023),
        ("bytes=-5000", 0, 1023),
        ("bytes=1020-5000", 1020, 1023),
    ]
    for header, first, last in cases:
        part = await served.client.get(url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == data[first : last + 1], header
        assert part.headers["content-range"] == f"bytes {first}-{last}/1024", header
        assert part.headers["content-length"] == str(last - first + 1), header

    for header in ["bytes=1024-", "bytes=5-2", "bytes=-0"]:
        refused = await served.client.get(url, headers={"Range": header})
        assert refused.status_code == 416, header
        assert refused.headers["content-range"] == "bytes */1024", header

    # what we do not understand is ignored: the whole content
    for header in ["items=0-1", "bytes=0-1,5-6", "bytes=x-y"]:
        ignored = await served.client.get(url, headers={"Range": header})
        assert ignored.status_code == 200, header
        assert ignored.content == data

    head = await served.client.head(url)
    assert head.status_code == 200
    assert head.headers["content-length"] == "1024"
    assert head.content == b""

    missing = await served.client.get("/api/v2/assets/nope/content")
    assert missing.status_code == 404


async def test_empty_asset(served: Served) -> None:
    asset = (await upload(served, b"")).json()
    assert asset["size_bytes"] == 0
    full = await served.client.get(asset["url"])
    assert full.status_code == 200
    assert full.content == b""
    ranged = await served.client.get(asset["url"], headers={"Range": "bytes=0-"})
    assert ranged.status_code == 416
    assert ranged.headers["content-range"] == "bytes */0"


# --------------------------------------------------------------------------- sweep, json


async def test_sweep_removes_expired_assets_and_their_blobs(served: Served) -> None:
    short = (await upload(served, b"short", expires_in="60")).json()
    long = (await upload(served, b"long", expires_in="600")).json()
    shared = (await upload(served, b"long", expires_in="60")).json()
    assert len(served.blobs()) == 2
    assert await served.assets.sweep(NOW + 59) == 0
    assert await served.assets.sweep(NOW + 60) == 2
    assert (await served.client.get(f"/api/v2/assets/{short['id']}")).status_code == 404
    assert (await served.client.get(f"/api/v2/assets/{shared['id']}")).status_code == 404
    assert (await served.client.get(long["url"])).content == b"long"
    assert len(served.blobs()) == 1
    assert not await served.assets.has_blob(short["hash"])
    assert await served.assets.has_blob(long["hash"])
    assert await served.assets.sweep(NOW + 600) == 1
    assert served.blobs() == []


async def test_concurrent_uploads_of_the_same_bytes_make_one_blob(served: Served) -> None:
    data = os.urandom(20000)
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await upload(served, data)).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert sorted(statuses) == [200, 200, 200, 200, 201]
    assert len(served.blobs()) == 1
    assert served.temps() == []


def test_asset_json_shape() -> None:
    record = AssetRecord(
        id="9f8a1c0d-2b3e-4f56-8a7b-1c2d3e4f5a6b",
        hash="blake3:" + "a" * 64,
        size_bytes=3,
        content_type="image/png",
        created_at=1_795_859_400.7,
    )
    body = asset_json(record, "http://127.0.0.1:8189")
    assert body == {
        "id": record.id,
        "hash": record.hash,
        "size_bytes": 3,
        "content_type": "image/png",
        "file_path": None,
        "created_at": "2026-11-28T09:50:00Z",
        "url": f"http://127.0.0.1:8189/api/v2/assets/{record.id}/content",
        "url_expires_at": "9999-12-31T23:59:59Z",
        "expires_at": None,
    }
    output = attrs.evolve(record, job_id="j", expires_at=1_795_859_460.0)
    body = asset_json(output, "https://h", created_new=False)
    assert body["job_id"] == "j"
    assert body["created_new"] is False
    assert body["expires_at"] == body["url_expires_at"] == "2026-11-28T09:51:00Z"


async def test_base_url_of_uses_the_host_header(served: Served) -> None:
    asset = (await upload(served, b"x")).json()
    got = await served.client.get(
        f"/api/v2/assets/{asset['id']}", headers={"Host": "example.com:9000"}
    )
    assert got.json()["url"].startswith("http://example.com:9000/api/v2/assets/")
    assert callable(base_url_of)


def multipart_body(data: bytes, boundary: str = "b0undary") -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="content_type"\r\n\r\nimage/png\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="file_path"\r\n\r\na.png\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n",
    ]
    return "".join(parts).encode() + data + f"\r\n--{boundary}--\r\n".encode()


async def test_a_huge_body_is_refused_before_it_is_read(served: Served) -> None:
    body = multipart_body(b"x" * (MAX_BYTES + 2 * 1024 * 1024))
    response = await served.client.post(
        "/api/v2/assets",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
    )
    assert response.status_code == 413
    assert served.temps() == []


async def test_a_huge_chunked_body_is_cut_off(served: Served) -> None:
    body = multipart_body(b"x" * (MAX_BYTES + 2 * 1024 * 1024))

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    response = await served.client.post(
        "/api/v2/assets",
        content=stream(),
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
    )
    assert response.status_code == 413
    assert served.temps() == []
    assert served.blobs() == []


async def test_from_hash_body_is_capped(served: Served) -> None:
    response = await served.client.post(
        "/api/v2/assets/from-hash", json={"hash": digest(b""), "pad": "x" * 100_000}
    )
    assert response.status_code == 413
