"""The dry run (``ComfyAPI.check_workflow``, ``comfytrio run --dry-run``): every problem of
a job found against real fake servers on 127.0.0.1, and nothing sent to them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import WORKFLOWS, load_recording, load_workflow, png_bytes

from comfytrio import (
    CheckReport,
    ComfyAPI,
    LoRARef,
    ModelRef,
    NodeTitleNotFoundError,
    WorkflowProblem,
)
from comfytrio._check import PROBLEM_KINDS, find_problems
from comfytrio.testing import FakeComfyUI

ALL = sorted(p.name for p in WORKFLOWS.glob("*.json"))


def ready(fakes: list[FakeComfyUI]) -> None:
    """Every model and input image the shared workflows name, on every fake."""
    for fake in fakes:
        fake.add_model("checkpoints", "juggernaut_xl.safetensors")
        fake.add_model("checkpoints", "v1-5-pruned-emaonly.safetensors")
        fake.add_model("loras", "detail_enhancer.safetensors")
        fake.add_input_image("example.png")


def inputs(fakes: list[FakeComfyUI]) -> list[list[str]]:
    return [sorted(p.name for p in fake.paths.input.rglob("*")) for fake in fakes]


def loader_title(workflow: dict[str, Any]) -> str | None:
    for node in workflow.values():
        if "ckpt_name" in node["inputs"]:
            return str(node["_meta"]["title"])
    return None


def of_kind(report: CheckReport, kind: str) -> list[WorkflowProblem]:
    assert kind in PROBLEM_KINDS
    return [p for p in report.problems if p.kind == kind]


def nothing_sent(fakes: list[FakeComfyUI]) -> None:
    assert [f.prompts_received for f in fakes] == [[] for _ in fakes]


# ---------------------------------------------------------------------- the Must-show


@pytest.mark.parametrize("name", ALL)
async def test_a_wrong_model_and_an_unknown_title_are_both_named(
    name: str, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    ready(comfy_fakes)
    before = inputs(comfy_fakes)
    workflow = load_workflow(name)
    params: dict[str, dict[str, Any]] = {
        "typo": {"type": "integer", "value": 3, "node_mappings": "API - STEPS"},
    }
    models: list[ModelRef] = []
    title = loader_title(workflow)
    if title is not None:  # the wrong name goes into the workflow's loader
        params["model"] = {
            "type": "string",
            "value": "juggernaut-xl.safetensors",
            "node_mappings": f"{title}.ckpt_name",
        }
    else:  # a model-free workflow: a model the job says it needs
        models.append(ModelRef("checkpoints", "juggernaut-xl.safetensors"))

    report = await comfy_api.check_workflow(workflow, params=params, models=models, seed=5)

    assert not report.ok
    (unknown,) = of_kind(report, "param_error")
    assert isinstance(unknown.error, NodeTitleNotFoundError)
    assert (unknown.param, unknown.value) == ("typo", "API - STEPS")
    assert unknown.allowed[0] == "API - BATCH SIZE"  # the workflow's titles, sorted
    assert "no node titled 'API - STEPS'" in unknown.message
    kind = "value_not_in_list" if title is not None else "model_not_found"
    (model,) = of_kind(report, kind)
    assert model.value == "juggernaut-xl.safetensors"
    assert "juggernaut_xl.safetensors" in model.allowed
    assert set(model.instances) == set(report.instances)
    if title is not None:
        assert (model.node_id, model.input_name, model.param) == ("4", "ckpt_name", "model")
        assert model.class_type == "CheckpointLoaderSimple"
        assert model.title == title
        assert "did you mean 'juggernaut_xl.safetensors'?" in model.message
    if "rgthree" in name:
        (custom,) = of_kind(report, "unknown_node_class")
        assert custom.class_type == "Power Lora Loader (rgthree)"
    assert len(report.shards) == 2  # the good params were still planned
    nothing_sent(comfy_fakes)
    assert inputs(comfy_fakes) == before  # nothing uploaded


@pytest.mark.parametrize("name", [n for n in ALL if "rgthree" not in n])
async def test_a_clean_job_has_no_problems(
    name: str, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    ready(comfy_fakes)
    batch = {"type": "integer", "value": 4, "node_mappings": "API - BATCH SIZE", "gpu_scale": True}
    report = await comfy_api.check_workflow(
        load_workflow(name),
        params={"batch": batch},
        seed=9,
        models=[ModelRef("loras", "detail_enhancer.safetensors")],
    )
    assert report.problems == ()
    assert report.ok
    assert report.seed == 9
    assert report.split is not None
    assert [s.scaled for s in report.shards] == [{"batch": 2}, {"batch": 2}]
    assert [s.batch_offset for s in report.shards] == [0, 2]
    assert all("batch" in s.params for s in report.shards)
    nothing_sent(comfy_fakes)


async def test_shards_show_their_params_and_seeds(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    ready(comfy_fakes)
    params: dict[str, dict[str, Any]] = {
        "steps": {"type": "integer", "value": 12, "node_mappings": "API - STEP"},
        "prompt": {"type": "string", "value": "a cat", "node_mappings": "API - PROMPT"},
        "seed": {"type": "seed", "value": 100, "node_mappings": "K - SEED"},
    }
    report = await comfy_api.check_workflow(
        load_workflow("sdxl_img2img.json"), params=params, seed=3
    )
    assert report.ok, report.problems
    first, second = report.shards
    assert first.params["steps"] == 12
    assert first.params["prompt"] == "a cat"
    assert first.seeds != second.seeds  # each shard its own seed, as run_workflow gives
    assert first.params["seed"] == first.seeds["K - SEED"]


# ---------------------------------------------------------------------- each rule


def sdxl() -> dict[str, Any]:
    return load_workflow("sdxl_txt2img.json")


async def check(api: ComfyAPI, workflow: dict[str, Any]) -> CheckReport:
    report = await api.check_workflow(workflow, seed=1)
    assert report.shards  # planned all the same
    return report


async def test_values_out_of_range_and_of_the_wrong_type(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    ready(comfy_fakes)
    workflow = sdxl()
    workflow["5"]["inputs"]["width"] = 8  # EmptyLatentImage: min 16
    workflow["3"]["inputs"]["cfg"] = 1000.0  # max 100
    workflow["3"]["inputs"]["denoise"] = "lots"  # a FLOAT
    workflow["3"]["inputs"]["sampler_name"] = "eulr"
    report = await check(comfy_api, workflow)
    (small,) = of_kind(report, "value_smaller_than_min")
    assert (small.node_id, small.input_name, small.value) == ("5", "width", 8)
    assert small.allowed == ("from 16 to 16384",)
    (big,) = of_kind(report, "value_bigger_than_max")
    assert (big.title, big.input_name, big.value) == ("KSampler", "cfg", 1000.0)
    assert "above the maximum 100" in big.message
    (wrong,) = of_kind(report, "invalid_input_type")
    assert (wrong.input_name, wrong.allowed) == ("denoise", ("FLOAT",))
    (listed,) = of_kind(report, "value_not_in_list")
    assert listed.input_name == "sampler_name"
    assert "euler" in listed.allowed
    assert "did you mean 'euler'?" in listed.message
    assert len(report.problems) == 4
    nothing_sent(comfy_fakes)


async def test_missing_inputs_and_bad_links(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    ready(comfy_fakes)
    workflow = sdxl()
    del workflow["3"]["inputs"]["steps"]
    workflow["8"]["inputs"]["vae"] = ["99", 0]  # no node 99
    workflow["6"]["inputs"]["clip"] = ["4", 7]  # the checkpoint has 3 outputs
    workflow["7"]["inputs"]["clip"] = ["4", 0]  # a MODEL where CLIP goes
    workflow["9"]["inputs"]["images"] = ["8"]  # not [node, slot]
    report = await check(comfy_api, workflow)
    (missing,) = of_kind(report, "required_input_missing")
    assert (missing.node_id, missing.input_name, missing.allowed) == ("3", "steps", ("INT",))
    links = {p.node_id: p for p in of_kind(report, "bad_linked_input")}
    assert set(links) == {"8", "6", "9"}
    assert "node '99', which is not in the workflow" in links["8"].message
    assert links["6"].allowed == ("0: MODEL", "1: CLIP", "2: VAE")
    (mismatch,) = of_kind(report, "return_type_mismatch")
    assert (mismatch.node_id, mismatch.value, mismatch.allowed) == ("7", ["4", 0], ("CLIP",))
    nothing_sent(comfy_fakes)


async def test_an_unknown_class_on_some_servers_only(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    ready(comfy_fakes)
    comfy_fakes[0].declare_node(
        "Power Lora Loader (rgthree)",
        inputs={"model": "MODEL", "clip": "CLIP"},
        outputs=["MODEL", "CLIP"],
    )
    report = await check(comfy_api, load_workflow("sdxl_txt2img_rgthree_loras.json"))
    (custom,) = report.problems
    assert custom.kind == "unknown_node_class"
    assert custom.node_id == "10"
    assert custom.instances == (comfy_api.instances[1].name,)
    assert custom.shards == (0, 1)  # both shards' workflows have it
    nothing_sent(comfy_fakes)


async def test_an_image_param_is_not_uploaded(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI], tmp_path: Path
) -> None:
    ready(comfy_fakes)
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes())
    before = inputs(comfy_fakes)
    params = {"picture": {"type": "image", "value": str(picture), "node_mappings": "API - PICTURE"}}
    report = await comfy_api.check_workflow(load_workflow("model_free.json"), params=params)
    assert report.ok, report.problems
    assert any("'picture'" in n and "not prepared in a dry run" in n for n in report.notes)
    assert report.shards[0].params["picture"] == "<image not uploaded in a dry run>"
    assert inputs(comfy_fakes) == before
    nothing_sent(comfy_fakes)


async def test_a_split_same_images_refuses_is_a_problem_too(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    ready(comfy_fakes)
    workflow = sdxl()
    workflow["3"]["inputs"]["sampler_name"] = "euler_ancestral"
    batch = {"type": "integer", "value": 4, "node_mappings": "API - BATCH SIZE", "gpu_scale": True}
    report = await comfy_api.check_workflow(
        workflow, params={"batch": batch}, same_images=True, seed=1
    )
    (refused,) = report.problems
    assert refused.kind == "param_error"
    assert "same images" in refused.message
    assert len(report.shards) == 2  # planned without same_images, to show them


async def test_a_lora_a_remote_server_lacks_is_named_and_not_downloaded(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    ready(comfy_fakes)
    lora = LoRARef("new_style.safetensors", "http://127.0.0.1:9/new_style.safetensors")
    report = await comfy_api.check_workflow(sdxl(), loras=[lora], seed=1)
    (missing,) = report.problems  # remote servers must list it: none is downloaded
    assert missing.kind == "value_not_in_list"
    assert (missing.node_id, missing.input_name, missing.value) == ("10", "lora_name", lora.name)
    nothing_sent(comfy_fakes)


async def test_params_that_clash_and_a_broken_workflow(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    ready(comfy_fakes)
    params = {
        "a": {"type": "integer", "value": 10, "node_mappings": "API - STEP"},
        "b": {"type": "integer", "value": 20, "node_mappings": "API - STEP"},
    }
    report = await comfy_api.check_workflow(sdxl(), params=params, seed=1)
    (clash,) = report.problems
    assert clash.kind == "param_error"
    assert "already gets param 'a'" in clash.message
    assert len(report.shards) == 2  # planned without them

    broken: Any = {"1": "not a node"}
    report = await comfy_api.check_workflow(broken)
    (refused,) = report.problems
    assert refused.param == "workflow"
    assert report.shards == ()
    nothing_sent(comfy_fakes)


# ---------------------------------------------------------------------- pure rules


def test_rules_on_the_recorded_object_info() -> None:
    info = load_recording("object_info.json")
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "sub/x.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "4": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["2", 0],
                "upscale_method": {"__value__": "area"},
                "width": "64",
                "height": 64,
                "crop": "disabled",
            },
        },
    }
    found = find_problems(workflow, info)
    assert [(p.kind, p.node_id) for p in found] == [("value_not_in_list", "2")]
    assert "input folder" in found[0].message
    assert find_problems(workflow, info, unchecked={("2", "image")}) == []
    assert [p.kind for p in find_problems({"1": workflow["1"]}, info)] == ["prompt_no_outputs"]


def test_a_boolean_given_as_text_and_the_newer_combo_spelling() -> None:
    info = {
        "Toggle": {
            "input": {
                "required": {"on": ["BOOLEAN", {}], "mode": ["COMBO", {"options": ["a", "b"]}]}
            },
            "output": [],
            "output_node": True,
        }
    }
    found = find_problems(
        {"1": {"class_type": "Toggle", "inputs": {"on": "false", "mode": "c"}}}, info
    )
    assert [p.kind for p in found] == ["invalid_input_type", "value_not_in_list"]
    assert found[1].allowed == ("a", "b")
    assert (
        find_problems({"1": {"class_type": "Toggle", "inputs": {"on": False, "mode": "b"}}}, info)
        == []
    )


def test_a_malformed_object_info_is_no_crash() -> None:
    info: dict[str, Any] = {
        "A": {"input": {"required": {"x": "INT", "y": []}}, "output_node": True},
        "B": 3,
    }
    assert [
        p.kind for p in find_problems({"1": {"class_type": "B"}, "2": {"class_type": "A"}}, info)
    ] == ["unknown_node_class"]


# ---------------------------------------------------------------------- the command line


async def run_cli(*args: str) -> tuple[int, str, str]:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "comfytrio", "run", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ},
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.mark.comfy_api(fakes=1)
async def test_cli_dry_run_names_every_problem(comfy_fakes: list[FakeComfyUI]) -> None:
    (fake,) = comfy_fakes
    ready(comfy_fakes)
    args = [
        str(WORKFLOWS / "sdxl_txt2img.json"),
        "--dry-run",
        "--url",
        fake.url,
        "--seed",
        "4",
        "--param",
        "API - STEPS=30",
        "--param",
        "Load Checkpoint.ckpt_name=juggernaut.safetensors",
    ]
    code, out, err = await run_cli(*args)
    assert code == 1, out + err
    assert "nothing was sent" in out
    assert "shard 0: " in out
    assert "seeds K - SEED=4" in out
    assert "2 problem(s):" in out
    assert "param 'API - STEPS': no node titled 'API - STEPS'" in out
    assert "input 'ckpt_name': 'juggernaut.safetensors' is not one of" in out
    assert "allowed: juggernaut_xl.safetensors, v1-5-pruned-emaonly.safetensors" in out

    code, out, err = await run_cli(*args, "--json")
    assert code == 1, err
    report = json.loads(out)
    assert report["ok"] is False
    assert report["dry_run"] is True
    assert report["seed"] == 4
    kinds = {p["kind"]: p for p in report["problems"]}
    assert set(kinds) == {"param_error", "value_not_in_list"}
    assert kinds["param_error"]["error"] == "NodeTitleNotFoundError"
    assert kinds["value_not_in_list"]["node_id"] == "4"
    assert kinds["value_not_in_list"]["value"] == "juggernaut.safetensors"
    assert report["shards"][0]["params"]["Load Checkpoint.ckpt_name"] == "juggernaut.safetensors"
    assert fake.prompts_received == []


@pytest.mark.comfy_api(fakes=1)
async def test_cli_dry_run_of_a_clean_job_exits_0(comfy_fakes: list[FakeComfyUI]) -> None:
    (fake,) = comfy_fakes
    ready(comfy_fakes)
    code, out, err = await run_cli(
        str(WORKFLOWS / "model_free.json"),
        "--dry-run",
        "--url",
        fake.url,
        "--scale",
        "API - BATCH SIZE=3",
    )
    assert code == 0, out + err
    assert "no problems found" in out
    assert "shard 0: API - BATCH SIZE=3" in out
    assert fake.prompts_received == []
