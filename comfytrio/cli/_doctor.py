"""``comfytrio doctor``: check NVML, a ComfyUI install (``--comfyui``, optionally started
with ``--start``), a models root and running servers (``--url``), and say what to fix.

Lines are printed as they come; the problems are listed again at the end, one line each,
and make the exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import re
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import trio

from .. import (
    ComfyAPI,
    ComfyAPIError,
    ComfyUIInstance,
    GPUInfo,
    PluginError,
    __version__,
    _gpu,
    make_plugin_manager,
)
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    add_flag,
    add_number,
    add_path,
    add_repeated,
    free_ports,
    quiet_nvml,
)

__all__ = ["add_doctor_arguments", "doctor"]


class _Report:
    """What doctor found: lines printed as they come, problems listed at the end."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def info(self, line: str) -> None:
        print(line, flush=True)

    def problem(self, line: str) -> None:
        print(f"  PROBLEM: {line}", flush=True)
        self.problems.append(line)


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    """Every argument of ``comfytrio doctor``."""
    add_path(parser, "--comfyui", "PATH", "check a ComfyUI install (folder of main.py)")
    parser.add_argument(
        "--python", metavar="PY", help="the interpreter that runs ComfyUI (default: this one)"
    )
    add_number(
        parser, "--port", int, None, "the port to check (and to --start on; default: a free one)"
    )
    add_flag(parser, "--cpu", "check (and start) without a GPU")
    add_flag(
        parser,
        "--start",
        "start one instance of --comfyui and report what it answers, then stop it",
    )
    add_path(parser, "--models-path", "DIR", "check a models root too")
    add_repeated(parser, "--url", "URL", "check a running ComfyUI server (repeat)")
    add_number(
        parser,
        "--timeout",
        float,
        10.0,
        "seconds to wait for a server (default 10; --start: 120)",
        metavar="S",
    )


def _gib(n: Any) -> str:
    try:
        return f"{int(n) / 2**30:.1f} GiB"
    except (TypeError, ValueError):
        return "?"


