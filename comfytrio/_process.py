"""Starting and stopping one ComfyUI process under a trio nursery.

Each instance gets its own input, output, temp and user folders, database and log file, so
several instances can share ONE ComfyUI install (see the collision table in
comfyui-protocol/README.md: a shared output folder makes SaveImage counters collide, a shared
temp folder is wiped by the next instance's start, the database is shared unless
``--database-url`` is set). Models and custom nodes still come from the install, plus the
user's ``models_path`` through an ``extra_model_paths`` file.

ComfyUI is started through ``_guardian.py`` with a pipe, so that it dies with this process
however this process dies (``kill -9`` included): see that module. This works on any POSIX
system (Linux, macOS, the BSDs); Windows is not supported by this launcher.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import attrs
import trio

from ._errors import (
    ComfyAPIError,
    ComfyUIStartupError,
    ComfyUITimeoutError,
    PortInUseError,
    unwrapped,
)
from ._rest import wait_server_ready

__all__ = ["InstanceDirs", "LaunchSpec", "comfyui_command", "run_comfyui"]

logger = logging.getLogger("comfytrio.process")

_GUARDIAN = Path(__file__).resolve().with_name("_guardian.py")
"""Run by path, never imported by the child: see ``_guarded_command``."""

# The model folders ComfyUI knows (folder_paths.py); each is mapped into models_path.
_MODEL_FOLDERS = (
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "clip",
    "diffusion_models",
    "unet",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "t2i_adapter",
    "gligen",
    "upscale_models",
    "latent_upscale_models",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
)


class _Below:
    """A read-only attribute of ``InstanceDirs``: the file or folder ``name`` in its root."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.__doc__ = doc

    @overload
    def __get__(self, dirs: None, owner: type[InstanceDirs]) -> _Below: ...
    @overload
    def __get__(self, dirs: InstanceDirs, owner: type[InstanceDirs]) -> Path: ...
    def __get__(self, dirs: InstanceDirs | None, owner: type[InstanceDirs]) -> Path | _Below:
        return self if dirs is None else dirs.root / self.name


@attrs.frozen
class InstanceDirs:
    """The folders and files that belong to one instance and to no other."""

    root: Path
    """The instance's state folder; everything below lives in it."""

    input = _Below("input", "``--input-directory``.")
    output = _Below("output", "``--output-directory``.")
    temp = _Below("temp", "``--temp-directory`` (ComfyUI uses ``temp/temp`` below it).")
    user = _Below("user", "``--user-directory`` (must exist before ComfyUI starts).")
    database = _Below("comfyui.db", "The sqlite file given with ``--database-url``.")
    log = _Below("comfyui.log", "Where the process's stdout and stderr go.")
    model_paths_config = _Below(
        "extra_model_paths.yaml",
        "The ``extra_model_paths`` YAML that points ComfyUI at ``models_path``.",
    )

    def create(self) -> None:
        """Make every folder (blocking; call it in a thread)."""
        for folder in (self.input, self.output, self.temp, self.user):
            folder.mkdir(parents=True, exist_ok=True)


@attrs.frozen
class LaunchSpec:
    """Everything needed to start one ComfyUI process."""

    name: str
    """Name for logs and errors."""
    comfyui_path: Path
    """The ComfyUI folder with ``main.py``."""
    port: int
    """Port on 127.0.0.1."""
    dirs: InstanceDirs
    """Its own folders."""
    python: str = sys.executable
    """Interpreter for ``main.py``."""
    cpu: bool = False
    """Run with ``--cpu``."""
    cuda_device: int | None = None
    """Pin to this CUDA device with ``CUDA_VISIBLE_DEVICES``."""
    models_path: Path | None = None
    """Extra models root (written into the extra_model_paths file)."""
    extra_args: tuple[str, ...] = ()
    """More ComfyUI flags."""
    env: Mapping[str, str] = attrs.field(factory=dict)
    """Extra environment variables."""
    ready_timeout: float = 120.0
    """Seconds to wait for ``/system_stats``."""
    grace: float = 10.0
    """Seconds between SIGTERM and SIGKILL when stopping."""

    @property
    def url(self) -> str:
        """Where it will answer."""
        return f"http://127.0.0.1:{self.port}"


