"""comfytrio against a minimal hand-written client and the seed library, on K fake ComfyUIs.

Starts K ``comfytrio fake-server`` processes with a simulated GPU time per image, then runs the
same workload through each library, one after the other, against the same servers, each in its
own process (so CPU time and peak memory are that library's alone), and prints a markdown
table. Quick run, then the issue's configurations:

    .venv/bin/python bench/compare.py --servers 4 --jobs 40 --seconds-per-image 0.05
    .venv/bin/python bench/compare.py --servers 8 --jobs 1000 --seconds-per-image 0.2
    .venv/bin/python bench/compare.py --servers 32 --jobs 10000 --skip-seed ...

Libraries (``--libraries``, in this order by default):

- ``comfytrio``: ``ComfyAPI(["http://127.0.0.1:P", ...])``, remote servers, outputs downloaded;
- ``comfytrio-local``: ``ComfyAPI([ComfyUIInstance(root, P), ...], auto_start=False)``, outputs
  read in place (no download);
- ``minimal``: bench/minimal_client.py (httpx + one trio-websocket per server);
- ``minimal-raw``: bench/minimal_raw_client.py (hand-written HTTP/1.1 + comfytrio's websocket
  reader: the CPU floor of a Python trio client);
- ``minimal-raw-dl``: the same with ``--download``: every output fetched with ``GET /view``
  and written to disk, the work ``comfytrio`` (by URL) does and the others skip;
- ``seed``: techtrash-comfyapi 1.1.3 in bench/.seed-venv (``bench/seed_venv.sh`` makes it),
  with ``--seed-jobs`` / ``--seed-latency-jobs`` (it polls every 2 s and fans every job out to
  every server).

Each library runs twice on freshly cleared servers: a *sequential* pass (``--latency-jobs``
jobs one at a time on idle servers: overhead = job wall time minus the servers' own span for
that job, from their history timestamps) and a *concurrent* pass (``--jobs`` jobs submitted at
once: latency, makespan, orchestrator CPU per job, peak memory). Warm-up jobs precede each
pass and are not counted: by default one per server, so that no measured job is the first on
its server (comfytrio asks a server for ``/object_info`` before its first prompt there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import PREFIX_TITLE, RunnerResult, percentile

HERE = Path(__file__).resolve().parent

LIBRARIES = ("comfytrio", "comfytrio-local", "minimal", "minimal-raw", "minimal-raw-dl", "seed")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---------------------------------------------------------------------------------- servers


@dataclass
class Server:
    port: int
    root: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far (Linux; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / _TICKS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_servers(count: int, seconds_per_image: float, base: Path) -> list[Server]:
    servers = []
    for _ in range(count):
        port = _free_port()
        root = base / f"server-{port}"
        log = (base / f"server-{port}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "comfytrio",
                "fake-server",
                "--port",
                str(port),
                "--root",
                str(root),
                "--seconds-per-image",
                str(seconds_per_image),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        servers.append(Server(port, root, proc))
    deadline = time.monotonic() + 60 + 2 * count
    with httpx.Client(timeout=5) as http:
        for server in servers:
            while True:
                if server.proc.poll() is not None:
                    log_text = (base / f"server-{server.port}.log").read_text(errors="replace")
                    raise SystemExit(f"fake server on {server.port} exited:\n{log_text}")
                try:
                    if http.get(f"{server.url}/system_stats").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"fake server on {server.port} did not answer in time")
                time.sleep(0.2)
    return servers


def stop_servers(servers: list[Server]) -> None:
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGINT)
    for server in servers:
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def clear_servers(http: httpx.Client, servers: list[Server]) -> None:
    for server in servers:
        http.post(f"{server.url}/queue", json={"clear": True})
        http.post(f"{server.url}/history", json={"clear": True})


@dataclass
class Span:
    """One prompt as a server's history tells it."""

    server: str
    start_ms: int
    end_ms: int
    ok: bool


def history_spans(http: httpx.Client, servers: list[Server]) -> dict[str, list[Span]]:
    """Every prompt in the servers' history, by the job prefix it carried."""
    spans: dict[str, list[Span]] = {}
    for server in servers:
        history = http.get(f"{server.url}/history", timeout=120).json()
        for entry in history.values():
            prompt = entry["prompt"][2]
            prefix = next(
                (
                    str(node["inputs"]["value"])
                    for node in prompt.values()
                    if node.get("_meta", {}).get("title") == PREFIX_TITLE
                    or node.get("class_type") == "PrimitiveString"
                ),
                None,
            )
            stamps = {name: data.get("timestamp") for name, data in entry["status"]["messages"]}
            start = stamps.get("execution_start")
            end = stamps.get("execution_success") or stamps.get("execution_error")
            if prefix is None or start is None or end is None:
                continue
            spans.setdefault(prefix, []).append(
                Span(server.url, int(start), int(end), "execution_success" in stamps)
            )
    return spans


