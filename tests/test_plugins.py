"""The plugin manager: a factory, entry points, blocking, duplicates, and every hook.

Each test makes its own manager: there is no global one to leak between tests.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from test_plugins_support import load_workflow, plan, std_plugins

import comfytrio
from comfytrio import PluginError, hookimpl
from comfytrio.hookspecs import (
    AssetResolver,
    BaseAssetResolver,
    BaseParamType,
    JobContext,
    Param,
    ParamType,
)

ROOT = Path(__file__).parent.parent


def plugin_module(name: str, **hooks: Callable[..., Any]) -> types.ModuleType:
    """A plugin as a module object, with the given hook implementations."""
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


class Upper(BaseParamType):
    """A param type for the tests: a string, upper-cased."""

    name = "upper"

    def shard_value(self, param: Param, prepared: Any, shard: Any) -> Any:
        return str(prepared).upper()


def registers(*objects: object) -> Callable[[Callable[[object], None]], None]:
    def hook(register: Callable[[object], None]) -> None:
        for obj in objects:
            register(obj)

    return hook


# --------------------------------------------------------------------------- the factory


def test_entry_points_bring_the_standard_plugin_like_any_other() -> None:
    plugins = comfytrio.make_plugin_manager()
    assert "std" in plugins.names()
    assert {"integer", "string", "image", "float", "boolean", "seed"} <= set(plugins.param_types())
    assert [r.name for r in plugins.asset_resolvers()] == [
        "models",
        "lora-downloads",
        "lora-loaders",
    ]


def test_each_call_makes_an_independent_manager() -> None:
    first = comfytrio.make_plugin_manager(entrypoints=False)
    second = comfytrio.make_plugin_manager(entrypoints=False)
    first.register(plugin_module("mine", register_param_types=registers(Upper())), "mine")
    assert "upper" in first.param_types()
    assert "upper" not in second.param_types()
    assert first.downloader is not second.downloader


def test_without_entry_points_the_manager_is_empty() -> None:
    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    assert plugins.names() == []
    assert plugins.param_types() == {}
    assert plugins.asset_resolvers() == []


def test_the_environment_variable_blocks_named_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYTRIO_BLOCK_PLUGINS", " std , nothing-of-that-name")
    plugins = comfytrio.make_plugin_manager()
    assert "std" not in plugins.names()
    assert "integer" not in plugins.param_types()


def test_blocked_names_can_be_given_too() -> None:
    plugins = comfytrio.make_plugin_manager(blocked=["std"])
    assert "std" not in plugins.names()
    with pytest.raises(PluginError, match="blocked"):
        plugins.register(plugin_module("std"), "std")


def test_the_core_imports_nothing_from_plugins() -> None:
    plugin_packages = {init.parent.name for init in (ROOT / "plugins").rglob("__init__.py")}
    assert {"comfytrio_std", "comfytrio_example"} <= plugin_packages
    for source in (ROOT / "comfytrio").rglob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in plugin_packages, f"{source} imports {name}"


def test_importing_comfytrio_loads_no_plugin() -> None:
    code = (
        "import sys, comfytrio; "
        "assert not {'comfytrio_std', 'comfytrio_example'} & set(sys.modules), sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- errors


def test_a_param_type_name_registered_twice_names_both_plugins() -> None:
    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    plugins.register(plugin_module("first", register_param_types=registers(Upper())), "first")
    second = plugin_module("second", register_param_types=registers(Upper()))
    with pytest.raises(PluginError, match="'upper' is registered twice") as caught:
        plugins.register(second, "second")
    assert "'first'" in str(caught.value)
    assert "'second'" in str(caught.value)
    # The manager is left as it was.
    assert plugins.names() == ["first"]


def test_a_standard_type_cannot_be_registered_again() -> None:
    class Integer(BaseParamType):
        name = "integer"

    with pytest.raises(PluginError, match="'integer' is registered twice"):
        std_plugins().register(
            plugin_module("dup", register_param_types=registers(Integer())), "dup"
        )


def test_a_plugin_name_used_twice_raises() -> None:
    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    plugins.register(plugin_module("a"), "same")
    with pytest.raises(PluginError, match="same"):
        plugins.register(plugin_module("b"), "same")


def test_an_implementation_of_an_unknown_hook_raises() -> None:
    def register_param_typos(register: Callable[[object], None]) -> None:
        raise AssertionError("never called")

    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    with pytest.raises(PluginError, match="register_param_typos"):
        plugins.register(plugin_module("typo", register_param_typos=register_param_typos))
    assert plugins.names() == []


def test_an_implementation_with_unknown_arguments_raises() -> None:
    def register_param_types(register: Callable[[object], None], extra: int) -> None:
        raise AssertionError("never called")

    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    with pytest.raises(PluginError, match="extra"):
        plugins.register(plugin_module("bad", register_param_types=register_param_types))


@pytest.mark.parametrize(
    ("obj", "message"),
    [(object(), "without a name"), (types.SimpleNamespace(name="half"), "lacks validate")],
)
def test_registering_something_that_is_not_a_param_type_raises(obj: object, message: str) -> None:
    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    with pytest.raises(PluginError, match=message):
        plugins.register(plugin_module("bad", register_param_types=registers(obj)), "bad")


def test_unregister_removes_what_a_plugin_registered() -> None:
    plugins = std_plugins()
    plugins.unregister("std")
    assert plugins.param_types() == {}


# --------------------------------------------------------------------------- the hooks


async def test_hook_register_param_types() -> None:
    plugins = std_plugins()
    plugins.register(plugin_module("mine", register_param_types=registers(Upper())), "mine")
    assert isinstance(plugins.param_types()["upper"], Upper)

    job = await plan(
        plugins,
        load_workflow("model_free"),
        {"prefix": {"type": "upper", "value": "demo", "node_mappings": "API - PROMPT"}},
    )
    assert job.shards[0].workflow["2"]["inputs"]["value"] == "DEMO"


async def test_hook_register_asset_resolvers() -> None:
    seen: list[str] = []

    class Stamp(BaseAssetResolver):
        """Records each step and stamps each shard's workflow."""

        name = "stamp"

        def check(self, job: JobContext) -> None:
            seen.append("check")

        async def resolve(self, job: JobContext) -> None:
            seen.append("resolve")

        def inject(self, workflow: dict[str, Any], job: JobContext) -> None:
            seen.append("inject")
            workflow["2"]["inputs"]["value"] = f"seed {job.seed}"

    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    plugins.register(plugin_module("s", register_asset_resolvers=registers(Stamp())), "s")
    resolvers: list[AssetResolver] = plugins.asset_resolvers()
    assert [r.name for r in resolvers] == ["stamp"]

    job = await plan(plugins, load_workflow("model_free"), shard_count=2, seed=7)
    assert seen == ["check", "resolve"]  # a shard's workflow is built when it is sent
    assert [s.workflow["2"]["inputs"]["value"] for s in job.shards] == ["seed 7", "seed 7"]
    assert seen == ["check", "resolve", "inject", "inject"]


