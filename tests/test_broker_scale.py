"""The broker at scale, as it is deployed: ``comfytrio worker`` PROCESSES (each with two
fake ComfyUIs in its own process, its own ``--worker-dir``, one shared ``file://`` output
folder) and two producers (two ``open_job_queue`` connections) in the test, against a real
``redis-server``.

What it shows: 200 jobs from two producers each complete once; a worker killed with
``kill -9`` loses its jobs to the other after the lease, and they complete once; a prompt
much longer than the lease is not stolen; Redis restarted under load loses nothing.
Waits are wall-clock with generous limits (leases are real Redis idle times); nothing here
asserts a speed: see ``bench/broker.py`` for that.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import pytest
import trio
from conftest import RedisUrl, empty_to_save
from PIL import Image

from comfytrio.broker import BrokerJob, JobQueue, JobUpdate, open_job_queue

_FAKE_URL = re.compile(r"fake ComfyUI listening on (http://127\.0\.0\.1:\d+)")


@attrs.define(eq=False)
class WorkerProcess:
    """One ``python -m comfytrio worker ... --fake 2`` of the test."""

    name: str
    process: trio.Process
    log: Path
    """Its stderr (the log: where its fakes say which port they listen on)."""

    def fake_urls(self) -> list[str]:
        """The URLs of the fake ComfyUIs it serves in its own process."""
        return _FAKE_URL.findall(self.log.read_text(errors="replace"))

    def kill(self) -> None:
        """``kill -9``: no hand-back, no goodbye, its fakes die with it."""
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> int:
        """SIGTERM (a graceful stop), then its exit code."""
        self.process.terminate()
        with trio.fail_after(30):
            return await self.process.wait()


StartWorkers = Callable[..., Awaitable[list[WorkerProcess]]]


@pytest.fixture
async def start_workers(redis_url: RedisUrl, tmp_path: Path) -> AsyncIterator[StartWorkers]:
    """``await start_workers(*names, seconds_per_image=S, lease=L)``: one worker process
    per name, started in parallel, each returned once it printed ``ready``. Every one is
    stopped (SIGTERM, SIGKILL if it lingers) and its pipe closed after the test."""
    started: list[WorkerProcess] = []
    outputs = tmp_path / "outputs"

    async def start_one(name: str, seconds_per_image: float, lease: float) -> WorkerProcess:
        log = tmp_path / f"worker-{name}.log"
        with log.open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "comfytrio",
                    "worker",
                    "--broker",
                    redis_url,
                    "--outputs",
                    outputs.as_uri(),
                    "--fake",
                    "2",
                    "--fake-seconds-per-image",
                    str(seconds_per_image),
                    "--worker-dir",
                    str(tmp_path / f"worker-{name}"),
                    "--name",
                    name,
                    "--lease",
                    str(lease),
                    "--grace",
                    "0.5",
                    "--print-ready",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        worker = WorkerProcess(name, process, log)
        started.append(worker)
        assert process.stdout is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                assert chunk, f"worker {name} exited before 'ready':\n{log.read_text()}"
                line += chunk
        assert line == b"ready\n", log.read_text()
        return worker

    async def start(
        *names: str, seconds_per_image: float = 0.0, lease: float = 2.0
    ) -> list[WorkerProcess]:
        workers: dict[str, WorkerProcess] = {}

        async def one(name: str) -> None:
            workers[name] = await start_one(name, seconds_per_image, lease)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)
        return [workers[name] for name in names]

    try:
        yield start
    finally:
        with trio.CancelScope(shield=True):
            for worker in started:
                if worker.process.returncode is None:
                    worker.process.terminate()
            for worker in started:
                with trio.move_on_after(20):
                    await worker.process.wait()
                if worker.process.returncode is None:
                    worker.process.kill()
                    await worker.process.wait()
                assert worker.process.stdout is not None
                await worker.process.stdout.aclose()


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """The output folder every worker of ``start_workers`` writes into."""
    return tmp_path / "outputs"


def rgb(color: int) -> tuple[int, int, int]:
    return ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)


def stored_files(folder: Path) -> set[str]:
    """Every file in the output folder, as a store key."""
    if not folder.exists():
        return set()
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


async def all_jobs(queue: JobQueue) -> list[BrokerJob]:
    """Every job the broker lists, page by page."""
    jobs: list[BrokerJob] = []
    cursor: str | None = None
    while True:
        page, cursor = await queue.list(limit=100, cursor=cursor)
        jobs += page
        if cursor is None:
            return jobs


async def updates_of(queue: JobQueue, job_id: str) -> list[JobUpdate]:
    async with aclosing(queue.events(job_id)) as events:
        return [u async for u in events]


async def assert_each_completed_once(
    queue: JobQueue,
    jobs: list[BrokerJob],
    outputs: Path,
    colors: dict[str, int],
    *,
    shards: int = 1,
) -> None:
    """Each job succeeded with one picture per shard (``shards`` of them), of its own
    colour, stored once under a key of the attempt that ended it; its events report each
    once; the folder holds exactly these pictures (nothing from an attempt that did not
    end its job)."""
    assert [(j.id, j.status) for j in jobs if j.status != "succeeded"] == []
    keys = [o.key for j in jobs for o in j.outputs]
    assert len(keys) == len(set(keys)) == shards * len(jobs)
    assert stored_files(outputs) == set(keys)
    for job in jobs:
        assert sorted(o.shard for o in job.outputs) == list(range(shards))
        for output in job.outputs:
            assert output.key.startswith(f"{job.id}/{job.attempt}/{output.shard}-2-")
            assert output.url == (outputs / output.key).as_uri()
            path = outputs / output.key
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(path) as image:
                assert image.getpixel((0, 0)) == rgb(colors[job.id])
        updates = await updates_of(queue, job.id)
        terminal = [u for u in updates if u.kind == "status" and u.data["status"] == "succeeded"]
        assert len(terminal) == 1
        reported = [u.data["key"] for u in updates if u.kind == "output"]
        assert sorted(reported) == sorted(o.key for o in job.outputs)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float) -> None:
    """Until ``await check()`` holds, asked every 20 ms (a state kept in Redis or another
    process: no event to wait on); fails after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 (a state of Redis)
            await trio.sleep(0.02)