# ---------------------------------------------------------------------------------- runners


def runner_command(
    library: str, servers: list[Server], args: argparse.Namespace, scratch: Path
) -> list[str]:
    urls = ",".join(s.url for s in servers)
    depth = ["--depth", str(args.depth)]
    if library == "comfytrio":
        return [
            sys.executable,
            str(HERE / "run_comfytrio.py"),
            "--urls",
            urls,
            "--download-dir",
            str(scratch / "downloads"),
            *depth,
        ]
    if library == "comfytrio-local":
        return [
            sys.executable,
            str(HERE / "run_comfytrio.py"),
            "--urls",
            urls,
            "--roots",
            ",".join(str(s.root) for s in servers),
            *depth,
        ]
    if library == "minimal":
        return [sys.executable, str(HERE / "minimal_client.py"), "--urls", urls, *depth]
    if library == "minimal-raw":
        return [sys.executable, str(HERE / "minimal_raw_client.py"), "--urls", urls, *depth]
    if library == "minimal-raw-dl":
        return [
            sys.executable,
            str(HERE / "minimal_raw_client.py"),
            "--urls",
            urls,
            "--download",
            str(scratch / "minimal-downloads"),
            *depth,
        ]
    if library == "seed":
        return [
            str(args.seed_python),
            str(HERE / "seed_runner.py"),
            "--ports",
            ",".join(str(s.port) for s in servers),
            "--roots",
            ",".join(str(s.root) for s in servers),
            "--models-path",
            str(scratch),
        ]
    raise ValueError(library)


class RunnerTimeout(Exception):
    """A runner process ran past ``--runner-timeout`` (it is killed)."""


def warmup_jobs(library: str, args: argparse.Namespace) -> int:
    if args.warmup >= 0:
        return int(args.warmup)
    return 1 if library == "seed" else max(2, args.servers)


@dataclass
class Pass:
    """One runner process: its result, the servers' history of it and their CPU time."""

    result: RunnerResult
    spans: dict[str, list[Span]]
    server_cpu_s: float
    elapsed_s: float


def run_pass(
    library: str,
    servers: list[Server],
    args: argparse.Namespace,
    scratch: Path,
    http: httpx.Client,
    *,
    jobs: int,
    latency_jobs: int,
    profile: str = "",
) -> Pass:
    clear_servers(http, servers)
    tag = f"{library}-{int(time.time() * 1000) % 10**9}"
    cmd = [
        *runner_command(library, servers, args, scratch),
        "--jobs",
        str(jobs),
        "--latency-jobs",
        str(latency_jobs),
        "--warmup",
        str(warmup_jobs(library, args)),
        "--images-per-job",
        str(args.images_per_job),
        "--tag",
        tag,
    ]
    if profile:
        cmd += ["--profile", profile]
    cpu0 = sum(s.cpu_s() for s in servers)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=args.runner_timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RunnerTimeout(f"did not finish in {args.runner_timeout:g} s") from None
    elapsed = time.perf_counter() - t0
    server_cpu = sum(s.cpu_s() for s in servers) - cpu0
    if done.returncode != 0:
        raise SystemExit(
            f"{library} runner failed ({done.returncode}):\n"
            f"{done.stderr.decode(errors='replace')[-4000:]}"
        )
    result: RunnerResult = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return Pass(result, history_spans(http, servers), server_cpu, elapsed)


# ---------------------------------------------------------------------------------- metrics


@dataclass
class Row:
    library: str
    jobs: int
    ok: int
    latency_p50_s: float
    latency_p99_s: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    overhead_mean_ms: float
    latency_jobs: int
    makespan_s: float
    ideal_s: float
    cpu_per_job_ms: float
    rss_peak_mib: float
    rss_growth_mib: float
    server_exec_per_image_ms: float
    server_cpu_per_job_ms: float
    servers_used: int
    cpu_busy: float
    """(servers' CPU + orchestrator's CPU) / makespan / CPUs during the concurrent pass."""
    notes: list[str] = field(default_factory=list)


def _overheads(p: Pass) -> list[float]:
    values = []
    for job in p.result["sequential"]:
        spans = p.spans.get(job["prefix"])
        if job["error"] is None and spans:
            span_s = (max(s.end_ms for s in spans) - min(s.start_ms for s in spans)) / 1000
            values.append((job["wall_s"] - span_s) * 1000)
    return values


