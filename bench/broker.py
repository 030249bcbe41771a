"""comfytrio in process against comfytrio through Redis (the broker), on the same fake ComfyUIs.

Starts N fake ComfyUI servers in this process and one ``redis-server`` (append-only file,
``everysec``, as docs/scale-out.md recommends), then runs the benchmark workload
(``_workload.py``: one image per job, its own colour and prefix) two ways:

- ``in process``: one ``ComfyAPI`` over all N servers, ``run_workflow`` from one task per job;
- ``broker``: ``--workers`` ``run_worker`` tasks (each a ``ComfyAPI`` over its share of the
  servers, outputs put into a folder ``OutputStore``) and one ``JobQueue`` producer that
  submits every job and waits for each (``JobQueue.wait``).

Each way runs the same passes, after one warm-up job per server: ``--latency-jobs`` jobs one
at a time with the fakes at 0 s per image (latency: submit -> terminal, the caller's view);
then ``--jobs`` jobs at once with the fakes at 0 s per image (the orchestration's ceiling),
then at ``--seconds-per-image`` (a simulated GPU). Prints a markdown table::

    .venv/bin/python bench/broker.py --servers 4 --jobs 200

CPU is this process's (the fakes, the clients, the workers and the producer all share it)
plus, for the broker, the ``redis-server`` process's, per job of the timed pass.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import job_params, percentile, workflow

from comfytrio import ComfyAPI, GPUInfo, make_plugin_manager
from comfytrio.broker import JobQueue, WorkerInfo, open_job_queue, run_worker
from comfytrio.testing import FakeComfyUI, serve_fake_comfyui

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---------------------------------------------------------------------------------- redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A ``redis-server`` on a free port with its data in ``folder``; its process and URL."""
    port = _free_port()
    log = (folder / "redis.log").open("wb")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"redis-server did not start, see {folder}/redis.log")
        time.sleep(0.02)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


# ---------------------------------------------------------------------------------- passes

OneJob = Callable[[str, int], Awaitable[float]]
"""Runs job ``index`` of pass ``phase``; returns its wall time (submit -> terminal)."""


@dataclass
class Throughput:
    jobs: int
    makespan_s: float
    cpu_s: float
    redis_cpu_s: float

    @property
    def per_s(self) -> float:
        return self.jobs / self.makespan_s


@dataclass
class Way:
    name: str
    latency_s: list[float]
    fast: Throughput
    slow: Throughput
    splits: list[tuple[float, float, float]] | None = None
    """Broker only, per latency job: submitted -> started (the worker's START), started ->
    completed (its FINISH), completed -> the caller's ``wait`` returned (seconds)."""


def set_speed(fakes: list[FakeComfyUI], seconds_per_image: float) -> None:
    for fake in fakes:
        fake.set_seconds_per_image(seconds_per_image)


async def run_passes(
    name: str,
    one: OneJob,
    fakes: list[FakeComfyUI],
    args: argparse.Namespace,
    redis_pid: int | None = None,
) -> Way:
    """Warm-up (one job per server, at once), latency (one at a time, 0 s per image), then
    ``args.jobs`` at once at 0 s per image and at ``args.seconds_per_image``."""
    set_speed(fakes, 0.0)
    async with trio.open_nursery() as nursery:
        for i in range(len(fakes)):
            nursery.start_soon(one, "warm", i)
    latency = [await one("seq", i) for i in range(args.latency_jobs)]

    async def timed(phase: str) -> Throughput:
        redis0 = process_cpu_s(redis_pid) if redis_pid else 0.0
        cpu0, t0 = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(args.jobs):
                nursery.start_soon(one, phase, i)
        makespan, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        redis = (process_cpu_s(redis_pid) - redis0) if redis_pid else 0.0
        return Throughput(args.jobs, makespan, cpu, redis)

    fast = await timed("fast")
    set_speed(fakes, args.seconds_per_image)
    slow = await timed("slow")
    return Way(name, latency, fast, slow)


async def in_process(fakes: list[FakeComfyUI], args: argparse.Namespace, work: Path) -> Way:
    async with ComfyAPI(
        [f.url for f in fakes],
        gpu=GPUInfo(False, 0),
        download_dir=work / "downloads-in-process",
        min_instances=len(fakes),
    ) as api:

        async def one(phase: str, index: int) -> float:
            t0 = time.perf_counter()
            result = await api.run_workflow(
                workflow(index), params=job_params(f"in-{phase}-{index:06d}", args.images)
            )
            if result.failures or len(result.outputs) != args.images:
                raise SystemExit(f"in process: job {phase} {index} failed: {result.failures}")
            return time.perf_counter() - t0

        return await run_passes("in process", one, fakes, args)


async def through_redis(
    fakes: list[FakeComfyUI],
    args: argparse.Namespace,
    work: Path,
    url: str,
    redis_pid: int,
) -> Way:
    store = make_plugin_manager().open_output_store((work / "store").as_uri())
    shares = [fakes[i :: args.workers] for i in range(args.workers)]

    async def worker(
        number: int, share: list[FakeComfyUI], *, task_status: trio.TaskStatus[WorkerInfo]
    ) -> None:
        async with ComfyAPI(
            [f.url for f in share],
            gpu=GPUInfo(False, 0),
            download_dir=work / f"downloads-worker-{number}",
            min_instances=len(share),
        ) as api:
            await run_worker(
                api,
                url,
                store=store,
                name=f"bench-{number}",
                task_status=task_status,
            )

    async with trio.open_nursery() as nursery:
        for number, share in enumerate(shares):
            await nursery.start(worker, number, share)
        async with open_job_queue(url) as queue:
            splits: list[tuple[float, float, float]] = []

            async def one(phase: str, index: int) -> float:
                return await submit_and_wait(
                    queue, phase, index, args.images, splits if phase == "seq" else None
                )

            way = await run_passes(
                f"broker ({args.workers} worker{'s' if args.workers > 1 else ''})",
                one,
                fakes,
                args,
                redis_pid,
            )
        nursery.cancel_scope.cancel()  # workers stop gracefully: nothing is running
    way.splits = splits
    return way


