"""Run the benchmark workload through the seed library (techtrash-comfyapi 1.1.3, asyncio);
print a JSON result. Runs INSIDE bench/.seed-venv (made by bench/seed_venv.sh):

    bench/.seed-venv/bin/python bench/seed_runner.py --ports 8188,8189 --roots /a,/b

The seed's ``ComfyAPI(..., auto_start=False)`` builds no clients, so we build them exactly as
its ``_start_instances`` would (``ComfyUIClient(inst)`` for the first ``gpu.device_count``
instances) without starting processes. Its ``execute_workflow`` then does what it always does:
one workflow per GPU (its ``gpu_scale`` share, 0 included), and per GPU ``GET /history`` until
ready, ``POST /prompt``, ``GET /history/{id}`` every 2 s. Usually started by bench/compare.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import (
    JobRecord,
    RunnerResult,
    add_runner_arguments,
    emit,
    job_params,
    maxrss_kib,
    prefix_for,
    workflow,
)
from comfyapi import ComfyAPI, ComfyUIInstance, GPUInfo  # type: ignore[import-untyped]
from comfyapi._client import ComfyUIClient  # type: ignore[import-untyped]


async def _run(args: argparse.Namespace) -> RunnerResult:
    rss_start = maxrss_kib()
    ports = [int(p) for p in args.ports.split(",") if p]
    roots = args.roots.split(",")
    instances = [
        ComfyUIInstance(path=root, port=port) for port, root in zip(ports, roots, strict=True)
    ]
    api = ComfyAPI(
        instances,
        models_path=args.models_path,
        gpu=GPUInfo(cuda_available=True, device_count=len(instances)),
        auto_start=False,
    )
    # What `_start_instances` does, minus `start_comfyui`:
    for inst in api.instances[: api.gpu.device_count]:
        api._clients.append(ComfyUIClient(inst))
    images: int = args.images_per_job
    async with api:

        async def one(phase: str, index: int) -> JobRecord:
            prefix = prefix_for(args.tag, phase, index)
            t0 = time.perf_counter()
            error, files = None, 0
            try:
                files = len(
                    await api.execute_workflow(
                        workflow(index), models=[], loras=[], params=job_params(prefix, images)
                    )
                )
            except Exception as exc:
                error = repr(exc)
            return JobRecord(
                prefix=prefix, wall_s=time.perf_counter() - t0, files=files, error=error
            )

        warmup = [await one("warm", i) for i in range(args.warmup)]
        sequential = [await one("seq", i) for i in range(args.latency_jobs)]
        rss_before = maxrss_kib()
        cpu0, t0 = time.process_time(), time.perf_counter()
        concurrent = await asyncio.gather(*(one("conc", i) for i in range(args.jobs)))
        makespan, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return RunnerResult(
        library="seed",
        warmup=warmup,
        sequential=sequential,
        concurrent=list(concurrent),
        makespan_s=makespan,
        cpu_s=cpu,
        rss_start_kib=rss_start,
        rss_before_kib=rss_before,
        rss_peak_kib=maxrss_kib(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", required=True, help="comma-separated ports (localhost)")
    parser.add_argument(
        "--roots",
        required=True,
        help="comma-separated ComfyUI folders (output/ inside), one per port",
    )
    parser.add_argument("--models-path", default=".", help="the seed's models_path")
    add_runner_arguments(parser)
    # The seed logs every rejected 0-image shard with a traceback: keep stderr readable.
    logging.getLogger("comfyapi").setLevel(logging.CRITICAL)
    emit(asyncio.run(_run(parser.parse_args())))


if __name__ == "__main__":
    main()
