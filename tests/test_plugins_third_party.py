"""A real third-party plugin: the ``comfytrio-example-plugin`` distribution.

It lives in ``plugins/third_party_example`` with its own ``pyproject.toml``, is installed
into the test environment (``pip install -e plugins/third_party_example``), and comfytrio
finds it through its ``comfytrio`` entry point, exactly as it finds the standard plugin.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest
from test_plugins_support import load_workflow, plan

import comfytrio
from comfytrio import ParamError


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