async def submit_and_wait(
    queue: JobQueue,
    phase: str,
    index: int,
    images: int,
    splits: list[tuple[float, float, float]] | None,
) -> float:
    t0 = time.perf_counter()
    job_id = await queue.submit(
        workflow(index), params=job_params(f"rd-{phase}-{index:06d}", images)
    )
    job = await queue.wait(job_id, timeout=600)
    wall = time.perf_counter() - t0
    returned = time.time()
    if job.status != "succeeded" or len(job.outputs) != images:
        raise SystemExit(f"broker: job {phase} {index} ended {job.status}: {job.error}")
    if splits is not None:
        assert job.started_at is not None
        assert job.completed_at is not None
        splits.append(
            (
                job.started_at - job.created_at,
                job.completed_at - job.started_at,
                returned - job.completed_at,
            )
        )
    return wall


# ---------------------------------------------------------------------------------- report


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(ways: list[Way], args: argparse.Namespace) -> str:
    base = ways[0]
    base_p50 = statistics.median(base.latency_s)
    base_p95 = percentile(base.latency_s, 0.95)
    head = (
        "| way | latency p50 ms | p95 ms | added p50 ms | added p95 ms "
        f"| jobs/s at 0 s/image | jobs/s at {args.seconds_per_image} s/image "
        "| CPU ms/job (this process) | redis-server CPU ms/job |"
    )
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for way in ways:
        p50 = statistics.median(way.latency_s)
        p95 = percentile(way.latency_s, 0.95)
        added = way is not base
        cpu = way.fast.cpu_s / way.fast.jobs
        redis = way.fast.redis_cpu_s / way.fast.jobs
        lines.append(
            f"| {way.name} | {ms(p50)} | {ms(p95)} "
            f"| {ms(p50 - base_p50) if added else '-'} | {ms(p95 - base_p95) if added else '-'} "
            f"| {way.fast.per_s:.1f} | {way.slow.per_s:.1f} "
            f"| {ms(cpu)} | {ms(redis) if added else '-'} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=4, help="fake ComfyUIs (default 4)")
    parser.add_argument(
        "--jobs", type=int, default=200, help="jobs of each timed pass (default 200)"
    )
    parser.add_argument(
        "--latency-jobs", type=int, default=30, help="jobs run one at a time (default 30)"
    )
    parser.add_argument(
        "--seconds-per-image",
        type=float,
        default=0.2,
        help="simulated GPU time of the second timed pass (default 0.2)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="broker workers sharing the servers (default 2)"
    )
    parser.add_argument("--images", type=int, default=1, help="images per job (default 1)")
    args = parser.parse_args(argv)
    if args.servers < 1 or args.jobs < 1 or args.latency_jobs < 1 or args.images < 1:
        parser.error("--servers, --jobs, --latency-jobs and --images must be at least 1")
    if not 1 <= args.workers <= args.servers:
        parser.error("--workers must be between 1 and --servers")
    return args


async def bench(args: argparse.Namespace, work: Path) -> list[Way]:
    redis, url = start_redis(work)
    try:
        async with trio.open_nursery() as nursery:
            fakes: list[FakeComfyUI] = [
                await nursery.start(partial(serve_fake_comfyui, work / f"fake-{i}"))
                for i in range(args.servers)
            ]
            ways = [
                await in_process(fakes, args, work),
                await through_redis(fakes, args, work, url, redis.pid),
            ]
            nursery.cancel_scope.cancel()
        return ways
    finally:
        redis.terminate()
        redis.wait(10)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="comfytrio-bench-broker-") as tmp:
        ways = trio.run(bench, args, Path(tmp))
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()[2:3]
    print(f"command: `{' '.join(['.venv/bin/python', 'bench/broker.py', *sys.argv[1:]])}`")
    print(
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"redis-server {' '.join(redis_version)}; {args.servers} in-process fakes, "
        f"{args.jobs} jobs per timed pass, {args.latency_jobs} latency jobs, "
        f"{args.images} image(s) per job"
    )
    print()
    print(table(ways, args))
    for way in ways:
        if way.splits:
            parts = [statistics.median(s[i] for s in way.splits) for i in range(3)]
            print(
                f"- {way.name}, latency jobs (p50): submitted -> started {ms(parts[0])} ms, "
                f"started -> completed {ms(parts[1])} ms, completed -> caller {ms(parts[2])} ms"
            )
        print(
            f"- {way.name}: makespan {way.fast.makespan_s:.2f} s at 0 s/image, "
            f"{way.slow.makespan_s:.2f} s at {args.seconds_per_image} s/image "
            f"(ideal {args.jobs * args.images * args.seconds_per_image / args.servers:.2f} s)"
        )


if __name__ == "__main__":
    main()
