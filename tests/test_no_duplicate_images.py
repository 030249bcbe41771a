"""A split never returns the same image twice.

Every shared workflow (``tests/workflows/``, copies of ``shared/workflows/``) and the demo's,
split over 2 and 3 fake servers: no two outputs of the job are the same image, unless the
workflow makes them alike on one server too. ``model_free.json`` is that case: its
``EmptyImage`` batch is N copies of one colour whatever runs it, so its split is held to the
one-server run (the same images at the same batch indices, and no more of them); its
inverted picture, which the split batch does not feed, is made once, by the first shard,
not once per shard. The fake's samplers draw their noise as ComfyUI does (from the seed and
each sample's index in the batch), so a split that repeated a seed would repeat images here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import WORKFLOWS, api_on_fakes, assert_no_duplicate_images, load_workflow, png_bytes

from comfytrio import JobResult, NotReproducibleError
from comfytrio.cli._demo import DEMO_CHECKPOINT, DEMO_WORKFLOW
from comfytrio.testing import FakeComfyUI

Factory = Callable[..., Awaitable[FakeComfyUI]]

SHARED = sorted(p.name for p in WORKFLOWS.glob("*.json"))


def prepare(server: FakeComfyUI) -> None:
    """What the shared workflows load: their checkpoints, LoRA, input picture, and
    rgthree's LoRA loader (a custom node)."""
    for name in ("juggernaut_xl.safetensors", "v1-5-pruned-emaonly.safetensors", DEMO_CHECKPOINT):
        server.add_model("checkpoints", name)
    server.add_model("loras", "detail_enhancer.safetensors")
    server.add_input_image("example.png")
    server.declare_node(
        "Power Lora Loader (rgthree)",
        optional={"model": "MODEL", "clip": "CLIP"},
        outputs=["MODEL", "CLIP"],
    )


