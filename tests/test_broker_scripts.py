"""The broker's Lua scripts one by one, against a real ``redis-server``: fencing by
attempt, and calls that are safe to retry (a reply lost with the connection makes the
client send the same call again)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
import trio
from conftest import RedisUrl, empty_to_save

from comfytrio.broker import BrokerOutput, JobQueue, open_job_queue
from comfytrio.broker._keys import GROUP, Keys
from comfytrio.broker._redis import Conn, open_conn

KEYS = Keys("comfytrio")


@pytest.fixture
async def conn(redis_url: RedisUrl) -> AsyncIterator[Conn]:
    async with open_conn(redis_url, 5.0) as c:
        yield c


@pytest.fixture
async def queue(redis_url: RedisUrl) -> AsyncIterator[JobQueue]:
    async with open_job_queue(redis_url, retention=60) as q:
        yield q


async def deliver(conn: Conn, consumer: str) -> str:
    """Read the pool's next entry as ``consumer``; its id."""
    stream = KEYS.jobs("default")
    answer = await conn.client.xreadgroup(GROUP, consumer, streams={stream: ">"}, count=1)
    assert answer is not None
    return str(answer[stream][0].identifier)


async def start(conn: Conn, job_id: str, worker: str, token: str) -> list[str]:
    answer = await conn.script(
        "START", [KEYS.job(job_id), KEYS.events(job_id)], [worker, token, repr(time.time())]
    )
    return [str(a) for a in answer]


async def finish(conn: Conn, job_id: str, attempt: int, token: str, entry: str) -> str:
    output = BrokerOutput(
        f"{job_id}/{attempt}/0-2-x.png", "file:///x", 1, "image/png", "2", "x.png", "image", 0, None
    ).to_json()
    answer = await conn.script(
        "FINISH",
        [KEYS.job(job_id), KEYS.events(job_id), KEYS.jobs("default")],
        [
            attempt,
            token,
            "succeeded",
            json.dumps([output]),
            "",
            "",
            repr(time.time()),
            entry,
            GROUP,
            json.dumps({"status": "succeeded", "error": None}),
            json.dumps(output),
        ],
    )
    return str(answer)


async def test_a_stale_attempt_writes_nothing_and_a_retried_finish_is_harmless(
    conn: Conn, queue: JobQueue
) -> None:
    job_id = await queue.submit(empty_to_save())
    entry = await deliver(conn, "old")
    assert await start(conn, job_id, "old", "t1") == ["started", "1"]
    assert await start(conn, job_id, "old", "t1") == ["started", "1"]  # retried: same attempt
    # The lease passed to another worker, which started attempt 2.
    await conn.client.xclaim(KEYS.jobs("default"), GROUP, "new", 0, [entry])
    assert await start(conn, job_id, "new", "t2") == ["started", "2"]

    assert await finish(conn, job_id, 1, "t1", entry) == "stale"
    job = await queue.get(job_id)
    assert job.status == "running"
    assert job.outputs == ()
    assert job.worker == "new"

    assert await finish(conn, job_id, 2, "t2", entry) == "succeeded"
    assert await finish(conn, job_id, 2, "t2", entry) == "succeeded"  # retried: no-op
    job = await queue.get(job_id)
    assert job.status == "succeeded"
    assert [o.key for o in job.outputs] == [f"{job_id}/2/0-2-x.png"]
    updates = [u async for u in queue.events(job_id)]
    assert [u.kind for u in updates].count("output") == 1
    assert [u.data["status"] for u in updates if u.kind == "status"] == [
        "queued",
        "running",
        "running",
        "succeeded",
    ]
    assert await conn.client.xlen(KEYS.jobs("default")) == 0  # acked and deleted
    # A late start of the finished job changes nothing.
    assert await start(conn, job_id, "late", "t3") == ["terminal", "succeeded"]


async def test_requeue_is_fenced_and_safe_to_retry(conn: Conn, queue: JobQueue) -> None:
    job_id = await queue.submit(empty_to_save())
    await deliver(conn, "w")
    assert await start(conn, job_id, "w", "t1") == ["started", "1"]
    keys = [KEYS.job(job_id), KEYS.events(job_id)]
    now = repr(time.time())
    assert await conn.script("REQUEUE", keys, [1, "other", now]) == "stale"
    assert await conn.script("REQUEUE", keys, [1, "t1", now]) == "queued"
    assert await conn.script("REQUEUE", keys, [1, "t1", now]) == "queued"
    job = await queue.get(job_id)
    assert job.status == "queued"
    assert job.worker is None


async def test_cancel_of_a_job_whose_worker_died_ends_when_it_is_claimed(
    conn: Conn, queue: JobQueue
) -> None:
    job_id = await queue.submit(empty_to_save())
    await deliver(conn, "dead")
    await start(conn, job_id, "dead", "t1")
    assert (await queue.cancel(job_id)).status == "canceling"
    # The next worker to take the entry finds it canceling: canceled, never run again.
    assert await start(conn, job_id, "next", "t2") == ["terminal", "canceled"]
    job = await queue.get(job_id)
    assert job.status == "canceled"
    assert job.attempt == 1


async def test_a_job_past_its_retention_is_expired(redis_url: RedisUrl) -> None:
    async with open_job_queue(redis_url, retention=1) as short:
        job_id = await short.submit(empty_to_save(), pool="none", metadata={"a": "b"})
        await trio.sleep(1.2)
        job = await short.get(job_id)
        assert job.status == "expired"
        assert job.terminal
        assert job.metadata == {}
        (listed,), _ = await short.list()
        assert listed.id == job_id
        assert listed.status == "expired"
        assert (await short.wait(job_id, timeout=1)).status == "expired"
        assert [u async for u in short.events(job_id)] == []
