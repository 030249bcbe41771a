"""A batch split over N servers makes the images of the whole batch on one server.

ComfyUI draws each sample's starting noise from the seed and the sample's index in the
batch when the latent says which indices it holds (``batch_index``, set by
``LatentFromBatch``). So every shard keeps the job's ``EmptyLatentImage`` at the whole
batch, keeps the seed, and cuts its own part with ``LatentFromBatch(k, m)``: image ``i`` of
the split is image ``i`` of the one-server run. The fake ComfyUI draws its simulated noise
by the same rule, so these tests compare pixels, index for index, over real sockets.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from conftest import api_on_fakes, assert_no_duplicate_images, image_pixels, load_workflow

from comfytrio import JobResult, NotReproducibleError
from comfytrio._samplers import DETERMINISTIC_SAMPLERS, STOCHASTIC_SAMPLERS
from comfytrio.testing import FakeComfyUI
from comfytrio.testing._nodes_models import draws_noise_while_sampling

Factory = Callable[..., Awaitable[FakeComfyUI]]

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


def txt2img(*, sampler: str = "euler", size: int = 64) -> dict[str, Any]:
    """The workflow most users export: the seed is the KSampler's widget, the batch comes
    from a ``PrimitiveInt`` titled ``API - BATCH SIZE`` (small images, to stay quick)."""
    workflow = load_workflow("sd15_seed_in_sampler.json")
    workflow["5"]["inputs"].update(width=size, height=size)
    workflow["3"]["inputs"]["sampler_name"] = sampler
    return workflow


def batch(n: int) -> dict[str, dict[str, Any]]:
    return {
        "batch": {
            "type": "integer",
            "value": n,
            "gpu_scale": True,
            "node_mappings": "API - BATCH SIZE",
        }
    }


async def fakes(factory: Factory, count: int) -> list[FakeComfyUI]:
    servers = [await factory() for _ in range(count)]
    for server in servers:
        server.add_model("checkpoints", CHECKPOINT)
    return servers


def pixels(result: JobResult) -> list[bytes]:
    """Each output image's pixels, in batch order."""
    assert [o.batch_index for o in result.outputs] == list(range(len(result.outputs)))
    return [image_pixels(o.path) for o in result.outputs]


async def test_batch_of_8_split_3_3_2_is_the_batch_of_8_on_one_server(
    fake_comfyui_factory: Factory, tmp_path: Path
) -> None:
    servers = await fakes(fake_comfyui_factory, 3)
    async with api_on_fakes(servers[:1], tmp_path) as one:
        alone = await one.run_workflow(txt2img(), params=batch(8))
    async with api_on_fakes(servers, tmp_path) as three:
        split = await three.run_workflow(txt2img(), params=batch(8))
        again = await three.run_workflow(txt2img(), params=batch(8))

    assert [s.scaled["batch"] for s in split.shards] == [3, 3, 2]
    assert [s.batch_offset for s in split.shards] == [0, 3, 6]
    assert split.split == "same-images"
    assert split.reproducible
    assert alone.split == "single"
    assert pixels(split) == pixels(alone)  # index for index, pixel for pixel
    assert pixels(again) == pixels(split)
    assert len(set(pixels(split))) == 8
    # Each shard kept the whole batch and the seed, and cut its part.
    prompts = [server.prompts_received[-1]["prompt"] for server in servers]
    cuts = sorted(
        (node["inputs"]["batch_index"], node["inputs"]["length"])
        for prompt in prompts
        for node in prompt.values()
        if node["class_type"] == "LatentFromBatch"
    )
    assert cuts == [(0, 3), (3, 3), (6, 2)]
    assert all(prompt["10"]["inputs"]["value"] == 8 for prompt in prompts)
    assert all(prompt["3"]["inputs"]["seed"] == 156680208700286 for prompt in prompts)
    assert split.shards[1].seeds == {"KSampler": 156680208700286}


async def test_seed_in_the_sampler_split_over_two_makes_four_different_images(
    fake_comfyui_factory: Factory, tmp_path: Path
) -> None:
    # Issue 19: this split used to send batch 2 with the same seed to both servers.
    servers = await fakes(fake_comfyui_factory, 2)
    async with api_on_fakes(servers, tmp_path) as two:
        split = await two.run_workflow(txt2img(), params=batch(4))
    async with api_on_fakes(servers[:1], tmp_path) as one:
        alone = await one.run_workflow(txt2img(), params=batch(4))

    assert len(set(pixels(split))) == 4
    assert_no_duplicate_images(split)
    assert pixels(split) == pixels(alone)


