"""Validation: the recorded 400 shapes, coercion, partial outputs, models and custom nodes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from conftest import Comfy, load_recording, load_workflow


def base_prompt() -> dict[str, Any]:
    return copy.deepcopy(load_recording("02_prompt_success.json")["request"]["body"]["prompt"])


def errors_of(answer: dict[str, Any], node: str) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = answer["node_errors"][node]["errors"]
    return errors


async def test_recorded_validation_answers_match_exactly(comfy: Comfy) -> None:
    recording = load_recording("06_validation_errors.json")
    for name in (
        "unknown_class_type",
        "missing_class_type_key",
        "missing_required_input_width",
        "batch_size_0_below_min_direct",
        "width_above_max",
        "int_input_given_string_abc",
        "bad_link_type_mismatch_STRING_into_IMAGE",
        "link_malformed_3_elements",
        "combo_value_not_in_list_ImageScale",
        "loadimage_missing_file",
        "no_output_node",
        "empty_prompt_object",
        "cycle",
    ):
        case = recording[name]
        response = await comfy.http.post("/prompt", json=case["request"])
        assert response.status_code == 400, name
        assert response.json() == case["response"]["body"], name


@pytest.mark.parametrize(
    ("link", "kind", "details"),
    [(["77", 0], "KeyError", "'77'"), (["3", 5], "IndexError", "tuple index out of range")],
)
async def test_broken_links_are_exceptions_during_validation(
    comfy: Comfy, link: list[Any], kind: str, details: str
) -> None:
    prompt = base_prompt()
    prompt["4"]["inputs"]["images"] = link
    answer = (await comfy.submit(prompt)).json()
    assert answer["error"]["details"] == f"Exception when validating node: {details}"
    error = errors_of(answer, "4")[0]
    assert error["type"] == "exception_during_validation"
    assert error["details"] == details
    assert error["extra_info"]["exception_type"] == kind
    assert isinstance(error["extra_info"]["traceback"], list)


async def test_broken_link_upstream_is_an_inner_exception(comfy: Comfy) -> None:
    prompt = base_prompt()
    prompt["3"]["inputs"]["batch_size"] = ["99", 0]
    answer = (await comfy.submit(prompt)).json()
    assert answer["error"]["details"] == ""
    error = errors_of(answer, "3")[0]
    assert error["type"] == "exception_during_inner_validation"
    assert error["details"] == "'99'"
    assert error["extra_info"]["linked_node"] == ["3", 0]  # the link into the broken node
    assert answer["node_errors"]["3"]["dependent_outputs"] == ["4"]


async def test_values_are_coerced_and_stored(comfy: Comfy) -> None:
    listener = await comfy.listen()
    prompt = base_prompt()
    prompt["3"]["inputs"]["width"] = "48"
    prompt["3"]["inputs"]["height"] = 40.9
    _, _, entry = await comfy.run(prompt, listener)
    stored = entry["prompt"][2]["3"]["inputs"]
    assert stored["width"] == 48
    assert stored["height"] == 40
    assert entry["status"]["status_str"] == "success"


async def test_linked_values_are_not_range_checked(comfy: Comfy) -> None:
    listener = await comfy.listen()
    prompt = base_prompt()
    prompt["1"]["inputs"]["value"] = 0
    response = await comfy.submit(prompt)
    assert response.status_code == 200
    assert response.json()["node_errors"] == {}
    prompt_id = response.json()["prompt_id"]
    await listener.wait_done(prompt_id)
    entry = (await comfy.http.get(f"/history/{prompt_id}")).json()[prompt_id]
    error = entry["status"]["messages"][-1][1]
    assert entry["status"]["messages"][-1][0] == "execution_error"
    assert error["exception_type"] == "IndexError"
    assert error["exception_message"] == "index 0 is out of bounds for dimension 0 with size 0\n"


async def test_one_bad_output_of_two_still_runs_the_good_one(comfy: Comfy) -> None:
    listener = await comfy.listen()
    case = load_recording("06_validation_errors.json")["two_outputs_one_invalid"]
    response = await comfy.http.post(
        "/prompt", json={**case["request"], "client_id": "test-client"}
    )
    assert response.status_code == 200
    assert response.json()["node_errors"] == case["response"]["body"]["node_errors"]
    prompt_id = response.json()["prompt_id"]
    await listener.wait_done(prompt_id)
    entry = (await comfy.http.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert entry["prompt"][4] == ["2"]
    assert list(entry["outputs"]) == ["2"]


async def test_cycles_fail_with_empty_details(comfy: Comfy) -> None:
    prompt = {
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c"}},
        "4": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "ok"}},
    }
    response = await comfy.submit(prompt)
    assert response.status_code == 200  # the good output still runs
    assert response.json()["node_errors"] == {}
    del prompt["4"], prompt["5"]
    answer = (await comfy.submit(prompt)).json()
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert answer["error"]["details"] == ""
    assert answer["node_errors"] == {}


async def test_extra_inputs_and_dict_values(comfy: Comfy) -> None:
    prompt = base_prompt()
    prompt["3"]["inputs"]["bogus"] = {"anything": [1, 2]}
    prompt["3"]["inputs"]["color"] = {"__value__": 255}
    response = await comfy.submit(prompt)
    assert response.status_code == 200
    assert comfy.fake.prompts_received[-1]["prompt"]["3"]["inputs"]["color"] == {"__value__": 255}


async def test_missing_model_names_the_files_that_exist(comfy: Comfy) -> None:
    workflow = load_workflow("sdxl_txt2img.json")
    answer = (await comfy.submit(workflow)).json()
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    ckpt = errors_of(answer, "4")[0]
    assert ckpt["type"] == "value_not_in_list"
    assert ckpt["details"] == "ckpt_name: 'juggernaut_xl.safetensors' not in []"
    comfy.fake.add_model("checkpoints", "other.safetensors")
    answer = (await comfy.submit(workflow)).json()
    assert errors_of(answer, "4")[0]["details"] == (
        "ckpt_name: 'juggernaut_xl.safetensors' not in ['other.safetensors']"
    )
    assert errors_of(answer, "4")[0]["extra_info"]["input_config"][0] == ["other.safetensors"]
    assert errors_of(answer, "10")[0]["extra_info"]["input_name"] == "lora_name"
    assert answer["node_errors"]["10"]["dependent_outputs"] == ["9"]
    # files added while it runs are seen by the next prompt
    comfy.fake.add_model("checkpoints", "juggernaut_xl.safetensors")
    comfy.fake.add_model("loras", "detail_enhancer.safetensors")
    assert (await comfy.submit(workflow)).status_code == 200


async def test_long_model_lists_are_not_sent_back(comfy: Comfy) -> None:
    for index in range(21):
        comfy.fake.add_model("loras", f"l{index:02}.safetensors")
    comfy.fake.add_model("checkpoints", "juggernaut_xl.safetensors")
    answer = (await comfy.submit(load_workflow("sdxl_txt2img.json"))).json()
    error = errors_of(answer, "10")[0]
    assert error["details"] == "lora_name: 'detail_enhancer.safetensors' not in (list of length 21)"
    assert error["extra_info"]["input_config"] is None


async def test_loadimage_accepts_subfolders_and_annotations(comfy: Comfy) -> None:
    comfy.fake.add_input_image("sub/pic.png")
    (comfy.fake.output_dir / "out.png").write_bytes(
        (comfy.fake.input_dir / "sub/pic.png").read_bytes()
    )
    for name, status in (
        ("sub/pic.png", 200),
        ("sub/pic.png [input]", 200),
        ("out.png [output]", 200),
        ("pic.png", 400),
        ("out.png", 400),
    ):
        prompt = {
            "1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
        response = await comfy.submit(prompt)
        assert response.status_code == status, name
        if status == 400:
            assert errors_of(response.json(), "1")[0]["details"] == (
                f"image - Invalid image file: {name}"
            )


async def test_undeclared_custom_node_is_invalid_prompt(comfy: Comfy) -> None:
    workflow = load_workflow("sdxl_txt2img_rgthree_loras.json")
    answer = (await comfy.submit(workflow)).json()
    assert answer == {
        "error": {
            "type": "invalid_prompt",
            "message": "Cannot execute because node Power Lora Loader (rgthree) does not exist.",
            "details": "Node ID '#10'",
            "extra_info": {},
        },
        "node_errors": {},
    }


async def test_declared_custom_node_validates_its_declared_inputs(comfy: Comfy) -> None:
    comfy.fake.declare_node(
        "Scaler",
        inputs={"image": "IMAGE", "factor": ["FLOAT", {"min": 1.0}], "mode": ["fast", "slow"]},
        outputs=["IMAGE"],
    )
    prompt = base_prompt()
    prompt["5"] = {
        "class_type": "Scaler",
        "inputs": {"image": ["3", 0], "factor": 0.5, "mode": "medium"},
    }
    prompt["4"]["inputs"]["images"] = ["5", 0]
    answer = (await comfy.submit(prompt)).json()
    assert [e["type"] for e in errors_of(answer, "5")] == [
        "value_smaller_than_min",
        "value_not_in_list",
    ]
    info = (await comfy.http.get("/object_info/Scaler")).json()["Scaler"]
    assert info["input"]["required"]["mode"] == [["fast", "slow"]]
    assert info["output"] == ["IMAGE"]
