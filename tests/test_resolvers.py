"""The standard resolvers: models must exist, LoRAs are downloaded once and injected.

Downloads come from a real HTTP server on 127.0.0.1; remote servers are asked for their
model lists over HTTP too (``GET /models/{folder}``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio
from test_plugins_support import (
    FakeComfyUploads,
    LocalTarget,
    RemoteTarget,
    Route,
    load_workflow,
    local_client,
    plan,
    safetensors_bytes,
    start_http_server,
    std_plugins,
)

import comfytrio
from comfytrio import (
    DownloadError,
    LoRARef,
    ModelNotFoundError,
    ModelRef,
    NodeTitleNotFoundError,
    ParamError,
    UnsafeNameError,
)

WEIGHTS = safetensors_bytes(5000)
CHECKPOINT = ModelRef("checkpoints", "juggernaut_xl.safetensors")


def files_in(folder: Path) -> list[str]:
    """What ``folder`` holds (nothing when it was never made: a failed download need not
    make its folder)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def models_path(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "juggernaut_xl.safetensors").write_bytes(b"ckpt")
    (root / "vae" / "sdxl").mkdir(parents=True)
    (root / "vae" / "sdxl" / "vae.safetensors").write_bytes(b"vae")
    return root


# --------------------------------------------------------------------------- models


async def test_models_present_on_disk_pass(models_path: Path) -> None:
    models = [CHECKPOINT, ModelRef("vae", "sdxl/vae.safetensors")]
    job = await plan(
        std_plugins(), load_workflow("sdxl_txt2img"), models=models, models_path=models_path
    )
    assert len(job.shards) == 1


async def test_every_missing_model_is_named(models_path: Path) -> None:
    missing = [ModelRef("checkpoints", "nope.safetensors"), ModelRef("vae", "gone.safetensors")]
    with pytest.raises(ModelNotFoundError) as caught:
        await plan(
            std_plugins(),
            load_workflow("sdxl_txt2img"),
            models=[CHECKPOINT, *missing],
            models_path=models_path,
        )
    assert caught.value.missing == missing
    assert caught.value.where == str(models_path)
    assert "checkpoints/nope.safetensors" in str(caught.value)
    assert "vae/gone.safetensors" in str(caught.value)


async def test_a_remote_server_is_asked_for_its_model_list(nursery: trio.Nursery) -> None:
    comfy = FakeComfyUploads(models={"checkpoints": ["juggernaut_xl.safetensors"]})
    server = await start_http_server(nursery, comfy.routes())
    async with local_client() as http:
        remote = RemoteTarget("gpu-box:8188", server.url(""), http)
        await plan(
            std_plugins(),
            load_workflow("sdxl_txt2img"),
            models=[CHECKPOINT],
            targets=[remote],
            http=http,
        )
        with pytest.raises(ModelNotFoundError) as caught:
            await plan(
                std_plugins(),
                load_workflow("sdxl_txt2img"),
                models=[CHECKPOINT, ModelRef("vae", "x.safetensors")],
                targets=[remote],
                http=http,
            )
    assert caught.value.missing == [ModelRef("vae", "x.safetensors")]
    assert caught.value.where == "ComfyUI gpu-box:8188"
    assert server.count("/models/checkpoints") == 2


async def test_local_models_are_checked_on_disk_and_remote_ones_by_listing(
    nursery: trio.Nursery, models_path: Path, tmp_path: Path
) -> None:
    comfy = FakeComfyUploads(models={"checkpoints": []})
    server = await start_http_server(nursery, comfy.routes())
    async with local_client() as http:
        targets = [
            LocalTarget("local", tmp_path / "input"),
            RemoteTarget("remote", server.url(""), http),
        ]
        with pytest.raises(ModelNotFoundError) as caught:
            await plan(
                std_plugins(),
                load_workflow("sdxl_txt2img"),
                models=[CHECKPOINT],
                targets=targets,
                models_path=models_path,
                http=http,
            )
    assert caught.value.missing == [CHECKPOINT]
    assert caught.value.where == "ComfyUI remote"