def comfyui_command(spec: LaunchSpec) -> list[str]:
    """The command line that starts ComfyUI for ``spec`` (listening on 127.0.0.1 only)."""
    d = spec.dirs
    cmd = [
        spec.python,
        "main.py",
        "--listen",
        "127.0.0.1",
        "--port",
        str(spec.port),
        "--disable-auto-launch",
        "--input-directory",
        str(d.input),
        "--output-directory",
        str(d.output),
        "--temp-directory",
        str(d.temp),
        "--user-directory",
        str(d.user),
        "--database-url",
        f"sqlite:///{d.database}",
    ]
    if spec.models_path is not None:
        cmd += ["--extra-model-paths-config", str(d.model_paths_config)]
    if spec.cpu:
        cmd.append("--cpu")
    cmd += list(spec.extra_args)
    return cmd


def _guarded_command(cmd: Sequence[str], read_fd: int, grace: float) -> list[str]:
    """``cmd`` started through the guardian, which watches ``read_fd`` (see ``_guardian``).

    The guardian runs with OUR interpreter, isolated (``-I``): ``cmd``'s interpreter
    (``spec.python``) may be another venv that has no comfytrio.
    """
    return [
        sys.executable,
        "-I",
        str(_GUARDIAN),
        "--fd",
        str(read_fd),
        "--grace",
        str(grace),
        "--",
        *cmd,
    ]


def _model_paths_yaml(models_path: Path) -> str:
    lines = ["comfytrio:", f"  base_path: {_yaml_str(str(models_path))}", "  is_default: true"]
    lines += [f"  {folder}: {folder}/" for folder in _MODEL_FOLDERS]
    return "\n".join(lines) + "\n"


def _yaml_str(text: str) -> str:
    """Quote a string for YAML (JSON strings are valid YAML scalars)."""
    return json.dumps(text)


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _prepare(spec: LaunchSpec) -> None:
    spec.dirs.create()
    if spec.models_path is not None:
        spec.dirs.model_paths_config.write_text(_model_paths_yaml(spec.models_path))


class _LogPump:
    """Copies the process output to its log file and to DEBUG logging; keeps the tail."""

    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.tail: collections.deque[str] = collections.deque(maxlen=40)

    async def run(self, stream: trio.abc.ReceiveStream) -> None:
        proc_logger = logging.getLogger(f"comfytrio.process.{self.spec.name}")
        buffer = b""
        async with await trio.open_file(self.spec.dirs.log, "ab") as log:
            async for chunk in stream:
                await log.write(chunk)
                await log.flush()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip()
                    self.tail.append(line)
                    proc_logger.debug("%s", line)
        if buffer:
            self.tail.append(buffer.decode(errors="replace"))

    def text(self) -> str:
        return "\n".join(self.tail)


async def _terminate(process: trio.Process, grace: float, name: str) -> None:
    """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it."""
    if process.returncode is not None:
        return
    logger.info("stopping ComfyUI %s (pid %d)", name, process.pid)
    try:
        os.killpg(process.pid, signal.SIGTERM)
        os.killpg(process.pid, signal.SIGCONT)  # a stopped process must run to see SIGTERM
    except ProcessLookupError:
        return
    with trio.move_on_after(grace):
        await process.wait()
        return
    logger.warning("ComfyUI %s ignored SIGTERM for %g s: killing it", name, grace)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    await process.wait()


@attrs.define(eq=False)
class RunningProcess:
    """A started ComfyUI process, as ``run_comfyui`` reports it."""

    spec: LaunchSpec
    """How it was started."""
    process: trio.Process
    """The process."""
    system_stats: dict[str, Any]
    """What ``/system_stats`` answered when it became ready."""
    log_pump: _LogPump
    spawned_at: float
    """``trio.current_time()`` when the process was created."""
    ready_at: float
    """``trio.current_time()`` when it first answered."""

    @property
    def pid(self) -> int:
        """Process id of ComfyUI, which is also the id of the process group we signal (the
        guardian we started execs ComfyUI in its own process)."""
        return self.process.pid

    def log_tail(self) -> str:
        """The last lines it printed."""
        return self.log_pump.text()