async def test_an_inject_that_raises_is_a_plugin_error_naming_the_resolver() -> None:
    class Broken(BaseAssetResolver):
        """Breaks its contract when a shard is built."""

        name = "broken"

        def inject(self, workflow: dict[str, Any], job: JobContext) -> None:
            raise KeyError("no such node")

    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    plugins.register(plugin_module("b", register_asset_resolvers=registers(Broken())), "b")
    job = await plan(plugins, load_workflow("model_free"))
    with pytest.raises(comfytrio.PluginError, match="asset resolver 'broken' failed to inject"):
        job.shards[0].build()


async def test_hook_default_params() -> None:
    def default_params(
        workflow: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
    ) -> Mapping[str, Mapping[str, Any]]:
        return {
            "prefix": {"type": "string", "value": "from a plugin", "node_mappings": "API - PROMPT"}
        }

    plugins = std_plugins()
    plugins.register(plugin_module("d", default_params=default_params), "d")
    workflow = load_workflow("model_free")

    job = await plan(plugins, workflow)
    assert job.shards[0].workflow["2"]["inputs"]["value"] == "from a plugin"

    # The caller's params win over a default of the same name.
    mine = {"prefix": {"type": "string", "value": "mine", "node_mappings": "API - PROMPT"}}
    job = await plan(plugins, workflow, mine)
    assert job.shards[0].workflow["2"]["inputs"]["value"] == "mine"


