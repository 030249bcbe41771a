"""Every hook is documented in docs/ (with its arguments) and has a test (as datasette does)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from comfytrio import hookspecs

ROOT = Path(__file__).parent.parent


def hook_names() -> list[str]:
    """Every hook in comfytrio.hookspecs (the functions marked with ``@hookspec``)."""
    return sorted(
        name
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, "comfytrio_spec")
    )


def test_the_hooks_are_found() -> None:
    assert hook_names() == [
        "default_params",
        "infer_param_type",
        "register_asset_resolvers",
        "register_output_stores",
        "register_param_types",
    ]


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_is_documented_with_its_arguments(name: str) -> None:
    arguments = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
    heading = f"### {name}({arguments})"
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    assert heading in docs.splitlines(), f"docs/ has no heading {heading!r}"
    section = docs.split(heading, 1)[1].split("\n### ", 1)[0]
    assert "```python" in section, f"the docs of {name} have no example"
    for argument in inspect.signature(getattr(hookspecs, name)).parameters:
        assert f"`{argument}`" in section, f"the docs of {name} do not explain {argument!r}"


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_has_a_test(name: str) -> None:
    tests: set[str] = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                tests.add(node.name)
    assert f"test_hook_{name}" in tests, f"no test named test_hook_{name}"


def test_every_public_name_of_the_plugin_api_is_documented() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name in hookspecs.__all__:
        if name not in {"hookspec", "hookimpl", *hook_names()}:
            assert name in docs, f"docs/plugins.md does not mention {name}"
