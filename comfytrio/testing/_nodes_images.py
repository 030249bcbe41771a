"""Node family: images and masks, really computed with Pillow (no model involved).

Loading from ``input/`` or ``output/``, making, scaling, cropping, flipping, batching
images, and the mask conversions. Blocking Pillow work runs in a worker thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps, ImageSequence

from ._nodes_base import Family, NodeContext, NodeResult
from ._nodes_values import Images, Masks
from ._paths import FakePaths

__all__ = ["NODES", "scale", "target_size"]

NODES = Family()
"""The image and mask nodes."""

ImageFn = Callable[[Images, dict[str, Any]], Images]
"""An image operation: the ``image`` input and the other inputs to the new batch."""

_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bislerp": Image.Resampling.BICUBIC,
}


def target_size(w: int, h: int, width: int, height: int) -> tuple[int, int]:
    """The size a scaler makes ``w`` x ``h`` into; a 0 keeps the aspect ratio."""
    if width == 0 and height == 0:
        return w, h
    if width == 0:
        width = max(1, round(w * height / h))
    elif height == 0:
        height = max(1, round(h * width / w))
    return width, height


def _crop_center(frame: Image.Image, width: int, height: int) -> Image.Image:
    w, h = frame.size
    old_aspect, new_aspect = w / h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((w - w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((h - h * (old_aspect / new_aspect)) / 2)
    return frame.crop((x, y, w - x, h - y))


def scale(frames: Images, method: str, width: int, height: int, crop: str) -> Images:
    """``common_upscale``: resize every frame (``crop="center"`` keeps the aspect ratio)."""
    if not frames.frames:
        return frames
    w, h = frames.width, frames.height
    width, height = target_size(w, h, width, height)
    result = []
    for frame in frames.frames:
        source = _crop_center(frame, width, height) if crop == "center" else frame
        result.append(
            source.resize((width, height), _RESAMPLE.get(method, Image.Resampling.BILINEAR))
        )
    return Images(result, width, height, charged=frames.charged)


def _map_frames(images: Images, op: Callable[[Image.Image], Image.Image]) -> Images:
    frames = [op(f) for f in images.frames]
    if frames:
        return Images(frames, charged=images.charged)
    return Images([], images.width, images.height, charged=images.charged)


def _image_op(class_type: str) -> Callable[[ImageFn], ImageFn]:
    """Register an ``ImageFn`` (run in a worker thread) as the simulation of ``class_type``."""

    def register(fn: ImageFn) -> ImageFn:
        async def run(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
            images = inputs["image"]
            return (await ctx.in_thread(lambda: fn(images, inputs)),), None

        NODES.node(class_type)(run)
        return fn

    return register


# --- loading and making ---------------------------------------------------------------------


def _load_image(path: Path) -> tuple[Images, Masks]:
    frames: list[Image.Image] = []
    masks: list[Image.Image] = []
    with Image.open(path) as img:
        size: tuple[int, int] | None = None
        for raw in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(raw) or raw
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            if size is None:
                size = rgb.size
            if rgb.size != size:
                continue
            if "A" in frame.getbands():
                mask = ImageOps.invert(frame.getchannel("A"))
            elif frame.mode == "P" and "transparency" in frame.info:
                mask = ImageOps.invert(frame.convert("RGBA").getchannel("A"))
            else:
                mask = Image.new("L", (64, 64), 0)
            frames.append(rgb)
            masks.append(mask)
        multi = len(frames) > 1 and img.format != "MPO"
    if not multi:
        frames, masks = frames[:1], masks[:1]
    return Images(frames), Masks(masks)


@dataclass(frozen=True)
class _ImageLoader:
    """LoadImage (``input/``) and LoadImageOutput (``output/``): an image file named
    relative to ``folder``, unless a ``[input]``/``[output]``/``[temp]`` annotation says."""

    folder: str

    def path(self, paths: FakePaths, name: str) -> Path:
        base = paths.output if self.folder == "output" else paths.input
        return paths.annotated_path(name, base)

    async def run(self, ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
        path = self.path(ctx.paths, str(inputs["image"]))
        images, masks = await ctx.in_thread(lambda: _load_image(path))
        return (images, masks), None

    def validate(self, paths: FakePaths, inputs: dict[str, Any]) -> bool | str:
        image = inputs.get("image")
        if not isinstance(image, str) or not self.path(paths, image).exists():
            return f"Invalid image file: {image}"
        return True

    def file_hash(self, paths: FakePaths, inputs: dict[str, Any]) -> Any:
        try:
            data = self.path(paths, str(inputs.get("image"))).read_bytes()
        except OSError:
            return "missing"
        return hashlib.sha256(data).hexdigest()


_INPUT_LOADER = _ImageLoader("input")
_OUTPUT_LOADER = _ImageLoader("output")
NODES.node(
    "LoadImage",
    combos={"image": FakePaths.input_images},
    validate=_INPUT_LOADER.validate,
    validate_inputs=("image",),
    is_changed=_INPUT_LOADER.file_hash,
)(_INPUT_LOADER.run)
NODES.node(
    "LoadImageOutput",
    validate=_OUTPUT_LOADER.validate,
    validate_inputs=("image",),
    is_changed=_OUTPUT_LOADER.file_hash,
)(_OUTPUT_LOADER.run)


def _rgb(color: int) -> tuple[int, int, int]:
    return ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)


@NODES.node("EmptyImage")
async def _empty_image(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    width, height = int(inputs["width"]), int(inputs["height"])
    count = int(inputs["batch_size"])

    def make() -> Images:
        frame = Image.new("RGB", (width, height), _rgb(int(inputs["color"])))
        return Images([frame] * max(count, 0), width, height)

    return (await ctx.in_thread(make),), None


# --- operations -------------------------------------------------------------------------------


@_image_op("ImageScale")
def _scale_node(images: Images, inputs: dict[str, Any]) -> Images:
    return scale(
        images,
        str(inputs["upscale_method"]),
        int(inputs["width"]),
        int(inputs["height"]),
        str(inputs["crop"]),
    )


@_image_op("ImageScaleBy")
def _scale_by_node(images: Images, inputs: dict[str, Any]) -> Images:
    factor = float(inputs["scale_by"])
    return scale(
        images,
        str(inputs["upscale_method"]),
        round(images.width * factor),
        round(images.height * factor),
        "disabled",
    )


@_image_op("ImageInvert")
def _invert(images: Images, inputs: dict[str, Any]) -> Images:
    return _map_frames(images, ImageOps.invert)


@_image_op("ImageCrop")
def _crop(images: Images, inputs: dict[str, Any]) -> Images:
    x = min(int(inputs["x"]), images.width - 1)
    y = min(int(inputs["y"]), images.height - 1)
    right = min(images.width, x + int(inputs["width"]))
    bottom = min(images.height, y + int(inputs["height"]))
    return _map_frames(images, lambda f: f.crop((x, y, right, bottom)))


@_image_op("ImageRotate")
def _rotate(images: Images, inputs: dict[str, Any]) -> Images:
    turn = {
        "90 degrees": Image.Transpose.ROTATE_270,
        "180 degrees": Image.Transpose.ROTATE_180,
        "270 degrees": Image.Transpose.ROTATE_90,
    }.get(str(inputs["rotation"]))
    return images if turn is None else _map_frames(images, lambda f: f.transpose(turn))


@_image_op("ImageFlip")
def _flip(images: Images, inputs: dict[str, Any]) -> Images:
    how = (
        Image.Transpose.FLIP_TOP_BOTTOM
        if str(inputs["flip_method"]).startswith("x")
        else Image.Transpose.FLIP_LEFT_RIGHT
    )
    return _map_frames(images, lambda f: f.transpose(how))


@_image_op("ImageBlur")
def _blur(images: Images, inputs: dict[str, Any]) -> Images:
    if int(inputs["blur_radius"]) == 0:
        return images
    sigma = float(inputs["sigma"])
    return _map_frames(images, lambda f: f.filter(ImageFilter.GaussianBlur(sigma)))


@_image_op("ImageFromBatch")
def _from_batch(images: Images, inputs: dict[str, Any]) -> Images:
    count = len(images.frames)
    index = min(count - 1, int(inputs["batch_index"]))
    length = min(count - index, int(inputs["length"]))
    return Images(
        images.frames[index : index + length], images.width, images.height, charged=images.charged
    )


@NODES.node("ImageBatch")
async def _image_batch(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    first: Images = inputs["image1"]
    second: Images = inputs["image2"]
    if second.frames and (second.width, second.height) != (first.width, first.height):
        second = scale(second, "bilinear", first.width, first.height, "center")
    return (Images(first.frames + second.frames, first.width, first.height),), None


@NODES.node("RepeatImageBatch")
async def _repeat_images(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    images: Images = inputs["image"]
    frames = images.frames * int(inputs["amount"])
    return (Images(frames, images.width, images.height, charged=images.charged),), None


@NODES.node("GetImageSize")
async def _get_image_size(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    images: Images = inputs["image"]
    width, height, count = images.width, images.height, len(images.frames)
    if inputs.get("unique_id"):
        ctx.send_text(f"width: {width}, height: {height}\n batch size: {count}")
    return (width, height, count), None


# --- masks ------------------------------------------------------------------------------------


@NODES.node("SolidMask")
async def _solid_mask(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    level = round(float(inputs["value"]) * 255)
    size = (int(inputs["width"]), int(inputs["height"]))
    return (Masks([Image.new("L", size, level)]),), None


@NODES.node("ImageToMask")
async def _image_to_mask(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    images: Images = inputs["image"]
    channel = ["red", "green", "blue", "alpha"].index(str(inputs["channel"]))
    if channel == 3:
        raise IndexError("index 3 is out of bounds for dimension 3 with size 3")
    return (Masks([f.getchannel(channel) for f in images.frames]),), None


@NODES.node("MaskToImage")
async def _mask_to_image(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    masks: Masks = inputs["mask"]
    return (Images([m.convert("RGB") for m in masks.frames]),), None


@NODES.node("InvertMask")
async def _invert_mask(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    masks: Masks = inputs["mask"]
    return (Masks([ImageOps.invert(m) for m in masks.frames]),), None
