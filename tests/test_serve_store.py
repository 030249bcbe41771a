"""The serve store: exact round-trips, restart, idempotency keys, job listing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from comfytrio.serve._problems import ApiProblem
from comfytrio.serve._records import AssetRecord, JobRecord, JobStatus, PromptRecord
from comfytrio.serve._store import SCHEMA_VERSION, open_store

NOW = 1_800_000_000.25


def full_job(job_id: str = "7f3d2c1b-9a8e-4d6f-b012-3c4d5e6f7a8b") -> JobRecord:
    return JobRecord(
        id=job_id,
        status="running",
        created_at=NOW,
        expires_at=NOW + 86400.5,
        workflow={"3": {"class_type": "KSampler", "inputs": {"seed": 1, "cfg": 7.5}}},
        started_at=NOW + 0.1,
        completed_at=None,
        comfytrio={"params": {"seed": [1, 2]}, "gpu_scale": 0.3333333333333333},
        metadata={"user": "ann", "ünï": "cödé"},
        webhook_url="https://example.com/hook",
        idempotency_key="key-1",
        progress={"percent": 12.5, "node": "3"},
        outputs=("a1", "a2"),
        error={"code": "x", "message": "y", "details": None},
        prompts=(
            PromptRecord(index=0, attempt=1, instance="gpu0", url="http://h:1", prompt_id="p1"),
            PromptRecord(index=1, attempt=2, instance="gpu1", url="http://h:2", prompt_id="p2"),
        ),
        shard_count=2,
        split="seed",
        seed=0xFFFF_FFFF_FFFF_FFFF,
        logs=("retry", "done"),
    )


def job(
    job_id: str,
    created_at: float,
    *,
    status: JobStatus = "queued",
    metadata: dict[str, str] | None = None,
    outputs: tuple[str, ...] = (),
) -> JobRecord:
    return JobRecord(
        id=job_id,
        status=status,
        created_at=created_at,
        expires_at=created_at + 100,
        workflow={},
        metadata=metadata or {},
        outputs=outputs,
    )


async def test_job_round_trip_is_exact(tmp_path: Path) -> None:
    record = full_job()
    minimal = job("b", NOW)
    async with open_store(tmp_path / "s.sqlite3") as store:
        await store.put_job(record)
        await store.put_job(minimal)
        assert await store.get_job(record.id) == record
        assert await store.get_job("b") == minimal
        assert await store.get_job("missing") is None
        replaced = job("b", NOW, status="succeeded", outputs=("z",))
        await store.put_job(replaced)
        assert await store.get_job("b") == replaced


async def test_asset_round_trip(tmp_path: Path) -> None:
    asset = AssetRecord(
        id="a",
        hash="blake3:" + "0" * 64,
        size_bytes=12,
        content_type="image/png",
        created_at=NOW,
        file_path="sub/x.png",
        expires_at=NOW + 5,
        job_id="j",
        tags=("input", "t2"),
        node_id="9",
        kind="image",
    )
    async with open_store(tmp_path / "s.sqlite3") as store:
        await store.put_asset(asset)
        assert await store.get_asset("a") == asset
        assert await store.asset_by_hash(asset.hash) == asset
        assert await store.count_assets_with_hash(asset.hash) == 1
        assert await store.assets_of_job("j") == [asset]
        assert await store.expired_assets(NOW + 4) == []
        assert await store.expired_assets(NOW + 5) == [asset]
        assert await store.delete_asset("a")
        assert not await store.delete_asset("a")
        assert await store.get_asset("a") is None
        assert await store.count_assets_with_hash(asset.hash) == 0


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "s.sqlite3"
    async with open_store(path) as store:
        await store.put_job(full_job())
        assert await store.claim_idempotency_key("k", "j1", NOW, 60)
    async with open_store(path) as store:
        assert await store.get_job(full_job().id) == full_job()
        assert not await store.claim_idempotency_key("k", "j2", NOW + 1, 60)
        assert await store.idempotency_claim("k", NOW + 1) == "j1"
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert int(version[0]) == SCHEMA_VERSION
    finally:
        db.close()


async def test_committed_writes_survive_a_killed_process(tmp_path: Path) -> None:
    """A separate process puts a job and claims a key, then is SIGKILLed at once."""
    path = tmp_path / "s.sqlite3"
    script = f"""
import os, signal, trio
from pathlib import Path
from comfytrio.serve._records import JobRecord
from comfytrio.serve._store import open_store

async def main():
    async with open_store(Path({str(path)!r})) as store:
        await store.put_job(JobRecord(id="j", status="queued", created_at=1.0,
                                      expires_at=2.0, workflow={{"a": 1}}))
        assert await store.claim_idempotency_key("k", "j", 1.0, 1000.0)
        os.kill(os.getpid(), signal.SIGKILL)

