"""The README's two set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\n(.+?)\n```", quickstart)


def test_quickstart_has_exactly_two_commands() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("comfytrio demo")
    assert commands[1].endswith("pytest")


def test_ci_runs_the_readme_test_command() -> None:
    command = _readme_commands()[1]
    install_args = command.split("pip install ", 1)[1].split(" && ", 1)[0]
    ci = (ROOT / ".ci" / "run").read_text()
    # CI runs the same install and test steps, in a fresh venv instead of ./.venv.
    assert f'pip" install --quiet {install_args}' in ci
    assert command.endswith(".venv/bin/pytest")
    assert '"$venv/bin/pytest"' in ci
