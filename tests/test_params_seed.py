"""Seeds: each shard gets its own, they are reported, and a job seed reproduces them.

The seed library gave the node titled ``K - SEED`` a random seed per GPU even when no param
asked for it; the standard plugin keeps that default, reproducible and reported.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_plugins_support import load_workflow, plan, std_plugins

from comfytrio import ParamError

BATCH = {"type": "integer", "value": 6, "gpu_scale": True, "node_mappings": "API - BATCH SIZE"}


async def test_without_a_seed_param_k_seed_gets_a_distinct_seed_per_shard() -> None:
    # No batch split: each server runs the whole job, with a seed of its own.
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), shard_count=3)
    seeds = [s.workflow["23"]["inputs"]["value"] for s in job.shards]
    assert len(set(seeds)) == 3
    assert [s.seeds for s in job.shards] == [{"K - SEED": seed} for seed in seeds]
    assert seeds == [job.seed, job.seed + 1, job.seed + 2]
    assert job.split == "distinct-seeds"


async def test_a_split_latent_batch_keeps_the_one_gpu_seed_on_every_shard() -> None:
    # Each shard cuts its part of the whole batch: same seed, its own noise (LatentFromBatch).
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), {"batch": BATCH}, shard_count=3)
    assert [s.workflow["23"]["inputs"]["value"] for s in job.shards] == [job.seed] * 3
    assert [s.seeds for s in job.shards] == [{"K - SEED": job.seed}] * 3
    cuts = [
        (node["inputs"]["batch_index"], node["inputs"]["length"])
        for s in job.shards
        for node in s.workflow.values()
        if node["class_type"] == "LatentFromBatch"
    ]
    assert cuts == [(0, 2), (2, 2), (4, 2)]
    assert job.split == "same-images"


async def test_a_random_job_seed_stays_in_the_seed_librarys_range() -> None:
    seeds = {(await plan(std_plugins(), load_workflow("sdxl_txt2img"))).seed for _ in range(20)}
    assert len(seeds) > 1
    assert all(0 <= seed <= 999_998 for seed in seeds)


async def test_giving_the_job_seed_again_reproduces_every_seed() -> None:
    first = await plan(
        std_plugins(), load_workflow("sdxl_txt2img"), {"batch": BATCH}, shard_count=3
    )
    again = await plan(
        std_plugins(),
        load_workflow("sdxl_txt2img"),
        {"batch": BATCH},
        shard_count=3,
        seed=first.seed,
    )
    assert again.seed == first.seed
    assert [s.workflow for s in again.shards] == [s.workflow for s in first.shards]


async def test_a_given_job_seed_is_used_as_is() -> None:
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), seed=42)
    assert job.seed == 42
    assert job.shards[0].seeds == {"K - SEED": 42}
    assert job.shards[0].workflow["23"]["inputs"]["value"] == 42


async def test_a_seed_param_value_is_the_first_shards_seed() -> None:
    params = {"seed": {"type": "seed", "value": 1234, "node_mappings": "K - SEED"}}
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), params, shard_count=2)
    assert [s.seeds for s in job.shards] == [{"K - SEED": 1234}, {"K - SEED": 1235}]
    split = await plan(
        std_plugins(), load_workflow("sdxl_txt2img"), {**params, "b": BATCH}, shard_count=2
    )
    assert [s.seeds for s in split.shards] == [{"K - SEED": 1234}] * 2  # one batch, one seed


async def test_a_seed_param_without_value_uses_the_job_seed() -> None:
    params = {"seed": {"type": "seed", "node_mappings": "K - SEED"}}
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), params, shard_count=2, seed=9)
    assert [s.seeds for s in job.shards] == [{"K - SEED": 9}, {"K - SEED": 10}]


async def test_a_seed_goes_into_a_samplers_seed_input() -> None:
    workflow = load_workflow("sdxl_txt2img")
    workflow["3"]["inputs"]["seed"] = 0  # not linked to K - SEED any more
    params = {"s": {"type": "seed", "value": 5, "node_mappings": "KSampler"}}
    job = await plan(std_plugins(), workflow, params, seed=1)
    assert job.shards[0].workflow["3"]["inputs"]["seed"] == 5
    assert "value" not in job.shards[0].workflow["3"]["inputs"]
    assert job.shards[0].seeds == {"KSampler": 5, "K - SEED": 1}


async def test_seeds_wrap_to_stay_valid() -> None:
    params = {"seed": {"type": "seed", "value": 2**64 - 1, "node_mappings": "K - SEED"}}
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), params, shard_count=2)
    assert [s.seeds["K - SEED"] for s in job.shards] == [2**64 - 1, 0]


async def test_a_callers_integer_param_on_k_seed_wins_over_the_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    params = {"seed": {"type": "integer", "value": 7, "node_mappings": "K - SEED"}}
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), params, shard_count=2)
    assert [s.workflow["23"]["inputs"]["value"] for s in job.shards] == [7, 7]
    assert [s.seeds for s in job.shards] == [{}, {}]
    assert "repeats its images" in caplog.text


async def test_a_workflow_without_k_seed_gets_no_default_seed() -> None:
    job = await plan(std_plugins(), load_workflow("model_free"), seed=3)
    assert job.shards[0].seeds == {}
    assert job.seed == 3


@pytest.mark.parametrize("value", [-1, 2**64, 1.5, "42", True])
async def test_a_bad_seed_value_is_refused(value: Any) -> None:
    params = {"seed": {"type": "seed", "value": value, "node_mappings": "K - SEED"}}
    with pytest.raises(ParamError, match="seed") as caught:
        await plan(std_plugins(), load_workflow("sdxl_txt2img"), params)
    assert caught.value.param == "seed"


@pytest.mark.parametrize("seed", [-1, 2**64, "1", True])
async def test_a_bad_job_seed_is_refused(seed: Any) -> None:
    with pytest.raises(ValueError, match="seed"):
        await plan(std_plugins(), load_workflow("sdxl_txt2img"), seed=seed)


async def test_a_seed_cannot_be_split() -> None:
    params = {"seed": {"type": "seed", "value": 1, "gpu_scale": True, "node_mappings": "K - SEED"}}
    with pytest.raises(ParamError, match="cannot be split"):
        await plan(std_plugins(), load_workflow("sdxl_txt2img"), params)


async def test_a_seed_goes_into_the_input_a_mapping_names() -> None:
    params = {"s": {"type": "seed", "value": 5, "node_mappings": "KSampler.seed"}}
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), params, shard_count=2, seed=1)
    assert [s.workflow["3"]["inputs"]["seed"] for s in job.shards] == [5, 6]  # was a link
    assert [s.seeds for s in job.shards] == [
        {"KSampler": 5, "K - SEED": 1},
        {"KSampler": 6, "K - SEED": 2},
    ]


async def test_a_callers_param_on_an_input_of_k_seed_replaces_the_default() -> None:
    params = {"seed": {"type": "integer", "value": 7, "node_mappings": "K - SEED.value"}}
    job = await plan(std_plugins(), load_workflow("sdxl_txt2img"), params, shard_count=2)
    assert [s.workflow["23"]["inputs"]["value"] for s in job.shards] == [7, 7]
    assert [s.seeds for s in job.shards] == [{}, {}]