def make_row(library: str, seq: Pass, conc: Pass, args: argparse.Namespace) -> Row:
    res = conc.result
    jobs = len(res["concurrent"])
    ok = [j for j in res["concurrent"] if j["error"] is None]
    walls = [j["wall_s"] for j in ok] or [float("nan")]
    overheads = _overheads(seq) or [float("nan")]
    conc_spans = [s for j in res["concurrent"] for s in conc.spans.get(j["prefix"], [])]
    images = jobs * args.images_per_job
    exec_total = sum(s.end_ms - s.start_ms for s in conc_spans) / 1000
    notes = []
    errors = sorted({j["error"] for j in res["concurrent"] if j["error"]})
    if errors:
        notes.append(f"{jobs - len(ok)} job(s) failed, e.g. {errors[0][:200]}")
    return Row(
        library=library,
        jobs=jobs,
        ok=len(ok),
        latency_p50_s=statistics.median(walls),
        latency_p99_s=percentile(walls, 0.99),
        overhead_p50_ms=statistics.median(overheads),
        overhead_p99_ms=percentile(overheads, 0.99),
        overhead_mean_ms=statistics.fmean(overheads),
        latency_jobs=len(seq.result["sequential"]),
        makespan_s=res["makespan_s"],
        ideal_s=images * args.seconds_per_image / args.servers,
        cpu_per_job_ms=res["cpu_s"] / max(jobs, 1) * 1000,
        rss_peak_mib=res["rss_peak_kib"] / 1024,
        rss_growth_mib=(res["rss_peak_kib"] - res["rss_before_kib"]) / 1024,
        server_exec_per_image_ms=exec_total / max(images, 1) * 1000,
        server_cpu_per_job_ms=conc.server_cpu_s / max(jobs, 1) * 1000,
        servers_used=len({s.server for s in conc_spans}),
        cpu_busy=(conc.server_cpu_s + res["cpu_s"]) / res["makespan_s"] / (os.cpu_count() or 1),
        notes=notes,
    )


def failed_row(library: str, jobs: int, args: argparse.Namespace, why: str) -> Row:
    nan = float("nan")
    return Row(
        library=library,
        jobs=jobs,
        ok=0,
        latency_p50_s=nan,
        latency_p99_s=nan,
        overhead_p50_ms=nan,
        overhead_p99_ms=nan,
        overhead_mean_ms=nan,
        latency_jobs=0,
        makespan_s=nan,
        ideal_s=jobs * args.images_per_job * args.seconds_per_image / args.servers,
        cpu_per_job_ms=nan,
        rss_peak_mib=nan,
        rss_growth_mib=nan,
        server_exec_per_image_ms=nan,
        server_cpu_per_job_ms=nan,
        servers_used=0,
        cpu_busy=nan,
        notes=[why],
    )


