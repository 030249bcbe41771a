"""The docs stay true to the code: their examples run, their commands parse, their names exist.

- A fenced block whose first line is ``# test: run`` (``python`` or ``bash``) is run, in the
  order of its page, in one scratch folder per page that holds a copy of ``tests/workflows/``,
  a fake ComfyUI install in ``ComfyUI/`` and a picture ``photo.png``. The ports 8188/8189 and
  3050/3051 are replaced by free ones, so examples keep the numbers a reader expects.
- The test files of docs/testing.md (blocks starting ``# test_<name>.py``) are run with pytest,
  its ``# example_script.py`` with Python.
- Every other Python block must compile; every ``comfytrio ...`` command line in a block must
  parse with the real parser; every comfytrio name in migrating.md's tables must exist.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from conftest import WORKFLOWS, png_bytes

import comfytrio
from comfytrio.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN_MARK = "# test: run"
RUNNABLE = ["quickstart.md", "concepts.md", "migrating.md"]


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, in order."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if match is None:
            i += 1
            continue
        indent, lang, start = match.group(1), match.group(2), i + 1
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :])
            i += 1
        found.append(Block(path.name, start, lang, "\n".join(body) + "\n"))
        i += 1
    return found


def all_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def free_pair() -> int:
    """A port P such that P and P + 1 are both free now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def with_free_ports(text: str, ports: dict[str, int]) -> str:
    return re.sub(r"\b(8188|8189|3050|3051)\b", lambda m: str(ports[m.group(1)]), text)


def scratch(tmp_path: Path) -> Path:
    from comfytrio.testing import lay_out_fake_comfyui_install

    shutil.copytree(WORKFLOWS, tmp_path / "tests" / "workflows")
    shutil.copytree(WORKFLOWS, tmp_path / "workflows")
    lay_out_fake_comfyui_install(tmp_path / "ComfyUI")
    (tmp_path / "photo.png").write_bytes(png_bytes((32, 24), (200, 40, 40)))
    return tmp_path


def environment() -> dict[str, str]:
    """The venv's scripts (``comfytrio``, ``python``) first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


async def run(cmd: list[str], cwd: Path, where: str, timeout: float = 60) -> str:
    with trio.fail_after(timeout):
        done = await trio.run_process(
            cmd, cwd=cwd, env=environment(), capture_stdout=True, capture_stderr=True, check=False
        )
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"the example at {where} failed ({done.returncode}):\n{output}"
    return output


# ---------------------------------------------------------------------- examples run


@pytest.mark.parametrize("page", RUNNABLE)
async def test_examples_run(page: str, tmp_path: Path) -> None:
    runnable = [b for b in blocks(DOCS / page) if b.text.startswith(RUN_MARK)]
    assert runnable, f"{page} has no block marked {RUN_MARK!r}"
    work = scratch(tmp_path)
    base, other = free_pair(), free_pair()
    ports = {"8188": base, "8189": base + 1, "3050": other, "3051": other + 1}
    for n, block in enumerate(runnable):
        text = with_free_ports(block.text, ports)
        if block.lang == "python":
            script = work / f"example_{n}.py"
            script.write_text(text, encoding="utf-8")
            await run([sys.executable, str(script)], work, block.where)
        elif block.lang == "bash":
            script = work / f"example_{n}.sh"
            script.write_text("set -euo pipefail\n" + text, encoding="utf-8")
            await run(["bash", str(script)], work, block.where)
        else:
            pytest.fail(f"{block.where}: cannot run a {block.lang!r} block")


async def test_testing_guide_tests_pass(tmp_path: Path) -> None:
    work = scratch(tmp_path)
    tests: list[str] = []
    for block in blocks(DOCS / "testing.md"):
        first = block.text.splitlines()[0] if block.text.strip() else ""
        name = re.fullmatch(r"# ((?:test_\w+|example_\w+)\.py)", first)
        if block.lang != "python" or name is None:
            continue
        (work / name.group(1)).write_text(block.text, encoding="utf-8")
        if name.group(1).startswith("test_"):
            tests.append(name.group(1))
        else:
            await run([sys.executable, name.group(1)], work, block.where)
    assert len(tests) >= 3, tests
    output = await run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "trio_mode=true",
            "-W",
            "error",
            *tests,
        ],
        work,
        "docs/testing.md",
        timeout=120,
    )
    assert " passed" in output, output
    assert "failed" not in output, output


# ---------------------------------------------------------------------- everything else checks


def python_blocks() -> list[Block]:
    return [b for p in all_pages() for b in blocks(p) if b.lang == "python"]


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: b.where)
def test_python_blocks_compile(block: Block) -> None:
    compile(block.text, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def json_blocks() -> list[Block]:
    return [b for p in all_pages() for b in blocks(p) if b.lang == "json"]


@pytest.mark.parametrize("block", json_blocks(), ids=lambda b: b.where)
def test_json_blocks_parse(block: Block) -> None:
    json.loads(block.text)


def command_lines() -> list[tuple[str, str]]:
    """Every ``comfytrio ...`` command of a shell block (continuations joined)."""
    found: list[tuple[str, str]] = []
    for page in all_pages():
        for block in blocks(page):
            if block.lang not in ("", "bash", "console", "sh", "shell"):
                continue
            joined = block.text.replace("\\\n", " ")
            for line in joined.splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith("comfytrio "):
                    # A synopsis writes optional parts as [--flag value]: check them too.
                    found.append((block.where, line.replace("[", " ").replace("]", " ")))
    return found


def test_some_commands_are_found() -> None:
    subcommands = {shlex.split(line)[1] for _, line in command_lines()}
    assert {"run", "demo", "doctor", "fake-server"} <= subcommands


@pytest.mark.parametrize(("where", "line"), command_lines(), ids=lambda v: str(v)[:60])
def test_commands_parse(where: str, line: str) -> None:
    argv = shlex.split(line.split(" | ")[0])[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: {line!r} does not parse (exit {exc.code})")


def migrating_names() -> list[str]:
    """The comfytrio column of every table in migrating.md."""
    names: list[str] = []
    for row in (DOCS / "migrating.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if not row.startswith("|") or len(cells) != 3 or cells[1] in ("comfytrio", "---"):
            continue
        names += re.findall(r"`([A-Za-z_][\w.]*)`", cells[1])
    return names


@pytest.mark.parametrize("name", migrating_names())
def test_migrating_names_exist(name: str) -> None:
    obj: object = comfytrio
    for part in name.split(".")[1:] if name.startswith("comfytrio") else name.split("."):
        assert hasattr(obj, part), f"migrating.md names {name!r}, which comfytrio lacks"
        obj = getattr(obj, part)


def test_migrating_covers_every_seed_name() -> None:
    from test_public_api import SEED_NAMES

    seed_names = SEED_NAMES - {"distribute"}
    assert seed_names <= set(migrating_names())


def test_every_doc_is_linked_from_the_index() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/index.md)" in readme