def _nvml_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_nvml(report: _Report) -> int:
    """What NVML sees; the number of GPUs (0 without NVML)."""
    try:
        with quiet_nvml():
            nvml = _gpu._load_nvml()
        nvml.nvmlInit()
    except Exception as exc:
        report.info(f"NVML: not available ({exc}): local instances run with --cpu")
        return 0
    try:
        try:
            driver = _nvml_text(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = "?"
        count = int(nvml.nvmlDeviceGetCount())
        report.info(f"NVML: driver {driver}, {count} GPU(s)")
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = _nvml_text(nvml.nvmlDeviceGetName(handle))
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                sizes = f", {_gib(memory.total)} ({_gib(memory.free)} free)"
            except Exception:
                sizes = ""
            report.info(f"  GPU {index}: {name}{sizes}")
        if count == 0:
            report.info("  no GPU: local instances run with --cpu")
        return count
    except Exception as exc:
        report.problem(
            f"NVML started but cannot list the GPUs ({exc}): check the NVIDIA driver "
            "(nvidia-smi), or run with --cpu"
        )
        return 0
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def _model_folders(root: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        found[folder.name] = sum(
            1 for f in folder.rglob("*") if f.is_file() and not f.name.startswith(("put_", "."))
        )
    return found


def _describe_models(counts: Mapping[str, int]) -> str:
    filled = [f"{name} {n}" for name, n in counts.items() if n]
    empty = len(counts) - len(filled)
    text = ", ".join(filled) if filled else "no model files"
    return f"{text} ({len(counts)} folder(s), {empty} empty)"


def _port_answer(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _python_check(
    report: _Report, python: str, install: Path, *, fake: bool, gpus: int, cpu: bool
) -> bool:
    code = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
    try:
        done = await trio.run_process(
            [python, "-c", code], capture_stdout=True, capture_stderr=True, check=False
        )
    except OSError as exc:
        report.problem(
            f"cannot run {python} ({exc.strerror or exc}): give ComfyUI's interpreter with --python"
        )
        return False
    if done.returncode != 0:
        report.problem(f"{python} exits with code {done.returncode}: give a working --python")
        return False
    report.info(f"  python {python}: {done.stdout.decode().strip()}")
    if fake:
        report.info("  (a comfytrio fake install: no torch needed)")
        return True
    torch = (
        "import torch; print(torch.__version__, torch.cuda.is_available(), "
        "torch.cuda.device_count())"
    )
    with trio.move_on_after(180):
        done = await trio.run_process(
            [python, "-c", torch], capture_stdout=True, capture_stderr=True, check=False
        )
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        report.problem(
            f"{python} cannot import torch ({last}): install ComfyUI's requirements into it "
            f"({python} -m pip install -r {install / 'requirements.txt'}) or point --python at "
            "ComfyUI's environment"
        )
        return False
    version, cuda, devices = [*done.stdout.decode().split(), "?", "?", "?"][:3]
    report.info(f"  torch {version}, CUDA {'yes' if cuda == 'True' else 'no'}, {devices} device(s)")
    if gpus and not cpu and cuda != "True":
        report.problem(
            f"NVML sees {gpus} GPU(s) but torch in {python} cannot use CUDA: install a CUDA "
            "build of torch, or run with --cpu"
        )
    return True


async def _check_install(report: _Report, args: argparse.Namespace, gpus: int) -> bool:
    path: Path = args.comfyui.expanduser().resolve()
    report.info(f"ComfyUI install {path}:")
    main_py = path / "main.py"
    if not main_py.is_file():
        report.problem(
            f"no main.py in {path}: --comfyui must be the ComfyUI folder that holds main.py "
            "(git clone https://github.com/comfyanonymous/ComfyUI)"
        )
        return False
    fake = "comfytrio" in main_py.read_text(errors="replace")
    version_file = path / "comfyui_version.py"
    version = "unknown"
    if version_file.is_file():
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text())
        version = match.group(1) if match else version
    report.info(f"  main.py found, version {version}" + (" (comfytrio fake)" if fake else ""))
    ok = await _python_check(
        report, args.python or sys.executable, path, fake=fake, gpus=gpus, cpu=args.cpu
    )
    if (path / "models").is_dir():
        report.info(f"  models/: {_describe_models(_model_folders(path / 'models'))}")
    else:
        report.info("  no models/ folder in the install")
    if args.port is not None:
        if _port_answer(args.port):
            report.problem(
                f"port {args.port} on 127.0.0.1 is in use: pick another --port (or attach to "
                "that server with --attach)"
            )
            ok = False
        else:
            report.info(f"  port {args.port} is free")
    return ok


async def _describe_server(
    report: _Report, http: httpx.AsyncClient, stats: Mapping[str, Any]
) -> None:
    system = stats.get("system") or {}
    python = str(system.get("python_version", "?")).split()[0]
    report.info(
        f"  ComfyUI {system.get('comfyui_version', '?')}, Python {python}, "
        f"PyTorch {system.get('pytorch_version', '?')}"
    )
    for device in stats.get("devices") or []:
        report.info(
            f"  device {device.get('name', '?')} ({device.get('type', '?')}): "
            f"{_gib(device.get('vram_total'))} ({_gib(device.get('vram_free'))} free)"
        )
    r = await http.get("/object_info")
    if r.status_code == 200:
        report.info(f"  object_info: {len(r.json())} node classes")
    else:
        report.problem(f"GET /object_info answered HTTP {r.status_code}")
    r = await http.get("/models")
    if r.status_code != 200:
        report.info("  /models: not available")
        return
    counts: dict[str, int] = {}
    for folder in r.json():
        listing = await http.get(f"/models/{folder}")
        counts[str(folder)] = len(listing.json()) if listing.status_code == 200 else 0
    report.info(f"  models: {_describe_models(counts)}")


async def _check_url(report: _Report, url: str, timeout: float) -> None:
    report.info(f"ComfyUI server {url}:")
    try:
        async with httpx.AsyncClient(
            base_url=url.rstrip("/"), timeout=httpx.Timeout(timeout)
        ) as http:
            try:
                r = await http.get("/system_stats")
            except httpx.TransportError as exc:
                report.problem(
                    f"{url} does not answer ({type(exc).__name__}: {exc}): is ComfyUI running "
                    "there? check the host and port, and that it listens beyond 127.0.0.1 "
                    "(--listen)"
                )
                return
            if r.status_code != 200:
                report.problem(
                    f"{url}/system_stats answered HTTP {r.status_code}: is it a ComfyUI server?"
                )
                return
            await _describe_server(report, http, r.json())
    except (httpx.HTTPError, ValueError) as exc:
        report.problem(f"{url} answered something unexpected ({exc}): is it a ComfyUI server?")


async def _start_check(report: _Report, args: argparse.Namespace, gpus: int) -> None:
    path = args.comfyui.expanduser().resolve()
    port = args.port or free_ports(1)[0]
    cuda = bool(gpus) and not args.cpu
    models = args.models_path or path / "models"
    report.info(f"starting one instance on port {port} ({'GPU 0' if cuda else '--cpu'}) ...")
    with tempfile.TemporaryDirectory(prefix="comfytrio-doctor-") as state:
        api = ComfyAPI(
            [ComfyUIInstance(path, port, python=args.python)],
            models,
            gpu=GPUInfo(cuda_available=cuda, device_count=1),
            state_dir=state,
            ready_timeout=max(args.timeout, 120.0),
            grace=5.0,
        )
        try:
            async with api:
                instance = api.instances[0]
                process = instance.process
                started = f" in {process.ready_at - process.spawned_at:.1f} s" if process else ""
                report.info(f"  ready at {instance.url}{started}")
                async with httpx.AsyncClient(base_url=instance.url, timeout=30) as http:
                    stats = (await http.get("/system_stats")).json()
                    await _describe_server(report, http, stats)
        except ComfyAPIError as exc:
            text = str(exc)
            first, _, rest = text.partition("\n")
            if rest:
                report.info(rest)
            report.problem(f"{first}: fix what its log says (or check --python, --port, --cpu)")


async def _doctor_async(args: argparse.Namespace) -> list[str]:
    report = _Report()
    report.info(
        f"comfytrio {__version__}, Python {platform.python_version()} ({sys.executable}), "
        f"{platform.system()} {platform.machine()}"
    )
    try:
        plugins = make_plugin_manager()
        report.info(
            f"plugins: {', '.join(plugins.names()) or 'none'}; param types: "
            f"{', '.join(sorted(plugins.param_types()))}"
        )
    except PluginError as exc:
        report.problem(
            f"{exc}: uninstall or fix that plugin, or block it with COMFYTRIO_BLOCK_PLUGINS"
        )
    gpus = _check_nvml(report)
    if args.comfyui is not None:
        ok = await _check_install(report, args, gpus)
        if args.start and ok:
            await _start_check(report, args, gpus)
    elif args.start:
        report.problem("--start needs --comfyui PATH")
    if args.models_path is not None:
        if args.models_path.is_dir():
            counts = _model_folders(args.models_path)
            report.info(f"models path {args.models_path}: {_describe_models(counts)}")
        else:
            report.problem(
                f"--models-path {args.models_path} is not a folder: create it or fix the path"
            )
    for url in args.url:
        await _check_url(report, url, args.timeout)
    return report.problems


def doctor(args: argparse.Namespace) -> int:
    """``comfytrio doctor``: every check, then the problems found (exit 1 when any)."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    problems = trio.run(_doctor_async, args)
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for problem in problems:
            print(f"- {problem}")
        return EXIT_FAILED
    print("\nno problems found")
    return EXIT_OK