trio.run(main)
"""
    import sys

    result = await trio.run_process([sys.executable, "-c", script], check=False)
    assert result.returncode == -9
    async with open_store(path) as store:
        got = await store.get_job("j")
        assert got is not None
        assert got.workflow == {"a": 1}
        assert not await store.claim_idempotency_key("k", "other", 2.0, 10)


async def test_idempotency_claim_release_and_expiry(tmp_path: Path) -> None:
    async with open_store(tmp_path / "s.sqlite3") as store:
        assert await store.claim_idempotency_key("k", "j1", NOW, 10)
        assert not await store.claim_idempotency_key("k", "j2", NOW + 9.9, 10)
        # expired: taken over
        assert await store.claim_idempotency_key("k", "j3", NOW + 10, 10)
        assert await store.idempotency_claim("k", NOW + 11) == "j3"
        await store.release_idempotency_key("k")
        assert await store.idempotency_claim("k", NOW + 11) is None
        assert await store.claim_idempotency_key("k", "j4", NOW + 11, 10)
        assert await store.forget_idempotency_keys(NOW + 100) == 1


async def test_concurrent_claims_one_wins(tmp_path: Path) -> None:
    results: dict[str, bool] = {}
    async with open_store(tmp_path / "s.sqlite3") as store:

        async def claim(job_id: str) -> None:
            results[job_id] = await store.claim_idempotency_key("same", job_id, NOW, 60)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(claim, f"j{i}")
        winners = [j for j, won in results.items() if won]
        assert len(winners) == 1
        assert await store.idempotency_claim("same", NOW) == winners[0]


async def test_list_jobs_pages_newest_first(tmp_path: Path) -> None:
    async with open_store(tmp_path / "s.sqlite3") as store:
        # two share a created_at: the id breaks the tie
        for i, t in enumerate([1.0, 2.0, 3.0, 3.0, 4.0]):
            await store.put_job(job(f"j{i}", t))
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page, cursor = await store.list_jobs(limit=2, cursor=cursor)
            pages += 1
            seen.extend(j.id for j in page)
            if cursor is None:
                break
        assert seen == ["j4", "j3", "j2", "j1", "j0"]
        assert pages == 3
        everything, last = await store.list_jobs(limit=5)
        assert [j.id for j in everything] == seen
        assert last is None


async def test_list_jobs_filters(tmp_path: Path) -> None:
    async with open_store(tmp_path / "s.sqlite3") as store:
        await store.put_job(job("a", 1, status="succeeded", metadata={"u": "ann", "p": "x"}))
        await store.put_job(job("b", 2, status="failed", metadata={"u": "ann"}))
        await store.put_job(job("c", 3, status="running", metadata={"u": "bob", "p": "x"}))
        page, _ = await store.list_jobs(statuses={"succeeded", "failed"}, limit=10)
        assert [j.id for j in page] == ["b", "a"]
        page, _ = await store.list_jobs(metadata={"u": "ann"}, limit=10)
        assert [j.id for j in page] == ["b", "a"]
        page, _ = await store.list_jobs(metadata={"u": "ann", "p": "x"}, limit=10)
        assert [j.id for j in page] == ["a"]
        page, _ = await store.list_jobs(statuses={"running"}, metadata={"u": "ann"}, limit=10)
        assert page == []
        # metadata replaced with the job
        await store.put_job(job("c", 3, status="running", metadata={"u": "ann"}))
        page, _ = await store.list_jobs(metadata={"p": "x"}, limit=10)
        assert [j.id for j in page] == ["a"]
        with pytest.raises(ApiProblem) as info:
            await store.list_jobs(limit=10, cursor="not a cursor!")
        assert info.value.code == "invalid_request"


async def test_unfinished_and_expired_jobs(tmp_path: Path) -> None:
    async with open_store(tmp_path / "s.sqlite3") as store:
        statuses: list[JobStatus] = [
            "queued",
            "running",
            "canceling",
            "succeeded",
            "failed",
            "expired",
        ]
        for i, status in enumerate(statuses):
            await store.put_job(job(f"j{i}", float(i), status=status))
        assert [j.id for j in await store.unfinished_jobs()] == ["j0", "j1", "j2"]
        # expires_at = created_at + 100
        assert [j.id for j in await store.expired_jobs(101.0)] == ["j0", "j1"]
        assert [j.id for j in await store.expired_jobs(1000.0)] == [f"j{i}" for i in range(5)]
        assert await store.delete_job("j0")
        assert await store.get_job("j0") is None


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    async with open_store(path):
        pass
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(RuntimeError, match="schema version 999"):
        async with open_store(path):
            pass