async def test_strict_mode_refuses_an_ancestral_sampler_naming_node_and_sampler(
    fake_comfyui_factory: Factory, tmp_path: Path
) -> None:
    servers = await fakes(fake_comfyui_factory, 2)
    async with api_on_fakes(servers, tmp_path) as api:
        with pytest.raises(NotReproducibleError) as caught:
            await api.run_workflow(
                txt2img(sampler="euler_ancestral"), params=batch(4), same_images=True
            )
    error = caught.value
    assert (error.param, error.node_id, error.title, error.sampler) == (
        "batch",
        "3",
        "KSampler",
        "euler_ancestral",
    )
    assert "euler_ancestral" in str(error)
    assert "KSampler" in str(error)
    assert all(not s.prompts_received for s in servers)  # refused before anything ran


async def test_an_ancestral_sampler_still_makes_distinct_images_by_default(
    fake_comfyui_factory: Factory, tmp_path: Path
) -> None:
    servers = await fakes(fake_comfyui_factory, 2)
    workflow = txt2img(sampler="euler_ancestral")
    async with api_on_fakes(servers, tmp_path) as two:
        split = await two.run_workflow(workflow, params=batch(4))
    async with api_on_fakes(servers[:1], tmp_path) as one:
        alone = await one.run_workflow(workflow, params=batch(4))

    assert split.split == "distinct"
    assert not split.reproducible
    assert len(set(pixels(split))) == 4
    assert_no_duplicate_images(split)
    # It draws noise for the whole batch at every step: a shard's images are its own.
    assert pixels(split) != pixels(alone)


async def test_a_batch_of_65_falls_back_to_a_seed_per_shard(
    fake_comfyui_factory: Factory, tmp_path: Path
) -> None:
    servers = await fakes(fake_comfyui_factory, 2)
    async with api_on_fakes(servers, tmp_path) as api:
        result = await api.run_workflow(txt2img(size=16), params=batch(65))
        with pytest.raises(NotReproducibleError, match="65 is over 64"):
            await api.run_workflow(txt2img(size=16), params=batch(65), same_images=True)

    assert result.split == "distinct-seeds"
    assert not result.reproducible
    assert [s.seeds for s in result.shards] == [
        {"KSampler": 156680208700286},
        {"KSampler": 156680208700287},
    ]
    assert [o.batch_index for o in result.outputs] == list(range(65))
    assert len(set(pixels(result))) == 65


async def test_strict_mode_makes_odd_latent_sizes_match_too(
    fake_comfyui_factory: Factory, tmp_path: Path
) -> None:
    # A 72x72 image is a 9x9 latent: 324 values a sample, not a multiple of 16, so torch
    # draws a sample's noise differently alone and in a whole batch. Strict mode cuts the
    # one-server batch with LatentFromBatch(0, N) too: both draw sample by sample.
    servers = await fakes(fake_comfyui_factory, 2)
    workflow = txt2img(size=72)
    async with api_on_fakes(servers, tmp_path) as two:
        loose = await two.run_workflow(workflow, params=batch(4))
        strict = await two.run_workflow(workflow, params=batch(4), same_images=True)
    async with api_on_fakes(servers[:1], tmp_path) as one:
        plain = await one.run_workflow(workflow, params=batch(4))
        strict_alone = await one.run_workflow(workflow, params=batch(4), same_images=True)

    assert loose.split == "distinct"
    assert plain.split == "single"
    assert pixels(loose) != pixels(plain)
    assert strict.split == strict_alone.split == "same-images"
    assert pixels(strict) == pixels(strict_alone)
    assert_no_duplicate_images(loose)


async def test_strict_mode_refuses_a_split_that_is_no_latent_batch(
    fake_comfyui_factory: Factory, tmp_path: Path
) -> None:
    servers = await fakes(fake_comfyui_factory, 2)
    workflow = load_workflow("model_free.json")
    async with api_on_fakes(servers, tmp_path) as api:
        with pytest.raises(NotReproducibleError, match="EmptyImage") as caught:
            await api.run_workflow(workflow, params=batch(4), same_images=True)
    assert caught.value.node_id == "3"


def test_the_fake_and_the_client_call_the_same_samplers_stochastic() -> None:
    # The fake decides by ComfyUI's naming rule, the client by its table of ComfyUI 0.3.64's
    # samplers: the two are written apart on purpose and must agree on every listed name.
    info = json.loads(
        resources.files("comfytrio.testing").joinpath("object_info.json").read_text("utf-8")
    )
    names = info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert len(names) > 40
    for name in names:
        assert draws_noise_while_sampling(name) == (name in STOCHASTIC_SAMPLERS), name
        assert (name in STOCHASTIC_SAMPLERS) != (name in DETERMINISTIC_SAMPLERS), name