@pytest.mark.parametrize(
    "model",
    [
        ModelRef("checkpoints", "../../etc/passwd"),
        ModelRef("../secrets", "a"),
        ModelRef("checkpoints", "/abs.safetensors"),
        ModelRef("a/b", "c"),
    ],
)
async def test_a_model_name_cannot_escape_its_folder(model: ModelRef, models_path: Path) -> None:
    with pytest.raises(UnsafeNameError):
        await plan(
            std_plugins(), load_workflow("sdxl_txt2img"), models=[model], models_path=models_path
        )


# --------------------------------------------------------------------------- LoRA downloads


async def test_a_missing_lora_is_downloaded_into_loras(
    nursery: trio.Nursery, models_path: Path
) -> None:
    server = await start_http_server(nursery, {"/style.safetensors": Route(WEIGHTS)})
    lora = LoRARef(
        "style.safetensors",
        server.url("/style.safetensors"),
        strength=0.7,
        sha256=hashlib.sha256(WEIGHTS).hexdigest(),
    )
    await plan(std_plugins(), load_workflow("sdxl_txt2img"), loras=[lora], models_path=models_path)
    assert (models_path / "loras" / "style.safetensors").read_bytes() == WEIGHTS
    # Present now: the next job does not ask again.
    await plan(std_plugins(), load_workflow("sdxl_txt2img"), loras=[lora], models_path=models_path)
    assert server.count("/style.safetensors") == 1


async def test_fifty_concurrent_jobs_needing_one_lora_make_one_request(
    nursery: trio.Nursery, models_path: Path
) -> None:
    server = await start_http_server(nursery, {"/style.safetensors": Route(WEIGHTS, delay=0.2)})
    lora = LoRARef("style.safetensors", server.url("/style.safetensors"))
    plugins = std_plugins()  # one api: one manager, one downloader
    plans: list[comfytrio.JobPlan] = []
    async with local_client() as http:

        async def job() -> None:
            plans.append(
                await plan(
                    plugins,
                    load_workflow("sdxl_txt2img"),
                    loras=[lora],
                    models_path=models_path,
                    http=http,
                )
            )

        async with trio.open_nursery() as jobs:
            for _ in range(50):
                jobs.start_soon(job)
    assert server.count("/style.safetensors") == 1
    assert len(plans) == 50
    assert (models_path / "loras" / "style.safetensors").read_bytes() == WEIGHTS
    assert sorted(p.name for p in (models_path / "loras").iterdir()) == ["style.safetensors"]


async def test_a_lora_cut_short_leaves_no_file(nursery: trio.Nursery, models_path: Path) -> None:
    server = await start_http_server(nursery, {"/cut": Route(WEIGHTS, drop_after=500)})
    with pytest.raises(DownloadError) as caught:
        await plan(
            std_plugins(),
            load_workflow("sdxl_txt2img"),
            loras=[LoRARef("cut.safetensors", server.url("/cut"))],
            models_path=models_path,
        )
    assert caught.value.url == server.url("/cut")
    assert files_in(models_path / "loras") == []


async def test_a_lora_with_the_wrong_hash_is_refused(
    nursery: trio.Nursery, models_path: Path
) -> None:
    server = await start_http_server(nursery, {"/a": Route(WEIGHTS)})
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        await plan(
            std_plugins(),
            load_workflow("sdxl_txt2img"),
            loras=[LoRARef("a.safetensors", server.url("/a"), sha256="ab" * 32)],
            models_path=models_path,
        )
    assert files_in(models_path / "loras") == []


async def test_a_lora_over_the_size_cap_is_refused(
    nursery: trio.Nursery, models_path: Path
) -> None:
    server = await start_http_server(nursery, {"/big": Route(WEIGHTS)})
    with pytest.raises(DownloadError, match="cap"):
        await plan(
            std_plugins(max_download_bytes=1000),
            load_workflow("sdxl_txt2img"),
            loras=[LoRARef("big.safetensors", server.url("/big"))],
            models_path=models_path,
        )
    assert files_in(models_path / "loras") == []


