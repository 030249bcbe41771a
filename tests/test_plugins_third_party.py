"""A real third-party plugin: the ``comfytrio-example-plugin`` distribution.

It lives in ``plugins/third_party_example`` with its own ``pyproject.toml``, is installed
into the test environment (``pip install -e plugins/third_party_example``), and comfytrio
finds it through its ``comfytrio`` entry point, exactly as it finds the standard plugin.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_cli import MODEL_FREE, run_cli
from test_plugins_support import load_workflow, plan

import comfytrio
from comfytrio import ParamError
from comfytrio.cli import build_params
from comfytrio.testing import FakeComfyUI


def test_the_example_distribution_is_installed_with_its_entry_point() -> None:
    dist = importlib.metadata.distribution("comfytrio-example-plugin")
    (entry_point,) = [ep for ep in dist.entry_points if ep.group == "comfytrio"]
    assert (entry_point.name, entry_point.value) == ("example", "comfytrio_example")


def test_the_plugin_manager_finds_it_through_its_entry_point() -> None:
    plugins = comfytrio.make_plugin_manager()
    assert {"example", "std"} <= set(plugins.names())
    assert "size" in plugins.param_types()


async def test_its_param_type_works_in_a_workflow() -> None:
    params: dict[str, dict[str, Any]] = {
        "size": {"type": "size", "value": "832x1216", "node_mappings": "Empty Latent Image"},
        "batch": {
            "type": "integer",
            "value": 2,
            "gpu_scale": True,
            "node_mappings": "API - BATCH SIZE",
        },
    }
    job = await plan(
        comfytrio.make_plugin_manager(), load_workflow("sdxl_txt2img"), params, shard_count=2
    )
    for shard in job.shards:
        latent = shard.workflow["5"]["inputs"]
        assert (latent["width"], latent["height"]) == (832, 1216)
        assert latent["batch_size"] == ["22", 0]


async def test_its_validation_errors_name_the_param() -> None:
    params = {"size": {"type": "size", "value": "830x1216", "node_mappings": "Empty Latent Image"}}
    with pytest.raises(ParamError, match="multiples of 8") as caught:
        await plan(comfytrio.make_plugin_manager(), load_workflow("sdxl_txt2img"), params)
    assert caught.value.param == "size"


def test_it_can_be_blocked_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYTRIO_BLOCK_PLUGINS", "example")
    plugins = comfytrio.make_plugin_manager()
    assert "example" not in plugins.names()
    assert "size" not in plugins.param_types()
    assert "integer" in plugins.param_types()


def test_its_type_parses_command_line_text() -> None:
    plugins = comfytrio.make_plugin_manager()
    params = build_params(
        load_workflow("sdxl_txt2img"),
        [("--param", "Empty Latent Image:size=832x1216")],
        plugins=plugins,
    )
    assert params == {
        "Empty Latent Image": {
            "type": "size",
            "node_mappings": "Empty Latent Image",
            "value": [832, 1216],  # SizeType.parse_text, not the text
        }
    }
    with pytest.raises(ParamError, match="expects WIDTHxHEIGHT, got '832 by 1216'") as caught:
        build_params(
            load_workflow("sdxl_txt2img"),
            [("--param", "Empty Latent Image:size=832 by 1216")],
            plugins=plugins,
        )
    assert caught.value.param == "Empty Latent Image"


def test_its_infer_hook_types_a_latent_node_from_its_text() -> None:
    plugins = comfytrio.make_plugin_manager()
    workflow = load_workflow("sdxl_txt2img")
    assert plugins.infer_param_type(workflow, "Empty Latent Image", "832x1216") == "size"
    # Other text, or another node: the standard plugin answers.
    assert plugins.infer_param_type(workflow, "Empty Latent Image", "7") == "integer"
    assert plugins.infer_param_type(workflow, "API - STEP", "8x8") == "integer"


@pytest.mark.parametrize("key", ["Empty Image:size", "Empty Image"])
async def test_comfytrio_run_takes_its_type_on_the_command_line(
    fake_comfyui: FakeComfyUI, tmp_path: Path, key: str
) -> None:
    fake_comfyui.add_input_image("example.png")
    done = await run_cli(
        "run",
        str(MODEL_FREE),
        "--url",
        fake_comfyui.url,
        "--param",
        f"{key}=64x48",
        "--param",
        "API - BATCH SIZE=1",
        "--download-dir",
        str(tmp_path),
        "--json",
    )
    assert done.returncode == 0, done.stderr.decode()
    outputs = json.loads(done.stdout)["outputs"]
    (generated,) = [o for o in outputs if o["filename"].startswith("demo")]
    with Image.open(generated["path"]) as image:
        assert image.size == (64, 48)


def test_the_docs_show_its_complete_pyproject() -> None:
    root = Path(__file__).parent.parent
    pyproject = (root / "plugins" / "third_party_example" / "pyproject.toml").read_text()
    docs = (root / "docs" / "plugins.md").read_text()
    assert f"```toml\n{pyproject}```" in docs