async def run_comfyui(
    spec: LaunchSpec,
    *,
    task_status: trio.TaskStatus[RunningProcess] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Start ComfyUI, report it through ``task_status`` once ``/system_stats`` answers, and
    run until cancelled (then SIGTERM, grace, SIGKILL: no orphan) or until it exits (the
    exit code is returned).

    Raises ``PortInUseError`` when someone already listens on the port,
    ``ComfyUIStartupError`` (with the log tail) when the process exits while starting, and
    ``ComfyUITimeoutError`` when it is not ready in ``spec.ready_timeout`` seconds.

    If this process dies without running that cleanup (``kill -9``, a SIGTERM left at its
    default action), ComfyUI dies too: the guardian's watcher sees the pipe close (see
    ``_guardian``; any POSIX system, not Windows).
    """
    if await trio.to_thread.run_sync(_port_taken, spec.port):
        raise PortInUseError(spec.name, spec.port)
    await trio.to_thread.run_sync(_prepare, spec)
    env = dict(os.environ)
    env.update(spec.env)
    if spec.cuda_device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(spec.cuda_device)
    cmd = comfyui_command(spec)
    logger.debug("starting ComfyUI %s: %s", spec.name, " ".join(cmd))
    # The guardian's pipe. os.pipe() makes both ends close-on-exec: the write end stays in
    # this process only (no other child inherits it), so the kernel closes it when this
    # process dies, however it dies; pass_fds hands the read end to the guardian alone.
    read_fd, write_fd = os.pipe()
    try:
        process = await trio.lowlevel.open_process(
            _guarded_command(cmd, read_fd, spec.grace),
            cwd=str(spec.comfyui_path),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(read_fd,),
            # Its own session: a Ctrl-C in our terminal does not reach it, and killpg
            # reaches ComfyUI and the guardian's watcher together.
            start_new_session=True,
        )
    except BaseException as exc:
        os.close(write_fd)
        if isinstance(exc, OSError):
            raise ComfyUIStartupError(spec.name, f"cannot run {cmd[0]}: {exc}") from exc
        raise
    finally:
        os.close(read_fd)  # only the guardian's watcher must hold it
    spawned_at = trio.current_time()
    pump = _LogPump(spec)
    try:
        with unwrapped(ComfyAPIError):  # our own errors, raised as themselves
            async with trio.open_nursery() as nursery:
                assert process.stdout is not None
                nursery.start_soon(pump.run, process.stdout)
                stats = await _wait_ready(spec, process)
                if stats is None:
                    await _terminate(process, spec.grace, spec.name)
                    with trio.move_on_after(2):  # let the pump read the last lines
                        await trio.sleep(0.05)
                    code = process.returncode
                    tail = pump.text()
                    if "address already in use" in tail.lower():
                        raise PortInUseError(spec.name, spec.port)
                    raise ComfyUIStartupError(
                        spec.name, f"the process exited with code {code} while starting", tail
                    )
                logger.info("ComfyUI %s ready at %s (pid %d)", spec.name, spec.url, process.pid)
                task_status.started(
                    RunningProcess(spec, process, stats, pump, spawned_at, trio.current_time())
                )
                code = await process.wait()
                logger.error("ComfyUI %s exited with code %s", spec.name, code)
                nursery.cancel_scope.cancel()
                return code
    finally:
        try:
            with trio.CancelScope(shield=True):
                await _terminate(process, spec.grace, spec.name)
        finally:
            # ComfyUI has exited: end-of-file tells the watcher the instance is over, and it
            # kills what is left of the process group (ComfyUI's own children), then itself.
            os.close(write_fd)


async def _wait_ready(spec: LaunchSpec, process: trio.Process) -> dict[str, Any] | None:
    """``/system_stats`` of our process once it answers; None when the process exited."""
    stats: dict[str, Any] | None = None
    with trio.move_on_after(spec.ready_timeout) as timer:
        async with trio.open_nursery() as nursery:

            async def watch_exit() -> None:
                await process.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_exit)
            stats = await wait_server_ready(spec.url, timeout=math.inf)
            nursery.cancel_scope.cancel()
    if process.returncode is not None:
        return None
    if timer.cancelled_caught or stats is None:
        await _terminate(process, spec.grace, spec.name)
        raise ComfyUITimeoutError(
            f"ComfyUI {spec.name} was not ready after {spec.ready_timeout:g} s "
            f"(see {spec.dirs.log})",
            instance=spec.name,
            timeout=spec.ready_timeout,
        )
    argv: Sequence[Any] = stats.get("system", {}).get("argv") or []
    if argv and str(spec.port) not in [str(a) for a in argv]:
        # Something else answered on our port: never adopt it silently.
        await _terminate(process, spec.grace, spec.name)
        raise PortInUseError(spec.name, spec.port)
    return stats