@pytest.mark.parametrize(
    ("lora", "error"),
    [
        (LoRARef("../evil.safetensors", "http://127.0.0.1:9/x"), UnsafeNameError),
        (LoRARef("/etc/cron.d/evil", "http://127.0.0.1:9/x"), UnsafeNameError),
        (LoRARef("a\\..\\..\\evil", "http://127.0.0.1:9/x"), UnsafeNameError),
        (LoRARef("a.safetensors", "file:///etc/passwd"), DownloadError),
        (LoRARef("a.safetensors", "ftp://127.0.0.1/a"), DownloadError),
        (LoRARef("a.safetensors", "http://127.0.0.1:9/x", sha256="xyz"), DownloadError),
        (LoRARef("a.safetensors", "http://127.0.0.1:9/x", strength=float("inf")), ParamError),
    ],
)
async def test_a_bad_lora_is_refused_before_any_io(
    nursery: trio.Nursery, models_path: Path, lora: LoRARef, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await plan(
            std_plugins(), load_workflow("sdxl_txt2img"), loras=[lora], models_path=models_path
        )
    assert not (models_path / "loras").exists()


async def test_one_lora_name_with_two_urls_is_refused(models_path: Path) -> None:
    loras = [
        LoRARef("a.safetensors", "http://127.0.0.1:9/1"),
        LoRARef("a.safetensors", "http://127.0.0.1:9/2"),
    ]
    with pytest.raises(ParamError, match="given twice"):
        await plan(
            std_plugins(), load_workflow("sdxl_txt2img"), loras=loras, models_path=models_path
        )


async def test_a_lora_in_a_sub_folder(nursery: trio.Nursery, models_path: Path) -> None:
    server = await start_http_server(nursery, {"/a": Route(WEIGHTS)})
    await plan(
        std_plugins(),
        load_workflow("sdxl_txt2img"),
        loras=[LoRARef("sdxl/a.safetensors", server.url("/a"))],
        models_path=models_path,
    )
    assert (models_path / "loras" / "sdxl" / "a.safetensors").read_bytes() == WEIGHTS


async def test_a_remote_server_must_already_list_the_lora(nursery: trio.Nursery) -> None:
    comfy = FakeComfyUploads(models={"loras": ["have.safetensors"]})
    server = await start_http_server(nursery, comfy.routes())
    async with local_client() as http:
        remote = RemoteTarget("remote", server.url(""), http)
        have = LoRARef("have.safetensors", server.url("/never-fetched"))
        await plan(
            std_plugins(), load_workflow("sdxl_txt2img"), loras=[have], targets=[remote], http=http
        )
        lack = LoRARef("lack.safetensors", server.url("/never-fetched"), node_title="LoRA 1")
        with pytest.raises(ModelNotFoundError, match="cannot receive downloads") as caught:
            await plan(
                std_plugins(),
                load_workflow("sdxl_txt2img"),
                loras=[lack],
                targets=[remote],
                http=http,
            )
    assert caught.value.missing == [ModelRef("loras", "lack.safetensors")]
    assert server.count("/never-fetched") == 0


# --------------------------------------------------------------------------- LoRA injection


async def test_rgthree_loaders_get_lora_1_to_n_as_the_seed_library_did(models_path: Path) -> None:
    (models_path / "loras").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (models_path / "loras" / name).write_bytes(WEIGHTS)
    loras = [
        LoRARef("a.safetensors", "http://127.0.0.1:9/a", strength=0.5),
        LoRARef("b.safetensors", "http://127.0.0.1:9/b", strength=0.9, strength_clip=0.3),
    ]
    job = await plan(
        std_plugins(),
        load_workflow("sdxl_txt2img_rgthree_loras"),
        loras=loras,
        models_path=models_path,
    )
    inputs = job.shards[0].workflow["10"]["inputs"]
    assert inputs["lora_1"] == {"on": True, "lora": "a.safetensors", "strength": 0.5}
    assert inputs["lora_2"] == {
        "on": True,
        "lora": "b.safetensors",
        "strength": 0.9,
        "strengthTwo": 0.3,
    }
    assert inputs["model"] == ["4", 0]


def loras_present(models_path: Path, *names: str) -> list[LoRARef]:
    (models_path / "loras").mkdir(exist_ok=True)
    refs = []
    for name in names:
        (models_path / "loras" / name).write_bytes(WEIGHTS)
        refs.append(LoRARef(name, f"http://127.0.0.1:9/{name}"))
    return refs


async def test_a_core_lora_loader_gets_the_lora_named_by_its_title(models_path: Path) -> None:
    (lora,) = loras_present(models_path, "detail.safetensors")
    lora = LoRARef(lora.name, lora.url, strength=0.6, strength_clip=0.4, node_title="LoRA 1")
    job = await plan(
        std_plugins(), load_workflow("sdxl_txt2img"), loras=[lora], models_path=models_path
    )
    inputs = job.shards[0].workflow["10"]["inputs"]
    assert (inputs["lora_name"], inputs["strength_model"], inputs["strength_clip"]) == (
        "detail.safetensors",
        0.6,
        0.4,
    )


async def test_untitled_loras_fill_core_loaders_in_workflow_order(models_path: Path) -> None:
    workflow = load_workflow("sdxl_txt2img")
    second = {
        "class_type": "LoraLoaderModelOnly",
        "_meta": {"title": "LoRA 2"},
        "inputs": {"model": ["10", 0], "lora_name": "old.safetensors", "strength_model": 1},
    }
    workflow["11"] = second
    a, b = loras_present(models_path, "a.safetensors", "b.safetensors")
    job = await plan(std_plugins(), workflow, loras=[a, b], models_path=models_path)
    shard = job.shards[0].workflow
    assert shard["10"]["inputs"]["lora_name"] == "a.safetensors"
    assert shard["10"]["inputs"]["strength_clip"] == 1.0
    assert shard["11"]["inputs"] == {
        "model": ["10", 0],
        "lora_name": "b.safetensors",
        "strength_model": 1.0,
    }


async def test_more_untitled_loras_than_core_loaders_is_an_error(models_path: Path) -> None:
    loras = loras_present(models_path, "a.safetensors", "b.safetensors")
    with pytest.raises(ParamError, match="node_title") as caught:
        await plan(
            std_plugins(), load_workflow("sdxl_txt2img"), loras=loras, models_path=models_path
        )
    assert caught.value.param == "loras"


async def test_a_lora_node_title_that_matches_no_node_lists_the_titles(models_path: Path) -> None:
    (lora,) = loras_present(models_path, "a.safetensors")
    with pytest.raises(NodeTitleNotFoundError) as caught:
        await plan(
            std_plugins(),
            load_workflow("sdxl_txt2img"),
            loras=[LoRARef(lora.name, lora.url, node_title="LoRA 9")],
            models_path=models_path,
        )
    assert "LoRA 1" in caught.value.available


async def test_a_lora_node_title_must_name_a_loader(models_path: Path) -> None:
    (lora,) = loras_present(models_path, "a.safetensors")
    with pytest.raises(ParamError, match="not a LoRA loader"):
        await plan(
            std_plugins(),
            load_workflow("sdxl_txt2img"),
            loras=[LoRARef(lora.name, lora.url, node_title="KSampler")],
            models_path=models_path,
        )


async def test_two_loras_for_one_core_loader_is_an_error(models_path: Path) -> None:
    loras = [
        LoRARef(r.name, r.url, node_title="LoRA 1")
        for r in loras_present(models_path, "a.safetensors", "b.safetensors")
    ]
    with pytest.raises(ParamError, match="takes one LoRA"):
        await plan(
            std_plugins(), load_workflow("sdxl_txt2img"), loras=loras, models_path=models_path
        )


async def test_loras_with_no_loader_node_are_downloaded_and_a_warning_says_so(
    models_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loras = loras_present(models_path, "a.safetensors")
    job = await plan(
        std_plugins(), load_workflow("model_free"), loras=loras, models_path=models_path
    )
    assert job.shards[0].workflow == load_workflow("model_free")
    assert "no LoRA loader node" in caplog.text


async def test_without_loras_loader_nodes_stay_as_exported(models_path: Path) -> None:
    for name in ("sdxl_txt2img", "sdxl_txt2img_rgthree_loras"):
        workflow = load_workflow(name)
        job = await plan(std_plugins(), workflow, models_path=models_path, seed=1)
        assert job.shards[0].workflow["10"] == workflow["10"]
