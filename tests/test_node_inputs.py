"""Params into any input of a node: ``"TITLE.INPUT"``, and the input a type writes.

A ``node_mappings`` string is a node title. When no node has that exact title and it holds a
``.``, the part after the last ``.`` is an input of the nodes titled with the part before it:
``"KSampler.steps"`` sets the KSampler's ``steps`` (a link there is replaced by the value).
A node that lacks the input named, or, mapped by plain title, the input its type writes
(``value`` for an ``integer``), is refused with its inputs listed: nothing is written beside
them any more.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import assert_no_duplicate_images
from test_plugins_support import load_workflow, plan, png, std_plugins

import comfytrio
from comfytrio import (
    ComfyAPI,
    NodeInputNotFoundError,
    NodeTitleNotFoundError,
    ParamError,
    PluginError,
)
from comfytrio.hookspecs import BaseParamType, Param
from comfytrio.testing import FakeComfyUI

KSAMPLER_INPUTS = [
    "cfg",
    "denoise",
    "latent_image",
    "model",
    "negative",
    "positive",
    "sampler_name",
    "scheduler",
    "seed",
    "steps",
]


def sdxl_models(fake: FakeComfyUI) -> None:
    fake.add_model("checkpoints", "juggernaut_xl.safetensors")
    fake.add_model("loras", "detail_enhancer.safetensors")


def integer(value: int, mapping: Any, **more: Any) -> dict[str, Any]:
    return {"type": "integer", "value": value, "node_mappings": mapping, **more}


# --------------------------------------------------------------------------- on a server


@pytest.mark.comfy_api(fakes=1)
async def test_ksampler_steps_reaches_the_server(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    (fake,) = comfy_fakes
    sdxl_models(fake)
    params = {"steps": integer(7, "KSampler.steps")}
    result = await comfy_api.run_workflow(load_workflow("sdxl_txt2img"), params=params)
    assert result.ok
    sent = fake.prompts_received[-1]["prompt"]
    assert sent["3"]["inputs"]["steps"] == 7  # was the link ["21", 0] to "API - STEP"
    assert "value" not in sent["3"]["inputs"]
    assert sent["3"]["inputs"]["cfg"] == 7.0  # the other inputs as they were
    assert sent["21"]["inputs"] == {"value": 20}


@pytest.mark.comfy_api(fakes=2)
async def test_gpu_scale_splits_an_integer_into_a_named_input(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    for fake in comfy_fakes:
        sdxl_models(fake)
    params = {"batch": integer(3, "Empty Latent Image.batch_size", gpu_scale=True)}
    result = await comfy_api.run_workflow(load_workflow("sdxl_txt2img"), params=params)
    assert len(result.paths) == 3
    assert sorted(s.scaled["batch"] for s in result.shards) == [1, 2]
    prompts = [f.prompts_received[-1]["prompt"] for f in comfy_fakes]
    sent = [prompt["5"]["inputs"] for prompt in prompts]
    # Each shard keeps the whole batch and cuts its share out (LatentFromBatch).
    assert [inputs["batch_size"] for inputs in sent] == [3, 3]
    assert all(inputs["width"] == 1024 for inputs in sent)
    cuts = sorted(
        (node["inputs"]["batch_index"], node["inputs"]["length"])
        for prompt in prompts
        for node in prompt.values()
        if node["class_type"] == "LatentFromBatch"
    )
    assert cuts == [(0, 2), (2, 1)]
    assert_no_duplicate_images(result)


# --------------------------------------------------------------------------- the rules


def test_a_named_input_is_recorded_by_node_id() -> None:
    (steps, *_) = comfytrio.validate_params(
        std_plugins(), load_workflow("sdxl_txt2img"), {"steps": integer(30, "KSampler.steps")}
    )
    assert steps.titles == ("KSampler",)
    assert steps.node_ids == ("3",)
    assert steps.inputs == {"3": "steps"}


async def test_two_params_may_set_two_inputs_of_one_node() -> None:
    params = {
        "steps": integer(30, "KSampler.steps"),
        "cfg": {"type": "float", "value": 4.5, "node_mappings": "KSampler.cfg"},
        "seed": {"type": "seed", "value": 11, "node_mappings": "KSampler"},  # seed: by title
    }
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), params)
    inputs = job.shards[0].workflow["3"]["inputs"]
    assert (inputs["steps"], inputs["cfg"], inputs["seed"]) == (30, 4.5, 11)


async def test_a_title_with_a_dot_is_matched_exactly_first() -> None:
    workflow = {
        "1": {
            "class_type": "PrimitiveInt",
            "inputs": {"value": 1},
            "_meta": {"title": "Size.width"},
        },
        "2": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
            "_meta": {"title": "Size"},
        },
    }
    params = {"w": integer(64, "Size.width"), "h": integer(32, "Size.height")}
    built = (await plan(std_plugins(), workflow, params)).shards[0].workflow
    assert built["1"]["inputs"] == {"value": 64}  # the node titled "Size.width"
    assert built["2"]["inputs"] == {"width": 8, "height": 32, "batch_size": 1, "color": 0}


async def test_a_value_goes_into_the_named_input_of_every_node_with_the_title() -> None:
    workflow = load_workflow("model_free")
    workflow["8"] = {**workflow["7"], "inputs": dict(workflow["7"]["inputs"])}
    params = {
        "prefix": {
            "type": "string",
            "value": "run",
            "node_mappings": "Save Inverted.filename_prefix",
        }
    }
    built = (await plan(std_plugins(), workflow, params)).shards[0].workflow
    assert (
        built["7"]["inputs"]["filename_prefix"] == built["8"]["inputs"]["filename_prefix"] == "run"
    )


# --------------------------------------------------------------------------- refused


def test_an_input_the_node_lacks_is_refused_listing_its_inputs() -> None:
    with pytest.raises(NodeInputNotFoundError) as caught:
        comfytrio.validate_params(
            std_plugins(), load_workflow("sdxl_txt2img"), {"steps": integer(30, "KSampler.stpes")}
        )
    error = caught.value
    assert isinstance(error, ParamError)
    assert (error.param, error.title, error.node_id, error.input_name) == (
        "steps",
        "KSampler",
        "3",
        "stpes",
    )
    assert error.available == KSAMPLER_INPUTS
    assert str(error) == (
        "param 'steps': node 'KSampler' (id '3') has no input 'stpes'; "
        f"its inputs: {', '.join(KSAMPLER_INPUTS)}"
    )


@pytest.mark.parametrize(
    ("entry", "title", "input_name"),
    [
        (integer(30, "KSampler"), "KSampler", "value"),
        ({"type": "string", "value": "x", "node_mappings": "Save Image"}, "Save Image", "value"),
        ({"type": "seed", "node_mappings": "Empty Latent Image"}, "Empty Latent Image", "value"),
        ({"type": "image", "value": png(), "node_mappings": "API - STEP"}, "API - STEP", "image"),
    ],
)
def test_a_plain_title_to_a_node_without_the_types_input_is_refused(
    entry: dict[str, Any], title: str, input_name: str
) -> None:
    # Before, an integer mapped to a KSampler went into an input "value" next to its own.
    with pytest.raises(NodeInputNotFoundError) as caught:
        comfytrio.validate_params(std_plugins(), load_workflow("sdxl_txt2img"), {"p": entry})
    assert (caught.value.param, caught.value.title) == ("p", title)
    assert caught.value.input_name == input_name
    assert caught.value.available  # the node's inputs, to pick one from
    assert f"to set another: '{title}.INPUT'" in str(caught.value)


def test_an_unknown_title_with_a_dot_lists_the_titles() -> None:
    with pytest.raises(NodeTitleNotFoundError) as caught:
        comfytrio.validate_params(
            std_plugins(), load_workflow("sdxl_txt2img"), {"steps": integer(30, "KSamplr.steps")}
        )
    assert caught.value.title == "KSamplr.steps"
    assert "KSampler" in caught.value.available


def test_two_params_for_one_input_are_refused() -> None:
    params = {"a": integer(30, "KSampler.steps"), "b": integer(20, "KSampler.steps")}
    with pytest.raises(
        ParamError, match="input 'steps' of node title 'KSampler' already gets param 'a'"
    ) as caught:
        comfytrio.validate_params(std_plugins(), load_workflow("sdxl_txt2img"), params)
    assert caught.value.param == "b"


def test_one_param_with_two_inputs_of_one_node_is_refused() -> None:
    params = {"a": integer(30, ["KSampler.steps", "KSampler.cfg"])}
    with pytest.raises(ParamError, match="twice: use one param per input"):
        comfytrio.validate_params(std_plugins(), load_workflow("sdxl_txt2img"), params)


# --------------------------------------------------------------------------- plugins


class Doubled(BaseParamType):
    """An integer written twice over: its own ``inject``, its own ``inject_input``."""

    name = "doubled"

    def inject(self, node: dict[str, Any], value: Any, param: Param) -> None:
        node["inputs"]["width"] = node["inputs"]["height"] = value * 2

    def inject_input(self, node: dict[str, Any], input_name: str, value: Any, param: Param) -> None:
        node["inputs"][input_name] = value * 2


class Checked(BaseParamType):
    """Says which input it writes; breaks on a node titled "Broken"."""

    name = "checked"

    def input_for(self, node: Any, param: Param) -> str | None:
        if node["_meta"]["title"] == "Broken":
            raise KeyError("oops")
        return "text"


def plugins_with(*types: BaseParamType) -> comfytrio.Plugins:
    class Plugin:
        @comfytrio.hookimpl
        def register_param_types(self, register: Any) -> None:
            for param_type in types:
                register(param_type)

    plugins = std_plugins()
    plugins.register(Plugin(), "test-types")
    return plugins


async def test_a_type_with_its_own_inject_decides_and_gets_named_inputs_by_inject_input() -> None:
    params = {
        "size": {"type": "doubled", "value": 16, "node_mappings": "Empty Latent Image"},
        "steps": {"type": "doubled", "value": 5, "node_mappings": "KSampler.steps"},
    }
    job = await plan(plugins_with(Doubled()), load_workflow("sdxl_txt2img"), params)
    built = job.shards[0].workflow
    assert (built["5"]["inputs"]["width"], built["5"]["inputs"]["height"]) == (32, 32)
    assert "value" not in built["5"]["inputs"]
    assert built["3"]["inputs"]["steps"] == 10


def test_the_input_a_type_names_is_checked_and_its_bugs_are_plugin_errors() -> None:
    workflow = load_workflow("sdxl_txt2img")
    workflow["7"]["_meta"]["title"] = "Broken"  # the negative prompt

    def check(title: str) -> list[Param]:
        params = {"n": {"type": "checked", "value": 1, "node_mappings": title}}
        return comfytrio.validate_params(plugins_with(Checked()), workflow, params)

    assert check("Positive")  # a CLIPTextEncode: it has a "text"
    with pytest.raises(NodeInputNotFoundError, match="no input 'text'"):
        check("KSampler")
    with pytest.raises(PluginError, match="'checked' failed to name the input of param 'n'"):
        check("Broken")
