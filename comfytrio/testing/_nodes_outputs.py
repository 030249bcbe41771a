"""Node family: output nodes, which hand images out of the graph.

SaveImage writes PNGs into ``output/`` (``prefix_00001_.png`` counters, prompt and
workflow in the PNG metadata), PreviewImage into ``temp/``; both report them in their UI
output. PreviewAny reports its input as text (``{"text": [value]}``), no file.
SaveImageWebsocket (``custom_nodes/websocket_image_save.py``, which every stock install
loads, so every fake has it: ``STOCK_CUSTOM_NODES``) sends each image as a binary preview
frame (a PNG) with a progress tick instead, writes nothing and reports no UI output.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL.PngImagePlugin import PngInfo

from ._nodes_base import Family, NodeContext, NodeDef, NodeResult
from ._nodes_values import Images
from ._paths import FakePaths

__all__ = ["NODES", "STOCK_CUSTOM_NODES", "save_image_websocket"]

NODES = Family()
"""The built-in output nodes."""


def _compute_prefix_vars(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    for key, value in (
        ("%width%", str(width)),
        ("%height%", str(height)),
        ("%year%", str(now.tm_year)),
        ("%month%", f"{now.tm_mon:02}"),
        ("%day%", f"{now.tm_mday:02}"),
        ("%hour%", f"{now.tm_hour:02}"),
        ("%minute%", f"{now.tm_min:02}"),
        ("%second%", f"{now.tm_sec:02}"),
    ):
        prefix = prefix.replace(key, value)
    return prefix


def _write_images(
    paths: FakePaths,
    images: Images,
    prefix: str,
    folder: Path,
    kind: str,
    compress_level: int,
    metadata: PngInfo | None,
) -> list[dict[str, str]]:
    first = images.first()
    if "%" in prefix:
        prefix = _compute_prefix_vars(prefix, first.width, first.height)
    full, stem, counter, subfolder = paths.save_image_path(prefix, folder)
    results = []
    for batch_number, frame in enumerate(images.frames):
        name = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        frame.save(full / name, pnginfo=metadata, compress_level=compress_level)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return results


def _png_metadata(ctx: NodeContext, inputs: dict[str, Any]) -> PngInfo | None:
    if ctx.settings.disable_metadata:
        return None
    info = PngInfo()
    if inputs.get("prompt") is not None:
        info.add_text("prompt", json.dumps(inputs["prompt"]))
    extra = inputs.get("extra_pnginfo")
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            info.add_text(str(key), json.dumps(value))
    return info


async def _charge(ctx: NodeContext, images: Images) -> None:
    """Spend ``seconds_per_image`` for images no decoder has paid for yet."""
    if not images.charged and images.frames:
        await ctx.gpu_sleep(ctx.settings.seconds_per_image * len(images.frames))


async def _save(ctx: NodeContext, inputs: dict[str, Any], kind: str) -> NodeResult:
    """Write the ``images`` input as PNGs into the ``kind`` folder (``output`` or ``temp``)."""
    images: Images = inputs["images"]
    if not isinstance(images, Images):
        raise TypeError(f"'{type(images).__name__}' object is not an image batch")
    images.first()
    await _charge(ctx, images)
    if kind == "output":
        prefix, folder, level = (
            str(inputs.get("filename_prefix", "ComfyUI")),
            ctx.paths.output,
            4,
        )
    else:
        suffix = "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        prefix, folder, level = "ComfyUI_temp_" + suffix, ctx.paths.temp, 1
    metadata = _png_metadata(ctx, inputs)
    results = await ctx.in_thread(
        lambda: _write_images(ctx.paths, images, prefix, folder, kind, level, metadata)
    )
    return (), {"images": results}


@NODES.node("SaveImage")
async def _save_image(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return await _save(ctx, inputs, "output")


@NODES.node("PreviewImage")
async def _preview_image(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return await _save(ctx, inputs, "temp")


@NODES.node("PreviewAny")
async def _preview_any(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    """``comfy_extras/nodes_preview_any.py``: the input as text, in the UI output only."""
    source = inputs.get("source")
    if isinstance(source, str):
        value = source
    elif isinstance(source, (int, float, bool)):
        value = str(source)
    elif source is None:
        value = "None"
    else:
        try:
            value = json.dumps(source)
        except (TypeError, ValueError):
            value = str(source)
    # A tuple, as ComfyUI keeps it (JSON makes it a list; /api/jobs skips it: no list).
    return (), {"text": (value,)}


# --- SaveImageWebsocket (custom_nodes/websocket_image_save.py) ----------------------------------

_SAVE_IMAGE_WEBSOCKET_INFO: dict[str, Any] = {
    "input": {"required": {"images": ["IMAGE"]}},
    "input_order": {"required": ["images"]},
    "output": [],
    "output_is_list": [],
    "output_name": [],
    "name": "SaveImageWebsocket",
    "display_name": "SaveImageWebsocket",
    "description": "",
    "python_module": "custom_nodes.websocket_image_save",
    "category": "api/image",
    "output_node": True,
}


async def _send_images(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    images: Images = inputs["images"]
    for step, frame in enumerate(images.frames):
        await ctx.progress(step, len(images.frames), frame)
    return (), None


def save_image_websocket() -> NodeDef:
    """ComfyUI's bundled ``SaveImageWebsocket`` node: each image goes out as a binary
    preview frame (with a progress message), never to disk; it always runs again."""
    return NodeDef(
        "SaveImageWebsocket",
        _SAVE_IMAGE_WEBSOCKET_INFO,
        _send_images,
        is_changed=lambda _p, _i: time.time(),
    )


STOCK_CUSTOM_NODES: tuple[Callable[[], NodeDef], ...] = (save_image_websocket,)
"""The custom nodes a stock ComfyUI install ships in ``custom_nodes/`` (loaded after the
built-in ones, so listed last in ``object_info``)."""
