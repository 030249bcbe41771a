"""How soon does a client learn that a prompt ended?

Runs the same small prompts (EmptyImage -> SaveImage, colour varied so ComfyUI's cache never
answers) through comfytrio's client (websocket, our own prompt ids) and through the seed
library's way (POST, then GET /history every 2 s), and prints a table.

    .venv/bin/python bench/prompt_end_latency.py                 # a fake ComfyUI it starts
    .venv/bin/python bench/prompt_end_latency.py --url http://127.0.0.1:8188   # a real one

"end seen" is the time from the server's ``execution_success`` timestamp (ms, written by the
server) to the moment the client returns; "POST->done" is the whole round trip.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import trio

from comfytrio import open_comfy_client, wait_server_ready


def _prompt(i: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": i % 16777215},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "lat"}},
    }


def _success_ms(entry: dict[str, Any]) -> float:
    for name, data in entry["status"]["messages"]:
        if name == "execution_success":
            return float(data["timestamp"])
    raise RuntimeError("no execution_success in history")


async def _websocket_client(url: str, n: int, offset: int) -> tuple[list[float], list[float]]:
    totals, ends = [], []
    async with open_comfy_client(url) as client:
        for i in range(n):
            t0 = time.perf_counter()
            result = await client.run(_prompt(offset + i))
            done_ms = time.time() * 1000
            totals.append((time.perf_counter() - t0) * 1000)
            entry = await client.history(result.prompt_id)
            assert entry is not None
            ends.append(done_ms - _success_ms(entry))
    return totals, ends


async def _poll_history(
    url: str, n: int, offset: int, interval: float
) -> tuple[list[float], list[float]]:
    totals, ends = [], []
    async with httpx.AsyncClient(base_url=url) as http:
        for i in range(n):
            t0 = time.perf_counter()
            r = await http.post("/prompt", json={"prompt": _prompt(offset + i)})
            prompt_id = r.json()["prompt_id"]
            while True:
                await trio.sleep(interval)
                entry = (await http.get(f"/history/{prompt_id}")).json().get(prompt_id)
                if entry:
                    break
            done_ms = time.time() * 1000
            totals.append((time.perf_counter() - t0) * 1000)
            ends.append(done_ms - _success_ms(entry))
    return totals, ends


def _row(name: str, totals: list[float], ends: list[float]) -> str:
    def p(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))]

    return (
        f"| {name:<34} | {statistics.median(totals):9.1f} | {p(totals, 0.9):9.1f} | "
        f"{statistics.median(ends):9.1f} | {p(ends, 0.9):9.1f} |"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an existing ComfyUI (default: start a fake one)")
    parser.add_argument("-n", type=int, default=30, help="prompts per client (default 30)")
    parser.add_argument("--poll-n", type=int, default=5, help="prompts for the 2 s poll")
    args = parser.parse_args()
    proc = None
    url = args.url
    if url is None:
        port = _free_port()
        root = tempfile.mkdtemp(prefix="comfytrio-bench-")
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "comfytrio", "fake-server", "--port", str(port), "--root", root],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
    try:
        await wait_server_ready(url, timeout=30)
        await _websocket_client(url, 3, 10_000_000)  # warm-up
        ws = await _websocket_client(url, args.n, int(time.time()) % 1_000_000)
        poll = await _poll_history(url, args.poll_n, int(time.time()) % 1_000_000 + 5000, 2.0)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                await proc.wait()
    server = "fake ComfyUI (comfytrio fake-server)" if args.url is None else args.url
    print(f"server: {server}; python {sys.version.split()[0]}; pid {os.getpid()}")
    print(
        "| client                             | POST->done p50 | POST->done p90 | end seen p50 "
        "| end seen p90 |"
    )
    print("| ---------------------------------- | --------- | --------- | --------- | --------- |")
    print(_row("comfytrio client (websocket)", *ws))
    print(_row("seed way: GET /history every 2 s", *poll))
    print("(milliseconds; 'end seen' = client return time - server's execution_success time)")


if __name__ == "__main__":
    trio.run(main)
