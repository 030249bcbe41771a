"""The ``image`` param: fetched once per job, named by its hash, on every server.

Local servers get the file written into their input folder; remote ones get it through
``POST /upload/image`` (a real HTTP server here, recording what it receives).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import trio
from comfytrio_std import ImageType
from test_plugins_support import (
    FakeComfyUploads,
    LocalTarget,
    RemoteTarget,
    Route,
    load_workflow,
    local_client,
    plan,
    png,
    start_http_server,
    std_plugins,
)

import comfytrio
from comfytrio import DownloadError, ParamError


def picture(value: Any) -> dict[str, Any]:
    return {"picture": {"type": "image", "value": value, "node_mappings": "API - PICTURE"}}


def hashed_name(data: bytes, extension: str = ".png") -> str:
    return f"comfytrio_{hashlib.sha256(data).hexdigest()}{extension}"


def local_targets(tmp_path: Path, count: int) -> list[LocalTarget]:
    return [LocalTarget(f"local-{i}", tmp_path / f"comfy{i}" / "input") for i in range(count)]


async def test_a_url_is_fetched_once_and_written_into_every_local_input_folder(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    image = png("red")
    server = await start_http_server(nursery, {"/photo.png": Route(image)})
    targets = local_targets(tmp_path, 3)
    job = await plan(
        std_plugins(),
        load_workflow("model_free"),
        picture(server.url("/photo.png")),
        targets=targets,
        shard_count=3,
    )
    assert server.count("/photo.png") == 1
    name = hashed_name(image)
    for target in targets:
        assert target.input_dir is not None
        assert (target.input_dir / name).read_bytes() == image
        assert sorted(p.name for p in target.input_dir.iterdir()) == [name]  # no temp file
    assert [s.workflow["5"]["inputs"]["image"] for s in job.shards] == [name] * 3


async def test_a_remote_server_gets_the_image_uploaded(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    comfy = FakeComfyUploads()
    server = await start_http_server(nursery, comfy.routes())
    image = png("blue")
    async with local_client() as http:
        remote = RemoteTarget("remote", server.url(""), http)
        (local,) = local_targets(tmp_path, 1)
        job = await plan(
            std_plugins(),
            load_workflow("model_free"),
            picture(image),
            targets=[remote, local],
            shard_count=2,
            http=http,
        )
    name = hashed_name(image)
    assert comfy.uploads == [(name, image)]
    assert local.input_dir is not None
    assert (local.input_dir / name).read_bytes() == image
    assert [s.workflow["5"]["inputs"]["image"] for s in job.shards] == [name, name]


async def test_a_local_path_and_bytes_work_too(tmp_path: Path) -> None:
    image = png("green")
    path = tmp_path / "photo.png"
    path.write_bytes(image)
    targets = local_targets(tmp_path, 1)
    for value in (str(path), path, image, bytearray(image)):
        job = await plan(
            std_plugins(), load_workflow("model_free"), picture(value), targets=targets
        )
        assert job.shards[0].workflow["5"]["inputs"]["image"] == hashed_name(image)


async def test_two_different_images_never_share_a_name(tmp_path: Path) -> None:
    targets = local_targets(tmp_path, 1)
    names = []
    for color in ("red", "blue"):
        job = await plan(
            std_plugins(), load_workflow("model_free"), picture(png(color)), targets=targets
        )
        names.append(job.shards[0].workflow["5"]["inputs"]["image"])
    assert names[0] != names[1]
    assert targets[0].input_dir is not None
    assert sorted(p.name for p in targets[0].input_dir.iterdir()) == sorted(names)


async def test_the_extension_follows_the_content(tmp_path: Path) -> None:
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="JPEG")
    job = await plan(
        std_plugins(),
        load_workflow("model_free"),
        picture(out.getvalue()),
        targets=local_targets(tmp_path, 1),
    )
    assert job.shards[0].workflow["5"]["inputs"]["image"].endswith(".jpg")


async def test_a_fetch_does_not_block_other_tasks(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await start_http_server(nursery, {"/slow.png": Route(png(), delay=0.3)})
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    nursery.start_soon(ticker)
    await plan(
        std_plugins(),
        load_workflow("model_free"),
        picture(server.url("/slow.png")),
        targets=local_targets(tmp_path, 1),
    )
    assert ticks >= 10


@pytest.mark.parametrize(
    "value", ["file:///etc/passwd", "ftp://example.com/a.png", "data:image/png;base64,AAAA"]
)
async def test_other_url_schemes_are_refused_at_plan_time(value: str) -> None:
    with pytest.raises(ParamError, match="only http") as caught:
        await plan(std_plugins(), load_workflow("model_free"), picture(value))
    assert caught.value.param == "picture"


@pytest.mark.parametrize("value", [b"", 42, None, ""])
async def test_a_value_that_is_no_image_source_is_refused(value: Any) -> None:
    with pytest.raises(ParamError) as caught:
        await plan(std_plugins(), load_workflow("model_free"), picture(value))
    assert caught.value.param == "picture"


async def test_bytes_that_are_not_an_image_are_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_http_server(nursery, {"/page": Route(b"<html>login</html>")})
    with pytest.raises(ParamError, match="is not a PNG") as caught:
        await plan(
            std_plugins(),
            load_workflow("model_free"),
            picture(server.url("/page")),
            targets=local_targets(tmp_path, 1),
        )
    assert caught.value.param == "picture"
    assert not (tmp_path / "comfy0").exists()


async def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ParamError, match="cannot read"):
        await plan(std_plugins(), load_workflow("model_free"), picture(tmp_path / "nope.png"))


async def test_a_failed_fetch_is_a_download_error(nursery: trio.Nursery) -> None:
    server = await start_http_server(nursery)
    url = server.url("/missing.png")
    with pytest.raises(DownloadError) as caught:
        await plan(std_plugins(), load_workflow("model_free"), picture(url))
    assert caught.value.url == url
    assert caught.value.reason == "HTTP 404"


async def test_an_image_over_the_cap_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    plugins = comfytrio.make_plugin_manager(entrypoints=False)

    class SmallImages:
        @comfytrio.hookimpl
        def register_param_types(self, register: Any) -> None:
            register(ImageType(max_bytes=50))

    plugins.register(SmallImages(), "small-images")
    server = await start_http_server(nursery, {"/photo.png": Route(png(size=(64, 64)))})
    with pytest.raises(DownloadError, match="cap"):
        await plan(plugins, load_workflow("model_free"), picture(server.url("/photo.png")))
    with pytest.raises(ParamError, match="cap"):
        await plan(plugins, load_workflow("model_free"), picture(png(size=(64, 64))))


async def test_an_image_cannot_be_split() -> None:
    entry = picture(png())
    entry["picture"]["gpu_scale"] = True
    with pytest.raises(ParamError, match="cannot be split"):
        await plan(std_plugins(), load_workflow("model_free"), entry)


async def test_an_image_goes_into_the_input_a_mapping_names(tmp_path: Path) -> None:
    workflow = load_workflow("model_free")
    workflow["9"] = {
        "class_type": "ImageFromPath",
        "inputs": {"path": "old.png", "strength": 1.0},
        "_meta": {"title": "Reference"},
    }
    params = {
        "picture": {
            "type": "image",
            "value": png("red"),
            "node_mappings": ["API - PICTURE.image", "Reference.path"],
        }
    }
    job = await plan(std_plugins(), workflow, params, targets=local_targets(tmp_path, 1))
    built = job.shards[0].workflow
    assert built["5"]["inputs"] == {"image": hashed_name(png("red"))}
    assert built["9"]["inputs"] == {"path": hashed_name(png("red")), "strength": 1.0}