def refuses(url: str) -> bool:
    """Nothing listens at ``url`` any more."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=2):
            return False
    except OSError:
        return True


async def running_on(queue: JobQueue, ids: list[str], worker: str) -> list[BrokerJob]:
    jobs = [await queue.get(i) for i in ids]
    return [j for j in jobs if j.status == "running" and j.worker == worker]


async def test_200_jobs_from_two_producers_on_two_worker_processes_each_complete_once(
    redis_url: RedisUrl, start_workers: StartWorkers, outputs: Path
) -> None:
    workers = await start_workers("a", "b")
    colors: dict[str, int] = {}

    async def produce(number: int) -> None:
        async with open_job_queue(redis_url) as producer:

            async def submit(i: int) -> None:
                color = number * 0x010000 + i * 0x000101  # 200 distinct pictures
                job_id = await producer.submit(
                    empty_to_save(prefix=f"p{number}-{i}", color=color),
                    metadata={"producer": number},
                )
                colors[job_id] = color

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(submit, i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce, 1)
        nursery.start_soon(produce, 2)
    assert len(colors) == 200

    async with open_job_queue(redis_url) as queue:
        with trio.fail_after(120):
            jobs = [await queue.wait(job_id) for job_id in colors]
        # No params to split by: each job runs whole on each of its worker's two fakes.
        await assert_each_completed_once(queue, jobs, outputs, colors, shards=2)
        assert all(j.attempt == 1 and j.last_error is None for j in jobs)
        ran = {name: sum(j.worker == name for j in jobs) for name in ("a", "b")}
        assert ran["a"] > 0, ran
        assert ran["b"] > 0, ran
        assert ran["a"] + ran["b"] == 200
        listed = await all_jobs(queue)
        assert sorted(j.id for j in listed) == sorted(colors)
        assert [j.metadata["producer"] for j in listed].count(1) == 100
        listed_keys = [o.key for j in listed for o in j.outputs]
        assert sorted(listed_keys) == sorted(o.key for j in jobs for o in j.outputs)
        assert await queue.pending() == 0
    assert [await w.stop() for w in workers] == [0, 0]


async def test_a_worker_killed_with_sigkill_loses_its_jobs_to_the_other_after_the_lease(
    redis_url: RedisUrl, start_workers: StartWorkers, outputs: Path
) -> None:
    victim, survivor = await start_workers("victim", "survivor", seconds_per_image=2.0)
    async with open_job_queue(redis_url) as queue:
        # One prompt per job (max_shards=1), 2 s each: a worker holds two at a time.
        colors = {await queue.submit(empty_to_save(color=i), max_shards=1): i for i in range(10)}
        ids = list(colors)
        held: list[BrokerJob] = []

        async def victim_full_of_fresh_jobs() -> bool:
            # Both its slots taken (it can start no other job) by jobs that started less
            # than 0.5 s ago (none can end before the signal lands).
            held[:] = await running_on(queue, ids, "victim")
            return len(held) == 2 and all(
                j.started_at is not None and time.time() - j.started_at < 0.5 for j in held
            )

        await eventually(victim_full_of_fresh_jobs, timeout=30)
        fakes = victim.fake_urls()
        assert len(fakes) == 2
        victim.kill()
        assert await victim.process.wait() == -signal.SIGKILL
        assert all(refuses(url) for url in fakes)  # its fakes died with it

        with trio.fail_after(60):
            jobs = [await queue.wait(job_id) for job_id in ids]
        await assert_each_completed_once(queue, jobs, outputs, colors)
        lost = {j.id for j in held}
        retried = {j.id for j in jobs if j.attempt >= 2}
        assert retried == lost
        for job in jobs:
            if job.id in lost:
                assert job.worker == "survivor"
                assert job.last_error is not None
                assert "on worker victim lost its lease" in job.last_error
            else:
                assert job.attempt == 1
                assert job.last_error is None

        # The dead worker's heartbeat ran out: only the survivor is left.
        async def only_survivor() -> bool:
            return [w.name for w in await queue.workers()] == ["survivor"]

        await eventually(only_survivor, timeout=10)
    assert await survivor.stop() == 0


async def test_a_prompt_five_leases_long_is_not_stolen_by_an_idle_worker(
    redis_url: RedisUrl, start_workers: StartWorkers, outputs: Path
) -> None:
    lease = 1.0
    (holder,) = await start_workers("holder", seconds_per_image=5.5, lease=lease)
    async with open_job_queue(redis_url) as queue:
        # Two long jobs fill the holder's two fake ComfyUIs.
        colors = {await queue.submit(empty_to_save(color=i), max_shards=1): i for i in (1, 2)}
        long_ids = list(colors)

        async def both_running() -> bool:
            return len(await running_on(queue, long_ids, "holder")) == 2

        await eventually(both_running, timeout=20)
        (eager,) = await start_workers("eager", lease=lease)
        # It is eager: a job submitted now runs on it at once (the holder has no free slot).
        quick = await queue.submit(empty_to_save(color=3), max_shards=1)
        colors[quick] = 3
        with trio.fail_after(20):
            quick_job = await queue.wait(quick)
        assert quick_job.worker == "eager"
        assert quick_job.completed_at is not None
        # Over the long prompts' whole life, the eager worker (claiming every lease / 2)
        # never takes them: their holder renews the leases.
        seen_eager = []
        with trio.fail_after(30):
            while True:
                jobs = [await queue.get(i) for i in long_ids]
                if all(j.terminal for j in jobs):
                    break
                for job in jobs:
                    assert job.worker == "holder"
                    assert job.attempt == 1
                    assert job.last_error is None
                seen_eager += [
                    w
                    for w in await queue.workers()
                    if w.name == "eager" and w.heartbeat_at > quick_job.completed_at + 0.5
                ]
                await trio.sleep(0.1)
        assert seen_eager
        assert all(w.busy == 0 and w.capacity == 2 for w in seen_eager)
        for job in jobs:
            assert job.completed_at is not None
            assert job.started_at is not None
            assert job.completed_at - job.started_at >= 5 * lease
            assert (job.worker, job.attempt, job.last_error) == ("holder", 1, None)
        jobs.append(await queue.get(quick))
        await assert_each_completed_once(queue, jobs, outputs, colors)
    assert [await holder.stop(), await eager.stop()] == [0, 0]


async def test_jobs_complete_once_across_a_redis_restart_under_load(
    redis_url: RedisUrl, start_workers: StartWorkers, outputs: Path
) -> None:
    workers = await start_workers("a", "b", seconds_per_image=0.3, lease=5.0)
    colors: dict[str, int] = {}

    async def produce(number: int, count: int) -> None:
        """Submit ``count`` jobs, one every 0.1 s, straight through the restart."""
        async with open_job_queue(redis_url, reconnect_timeout=30) as producer:
            for i in range(count):
                color = number * 0x010000 + i
                colors[await producer.submit(empty_to_save(color=color))] = color
                await trio.sleep(0.1)

    async with open_job_queue(redis_url, reconnect_timeout=30) as queue:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, 1, 14)
            nursery.start_soon(produce, 2, 14)

            async def some_running() -> bool:
                return any(j.status == "running" for j in await all_jobs(queue))

            await eventually(some_running, timeout=20)
            # The restart in two steps, so that a job can be submitted while Redis is down.
            redis_url.stop()
            submitted = trio.Event()

            async def submit_while_down() -> None:
                async with open_job_queue(redis_url, reconnect_timeout=30) as late:
                    colors[await late.submit(empty_to_save(color=0xABCDEF))] = 0xABCDEF
                submitted.set()

            nursery.start_soon(submit_while_down)
            await trio.sleep(1.0)
            assert not submitted.is_set()  # it waits for Redis, retrying
            redis_url.start()  # the same append-only file: nothing of before is lost
            with trio.fail_after(30):
                await submitted.wait()
        assert len(colors) == 29

        with trio.fail_after(60):
            jobs = [await queue.wait(job_id) for job_id in colors]
        await assert_each_completed_once(queue, jobs, outputs, colors, shards=2)
        assert sorted(j.id for j in await all_jobs(queue)) == sorted(colors)
        assert {j.worker for j in jobs} == {"a", "b"}
        assert await queue.pending() == 0
    assert [await w.stop() for w in workers] == [0, 0]
