"""Long jobs with idle gaps between them, by URL, on real ``comfytrio fake-server`` processes.

The check behind "healthy GPUs are never killed and no job is lost" (issue 12), in real time:
K fake servers with ``--seconds-per-image`` S and ``--idle-timeout`` I, then N jobs of B
images each (split over the servers), one after the other with G seconds of idle time between
them, so every kept-alive connection has been closed by the server when the next job (and the
next health probe) comes. Prints one row per job and the statistics of every instance::

    .venv/bin/python bench/long_jobs.py                      # 2 servers, 3 jobs of 12 s, 6 s gaps
    .venv/bin/python bench/long_jobs.py --idle-timeout 75    # ComfyUI's own idle timeout

Every job must come back whole, with 0 hangs, restarts and retries.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from comfytrio import ComfyAPI, GPUInfo

WORKFLOW = {
    "1": {"class_type": "PrimitiveString", "inputs": {"value": "x"}, "_meta": {"title": "P"}},
    "2": {"class_type": "PrimitiveInt", "inputs": {"value": 1}, "_meta": {"title": "B"}},
    "3": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": ["2", 0], "color": 3},
    },
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": ["1", 0]}},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(args: argparse.Namespace, urls: list[str], work: Path) -> bool:
    whole = True
    async with ComfyAPI(urls, work / "models", gpu=GPUInfo(False, 0), download_dir=work) as api:
        print("| job | images | files | seconds |")
        print("| --- | --- | --- | --- |")
        for n in range(args.jobs):
            if n:
                await trio.sleep(args.gap)
            params = {
                "prefix": {"type": "string", "value": f"job{n}", "node_mappings": "P"},
                "batch": {
                    "type": "integer",
                    "value": args.images,
                    "gpu_scale": True,
                    "node_mappings": "B",
                },
            }
            started = trio.current_time()
            result = await api.run_workflow(WORKFLOW, params=params)
            files = sum([await trio.Path(o.path).is_file() for o in result.outputs])
            whole = whole and files == args.images and not result.failures
            print(f"| {n} | {args.images} | {files} | {trio.current_time() - started:.1f} |")
        print()
        print("| instance | state | done | failed | retried | hangs | restarts |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for i in api.statistics().instances:
            print(
                f"| {i.name} | {i.state} | {i.shards_done} | {i.shards_failed} | "
                f"{i.shards_retried} | {i.hangs} | {i.restarts} |"
            )
            whole = whole and (i.hangs, i.restarts, i.shards_retried, i.shards_failed) == (
                0,
                0,
                0,
                0,
            )
    return whole


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--images", type=int, default=4, help="images per job (split)")
    parser.add_argument("--seconds-per-image", type=float, default=6.0)
    parser.add_argument("--idle-timeout", type=float, default=5.0)
    parser.add_argument("--gap", type=float, default=6.0, help="idle seconds between jobs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="comfytrio-long-") as tmp:
        work = Path(tmp)
        ports = [free_port() for _ in range(args.servers)]
        servers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "comfytrio",
                    "fake-server",
                    "--root",
                    str(work / f"server{p}"),
                    "--port",
                    str(p),
                    "--seconds-per-image",
                    str(args.seconds_per_image),
                    "--idle-timeout",
                    str(args.idle_timeout),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for p in ports
        ]
        try:
            time.sleep(2.0)  # the servers start listening
            print(json.dumps(vars(args)))
            ok = trio.run(run, args, [f"http://127.0.0.1:{p}" for p in ports], work)
        finally:
            for server in servers:
                server.terminate()
                server.wait(10)
    print("\nevery job whole, no hang, restart or retry:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