def job(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The workflow (small images, to stay quick) and a batch of 6 split with gpu_scale."""
    workflow = dict(DEMO_WORKFLOW) if name == "demo" else load_workflow(name)
    for node in workflow.values():
        if node["class_type"] in ("EmptyLatentImage", "EmptyImage"):
            node["inputs"].update(width=64, height=64)
    params: dict[str, Any] = {
        "batch": {
            "type": "integer",
            "value": 6,
            "gpu_scale": True,
            "node_mappings": "API - BATCH SIZE",
        }
    }
    if name in ("demo", "model_free.json", "sdxl_img2img.json"):
        picture = png_bytes()
        params["picture"] = {"type": "image", "value": picture, "node_mappings": "API - PICTURE"}
    return workflow, params


async def run(servers: list[FakeComfyUI], tmp_path: Path, name: str) -> JobResult:
    workflow, params = job(name)
    async with api_on_fakes(servers, tmp_path) as api:
        return await api.run_workflow(workflow, params=params, seed=11)


@pytest.mark.parametrize("name", [*SHARED, "demo"])
@pytest.mark.parametrize("count", [2, 3])
async def test_a_split_never_returns_the_same_image_twice(
    fake_comfyui_factory: Factory, tmp_path: Path, name: str, count: int
) -> None:
    servers = [await fake_comfyui_factory() for _ in range(count)]
    for server in servers:
        prepare(server)
    split = await run(servers, tmp_path, name)
    alone = await run(servers[:1], tmp_path, name)

    assert split.ok
    assert len(split.shards) == count
    assert len(split.outputs) == len(alone.outputs)  # no copies of what the split does not feed
    assert_no_duplicate_images(split, one_gpu=alone)
    if name == "model_free.json":
        assert split.split == "unseeded"
    else:
        assert split.split in ("same-images", "distinct-seeds")
        assert_no_duplicate_images(split)  # these make 6 different images on one server too


def test_every_shared_workflow_is_covered() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "workflows"
    if shared.is_dir():
        assert {p.name for p in shared.glob("*.json")} <= set(SHARED)


# ------------------------------------------------------------ seeds, where no batch is cut


def custom_sampling(latent: dict[str, Any], sampler: str = "euler") -> dict[str, Any]:
    """``SamplerCustomAdvanced`` with its noise from ``RandomNoise`` (seed 5, a widget) and
    its sampler from ``KSamplerSelect``, sampling ``latent`` (node ``"3"``)."""

    def node(class_type: str, title: str, **inputs: Any) -> dict[str, Any]:
        return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}

    return {
        "1": node("PrimitiveInt", "API - BATCH SIZE", value=2),
        "2": node("EmptyImage", "Picture", width=64, height=64, batch_size=1, color=0),
        "3": latent,
        "4": node("RandomNoise", "RandomNoise", noise_seed=5),
        "5": node("KSamplerSelect", "KSamplerSelect", sampler_name=sampler),
        "6": node(
            "SamplerCustomAdvanced",
            "Sample",
            noise=["4", 0],
            guider=["9", 0],
            sampler=["5", 0],
            sigmas=["9", 0],
            latent_image=["3", 0],
        ),
        "7": node("VAEDecode", "Decode", samples=["6", 0], vae=["9", 0]),
        "8": node("SaveImage", "Save", images=["7", 0], filename_prefix="x"),
        "9": node("CheckpointLoaderSimple", "Load", ckpt_name="m.safetensors"),
    }


REPEATED = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["2", 0], "amount": ["1", 0]}}
EMPTY_LATENT = {
    "class_type": "EmptyLatentImage",
    "inputs": {"width": 64, "height": 64, "batch_size": ["1", 0]},
}


async def plan(workflow: dict[str, Any], shards: int, **options: Any) -> Any:
    import httpx

    from comfytrio import make_plugin_manager, plan_job

    async with httpx.AsyncClient() as http:
        return await plan_job(
            make_plugin_manager(),
            workflow,
            models=[],
            loras=[],
            targets=[],
            shard_count=shards,
            models_path=None,
            http=http,
            seed=1,
            **options,
        )


async def test_a_split_it_cannot_cut_gives_random_noise_a_seed_per_shard() -> None:
    # RepeatLatentBatch.amount is no EmptyLatentImage batch: no LatentFromBatch, so the
    # RandomNoise the sampler draws from gets its seed plus the shard index.
    params = {
        "batch": {
            "type": "integer",
            "value": 6,
            "gpu_scale": True,
            "node_mappings": "API - BATCH SIZE",
        }
    }
    job = await plan(custom_sampling(REPEATED), 3, params=params)
    assert job.split == "distinct-seeds"
    assert [s.workflow["4"]["inputs"]["noise_seed"] for s in job.shards] == [5, 6, 7]
    assert [s.seeds for s in job.shards] == [{"RandomNoise": n} for n in (5, 6, 7)]
    assert [s.workflow["1"]["inputs"]["value"] for s in job.shards] == [2, 2, 2]


async def test_a_job_run_whole_on_each_server_gets_a_seed_per_shard() -> None:
    workflow = custom_sampling(EMPTY_LATENT)
    workflow["6"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {"noise_seed": 100, "sampler_name": "euler", "latent_image": ["3", 0]},
        "_meta": {"title": "KSampler (Advanced)"},
    }
    job = await plan(workflow, 2, params={})  # no gpu_scale: each server runs the whole job
    assert job.split == "distinct-seeds"
    assert [s.workflow["6"]["inputs"]["noise_seed"] for s in job.shards] == [100, 101]


async def test_strict_mode_reads_the_sampler_of_custom_sampling() -> None:
    params = {
        "batch": {
            "type": "integer",
            "value": 4,
            "gpu_scale": True,
            "node_mappings": "API - BATCH SIZE",
        }
    }
    same = await plan(custom_sampling(EMPTY_LATENT), 2, params=params, same_images=True)
    assert same.split == "same-images"
    assert [s.workflow["4"]["inputs"]["noise_seed"] for s in same.shards] == [5, 5]
    with pytest.raises(NotReproducibleError) as caught:
        await plan(
            custom_sampling(EMPTY_LATENT, "dpmpp_2m_sde"), 2, params=params, same_images=True
        )
    assert (caught.value.node_id, caught.value.title, caught.value.sampler) == (
        "6",
        "Sample",
        "dpmpp_2m_sde",
    )
