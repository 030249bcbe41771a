"""Params: validated at plan time, split for ``gpu_scale``, injected into every mapped node.

These are the seed library's ``params`` dicts: ``{"type", "value", "node_mappings",
"gpu_scale"}``, with ``integer`` and ``string`` as it had them, plus ``float`` and
``boolean``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import trio
from test_plugins_support import Route, load_workflow, plan, start_http_server, std_plugins

import comfytrio
from comfytrio import LoRARef, NodeTitleNotFoundError, ParamError, UnknownParamTypeError

STEPS = {"type": "integer", "value": 30, "node_mappings": "API - STEP"}
PROMPT = {"type": "string", "value": "a red fox", "node_mappings": "API - PROMPT"}


def batch(value: int) -> dict[str, Any]:
    return {
        "type": "integer",
        "value": value,
        "gpu_scale": True,
        "node_mappings": "API - BATCH SIZE",
    }


# --------------------------------------------------------------------------- injection


async def test_integer_and_string_go_into_inputs_value() -> None:
    job = await plan(
        std_plugins(), load_workflow("sdxl_txt2img"), {"steps": STEPS, "prompt": PROMPT}
    )
    (shard,) = job.shards
    assert shard.workflow["21"]["inputs"]["value"] == 30
    assert shard.workflow["20"]["inputs"]["value"] == "a red fox"


async def test_a_value_goes_into_every_node_with_the_title() -> None:
    workflow = load_workflow("model_free")
    workflow["8"] = copy.deepcopy(workflow["2"])  # a second node titled "API - PROMPT"
    job = await plan(std_plugins(), workflow, {"prompt": PROMPT})
    assert job.shards[0].workflow["2"]["inputs"]["value"] == "a red fox"
    assert job.shards[0].workflow["8"]["inputs"]["value"] == "a red fox"


async def test_node_mappings_may_list_several_titles() -> None:
    both = {
        "type": "string",
        "value": "x",
        "node_mappings": ["API - PROMPT", "Save Inverted.filename_prefix"],
    }
    job = await plan(std_plugins(), load_workflow("model_free"), {"both": both})
    assert job.shards[0].workflow["2"]["inputs"]["value"] == "x"
    assert job.shards[0].workflow["7"]["inputs"] == {"images": ["6", 0], "filename_prefix": "x"}


async def test_float_and_boolean() -> None:
    workflow = load_workflow("model_free")
    params = {
        "cfg": {"type": "float", "value": 7, "node_mappings": "API - BATCH SIZE"},
        "flag": {"type": "boolean", "value": False, "node_mappings": "API - PROMPT"},
    }
    job = await plan(std_plugins(), workflow, params)
    value = job.shards[0].workflow["1"]["inputs"]["value"]
    assert value == 7.0
    assert isinstance(value, float)
    assert job.shards[0].workflow["2"]["inputs"]["value"] is False


async def test_the_callers_workflow_is_never_changed() -> None:
    workflow = load_workflow("sdxl_txt2img")
    before = copy.deepcopy(workflow)
    job = await plan(std_plugins(), workflow, {"steps": STEPS, "b": batch(4)}, shard_count=3)
    assert workflow == before
    assert len({id(s.workflow) for s in job.shards}) == 3


async def test_a_shard_is_built_from_the_workflow_as_it_was_when_planned() -> None:
    workflow = load_workflow("sdxl_txt2img")
    job = await plan(std_plugins(), workflow, {"steps": STEPS})
    workflow["20"]["inputs"]["value"] = "changed after planning"
    del workflow["21"]
    built = job.shards[0].build()
    assert built["21"]["inputs"]["value"] == 30
    assert built["20"]["inputs"]["value"] == load_workflow("sdxl_txt2img")["20"]["inputs"]["value"]
    again = job.shards[0].build()
    assert again == built
    assert again is not built
    assert again["21"]["inputs"] is not built["21"]["inputs"]


async def test_jobs_of_one_workflow_share_its_snapshot() -> None:
    """A waiting job holds no copy of a workflow that other jobs already hold."""
    first = await plan(std_plugins(), load_workflow("sdxl_txt2img"), {"steps": STEPS})
    second = await plan(std_plugins(), load_workflow("sdxl_txt2img"), {"prompt": PROMPT})
    assert first.shards[0]._template.workflow_json is second.shards[0]._template.workflow_json
    assert second.shards[0].build()["20"]["inputs"]["value"] == "a red fox"


async def test_a_workflow_with_integer_node_ids_is_sent_as_json_names_it() -> None:
    workflow: dict[Any, Any] = {int(k): v for k, v in load_workflow("sdxl_txt2img").items()}
    job = await plan(std_plugins(), workflow, {"steps": STEPS})
    built = job.shards[0].build()
    assert built["21"]["inputs"]["value"] == 30
    assert sorted(built) == sorted(str(k) for k in workflow)


async def test_a_workflow_that_is_not_json_is_refused_naming_the_node() -> None:
    workflow = load_workflow("sdxl_txt2img")
    workflow["20"]["inputs"]["value"] = object()
    with pytest.raises(ParamError) as info:
        await plan(std_plugins(), workflow, {"steps": STEPS})
    assert info.value.param == "workflow"
    assert "node '20'" in str(info.value)


# --------------------------------------------------------------------------- gpu_scale


@pytest.mark.parametrize(
    ("total", "shards", "shares"),
    [(4, 3, [2, 1, 1]), (6, 3, [2, 2, 2]), (1, 3, [1]), (2, 3, [1, 1]), (5, 1, [5])],
)
async def test_gpu_scale_splits_with_distribute_and_drops_zero_shares(
    total: int, shards: int, shares: list[int]
) -> None:
    job = await plan(
        std_plugins(), load_workflow("sdxl_txt2img"), {"batch": batch(total)}, shard_count=shards
    )
    assert [s.scaled for s in job.shards] == [{"batch": n} for n in shares]
    assert [s.index for s in job.shards] == list(range(len(shares)))
    cuts = [
        [n["inputs"]["length"] for n in s.workflow.values() if n["class_type"] == "LatentFromBatch"]
        for s in job.shards
    ]
    if len(shares) > 1:  # an EmptyLatentImage batch: whole on each shard, its share cut out
        assert [s.workflow["22"]["inputs"]["value"] for s in job.shards] == [total] * len(shares)
        assert cuts == [[n] for n in shares]
    else:  # one shard runs the workflow as given
        assert [s.workflow["22"]["inputs"]["value"] for s in job.shards] == shares
        assert cuts == [[]]
    # Any other batch (an EmptyImage here) gets each shard's share itself.
    other = await plan(
        std_plugins(), load_workflow("model_free"), {"batch": batch(total)}, shard_count=shards
    )
    assert [s.workflow["1"]["inputs"]["value"] for s in other.shards] == shares


async def test_without_gpu_scale_every_shard_runs_the_whole_value() -> None:
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), {"steps": STEPS}, shard_count=3)
    assert len(job.shards) == 3
    assert all(s.scaled == {} and s.workflow["21"]["inputs"]["value"] == 30 for s in job.shards)


async def test_a_shard_runs_only_when_every_scaled_share_is_above_zero() -> None:
    params = {
        "batch": batch(4),
        "frames": {"type": "integer", "value": 2, "gpu_scale": True, "node_mappings": "API - STEP"},
    }
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), params, shard_count=3)
    assert [s.scaled for s in job.shards] == [{"batch": 2, "frames": 1}, {"batch": 1, "frames": 1}]


# --------------------------------------------------------------------------- errors


async def test_an_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(UnknownParamTypeError) as caught:
        await plan(
            std_plugins(),
            load_workflow("model_free"),
            {"steps": {"type": "int", "value": 3, "node_mappings": "API - BATCH SIZE"}},
        )
    assert caught.value.param == "steps"
    assert caught.value.type_name == "int"
    assert {"integer", "string", "image", "seed"} <= set(caught.value.known)
    assert "integer" in str(caught.value)


async def test_a_title_that_matches_no_node_lists_the_titles() -> None:
    with pytest.raises(NodeTitleNotFoundError) as caught:
        await plan(
            std_plugins(),
            load_workflow("model_free"),
            {"steps": {"type": "integer", "value": 3, "node_mappings": "API - STEPS"}},
        )
    assert caught.value.param == "steps"
    assert caught.value.title == "API - STEPS"
    assert "API - BATCH SIZE" in caught.value.available
    assert "API - PICTURE" in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"type": "integer", "value": "20", "node_mappings": "API - STEP"}, "expects an integer"),
        ({"type": "integer", "value": True, "node_mappings": "API - STEP"}, "expects an integer"),
        ({"type": "integer", "node_mappings": "API - STEP"}, "needs a 'value'"),
        ({"type": "string", "value": 3, "node_mappings": "API - PROMPT"}, "expects a string"),
        ({"type": "float", "value": "7", "node_mappings": "API - STEP"}, "expects a number"),
        ({"type": "float", "value": math.nan, "node_mappings": "API - STEP"}, "finite"),
        ({"type": "boolean", "value": 1, "node_mappings": "API - STEP"}, "true or false"),
        (
            {"type": "string", "value": "x", "gpu_scale": True, "node_mappings": "API - PROMPT"},
            "cannot be split",
        ),
        (
            {"type": "integer", "value": 0, "gpu_scale": True, "node_mappings": "API - STEP"},
            "at least 1",
        ),
        (
            {"type": "integer", "value": 4, "gpu_scale": "yes", "node_mappings": "API - STEP"},
            "true or false",
        ),
        (
            {"type": "integer", "value": 4, "gpu_sacle": True, "node_mappings": "API - STEP"},
            "unknown key",
        ),
        ({"type": "integer", "value": 4}, "node_mappings"),
        ({"type": "integer", "value": 4, "node_mappings": []}, "node_mappings"),
        ({"value": 4, "node_mappings": "API - STEP"}, "needs a 'type'"),
        ("20", "must be a dict"),
    ],
)
async def test_a_bad_param_is_refused_with_its_name(entry: Any, message: str) -> None:
    with pytest.raises(ParamError, match=message) as caught:
        await plan(std_plugins(), load_workflow("sdxl_txt2img"), {"steps": entry})
    assert caught.value.param == "steps"
    assert "'steps'" in str(caught.value)


async def test_two_params_for_one_title_are_refused() -> None:
    with pytest.raises(ParamError, match="already gets param 'a'") as caught:
        await plan(
            std_plugins(), load_workflow("sdxl_txt2img"), {"a": STEPS, "b": {**STEPS, "value": 10}}
        )
    assert caught.value.param == "b"


async def test_a_bad_param_downloads_nothing(nursery: trio.Nursery, tmp_path: Any) -> None:
    # Params are checked before any I/O, so a typo never costs a multi-GB download.
    server = await start_http_server(nursery, {"/style.safetensors": Route(b"weights")})
    lora = LoRARef("style.safetensors", server.url("/style.safetensors"))
    with pytest.raises(ParamError):
        await plan(
            std_plugins(),
            load_workflow("sdxl_txt2img"),
            {"steps": {**STEPS, "value": "many"}},
            loras=[lora],
            models_path=tmp_path,
        )
    assert server.requests == []
    assert not (tmp_path / "loras").exists()


def test_validate_params_checks_without_io() -> None:
    checked = comfytrio.validate_params(
        std_plugins(), load_workflow("sdxl_txt2img"), {"steps": STEPS, "batch": batch(4)}
    )
    by_name = {p.name: p for p in checked}
    assert by_name["steps"].node_ids == ("21",)
    assert by_name["batch"].gpu_scale
    assert "K - SEED" in by_name  # the default seed param of the standard plugin


@pytest.mark.parametrize("shard_count", [0, -1, True])
async def test_shard_count_must_be_positive(shard_count: Any) -> None:
    with pytest.raises(ValueError, match="shard_count"):
        await plan(std_plugins(), load_workflow("model_free"), shard_count=shard_count)
