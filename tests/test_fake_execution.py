"""Execution: real model-free nodes, simulated model nodes, messages, cache and the queue."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from conftest import Comfy, load_workflow
from PIL import Image

from comfytrio.testing import FakeComfyUI


def tiny(color: int = 0, prefix: str = "t", batch: int = 1) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 8, "batch_size": batch, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def sdxl_models(fake: FakeComfyUI) -> None:
    fake.add_model("checkpoints", "juggernaut_xl.safetensors")
    fake.add_model("loras", "detail_enhancer.safetensors")


async def test_model_free_workflow_writes_real_pngs(comfy: Comfy) -> None:
    comfy.fake.add_input_image("example.png", size=(40, 30), color=(10, 20, 30))
    listener = await comfy.listen()
    _, messages, entry = await comfy.run(load_workflow("model_free.json"), listener)
    assert entry["status"]["status_str"] == "success"
    demo = [i["filename"] for i in entry["outputs"]["4"]["images"]]
    assert demo == [f"demo_{n:05}_.png" for n in range(1, 5)]
    assert entry["outputs"]["7"]["images"] == [
        {"filename": "inverted_00001_.png", "subfolder": "", "type": "output"}
    ]
    with Image.open(comfy.fake.output_dir / "demo_00001_.png") as img:
        assert img.size == (512, 512)
        assert img.getpixel((5, 5)) == (0x33, 0x33, 0x33)
    with Image.open(comfy.fake.output_dir / "inverted_00001_.png") as img:
        assert img.size == (40, 30)
        assert img.getpixel((0, 0)) == (245, 235, 225)
        assert "prompt" in img.info  # metadata, as without --disable-metadata
    executed = [m["data"]["node"] for m in messages if m["type"] == "executed"]
    assert sorted(executed) == ["4", "7"]


async def test_counter_continues_after_existing_files(comfy: Comfy) -> None:
    listener = await comfy.listen()
    (comfy.fake.output_dir / "t_00007_.png").write_bytes(b"")
    (comfy.fake.output_dir / "t_notanumber_.png").write_bytes(b"")
    _, _, entry = await comfy.run(tiny(prefix="t", batch=2), listener)
    names = [i["filename"] for i in entry["outputs"]["2"]["images"]]
    assert names == ["t_00008_.png", "t_00009_.png"]


async def test_preview_image_goes_to_temp(comfy: Comfy) -> None:
    listener = await comfy.listen()
    prompt = tiny()
    prompt["2"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    _, _, entry = await comfy.run(prompt, listener)
    image = entry["outputs"]["2"]["images"][0]
    assert image["type"] == "temp"
    assert (comfy.fake.temp_dir / image["filename"]).is_file()


async def test_image_nodes(comfy: Comfy) -> None:
    listener = await comfy.listen()
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 20, "height": 10, "batch_size": 1, "color": 0x0000FF},
        },
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "area",
                "width": 40,
                "height": 0,
                "crop": "disabled",
            },
        },
        "3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 3}},
        "4": {
            "class_type": "ImageFlip",
            "inputs": {"image": ["3", 0], "flip_method": "y-axis: horizontally"},
        },
        "5": {
            "class_type": "ImageCrop",
            "inputs": {"image": ["4", 0], "width": 10, "height": 10, "x": 5, "y": 5},
        },
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "ops"}},
        "7": {"class_type": "GetImageSize", "inputs": {"image": ["2", 0]}},
        "8": {
            "class_type": "EmptyImage",
            "inputs": {"width": ["7", 0], "height": ["7", 1], "batch_size": ["7", 2], "color": 0},
        },
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    _, messages, entry = await comfy.run(prompt, listener)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(entry["outputs"]["6"]["images"]) == 3
    with Image.open(comfy.fake.output_dir / "ops_00001_.png") as img:
        assert img.size == (10, 10)
        assert img.getpixel((0, 0)) == (0, 0, 255)
    preview = entry["outputs"]["9"]["images"][0]["filename"]
    with Image.open(comfy.fake.temp_dir / preview) as img:
        assert img.size == (40, 20)
    text = [m for m in messages if isinstance(m, bytes)]
    assert text == [b"\x00\x00\x00\x03\x00\x00\x00\x017width: 40, height: 20\n batch size: 1"]


async def test_sdxl_txt2img_with_dummy_models(comfy: Comfy) -> None:
    sdxl_models(comfy.fake)
    listener = await comfy.listen()
    workflow = load_workflow("sdxl_txt2img.json")
    workflow["22"]["inputs"]["value"] = 2  # API - BATCH SIZE
    workflow["21"]["inputs"]["value"] = 5  # API - STEP
    _, messages, entry = await comfy.run(workflow, listener)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["9"]["images"]
    assert [i["filename"] for i in images] == ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]
    with Image.open(comfy.fake.output_dir / images[0]["filename"]) as first:
        assert first.size == (1024, 1024)
        pixel = first.getpixel((0, 0))
    with Image.open(comfy.fake.output_dir / images[1]["filename"]) as second:
        assert second.getpixel((0, 0)) != pixel  # each latent of the batch differs
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert [p["value"] for p in progress] == [1, 2, 3, 4, 5]
    assert {p["max"] for p in progress} == {5}
    assert {p["node"] for p in progress} == {"3"}
    # same seed, same pixels: run again with another prefix (cache defeated)
    workflow["9"]["inputs"]["filename_prefix"] = "again"
    _, _, entry = await comfy.run(workflow, listener)
    with Image.open(comfy.fake.output_dir / "again_00001_.png") as again:
        assert again.getpixel((0, 0)) == pixel


async def test_sdxl_img2img_follows_the_picture_size(comfy: Comfy) -> None:
    sdxl_models(comfy.fake)
    comfy.fake.add_input_image("example.png", size=(96, 64))
    listener = await comfy.listen()
    workflow = load_workflow("sdxl_img2img.json")
    workflow["22"]["inputs"]["value"] = 3
    _, _, entry = await comfy.run(workflow, listener)
    images = entry["outputs"]["9"]["images"]
    assert len(images) == 3
    with Image.open(comfy.fake.output_dir / images[0]["filename"]) as img:
        assert img.size == (96, 64)


async def test_declared_rgthree_lora_loader(comfy: Comfy) -> None:
    sdxl_models(comfy.fake)
    seen: list[dict[str, Any]] = []

    def power_lora(inputs: dict[str, Any]) -> tuple[Any, ...]:
        seen.append(inputs)
        return (inputs["model"], inputs["clip"])

    comfy.fake.declare_node(
        "Power Lora Loader (rgthree)",
        optional={"model": "MODEL", "clip": "CLIP"},
        outputs=["MODEL", "CLIP"],
        run=power_lora,
    )
    listener = await comfy.listen()
    workflow = load_workflow("sdxl_txt2img_rgthree_loras.json")
    _, _, entry = await comfy.run(workflow, listener)
    assert entry["status"]["status_str"] == "success"
    assert seen[0]["lora_1"] == {"on": True, "lora": "detail_enhancer.safetensors", "strength": 0.8}


async def test_seconds_per_image_and_per_step(
    autojump_clock: trio.testing.MockClock, comfy: Comfy
) -> None:
    # Virtual time: the simulated GPU time is exactly what the knobs say.
    listener = await comfy.listen()
    comfy.fake.set_seconds_per_image(1.5)
    started = trio.current_time()
    await comfy.run(tiny(batch=2, color=1), listener)
    assert trio.current_time() - started >= 3
    comfy.fake.set_seconds_per_image(0)
    started = trio.current_time()
    await comfy.run(tiny(batch=2, color=2), listener)
    assert trio.current_time() - started < 1
    sdxl_models(comfy.fake)
    comfy.fake.set_seconds_per_step(0.5)
    workflow = load_workflow("sdxl_txt2img.json")
    workflow["21"]["inputs"]["value"] = 10
    workflow["5"]["inputs"]["width"] = workflow["5"]["inputs"]["height"] = 256
    started = trio.current_time()
    await comfy.run(workflow, listener)
    assert trio.current_time() - started >= 5  # 10 steps of 0.5 s


async def test_messages_go_only_to_the_prompts_client(comfy: Comfy) -> None:
    mine = await comfy.listen("mine")
    theirs = await comfy.listen("theirs")
    prompt_id, _, _ = await comfy.run(tiny(color=3), mine, client_id="mine")
    await theirs.wait_for(
        lambda m: (
            m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0
        ),
        start=1,
    )
    assert set(theirs.types()) == {"status"}
    end = [m for m in mine.texts() if m["type"] == "executing" and m["data"]["node"] is None]
    assert end == [{"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}]
    assert mine.types()[-1] == "executing"


async def test_identical_resubmit_is_cached_and_free_clears_it(comfy: Comfy) -> None:
    listener = await comfy.listen()
    prompt = tiny(color=7, prefix="c")
    first_id, _, first = await comfy.run(prompt, listener)
    ran = len(comfy.fake.executed_nodes)
    prompt["1"]["_meta"] = {"title": "renamed"}
    second_id, messages, second = await comfy.run(prompt, listener)
    assert len(comfy.fake.executed_nodes) == ran  # nothing ran
    assert second["outputs"] == first["outputs"]
    assert second["status"]["messages"][1][1]["nodes"] == ["1", "2"]
    assert [m["type"] for m in messages if m["type"].startswith("execut")] == [
        "execution_start",
        "execution_cached",
        "executed",
        "execution_success",
        "executing",
    ]
    assert sorted(p.name for p in comfy.fake.output_dir.iterdir()) == ["c_00001_.png"]
    await comfy.http.post("/free", json={"free_memory": True})
    await comfy.fake.wait_idle()
    _, _, third = await comfy.run(prompt, listener)
    assert third["outputs"]["2"]["images"][0]["filename"] == "c_00002_.png"
    assert first_id != second_id


async def test_interrupt_during_simulated_time(
    autojump_clock: trio.testing.MockClock, comfy: Comfy
) -> None:
    listener = await comfy.listen()
    comfy.fake.set_seconds_per_image(500)
    response = await comfy.submit(tiny(color=9))
    prompt_id = response.json()["prompt_id"]
    await listener.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] == "2")
    await comfy.http.post("/interrupt", json={"prompt_id": "somebody-else"})
    assert comfy.fake.running_id == prompt_id
    started = trio.current_time()
    await comfy.http.post("/interrupt", json={"prompt_id": prompt_id})
    await listener.wait_done(prompt_id)
    assert trio.current_time() - started < 1  # not the 500 s of the image
    entry = (await comfy.http.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["completed"] is False
    event, data = entry["status"]["messages"][-1]
    assert event == "execution_interrupted"
    assert data["node_id"] == "2"
    assert data["executed"] == ["1"]
    # an interrupt while idle does not leak into the next prompt
    comfy.fake.set_seconds_per_image(0)
    await comfy.http.post("/interrupt")
    _, _, entry = await comfy.run(tiny(color=10), listener)
    assert entry["status"]["status_str"] == "success"


async def test_queue_order_delete_and_clear(
    autojump_clock: trio.testing.MockClock, comfy: Comfy
) -> None:
    listener = await comfy.listen()
    comfy.fake.set_node_seconds("1", 3)  # node "1" of every prompt takes 3 s
    a = (await comfy.submit(tiny(color=11, prefix="slow"))).json()["prompt_id"]
    b = (await comfy.submit(tiny(color=12, prefix="b"))).json()["prompt_id"]
    c = (await comfy.submit(tiny(color=13, prefix="c"))).json()["prompt_id"]
    d = (await comfy.submit(tiny(color=14, prefix="d"), front=True)).json()["prompt_id"]
    e = (await comfy.submit(tiny(color=15, prefix="e"))).json()["prompt_id"]
    await listener.wait_for(lambda m: m["type"] == "execution_start")
    assert comfy.fake.running_id == a
    assert comfy.fake.queue_ids() == [d, b, c, e]
    await comfy.http.post("/queue", json={"delete": [c]})
    comfy.fake.clear_queue()  # someone else clears: b, d, e vanish too
    assert comfy.fake.queue_ids() == []
    await listener.wait_done(a)
    await comfy.fake.wait_idle()
    for gone in (b, c, d, e):
        assert (await comfy.http.get(f"/history/{gone}")).json() == {}
        assert not any(
            isinstance(m, dict) and m["data"].get("prompt_id") == gone for m in listener.messages
        )
    assert comfy.fake.executed_count == 1


async def test_front_prompt_runs_next(autojump_clock: trio.testing.MockClock, comfy: Comfy) -> None:
    listener = await comfy.listen()
    comfy.fake.set_node_seconds("1", 2)
    first = (await comfy.submit(tiny(color=21, prefix="f1"))).json()["prompt_id"]
    later = (await comfy.submit(tiny(color=22, prefix="f2"))).json()["prompt_id"]
    front = (await comfy.submit(tiny(color=23, prefix="f3"), front=True)).json()["prompt_id"]
    await listener.wait_done(later)
    starts = [m["data"]["prompt_id"] for m in listener.texts() if m["type"] == "execution_start"]
    assert starts == [first, front, later]


async def test_reconnecting_client_is_told_the_current_node(
    autojump_clock: trio.testing.MockClock, comfy: Comfy
) -> None:
    listener = await comfy.listen("again")
    comfy.fake.set_seconds_per_image(200)
    prompt_id = (await comfy.submit(tiny(color=31), client_id="again")).json()["prompt_id"]
    await listener.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] == "2")
    second = await comfy.listen("again")
    await second.wait_for(lambda m: m["type"] == "executing")
    assert second.texts()[1] == {"type": "executing", "data": {"node": "2"}}
    await comfy.http.post("/interrupt", json={"prompt_id": prompt_id})
    await second.wait_done(prompt_id)


async def test_no_time_is_spent_beyond_the_simulated_time(
    autojump_clock: trio.testing.MockClock, comfy: Comfy
) -> None:
    # No poll, no sleep: a model-free prompt is answered as soon as it has run. (How fast
    # in real time is for bench/, not for tests.)
    listener = await comfy.listen()
    timings = []
    for color in range(8):
        started = trio.current_time()
        await comfy.run(tiny(color=100 + color), listener)
        timings.append(trio.current_time() - started)
    assert timings == [0.0] * 8


async def test_wait_idle_and_executed_nodes(comfy: Comfy) -> None:
    await comfy.submit(tiny(color=41), client_id=None)
    with trio.fail_after(5):
        await comfy.fake.wait_idle()
    assert [node for _, node in comfy.fake.executed_nodes] == ["1", "2"]
    assert comfy.fake.history()


async def test_other_model_nodes_and_primitives(comfy: Comfy) -> None:
    comfy.fake.add_model("diffusion_models", "flux.safetensors")
    comfy.fake.add_model("loras", "style.safetensors")
    comfy.fake.add_model("vae", "ae.safetensors")
    comfy.fake.add_model("text_encoders", "t5.safetensors")
    seen: list[dict[str, Any]] = []
    comfy.fake.declare_node(
        "Sink",
        inputs={"flag": "BOOLEAN", "ratio": "FLOAT", "text": "STRING", "images": "IMAGE"},
        output_node=True,
        run=lambda inputs: seen.append(inputs),
    )
    prompt = {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "flux.safetensors", "weight_dtype": "default"},
        },
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": "style.safetensors", "strength_model": 0.5},
        },
        "3": {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": "t5.safetensors", "type": "stable_diffusion"},
        },
        "4": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a\nb"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": ["4", 0], "clip": ["3", 0]}},
        "6": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 48, "batch_size": 2},
        },
        "7": {
            "class_type": "KSamplerAdvanced",
            "inputs": {
                "model": ["2", 0],
                "add_noise": "enable",
                "noise_seed": 1,
                "steps": 10,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["5", 0],
                "negative": ["5", 0],
                "latent_image": ["6", 0],
                "start_at_step": 4,
                "end_at_step": 10000,
                "return_with_leftover_noise": "disable",
            },
        },
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["8", 0]}},
        "10": {"class_type": "PrimitiveBoolean", "inputs": {"value": True}},
        "11": {"class_type": "PrimitiveFloat", "inputs": {"value": 0.25}},
        "12": {
            "class_type": "Sink",
            "inputs": {"flag": ["10", 0], "ratio": ["11", 0], "text": ["4", 0], "images": ["9", 0]},
        },
    }
    listener = await comfy.listen()
    _, messages, entry = await comfy.run(prompt, listener)
    assert entry["status"]["status_str"] == "success", entry["status"]
    progress = [m["data"]["value"] for m in messages if m["type"] == "progress"]
    assert progress == [1, 2, 3, 4, 5, 6]  # steps 4..10 of KSamplerAdvanced
    (inputs,) = seen
    assert (inputs["flag"], inputs["ratio"], inputs["text"]) == (True, 0.25, "a\nb")
    assert (inputs["images"].width, inputs["images"].height, len(inputs["images"])) == (64, 48, 2)
