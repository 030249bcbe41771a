"""A job whose images come over the websocket (``SaveImageWebsocket``, ComfyUI's way to hand
images out without touching the server's disk) and whose output nodes report values
(``PreviewAny``): every output reaches the caller, through ``ComfyAPI`` and through
``comfytrio run``; a server that sends fewer images than it counted fails its shard."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from PIL import Image

from comfytrio import ComfyAPI, ServerProtocolError
from comfytrio.testing import COMFYUI_VERSIONS, FakeComfyUI

Factory = Callable[..., Awaitable[FakeComfyUI]]

WORKFLOW: dict[str, Any] = {
    "1": {
        "class_type": "PrimitiveInt",
        "inputs": {"value": 1},
        "_meta": {"title": "API - BATCH SIZE"},
    },
    "2": {
        "class_type": "EmptyImage",
        "inputs": {"width": 24, "height": 16, "batch_size": ["1", 0], "color": 0xFF0000},
    },
    "3": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}},
    "4": {"class_type": "GetImageSize", "inputs": {"image": ["2", 0]}},
    "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}},
}
"""``batch`` red 24x16 images streamed back; ``PreviewAny`` reports the batch size (each
shard's share) as text."""


def batch(n: int) -> dict[str, dict[str, Any]]:
    return {
        "batch_size": {
            "type": "integer",
            "value": n,
            "gpu_scale": True,
            "node_mappings": "API - BATCH SIZE",
        }
    }


def assert_png(path: str) -> None:
    with Image.open(io.BytesIO(Path(path).read_bytes())) as image:
        image.load()
        assert (image.format, image.size) == ("PNG", (24, 16))


def nothing_written(fakes: list[FakeComfyUI]) -> bool:
    return not any(any(Path(f.output_dir).iterdir()) for f in fakes)


@pytest.mark.parametrize(
    "version",
    [pytest.param(v, marks=pytest.mark.comfy_api(comfyui_version=v)) for v in COMFYUI_VERSIONS],
)
async def test_a_batch_of_4_split_over_two_servers_gives_4_png_files(
    version: str, comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    assert {f.comfyui_version for f in comfy_fakes} == {version}
    result = await comfy_api.run_workflow(WORKFLOW, params=batch(4))
    assert result.ok
    assert [o.type for o in result.outputs] == ["websocket"] * 4
    assert [o.batch_index for o in result.outputs] == [0, 1, 2, 3]
    assert len({o.instance for o in result.outputs}) == 2  # 2 images from each server
    assert result.paths == [o.path for o in result.outputs]
    for output in result.outputs:
        assert_png(output.path)
        assert output.node_id == "3"
        assert Path(output.path).is_relative_to(comfy_api.download_dir / result.job_id)
    assert nothing_written(comfy_fakes)
    # PreviewAny's text, one per shard: each shard's share of the batch.
    assert sorted((v.node_id, v.key, v.values) for v in result.values) == [
        ("5", "text", ("2",)),
        ("5", "text", ("2",)),
    ]
    assert {v.shard for v in result.values} == {0, 1}


@pytest.mark.comfy_api(fakes=1)
async def test_fewer_images_than_counted_fail_the_shard(
    comfy_api: ComfyAPI, comfy_fakes: list[FakeComfyUI]
) -> None:
    (fake,) = comfy_fakes
    fake.drop_ws_messages(4, times=None)  # every image frame is lost on the way
    with pytest.raises(ServerProtocolError, match=r"sent 0 image\(s\) but its progress counted 2"):
        await comfy_api.run_workflow(WORKFLOW, params=batch(2))


# -- the command line -----------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("comfytrio")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "import sys; from comfytrio.cli import main; sys.exit(main())"]


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            cli(*args), capture_stdout=True, capture_stderr=True, check=False, env=dict(os.environ)
        )


async def test_comfytrio_run_prints_the_streamed_images_and_the_values(
    fake_comfyui_factory: Factory, tmp_path: Path
) -> None:
    fakes = [await fake_comfyui_factory(), await fake_comfyui_factory(comfyui_version="0.38.1")]
    workflow = tmp_path / "ws.json"
    workflow.write_text(json.dumps(WORKFLOW))
    urls = [a for f in fakes for a in ("--url", f.url)]
    downloads = ["--download-dir", str(tmp_path / "downloads")]
    scale = ["--scale", "API - BATCH SIZE=4"]
    done = await run_cli("run", str(workflow), *urls, *scale, *downloads)
    assert done.returncode == 0, done.stderr.decode()
    paths = done.stdout.decode().split()
    assert len(paths) == 4
    for path in paths:
        assert_png(path)
    done = await run_cli("run", str(workflow), *urls, *scale, *downloads, "--json")
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert [(o["type"], o["node_id"], o["batch_index"]) for o in result["outputs"]] == [
        ("websocket", "3", i) for i in range(4)
    ]
    assert result["paths"] == [o["path"] for o in result["outputs"]]
    assert sorted((v["node_id"], v["key"], v["values"]) for v in result["values"]) == [
        ("5", "text", ["2"]),
        ("5", "text", ["2"]),
    ]
    assert nothing_written(fakes)
