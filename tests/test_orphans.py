"""ComfyUI processes die with the orchestrator, however it dies (``kill -9``, a SIGTERM that
Python leaves at its default action): the guardian of ``comfytrio/_guardian.py`` and its
pipe. Real processes, no GPU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from test_api import free_ports

from comfytrio import _process
from comfytrio.testing import lay_out_fake_comfyui_install

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")

# An orchestrator: a ComfyAPI on the fake install, its instances' pids and ports on one line
# of stdout, then it waits to be killed. argv: install, state folder, ports...
ORCHESTRATOR = """
import json, sys
from pathlib import Path
import trio
from comfytrio import ComfyAPI, ComfyUIInstance, GPUInfo

async def main() -> None:
    install, state, ports = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    api = ComfyAPI(
        [ComfyUIInstance(install, int(port)) for port in ports],
        state / "models",
        gpu=GPUInfo(False, len(ports)),
        state_dir=state,
        ready_timeout=30,
        grace=3,
    )
    async with api:
        pids = [i.process.pid for i in api.instances if i.process is not None]
        print(json.dumps({"pids": pids, "ports": [int(p) for p in ports]}), flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def running(pid: int) -> bool:
    """Whether ``pid`` still runs. A zombie does not count: the reaper it was handed to may
    never reap it (PID 1 of some containers), and it holds no port, memory or GPU."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the kill above says enough
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """The running processes of process group ``pgid``: from ``/proc`` on Linux; elsewhere
    ``[pgid]`` while any process of the group is left."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it just went away
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


async def port_open(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def wait_gone(pgids: Sequence[int], ports: Sequence[int], timeout: float = 5.0) -> None:
    """Until no process of these groups runs and no one listens on these ports."""
    with trio.fail_after(timeout):
        while True:
            left = [pid for pgid in pgids for pid in group_members(pgid)]
            listening = [port for port in ports if await port_open(port)]
            if not left and not listening:
                return
            await trio.sleep(0.05)


async def reap(process: trio.Process) -> None:
    """Wait for ``process`` and close its stdout (no ResourceWarning)."""
    await process.wait()
    if process.stdout is not None:
        await process.stdout.aclose()


async def read_until(process: trio.Process, marker: str, timeout: float = 10.0) -> str:
    """What ``process`` printed up to a complete line that holds ``marker`` (all it printed
    if it ends first)."""
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(timeout):
        async for chunk in process.stdout:
            buffer += chunk
            if marker.encode() in buffer[: buffer.rfind(b"\n") + 1]:
                break
    return buffer.decode(errors="replace")


def line_with(text: str, marker: str) -> str:
    """The first line of ``text`` that holds ``marker`` (fails with the whole text)."""
    for line in text.splitlines():
        if marker in line:
            return line
    pytest.fail(f"no line with {marker!r} in:\n{text}")


# --------------------------------------------------------------------------- the orchestrator


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_comfyui_dies_with_a_killed_orchestrator(tmp_path: Path, signum: int) -> None:
    install = lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    ports = free_ports(2)
    orchestrator = await trio.lowlevel.open_process(
        [sys.executable, "-c", ORCHESTRATOR, str(install), str(tmp_path / "state")]
        + [str(p) for p in ports],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    pids: list[int] = []
    try:
        text = await read_until(orchestrator, '{"pids"', timeout=60)
        started = json.loads(line_with(text, '{"pids"'))
        pids = started["pids"]
        assert len(pids) == 2
        assert all(running(pid) for pid in pids)
        assert all([await port_open(port) for port in ports])

        orchestrator.send_signal(signum)
        assert await orchestrator.wait() == -signum  # no cleanup of its own ran

        await wait_gone(pids, ports)
    finally:
        with trio.CancelScope(shield=True):
            if orchestrator.returncode is None:
                orchestrator.kill()
            await reap(orchestrator)
            for pid in pids:  # a failed test leaves no server behind
                if group_members(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the guardian


class Guarded:
    """A command started as ``run_comfyui`` starts ComfyUI, and the write end of its pipe."""

    def __init__(self, process: trio.Process, write_fd: int) -> None:
        self.process = process
        self._write_fd: int | None = write_fd

    def close_pipe(self) -> None:
        """What the kernel does when the orchestrator dies (closing twice does nothing: the
        descriptor number may belong to someone else by then)."""
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None


@asynccontextmanager
async def guarded(code: str, *, grace: float = 5.0) -> AsyncIterator[Guarded]:
    """``python -c code`` under the guardian. On the way out the pipe is closed and no process
    of the group may be left."""
    read_fd, write_fd = os.pipe()
    try:
        process = await trio.lowlevel.open_process(
            _process._guarded_command([sys.executable, "-c", code], read_fd, grace),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            pass_fds=(read_fd,),
            start_new_session=True,
        )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    guard = Guarded(process, write_fd)
    try:
        yield guard
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            await reap(process)
            guard.close_pipe()
            await wait_gone([process.pid], [])


# The command prints "ready" once set up, then waits to be stopped.
READY = "import os, signal, sys, time\n{setup}\nprint('ready', flush=True)\ntime.sleep(60)\n"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("pass", 0),
        ("import sys; sys.exit(3)", 3),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
    ],
    ids=["0", "3", "killed"],
)
async def test_the_exit_code_passes_through(code: str, expected: int) -> None:
    async with guarded(code) as guard:
        assert await guard.process.wait() == expected
        guard.close_pipe()  # the orchestrator's finally: the watcher goes too
        await wait_gone([guard.process.pid], [])


async def test_the_pid_is_the_commands_own() -> None:
    """A signal to the pid reaches the command, not a middleman that would leave it running
    (the fault handling stops a hung ComfyUI with SIGSTOP or SIGKILL to that pid)."""
    async with guarded(READY.format(setup="print('pgid', os.getpid(), os.getpgid(0))")) as guard:
        pid = guard.process.pid
        text = await read_until(guard.process, "ready")
        assert line_with(text, "pgid").split() == ["pgid", str(pid), str(pid)]
        os.kill(pid, signal.SIGKILL)
        assert await guard.process.wait() == -signal.SIGKILL


async def test_end_of_file_on_the_pipe_stops_the_command() -> None:
    async with guarded(READY.format(setup="")) as guard:
        assert "ready" in await read_until(guard.process, "ready")
        guard.close_pipe()
        with trio.fail_after(5):
            assert await guard.process.wait() == -signal.SIGTERM
        await wait_gone([guard.process.pid], [])


async def test_a_command_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    # It notes the SIGTERM and carries on: the SIGKILL it dies of came after it.
    setup = "signal.signal(signal.SIGTERM, lambda *_: print('sigterm', flush=True))"
    async with guarded(READY.format(setup=setup), grace=0.5) as guard:
        assert "ready" in await read_until(guard.process, "ready")
        guard.close_pipe()
        assert "sigterm" in await read_until(guard.process, "sigterm", timeout=5)
        with trio.fail_after(5):
            assert await guard.process.wait() == -signal.SIGKILL
        await wait_gone([guard.process.pid], [])


async def test_the_watcher_outlives_sigterm_and_cleans_up_the_group() -> None:
    """The orchestrator's own stop: SIGTERM to the group ends the command but not the
    watcher (its handler does nothing), which kills what is left of the group (here a child
    of the command that ignores SIGTERM) at end-of-file."""
    straggler = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('set', flush=True); time.sleep(60)"
    )
    setup = (
        "import subprocess\n"
        f"child = subprocess.Popen([sys.executable, '-c', {straggler!r}], stdout=subprocess.PIPE)\n"
        "child.stdout.readline()"
    )
    async with guarded(READY.format(setup=setup)) as guard:
        pid = guard.process.pid
        assert "ready" in await read_until(guard.process, "ready")
        os.killpg(pid, signal.SIGTERM)
        assert await guard.process.wait() == -signal.SIGTERM
        if sys.platform == "linux":
            assert len(group_members(pid)) == 2  # the straggler and the watcher
        guard.close_pipe()
        await wait_gone([pid], [])


async def test_a_command_that_cannot_run_exits_127() -> None:
    read_fd, write_fd = os.pipe()
    try:
        result = await trio.run_process(
            _process._guarded_command(["/nonexistent/python", "main.py"], read_fd, 1.0),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            pass_fds=(read_fd,),
            start_new_session=True,
        )
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert result.returncode == 127
    assert b"cannot run /nonexistent/python" in result.stderr
