"""The Redis Streams broker against a real ``redis-server`` and real fake ComfyUIs: jobs
submitted by a producer run on workers, once, through dead workers, long prompts,
cancels, graceful stops and a Redis restart (wall-clock time: Redis idle times are real)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, ClassVar

import attrs
import coredis
import pytest
import trio
from conftest import RedisUrl, api_on_fakes, empty_to_save, until
from coredis.response.types import StreamPendingExt

from comfytrio import (
    BrokerUnavailableError,
    ComfyAPI,
    IdempotencyKeyReusedError,
    JobNotFoundError,
)
from comfytrio.broker import (
    BrokerJob,
    JobQueue,
    JobUpdate,
    WorkerInfo,
    open_job_queue,
    run_worker,
)
from comfytrio.hookspecs import StoredOutput
from comfytrio.testing import FakeComfyUI

FakeFactory = Callable[..., Any]


class FolderStore:
    """The smallest ``OutputStore``: files under a folder (written atomically)."""

    scheme: ClassVar[str] = "file"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.puts: list[str] = []

    async def put(self, key: str, path: Path, *, content_type: str) -> StoredOutput:
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
        self.puts.append(key)
        return StoredOutput(key, dest.as_uri(), dest.stat().st_size, content_type)

    async def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    async def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def stored(self) -> set[str]:
        return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}


@attrs.define(eq=False)
class Worker:
    """A ``run_worker`` of the test, in its own cancel scope."""

    info: WorkerInfo
    scope: trio.CancelScope
    done: trio.Event
    die: trio.Event

    async def stop(self) -> None:
        """Cancel it (a graceful stop) and wait until it returned."""
        self.scope.cancel()
        with trio.fail_after(15):
            await self.done.wait()

    async def kill(self) -> None:
        """End it as a crash would: no hand-back, nothing more written."""
        self.die.set()
        with trio.fail_after(15):
            await self.done.wait()


@attrs.define(eq=False)
class Env:
    """What a test starts: fake ComfyUIs, a ComfyAPI over each, workers."""

    nursery: trio.Nursery
    url: RedisUrl
    store: FolderStore
    factory: FakeFactory
    tmp_path: Path
    workers: list[Worker] = attrs.field(factory=list)
    count: int = 0

    async def api(self, **fake: Any) -> tuple[ComfyAPI, FakeComfyUI]:
        """A ComfyAPI over one new fake ComfyUI (``fake``: its keywords), open until the
        test ends."""
        server: FakeComfyUI = await self.factory(**fake)
        self.count += 1
        folder = self.tmp_path / f"api-{self.count}"

        async def hold(*, task_status: trio.TaskStatus[ComfyAPI]) -> None:
            async with api_on_fakes([server], folder) as api:
                task_status.started(api)
                await trio.sleep_forever()

        api: ComfyAPI = await self.nursery.start(hold)
        return api, server

    async def worker(self, api: ComfyAPI, name: str, **options: Any) -> Worker:
        """``run_worker`` on ``api`` (``grace`` 0.5 s unless given)."""
        options.setdefault("grace", 0.5)
        scope = trio.CancelScope()
        done = trio.Event()
        die = trio.Event()

        async def run(*, task_status: trio.TaskStatus[WorkerInfo]) -> None:
            try:
                with scope:
                    await run_worker(
                        api,
                        self.url,
                        store=self.store,
                        name=name,
                        task_status=task_status,
                        _die=die,
                        **options,
                    )
            finally:
                done.set()

        info: WorkerInfo = await self.nursery.start(run)
        worker = Worker(info, scope, done, die)
        self.workers.append(worker)
        return worker


@pytest.fixture
async def env(
    redis_url: RedisUrl, fake_comfyui_factory: FakeFactory, tmp_path: Path
) -> AsyncIterator[Env]:
    """Workers stop (gracefully) before their apis close."""
    async with trio.open_nursery() as nursery:
        store = FolderStore(tmp_path / "store")
        env = Env(nursery, redis_url, store, fake_comfyui_factory, tmp_path)
        yield env
        for worker in env.workers:
            worker.scope.cancel()
        with trio.fail_after(15):
            for worker in env.workers:
                await worker.done.wait()
        nursery.cancel_scope.cancel()


@pytest.fixture
async def queue(redis_url: RedisUrl) -> AsyncIterator[JobQueue]:
    async with open_job_queue(redis_url, reconnect_timeout=20.0) as q:
        yield q


def output_keys(jobs: list[BrokerJob]) -> list[str]:
    return [o.key for job in jobs for o in job.outputs]


async def test_a_job_runs_on_a_worker_and_its_outputs_are_stored_and_reported_once(
    env: Env, queue: JobQueue
) -> None:
    api, _ = await env.api()
    worker = await env.worker(api, "w1", lease=2.0)
    assert worker.info.capacity == 1
    assert worker.info.pools == ("default",)
    job_id = await queue.submit(empty_to_save(batch=2), metadata={"user": "ada"})
    job = await queue.wait(job_id, timeout=20)
    assert job.status == "succeeded", job.error
    assert job.attempt == 1
    assert job.worker == "w1"
    assert job.error is None
    assert job.metadata == {"user": "ada"}
    assert job.workflow == empty_to_save(batch=2)
    assert len(job.outputs) == 2
    assert {o.batch_index for o in job.outputs} == {None}  # no split param
    for output in job.outputs:
        assert output.key.startswith(f"{job_id}/1/0-2-")
        assert output.kind == "image"
        assert output.node_id == "2"
        assert output.content_type == "image/png"
        assert (await env.store.get(output.key))[:4] == b"\x89PNG"
    assert env.store.stored() == {o.key for o in job.outputs}
    assert job.progress is not None
    assert job.progress["shards_finished"] == 1

    async with aclosing(queue.events(job_id)) as events:
        updates: list[JobUpdate] = [u async for u in events]
    kinds = [u.kind for u in updates]
    statuses = [u.data["status"] for u in updates if u.kind == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert kinds.count("output") == 2
    assert kinds[-1] == "status"
    assert sorted(u.data["key"] for u in updates if u.kind == "output") == sorted(
        o.key for o in job.outputs
    )
    assert "progress" in kinds

    (info,) = await queue.workers()
    assert info.name == "w1"
    assert info.capacity == 1
    assert info.gpu_count == 0
    assert await queue.pending("default") == 0
    await worker.stop()
    assert await queue.workers() == []


async def test_twenty_jobs_on_two_workers_each_complete_once(env: Env, queue: JobQueue) -> None:
    api1, _ = await env.api(seconds_per_image=0.05)
    api2, _ = await env.api(seconds_per_image=0.05)
    await env.worker(api1, "a", lease=2.0)
    await env.worker(api2, "b", lease=2.0)
    ids = [await queue.submit(empty_to_save(prefix=f"j{i}")) for i in range(20)]
    jobs = [await queue.wait(i, timeout=30) for i in ids]
    assert [j.status for j in jobs] == ["succeeded"] * 20
    assert all(j.attempt == 1 and len(j.outputs) == 1 for j in jobs)
    keys = output_keys(jobs)
    assert len(set(keys)) == 20
    assert env.store.stored() == set(keys)
    assert sorted(env.store.puts) == sorted(keys)  # nothing stored twice
    by_worker = {w: sum(j.worker == w for j in jobs) for w in ("a", "b")}
    assert by_worker["a"] > 0, by_worker
    assert by_worker["b"] > 0, by_worker


async def test_the_job_of_a_dead_worker_is_claimed_after_its_lease(
    env: Env, queue: JobQueue
) -> None:
    slow, _ = await env.api(seconds_per_image=1.0)
    fast, _ = await env.api()
    dying = await env.worker(slow, "dying", lease=1.0)
    job_id = await queue.submit(empty_to_save())
    await until(lambda: bool(dying.info), timeout=5)
    await until_status(queue, job_id, "running")
    survivor = await env.worker(fast, "survivor", lease=1.0)
    await dying.kill()
    job = await queue.wait(job_id, timeout=15)
    assert job.status == "succeeded"
    assert job.worker == "survivor"
    assert job.attempt == 2
    assert job.last_error is not None
    assert "dying lost its lease" in job.last_error
    assert len(job.outputs) == 1
    assert job.outputs[0].key.startswith(f"{job_id}/2/")
    assert env.store.stored() == {job.outputs[0].key}
    await survivor.stop()


async def test_a_box_whose_servers_all_fail_hands_the_job_to_another(
    env: Env, queue: JobQueue
) -> None:
    slow, server = await env.api(seconds_per_image=2.0)
    fast, _ = await env.api()
    broken = await env.worker(slow, "broken", lease=2.0)
    job_id = await queue.submit(empty_to_save())
    await until_status(queue, job_id, "running")
    good = await env.worker(fast, "good", lease=2.0)
    server.crash()  # the box's only ComfyUI dies: the job is not at fault
    job = await queue.wait(job_id, timeout=30)
    assert job.status == "succeeded", job.error
    assert (job.worker, job.attempt) == ("good", 2)
    assert job.last_error is not None
    assert "on worker broken" in job.last_error
    assert env.store.stored() == {o.key for o in job.outputs}
    assert len(job.outputs) == 1
    await broken.stop()
    await good.stop()


async def until_status(queue: JobQueue, job_id: str, status: str, timeout: float = 10) -> BrokerJob:
    with trio.fail_after(timeout):
        while True:
            job = await queue.get(job_id)
            if job.status == status:
                return job
            await trio.sleep(0.02)


async def test_a_long_prompt_keeps_its_lease(env: Env, queue: JobQueue) -> None:
    slow, _ = await env.api(seconds_per_image=3.0)
    idle, _ = await env.api()
    await env.worker(slow, "holder", lease=0.6)
    job_id = await queue.submit(empty_to_save())
    await until_status(queue, job_id, "running")
    await env.worker(idle, "eager", lease=0.6)
    # A busy worker reads no job it cannot start: the next one goes to the idle worker.
    second = await queue.wait(await queue.submit(empty_to_save(prefix="b")), timeout=10)
    assert second.worker == "eager"
    assert (await queue.get(job_id)).status == "running"
    job = await queue.wait(job_id, timeout=20)
    assert job.status == "succeeded"
    assert job.worker == "holder"
    assert job.attempt == 1
    assert job.last_error is None
    assert len(env.store.puts) == 2


async def test_attempts_exhausted_goes_to_the_dead_letter_stream(env: Env, queue: JobQueue) -> None:
    slow, _ = await env.api(seconds_per_image=2.0)
    other, _ = await env.api()
    dying = await env.worker(slow, "dying", lease=0.6, max_attempts=1)
    job_id = await queue.submit(empty_to_save())
    await until_status(queue, job_id, "running")
    await env.worker(other, "judge", lease=0.6, max_attempts=1)
    await dying.kill()
    job = await queue.wait(job_id, timeout=15)
    assert job.status == "failed"
    assert job.outputs == ()
    assert job.error is not None
    assert job.error["code"] == "attempts_exhausted"
    assert "delivered 2 times" in job.error["message"]
    assert "dying lost its lease" in job.error["message"]
    async with coredis.Redis.from_url(env.url, decode_responses=True) as redis:
        (entry,) = await redis.xrange("comfytrio:dead:default")
        assert entry.field_values["job"] == job_id
        assert "dying lost its lease" in entry.field_values["error"]
        assert await redis.xlen("comfytrio:jobs:default") == 0  # acked and deleted
    assert env.store.stored() == set()


async def test_cancel_a_queued_job(env: Env, queue: JobQueue) -> None:
    job_id = await queue.submit(empty_to_save(), pool="later")
    assert await queue.pending("later") == 1
    job = await queue.cancel(job_id)
    assert job.status == "canceled"
    assert job.completed_at is not None
    assert (await queue.cancel(job_id)).status == "canceled"  # idempotent
    api, server = await env.api()
    await env.worker(api, "w", pools=("later",), lease=1.0)
    async with coredis.Redis.from_url(env.url, decode_responses=True) as redis:
        with trio.fail_after(10):
            while await redis.xlen("comfytrio:jobs:later"):  # noqa: ASYNC110 (Redis state)
                await trio.sleep(0.02)
    job = await queue.get(job_id)
    assert job.status == "canceled"
    assert job.attempt == 0
    assert server.executed_count == 0


async def test_cancel_a_running_job(env: Env, queue: JobQueue) -> None:
    api, server = await env.api(seconds_per_image=1.0)
    await env.worker(api, "w", lease=1.0)
    job_id = await queue.submit(empty_to_save())
    await until_status(queue, job_id, "running")
    await until(lambda: server.running_id is not None)
    job = await queue.cancel(job_id)
    assert job.status == "canceling"
    job = await queue.wait(job_id, timeout=10)
    assert job.status == "canceled"
    assert job.outputs == ()
    await until(lambda: server.running_id is None and not server.queue_ids(), timeout=5)
    assert env.store.stored() == set()
    # The worker is free again: the next job runs.
    second = await queue.submit(empty_to_save(prefix="next"))
    assert (await queue.wait(second, timeout=15)).status == "succeeded"


async def test_a_graceful_stop_hands_the_job_back(env: Env, queue: JobQueue) -> None:
    slow, server = await env.api(seconds_per_image=3.0)
    other, _ = await env.api()
    leaving = await env.worker(slow, "leaving", lease=1.0, grace=0.2)
    job_id = await queue.submit(empty_to_save())
    await until_status(queue, job_id, "running")
    await leaving.stop()
    job = await queue.get(job_id)
    assert job.status == "queued"
    assert job.worker is None
    await until(lambda: server.running_id is None and not server.queue_ids(), timeout=5)
    with trio.fail_after(3):  # handed back at once: claimed at the first claim round
        await env.worker(other, "taker", lease=1.0)
        job = await queue.wait(job_id)
    assert job.status == "succeeded"
    assert job.worker == "taker"
    assert job.attempt == 2
    assert job.last_error is None
    assert env.store.stored() == {o.key for o in job.outputs}


async def test_jobs_complete_once_across_a_redis_restart(env: Env, queue: JobQueue) -> None:
    api1, _ = await env.api(seconds_per_image=0.4)
    api2, _ = await env.api(seconds_per_image=0.4)
    await env.worker(api1, "a", lease=2.0, reconnect_timeout=20.0)
    await env.worker(api2, "b", lease=2.0, reconnect_timeout=20.0)
    ids = [await queue.submit(empty_to_save(prefix=f"r{i}")) for i in range(6)]
    await until_status(queue, ids[0], "running")
    await env.url.restart(downtime=0.5)
    jobs = [await queue.wait(i, timeout=30) for i in ids]
    assert [j.status for j in jobs] == ["succeeded"] * 6
    keys = output_keys(jobs)
    assert len(keys) == 6
    assert len(set(keys)) == 6
    assert env.store.stored() == set(keys)


async def test_idempotency_and_job_ids(queue: JobQueue) -> None:
    first = await queue.submit(empty_to_save(), pool="none", idempotency_key="k1")
    with pytest.raises(IdempotencyKeyReusedError) as caught:
        await queue.submit(empty_to_save(), pool="none", idempotency_key="k1")
    assert caught.value.key == "k1"
    assert caught.value.job_id == first
    mine = await queue.submit(empty_to_save(), pool="none", job_id="my-job.1")
    again = await queue.submit(empty_to_save(batch=3), pool="none", job_id="my-job.1")
    assert mine == again == "my-job.1"
    assert (await queue.get("my-job.1")).workflow == empty_to_save()
    assert await queue.pending("none") == 2
    with pytest.raises(ValueError, match="job_id"):
        await queue.submit(empty_to_save(), job_id="../x")
    with pytest.raises(JobNotFoundError):
        await queue.get("nope")
    with pytest.raises(JobNotFoundError):
        await queue.cancel("nope")
    with pytest.raises(TimeoutError):
        await queue.wait(first, timeout=0.3)


async def test_list_filters_and_pages(queue: JobQueue) -> None:
    ids = [
        await queue.submit(empty_to_save(), pool="none", metadata={"batch": "ab"[i % 2]})
        for i in range(7)
    ]
    for job_id in ids[:2]:
        await queue.cancel(job_id)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = await queue.list(limit=3, cursor=cursor)
        pages += 1
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert pages == 3
    canceled, more = await queue.list(statuses={"canceled"})
    assert [j.id for j in canceled] == ids[1::-1]
    assert more is None
    a_jobs, _ = await queue.list(metadata={"batch": "a"})
    assert [j.id for j in a_jobs] == ids[::2][::-1]
    queued_b, _ = await queue.list(statuses=["queued"], metadata={"batch": "b"}, limit=1)
    assert [j.id for j in queued_b] == [ids[5]]


async def test_an_attempt_that_lost_its_lease_drops_its_outputs(
    env: Env, queue: JobQueue, fake_comfyui_factory: FakeFactory
) -> None:
    fast = await fake_comfyui_factory()
    slow = await fake_comfyui_factory(seconds_per_image=3.0)

    async def hold(*, task_status: trio.TaskStatus[ComfyAPI]) -> None:
        async with api_on_fakes([fast, slow], env.tmp_path / "two") as api:
            task_status.started(api)
            await trio.sleep_forever()

    two: ComfyAPI = await env.nursery.start(hold)
    await env.worker(two, "partitioned", lease=0.9)
    job_id = await queue.submit(empty_to_save())
    await until(lambda: any(k.startswith(f"{job_id}/1/") for k in env.store.stored()))
    # Another consumer takes the entry, as after a partition: the holder must notice
    # within lease / 3, stop, and delete what it stored.
    async with coredis.Redis.from_url(env.url, decode_responses=True) as redis:
        pending = await redis.xpending("comfytrio:jobs:default", "workers", "-", "+", 10)
        entry = pending[0]
        assert isinstance(entry, StreamPendingExt)
        await redis.xclaim("comfytrio:jobs:default", "workers", "thief", 0, [entry.identifier])
    await until(lambda: not env.store.stored(), timeout=5)
    other, _ = await env.api()
    await env.worker(other, "heir", lease=0.9)
    job = await queue.wait(job_id, timeout=15)
    assert job.status == "succeeded"
    assert job.attempt == 2
    assert job.worker == "heir"
    assert job.outputs
    assert all(o.key.startswith(f"{job_id}/2/") for o in job.outputs)
    assert env.store.stored() == {o.key for o in job.outputs}
    async with aclosing(queue.events(job_id)) as events:
        reported = [u.data["key"] async for u in events if u.kind == "output"]
    assert sorted(reported) == sorted(o.key for o in job.outputs)


async def test_redis_away_too_long_raises_broker_unavailable(redis_url: RedisUrl) -> None:
    async with open_job_queue(redis_url, reconnect_timeout=0.5) as queue:
        job_id = await queue.submit(empty_to_save())
        redis_url.stop()
        with pytest.raises(BrokerUnavailableError) as caught:
            await queue.get(job_id)
        assert caught.value.url == redis_url
        redis_url.start()
        assert (await queue.get(job_id)).status == "queued"  # kept: append-only file