def test_hook_infer_param_type() -> None:
    from comfytrio.cli import build_params

    def infer_param_type(workflow: Mapping[str, Any], title: str, text: str) -> str | None:
        return "upper" if title == "API - PROMPT" else None

    plugins = std_plugins()
    plugins.register(
        plugin_module(
            "mine", register_param_types=registers(Upper()), infer_param_type=infer_param_type
        ),
        "mine",
    )
    workflow = load_workflow("model_free")
    # Its answer wins over the standard plugin's (which answers last, for every title) ...
    assert plugins.infer_param_type(workflow, "API - PROMPT", "a cat") == "upper"
    # ... and None leaves the title to the next plugin.
    assert plugins.infer_param_type(workflow, "API - BATCH SIZE", "4") == "integer"
    params = build_params(
        workflow,
        [("--param", "API - PROMPT=a cat"), ("--param", "API - BATCH SIZE=4")],
        plugins=plugins,
    )
    assert params == {
        "API - PROMPT": {"type": "upper", "node_mappings": "API - PROMPT", "value": "a cat"},
        "API - BATCH SIZE": {"type": "integer", "node_mappings": "API - BATCH SIZE", "value": 4},
    }
    # Without any plugin, nobody answers.
    empty = comfytrio.make_plugin_manager(entrypoints=False)
    assert empty.infer_param_type(workflow, "API - PROMPT", "a cat") is None


@pytest.mark.parametrize("answer", [42, "", ["integer"]])
def test_an_infer_param_type_answer_that_is_no_type_name_is_a_plugin_error(answer: object) -> None:
    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    plugins.register(plugin_module("bad", infer_param_type=lambda workflow, title, text: answer))
    with pytest.raises(PluginError, match="infer_param_type hook returned"):
        plugins.infer_param_type({}, "x", "1")


def test_an_infer_param_type_that_raises_is_a_plugin_error() -> None:
    def infer_param_type(workflow: Mapping[str, Any], title: str, text: str) -> str | None:
        raise KeyError(title)

    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    plugins.register(plugin_module("bad", infer_param_type=infer_param_type))
    with pytest.raises(PluginError, match="infer_param_type hook failed: KeyError"):
        plugins.infer_param_type({}, "x", "1")


def test_parse_text_goes_to_the_type_and_names_its_plugin_when_it_breaks() -> None:
    class Sloppy(BaseParamType):
        """Parses with int() and lets its ValueError out: a plugin bug."""

        name = "sloppy"

        def parse_text(self, text: str, param_name: str) -> Any:
            return int(text)

    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    plugins.register(
        plugin_module("p", register_param_types=registers(Upper(), Sloppy())), "sloppy-plugin"
    )
    assert plugins.parse_text("upper", "as typed", "prefix") == "as typed"  # the default
    assert plugins.parse_text("sloppy", "12", "n") == 12
    with pytest.raises(PluginError, match="param type 'sloppy' \\(plugin 'sloppy-plugin'\\)"):
        plugins.parse_text("sloppy", "twelve", "n")
    with pytest.raises(comfytrio.UnknownParamTypeError, match="known types: sloppy, upper"):
        plugins.parse_text("colour", "red", "n")


def test_a_param_type_without_parse_text_is_refused() -> None:
    # Every method of the protocol but parse_text.
    half = types.SimpleNamespace(name="half")
    for method in dir(BaseParamType):
        if not method.startswith("_") and callable(getattr(BaseParamType, method)):
            setattr(half, method, getattr(Upper(), method))
    del half.parse_text
    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    with pytest.raises(PluginError, match=r"'half' lacks parse_text$"):
        plugins.register(plugin_module("bad", register_param_types=registers(half)), "bad")


def test_every_param_field_is_documented_with_its_type() -> None:
    import attrs

    docs = (ROOT / "docs" / "plugins.md").read_text()
    for field in attrs.fields(Param):
        assert f"| `{field.name}` | `{field.type}` |" in docs, f"Param.{field.name} ({field.type})"


def test_param_types_satisfy_the_protocol() -> None:
    # What mypy checks statically, pinned for the standard plugin at run time.
    for param_type in std_plugins().param_types().values():
        checked: ParamType = param_type
        assert checked.name