def table(rows: list[Row], args: argparse.Namespace) -> str:
    minimal = next((r for r in rows if r.library == "minimal"), None)
    lines = [
        "| library | jobs (ok) | latency p50 / p99 (s) | overhead/job p50 / p99 (ms) "
        "| makespan (s) | x ideal | x minimal | CPU/job (ms) | peak RSS (MiB) "
        "| RSS growth (MiB) | servers used | server exec/image (ms) | server CPU/job (ms) "
        "| CPU busy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        vs_min = (
            f"{r.makespan_s / minimal.makespan_s:.2f}"
            if minimal is not None and r.jobs == minimal.jobs
            else "n/a"
        )
        name = r.library + (" (fewer jobs)" if r.library == "seed" else "")
        lines.append(
            f"| {name} | {r.jobs} ({r.ok}) | {r.latency_p50_s:.3f} / {r.latency_p99_s:.3f} "
            f"| {r.overhead_p50_ms:.1f} / {r.overhead_p99_ms:.1f} "
            f"| {r.makespan_s:.2f} | {r.makespan_s / r.ideal_s:.2f} | {vs_min} "
            f"| {r.cpu_per_job_ms:.2f} | {r.rss_peak_mib:.1f} | {r.rss_growth_mib:.1f} "
            f"| {r.servers_used}/{args.servers} | {r.server_exec_per_image_ms:.1f} "
            f"| {r.server_cpu_per_job_ms:.1f} | {r.cpu_busy:.0%} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main


def comfytrio_revision() -> str:
    """The commit of the comfytrio checkout, ``+dirty`` when comfytrio/ has local changes."""
    repo = HERE.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "comfytrio"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(unknown revision)"
    return head + ("+dirty" if dirty else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=4, help="fake servers K (default 4)")
    parser.add_argument("--jobs", type=int, default=40, help="concurrent jobs N (default 40)")
    parser.add_argument(
        "--seconds-per-image",
        type=float,
        default=0.05,
        help="simulated GPU seconds per image (default 0.05)",
    )
    parser.add_argument("--images-per-job", type=int, default=1, help="images per job (1)")
    parser.add_argument(
        "--latency-jobs",
        type=int,
        default=20,
        help="jobs run one at a time for the overhead (default 20)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=-1,
        help="unmeasured jobs before each pass (default: one per server, at "
        "least 2, so every server has been used once; 1 for the seed, "
        "which sends every job to every server)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=2,
        help="prompts in flight per server: comfytrio's prompts_per_instance "
        "and the minimal client's --depth (default 2; 0: the minimal "
        "client sends every job at once)",
    )
    parser.add_argument(
        "--libraries",
        default=",".join(LIBRARIES),
        help=f"comma-separated, from {', '.join(LIBRARIES)}",
    )
    parser.add_argument("--skip-seed", action="store_true", help="do not run the seed")
    parser.add_argument(
        "--seed-jobs", type=int, default=20, help="concurrent jobs for the seed (default 20)"
    )
    parser.add_argument(
        "--seed-latency-jobs",
        type=int,
        default=5,
        help="one-at-a-time jobs for the seed (default 5)",
    )
    parser.add_argument(
        "--seed-python",
        type=Path,
        default=HERE / ".seed-venv/bin/python",
        help="the seed venv's python (bench/seed_venv.sh makes it)",
    )
    parser.add_argument(
        "--profile",
        default="",
        metavar="PREFIX",
        help="cProfile comfytrio's concurrent passes into PREFIX.<library>.prof "
        "(inflates their CPU/job; read with python -m pstats)",
    )
    parser.add_argument("--json", default="", help="write every metric here as JSON")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the servers' folders (outputs, logs) instead of deleting them",
    )
    parser.add_argument(
        "--runner-timeout",
        type=float,
        default=3600.0,
        help="seconds one runner process may take (default 3600)",
    )
    args = parser.parse_args(argv)
    libraries = [name for name in args.libraries.split(",") if name]
    unknown = set(libraries) - set(LIBRARIES)
    if unknown:
        parser.error(f"unknown libraries: {', '.join(sorted(unknown))}")
    if args.skip_seed and "seed" in libraries:
        libraries.remove("seed")
    if "seed" in libraries and not args.seed_python.exists():
        print(
            f"no seed venv at {args.seed_python}: run bench/seed_venv.sh; skipping the seed",
            file=sys.stderr,
        )
        libraries.remove("seed")
    args.library_list = libraries
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = " ".join(["bench/compare.py", *(sys.argv[1:] if argv is None else argv)])
    revision = comfytrio_revision()
    base = Path(tempfile.mkdtemp(prefix="comfytrio-compare-"))
    servers = start_servers(args.servers, args.seconds_per_image, base)
    rows: list[Row] = []
    try:
        with httpx.Client(timeout=60) as http:
            for library in args.library_list:
                seed = library == "seed"
                jobs = args.seed_jobs if seed else args.jobs
                t0 = time.perf_counter()
                try:
                    seq = run_pass(
                        library,
                        servers,
                        args,
                        base,
                        http,
                        jobs=0,
                        latency_jobs=args.seed_latency_jobs if seed else args.latency_jobs,
                    )
                    conc = run_pass(
                        library,
                        servers,
                        args,
                        base,
                        http,
                        jobs=jobs,
                        latency_jobs=0,
                        profile=f"{args.profile}.{library}.prof"
                        if args.profile and library.startswith("comfytrio")
                        else "",
                    )
                except RunnerTimeout as exc:
                    rows.append(failed_row(library, jobs, args, str(exc)))
                else:
                    rows.append(make_row(library, seq, conc, args))
                print(f"# {library}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        stop_servers(servers)
        if args.keep:
            print(f"servers' folders kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"command: `{command}`")
    print(
        f"setup: {args.servers} fake servers, {args.seconds_per_image:g} s/image, "
        f"{args.images_per_job} image(s)/job, depth {args.depth}, {os.cpu_count()} CPUs, "
        f"python {sys.version.split()[0]}, comfytrio {revision}"
    )
    print()
    print(table(rows, args))
    for row in rows:
        for note in row.notes:
            print(f"- {row.library}: {note}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": command,
                    "revision": revision,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": [asdict(r) for r in rows],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
