"""Run the benchmark workload through comfytrio's ``ComfyAPI``; print a JSON result.

    .venv/bin/python bench/run_comfytrio.py --urls http://127.0.0.1:8188,http://127.0.0.1:8189

By URL the servers count as remote, so every output is downloaded (GET /view) into
``--download-dir``; with ``--roots`` (one ComfyUI folder per URL, same order) they are attached
as local ``ComfyUIInstance(path, port)`` with ``auto_start=False`` and outputs are read in
place. Usually started by ``bench/compare.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _passes import run_passes
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

from comfytrio import ComfyAPI, ComfyUIInstance, GPUInfo


def _make_api(args: argparse.Namespace, scratch: Path) -> ComfyAPI:
    urls = [u for u in args.urls.split(",") if u]
    download_dir = Path(args.download_dir) if args.download_dir else scratch / "downloads"
    extra: dict[str, Any] = {}
    if args.depth:
        extra["prompts_per_instance"] = args.depth
    if not args.roots:
        return ComfyAPI(urls, models_path=scratch / "models", download_dir=download_dir, **extra)
    roots = args.roots.split(",")
    if len(roots) != len(urls):
        raise SystemExit("--roots needs one folder per URL")
    instances = [
        ComfyUIInstance(path=root, port=int(urlsplit(url).port or 80))
        for url, root in zip(urls, roots, strict=True)
    ]
    return ComfyAPI(
        instances,
        models_path=scratch / "models",
        auto_start=False,
        gpu=GPUInfo(cuda_available=False, device_count=len(instances)),
        download_dir=download_dir,
        **extra,
    )


async def _run(args: argparse.Namespace) -> RunnerResult:
    rss_start = maxrss_kib()
    images: int = args.images_per_job
    with tempfile.TemporaryDirectory(prefix="comfytrio-bench-") as tmp:
        scratch = Path(tmp)
        (scratch / "models").mkdir()
        async with _make_api(args, scratch) as api:

            async def one(phase: str, index: int) -> JobRecord:
                prefix = prefix_for(args.tag, phase, index)
                t0 = time.perf_counter()
                error = None
                files = 0
                try:
                    files = len(
                        await api.execute_workflow(
                            workflow(index), params=job_params(prefix, images)
                        )
                    )
                except Exception as exc:
                    error = repr(exc)
                return JobRecord(
                    prefix=prefix, wall_s=time.perf_counter() - t0, files=files, error=error
                )

            result = await run_passes(
                "comfytrio-local" if args.roots else "comfytrio",
                one,
                warmup=args.warmup,
                latency_jobs=args.latency_jobs,
                jobs=args.jobs,
                rss_start=rss_start,
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", required=True, help="comma-separated server URLs")
    parser.add_argument(
        "--roots", default="", help="comma-separated ComfyUI folders, one per URL: attach as local"
    )
    parser.add_argument("--download-dir", default="", help="where remote outputs go")
    parser.add_argument("--profile", default="", help="write a cProfile of the run here")
    parser.add_argument(
        "--depth",
        type=int,
        default=0,
        help="ComfyAPI(prompts_per_instance=...) (default: the library's)",
    )
    add_runner_arguments(parser)
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        result = profiler.runcall(trio.run, _run, args)
        profiler.dump_stats(args.profile)
    else:
        result = trio.run(_run, args)
    emit(result)


if __name__ == "__main__":
    main()
