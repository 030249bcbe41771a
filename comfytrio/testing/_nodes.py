"""The nodes the fake ComfyUI knows, with their recorded ``object_info`` and a simulation each.

Model-free nodes really run on Pillow images (an IMAGE is a batch of RGB frames). Model
nodes are simulated: loaders check that their file is listed, samplers spend
``seconds_per_step`` per step and report progress, decoders produce images of the latent's
size with pixels derived from the seed. Tests can declare more node types (custom nodes).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol, TypeVar

from PIL import Image, ImageFilter, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from ._paths import FakePaths

__all__ = [
    "Images",
    "Latent",
    "Masks",
    "NodeContext",
    "NodeDef",
    "NodeRegistry",
    "SimObject",
]

T = TypeVar("T")

NodeResult = tuple[tuple[Any, ...], dict[str, Any] | None]
"""What a node returns: its outputs (one per output slot) and its UI output (or None)."""


class NodeContext(Protocol):
    """What the engine gives a running node."""

    node_id: str
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    paths: FakePaths
    disable_metadata: bool

    @property
    def seconds_per_image(self) -> float:
        """Simulated GPU seconds per image produced (read when used)."""
        ...

    @property
    def seconds_per_step(self) -> float:
        """Simulated GPU seconds per sampler step and latent (read when used)."""
        ...

    async def gpu_sleep(self, seconds: float) -> None:
        """Spend simulated GPU time; an interrupt ends it early."""
        ...

    async def progress(
        self, value: float, total: float, preview: Image.Image | None = None
    ) -> None:
        """Report ProgressBar progress (checks for an interrupt first)."""
        ...

    def send_text(self, text: str) -> None:
        """Send a binary TEXT frame for this node (to every socket, like ComfyUI)."""
        ...

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Run blocking work (Pillow, files) in a worker thread."""
        ...


# --- values -------------------------------------------------------------------------------


class Images:
    """An IMAGE batch: Pillow RGB frames, with the shape kept even for an empty batch."""

    def __init__(
        self,
        frames: Sequence[Image.Image],
        width: int = 0,
        height: int = 0,
        *,
        charged: bool = False,
    ) -> None:
        self.frames = list(frames)
        if self.frames:
            width, height = self.frames[0].size
        self.width = width
        self.height = height
        self.charged = charged
        """True once the simulated GPU time for these images was spent (by a decoder)."""

    def __len__(self) -> int:
        return len(self.frames)

    def first(self) -> Image.Image:
        """The first frame; the IndexError torch raises for an empty batch otherwise."""
        if not self.frames:
            raise IndexError("index 0 is out of bounds for dimension 0 with size 0")
        return self.frames[0]

    def __str__(self) -> str:
        body = "[]" if not self.frames else "[...]"
        return f"tensor({body}, size=({len(self.frames)}, {self.height}, {self.width}, 3))"


class Masks:
    """A MASK batch: Pillow ``L`` frames (255 = masked)."""

    def __init__(self, frames: Sequence[Image.Image]) -> None:
        self.frames = list(frames)

    def __str__(self) -> str:
        w, h = self.frames[0].size if self.frames else (0, 0)
        return f"tensor([...], size=({len(self.frames)}, {h}, {w}))"


@dataclass
class Latent:
    """A LATENT batch: one content key per item and the size in latent pixels (1/8)."""

    items: list[str]
    width: int
    height: int

    def __str__(self) -> str:
        size = f"({len(self.items)}, 4, {self.height}, {self.width})"
        return f"{{'samples': tensor([...], size={size})}}"


@dataclass(frozen=True)
class SimObject:
    """A simulated model-side object (MODEL, CLIP, VAE, CONDITIONING, ...)."""

    kind: str
    label: str
    parts: tuple[str, ...] = ()

    def with_part(self, part: str) -> SimObject:
        """A copy with one more modification (a LoRA, a clip layer)."""
        return SimObject(self.kind, self.label, (*self.parts, part))

    def __str__(self) -> str:
        extra = "".join(f" + {p}" for p in self.parts)
        return f"<fake {self.kind}: {self.label}{extra}>"


# --- node definitions ---------------------------------------------------------------------

RunFn = Callable[[NodeContext, dict[str, Any]], Awaitable[NodeResult]]
ComboFn = Callable[[FakePaths], list[str]]
ValidateFn = Callable[[FakePaths, dict[str, Any]], "bool | str"]
IsChangedFn = Callable[[FakePaths, dict[str, Any]], Any]


@dataclass
class NodeDef:
    """One node type: its ``object_info`` entry and how the fake runs it."""

    class_type: str
    info: dict[str, Any]
    run: RunFn
    combos: dict[str, ComboFn] = field(default_factory=dict)
    validate: ValidateFn | None = None
    validate_inputs: tuple[str, ...] = ()
    is_changed: IsChangedFn | None = None
    wildcard: bool = False

    @property
    def output_node(self) -> bool:
        """Whether ComfyUI runs it as an output (``OUTPUT_NODE``)."""
        return bool(self.info.get("output_node"))

    @property
    def return_types(self) -> tuple[Any, ...]:
        """``RETURN_TYPES``."""
        return tuple(self.info.get("output", ()))

    @property
    def hidden(self) -> dict[str, str]:
        """Hidden inputs (``prompt``, ``extra_pnginfo``, ``unique_id``)."""
        hidden = self.info.get("input", {}).get("hidden", {})
        return dict(hidden) if isinstance(hidden, dict) else {}

    def input_types(self, paths: FakePaths) -> dict[str, dict[str, Any]]:
        """``INPUT_TYPES()`` now, with combos listing the files that exist at this moment."""
        result: dict[str, dict[str, Any]] = {}
        for category, inputs in self.info.get("input", {}).items():
            result[category] = dict(inputs)
        for name, combo in self.combos.items():
            for inputs in result.values():
                if name in inputs:
                    spec = list(inputs[name])
                    spec[0] = combo(paths)
                    inputs[name] = spec
        return result

    def object_info(self, paths: FakePaths) -> dict[str, Any]:
        """The ``GET /object_info`` entry."""
        entry = dict(self.info)
        entry["input"] = self.input_types(paths)
        return entry


_BUILTIN_INFO: dict[str, Any] | None = None


def _builtin_info() -> dict[str, Any]:
    global _BUILTIN_INFO
    if _BUILTIN_INFO is None:
        text = (
            resources.files("comfytrio.testing")
            .joinpath("object_info.json")
            .read_text(encoding="utf-8")
        )
        _BUILTIN_INFO = json.loads(text)
    return _BUILTIN_INFO


class NodeRegistry:
    """The node types one fake server knows (built-ins plus declared custom nodes)."""

    def __init__(self) -> None:
        info = _builtin_info()
        self._nodes: dict[str, NodeDef] = {}
        for class_type, spec in _SIMULATIONS.items():
            run, extra = spec
            self._nodes[class_type] = NodeDef(
                class_type, json.loads(json.dumps(info[class_type])), run, **extra
            )

    def get(self, class_type: Any) -> NodeDef | None:
        """The node type, or None when this server does not have it."""
        return self._nodes.get(class_type)

    def __contains__(self, class_type: object) -> bool:
        return class_type in self._nodes

    def names(self) -> list[str]:
        """Every class_type, in ``object_info`` order."""
        return list(self._nodes)

    def add(self, node: NodeDef) -> None:
        """Add or replace a node type."""
        self._nodes[node.class_type] = node

    def object_info(self, paths: FakePaths) -> dict[str, Any]:
        """The whole ``GET /object_info`` answer."""
        return {name: node.object_info(paths) for name, node in self._nodes.items()}


def _normalize_input(spec: Any) -> list[Any]:
    """``"MODEL"`` / ``["INT", {...}]`` / ``["a", "b"]`` (combo) into ComfyUI's spec list."""
    if isinstance(spec, str):
        return [spec]
    items = list(spec)
    if not items:
        raise ValueError("an input spec cannot be empty")
    if isinstance(items[0], (list, tuple)):
        return [list(items[0]), *items[1:]]
    if len(items) == 1:
        return [items[0]]
    if len(items) == 2 and isinstance(items[1], Mapping):
        return [items[0], dict(items[1])]
    return [[str(x) for x in items]]


def declared_node(
    class_type: str,
    *,
    inputs: Mapping[str, Any] | None = None,
    optional: Mapping[str, Any] | None = None,
    outputs: Sequence[str] = (),
    output_names: Sequence[str] | None = None,
    output_node: bool = False,
    category: str = "custom",
    display_name: str | None = None,
    run: Callable[[dict[str, Any]], Any] | None = None,
    seconds: float = 0.0,
    info: Mapping[str, Any] | None = None,
) -> NodeDef:
    """Build a custom node type (see ``FakeComfyUI.declare_node``)."""
    if class_type == "SaveImageWebsocket" and inputs is None and info is None:
        return NodeDef(
            class_type,
            _SAVE_IMAGE_WEBSOCKET_INFO,
            _save_image_websocket,
            is_changed=lambda _p, _i: time.time(),
        )
    if info is not None:
        entry = json.loads(json.dumps(info))
    else:
        required = {k: _normalize_input(v) for k, v in (inputs or {}).items()}
        opt = {k: _normalize_input(v) for k, v in (optional or {}).items()}
        input_section: dict[str, Any] = {"required": required}
        order: dict[str, Any] = {"required": list(required)}
        if opt:
            input_section["optional"] = opt
            order["optional"] = list(opt)
        entry = {
            "input": input_section,
            "input_order": order,
            "output": list(outputs),
            "output_is_list": [False] * len(outputs),
            "output_name": list(output_names or outputs),
            "name": class_type,
            "display_name": display_name or class_type,
            "description": "",
            "python_module": "custom_nodes.comfytrio_fake",
            "category": category,
            "output_node": output_node,
        }
    entry.setdefault("name", class_type)
    return NodeDef(class_type, entry, _declared_runner(entry, run, seconds), wildcard=True)


def _declared_runner(
    entry: Mapping[str, Any], run: Callable[[dict[str, Any]], Any] | None, seconds: float
) -> RunFn:
    outputs = list(entry.get("output", []))
    declared: dict[str, Any] = {}
    for section in ("required", "optional"):
        declared.update(entry.get("input", {}).get(section, {}) or {})

    async def runner(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
        if seconds:
            await ctx.gpu_sleep(seconds)
        if run is not None:
            result = run(dict(inputs))
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, Mapping):
                ui = result.get("ui")
                return tuple(result.get("result", ())), dict(ui) if ui else None
            if result is None:
                return (), None
            return tuple(result), None
        values: list[Any] = []
        for kind in outputs:
            found = _NO_VALUE
            for name, spec in declared.items():
                if name in inputs and spec and spec[0] == kind:
                    found = inputs[name]
                    break
            if found is _NO_VALUE:
                found = _default_for(kind, str(entry.get("name", "custom")))
            values.append(found)
        return tuple(values), None

    return runner


_NO_VALUE = object()


def _default_for(kind: Any, label: str) -> Any:
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(
        kind if isinstance(kind, str) else "", SimObject(str(kind), label)
    )


# --- helpers ------------------------------------------------------------------------------


def _rgb(color: int) -> tuple[int, int, int]:
    return ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)


def _digest_color(key: str) -> tuple[int, int, int]:
    d = hashlib.sha256(key.encode()).digest()
    return (d[0], d[1], d[2])


_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bislerp": Image.Resampling.BICUBIC,
}


def _target_size(w: int, h: int, width: int, height: int) -> tuple[int, int]:
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


def _scale(frames: Images, method: str, width: int, height: int, crop: str) -> Images:
    if not frames.frames:
        return frames
    w, h = frames.width, frames.height
    width, height = _target_size(w, h, width, height)
    result = []
    for frame in frames.frames:
        source = _crop_center(frame, width, height) if crop == "center" else frame
        result.append(
            source.resize((width, height), _RESAMPLE.get(method, Image.Resampling.BILINEAR))
        )
    return Images(result, width, height, charged=frames.charged)


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
    if ctx.disable_metadata:
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
        await ctx.gpu_sleep(ctx.seconds_per_image * len(images.frames))


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


# --- simulations --------------------------------------------------------------------------


async def _primitive(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return (inputs["value"],), None


async def _empty_image(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    width, height = int(inputs["width"]), int(inputs["height"])
    count = int(inputs["batch_size"])

    def make() -> Images:
        frame = Image.new("RGB", (width, height), _rgb(int(inputs["color"])))
        return Images([frame] * max(count, 0), width, height)

    return (await ctx.in_thread(make),), None


def _load_image_node(default: str) -> RunFn:
    async def run(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
        base = ctx.paths.output if default == "output" else ctx.paths.input
        path = ctx.paths.annotated_path(str(inputs["image"]), base)
        images, masks = await ctx.in_thread(lambda: _load_image(path))
        return (images, masks), None

    return run


def _validate_image_file(default: str) -> ValidateFn:
    def check(paths: FakePaths, inputs: dict[str, Any]) -> bool | str:
        image = inputs.get("image")
        base = paths.output if default == "output" else paths.input
        if not isinstance(image, str) or not paths.annotated_path(image, base).exists():
            return f"Invalid image file: {image}"
        return True

    return check


def _file_hash(default: str) -> IsChangedFn:
    def digest(paths: FakePaths, inputs: dict[str, Any]) -> Any:
        base = paths.output if default == "output" else paths.input
        try:
            data = paths.annotated_path(str(inputs.get("image")), base).read_bytes()
        except OSError:
            return "missing"
        return hashlib.sha256(data).hexdigest()

    return digest


def _save_node(kind: str) -> RunFn:
    async def run(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
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

    return run


async def _save_image_websocket(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    images: Images = inputs["images"]
    for step, frame in enumerate(images.frames):
        await ctx.progress(step, len(images.frames), frame)
    return (), None


def _image_op(fn: Callable[[Images, dict[str, Any]], Images]) -> RunFn:
    async def run(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
        images = inputs["image"]
        return (await ctx.in_thread(lambda: fn(images, inputs)),), None

    return run


def _map_frames(images: Images, op: Callable[[Image.Image], Image.Image]) -> Images:
    frames = [op(f) for f in images.frames]
    if frames:
        return Images(frames, charged=images.charged)
    return Images([], images.width, images.height, charged=images.charged)


def _crop(images: Images, inputs: dict[str, Any]) -> Images:
    x = min(int(inputs["x"]), images.width - 1)
    y = min(int(inputs["y"]), images.height - 1)
    right = min(images.width, x + int(inputs["width"]))
    bottom = min(images.height, y + int(inputs["height"]))
    return _map_frames(images, lambda f: f.crop((x, y, right, bottom)))


def _rotate(images: Images, inputs: dict[str, Any]) -> Images:
    turn = {
        "90 degrees": Image.Transpose.ROTATE_270,
        "180 degrees": Image.Transpose.ROTATE_180,
        "270 degrees": Image.Transpose.ROTATE_90,
    }.get(str(inputs["rotation"]))
    return images if turn is None else _map_frames(images, lambda f: f.transpose(turn))


def _flip(images: Images, inputs: dict[str, Any]) -> Images:
    how = (
        Image.Transpose.FLIP_TOP_BOTTOM
        if str(inputs["flip_method"]).startswith("x")
        else Image.Transpose.FLIP_LEFT_RIGHT
    )
    return _map_frames(images, lambda f: f.transpose(how))


def _blur(images: Images, inputs: dict[str, Any]) -> Images:
    if int(inputs["blur_radius"]) == 0:
        return images
    sigma = float(inputs["sigma"])
    return _map_frames(images, lambda f: f.filter(ImageFilter.GaussianBlur(sigma)))


def _from_batch(images: Images, inputs: dict[str, Any]) -> Images:
    count = len(images.frames)
    index = min(count - 1, int(inputs["batch_index"]))
    length = min(count - index, int(inputs["length"]))
    return Images(
        images.frames[index : index + length], images.width, images.height, charged=images.charged
    )


async def _image_batch(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    first: Images = inputs["image1"]
    second: Images = inputs["image2"]
    if second.frames and (second.width, second.height) != (first.width, first.height):
        second = _scale(second, "bilinear", first.width, first.height, "center")
    return (Images(first.frames + second.frames, first.width, first.height),), None


async def _repeat_images(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    images: Images = inputs["image"]
    frames = images.frames * int(inputs["amount"])
    return (Images(frames, images.width, images.height, charged=images.charged),), None


async def _get_image_size(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    images: Images = inputs["image"]
    width, height, count = images.width, images.height, len(images.frames)
    if inputs.get("unique_id"):
        ctx.send_text(f"width: {width}, height: {height}\n batch size: {count}")
    return (width, height, count), None


async def _string_concatenate(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return (f"{inputs['string_a']}{inputs['delimiter']}{inputs['string_b']}",), None


async def _string_length(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return (len(str(inputs["string"])),), None


async def _solid_mask(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    level = round(float(inputs["value"]) * 255)
    size = (int(inputs["width"]), int(inputs["height"]))
    return (Masks([Image.new("L", size, level)]),), None


async def _image_to_mask(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    images: Images = inputs["image"]
    channel = ["red", "green", "blue", "alpha"].index(str(inputs["channel"]))
    if channel == 3:
        raise IndexError("index 3 is out of bounds for dimension 3 with size 3")
    return (Masks([f.getchannel(channel) for f in images.frames]),), None


async def _mask_to_image(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    masks: Masks = inputs["mask"]
    return (Images([m.convert("RGB") for m in masks.frames]),), None


async def _invert_mask(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    masks: Masks = inputs["mask"]
    return (Masks([ImageOps.invert(m) for m in masks.frames]),), None


# model side


def _model_file(ctx: NodeContext, folder: str, name: Any) -> str:
    if ctx.paths.find_model(folder, str(name)) is None:
        raise FileNotFoundError(f"Model in folder '{folder}' with filename '{name}' not found.")
    return str(name)


async def _checkpoint_loader(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    name = _model_file(ctx, "checkpoints", inputs["ckpt_name"])
    return (SimObject("MODEL", name), SimObject("CLIP", name), SimObject("VAE", name)), None


async def _lora_loader(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    model: SimObject = inputs["model"]
    clip: SimObject = inputs["clip"]
    s_model, s_clip = float(inputs["strength_model"]), float(inputs["strength_clip"])
    if s_model == 0 and s_clip == 0:
        return (model, clip), None
    name = _model_file(ctx, "loras", inputs["lora_name"])
    return (
        model.with_part(f"lora {name} ({s_model:g})"),
        clip.with_part(f"lora {name} ({s_clip:g})"),
    ), None


async def _lora_model_only(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    model: SimObject = inputs["model"]
    strength = float(inputs["strength_model"])
    if strength == 0:
        return (model,), None
    name = _model_file(ctx, "loras", inputs["lora_name"])
    return (model.with_part(f"lora {name} ({strength:g})"),), None


def _vae_names(paths: FakePaths) -> list[str]:
    names = list(paths.list_models("vae") or [])
    approx = paths.list_models("vae_approx") or []
    for family, enc, dec in (
        ("taesd", "taesd_encoder.", "taesd_decoder."),
        ("taesdxl", "taesdxl_encoder.", "taesdxl_decoder."),
        ("taesd3", "taesd3_encoder.", "taesd3_decoder."),
        ("taef1", "taef1_encoder.", "taef1_decoder."),
    ):
        if any(a.startswith(enc) for a in approx) and any(a.startswith(dec) for a in approx):
            names.append(family)
    names.append("pixel_space")
    return names


async def _vae_loader(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    name = str(inputs["vae_name"])
    if name not in ("pixel_space", "taesd", "taesdxl", "taesd3", "taef1"):
        _model_file(ctx, "vae", name)
    return (SimObject("VAE", name),), None


def _simple_loader(folder: str, kind: str, *names: str) -> RunFn:
    async def run(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
        files = [_model_file(ctx, folder, inputs[n]) for n in names]
        return (SimObject(kind, " + ".join(files)),), None

    return run


async def _clip_set_last_layer(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    clip: SimObject = inputs["clip"]
    return (clip.with_part(f"last layer {inputs['stop_at_clip_layer']}"),), None


async def _clip_text_encode(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    clip = inputs["clip"]
    if clip is None:
        raise RuntimeError("ERROR: clip input is invalid: None")
    return (SimObject("CONDITIONING", str(inputs["text"]), (str(clip),)),), None


async def _conditioning_combine(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    a, b = inputs["conditioning_1"], inputs["conditioning_2"]
    return (
        SimObject("CONDITIONING", f"{getattr(a, 'label', a)} | {getattr(b, 'label', b)}"),
    ), None


async def _controlnet_apply(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    net = str(inputs["control_net"])
    pos: SimObject = inputs["positive"]
    neg: SimObject = inputs["negative"]
    return (pos.with_part(net), neg.with_part(net)), None


async def _empty_latent(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    count = int(inputs["batch_size"])
    return (Latent(["empty"] * count, int(inputs["width"]) // 8, int(inputs["height"]) // 8),), None


def _sampler(advanced: bool) -> RunFn:
    async def run(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
        latent: Latent = inputs["latent_image"]
        steps = int(inputs["steps"])
        seed = int(inputs["noise_seed"] if advanced else inputs["seed"])
        if advanced:
            start = int(inputs["start_at_step"])
            end = min(int(inputs["end_at_step"]), steps)
            total = max(end - start, 0)
        else:
            total = steps
        positive = getattr(inputs["positive"], "label", str(inputs["positive"]))
        model = str(inputs["model"])
        for step in range(total):
            await ctx.gpu_sleep(ctx.seconds_per_step * len(latent.items))
            await ctx.progress(step + 1, total)
        items = [
            f"{model}|{positive}|{seed}|{i}|{item}|{inputs['sampler_name']}|{inputs['cfg']}"
            for i, item in enumerate(latent.items)
        ]
        return (Latent(items, latent.width, latent.height),), None

    return run


async def _vae_encode(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    images: Images = inputs["pixels"]

    def encode() -> Latent:
        keys = [hashlib.sha256(f.tobytes()).hexdigest()[:16] for f in images.frames]
        return Latent([f"pixels {k}" for k in keys], images.width // 8, images.height // 8)

    return (await ctx.in_thread(encode),), None


async def _vae_decode(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    latent: Latent = inputs["samples"]
    await ctx.gpu_sleep(ctx.seconds_per_image * len(latent.items))
    size = (latent.width * 8, latent.height * 8)

    def decode() -> Images:
        frames = []
        for item in latent.items:
            frame = Image.new("RGB", size, _digest_color(item))
            inner = (size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4)
            frame.paste(_digest_color(item + "/inner"), inner)
            frames.append(frame)
        return Images(frames, size[0], size[1], charged=True)

    return (await ctx.in_thread(decode),), None


async def _repeat_latent(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    latent: Latent = inputs["samples"]
    return (Latent(latent.items * int(inputs["amount"]), latent.width, latent.height),), None


async def _latent_upscale(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    latent: Latent = inputs["samples"]
    width, height = int(inputs["width"]), int(inputs["height"])
    if width == 0 and height == 0:
        return (latent,), None
    w, h = _target_size(latent.width * 8, latent.height * 8, width, height)
    return (Latent(list(latent.items), max(w // 8, 1), max(h // 8, 1)),), None


async def _latent_upscale_by(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    latent: Latent = inputs["samples"]
    scale = float(inputs["scale_by"])
    return (
        Latent(list(latent.items), round(latent.width * scale), round(latent.height * scale)),
    ), None


def _scale_node(images: Images, inputs: dict[str, Any]) -> Images:
    return _scale(
        images,
        str(inputs["upscale_method"]),
        int(inputs["width"]),
        int(inputs["height"]),
        str(inputs["crop"]),
    )


def _scale_by_node(images: Images, inputs: dict[str, Any]) -> Images:
    scale = float(inputs["scale_by"])
    return _scale(
        images,
        str(inputs["upscale_method"]),
        round(images.width * scale),
        round(images.height * scale),
        "disabled",
    )


def _models(folder: str) -> ComboFn:
    return lambda paths: paths.list_models(folder) or []


_SIMULATIONS: dict[str, tuple[RunFn, dict[str, Any]]] = {
    "PrimitiveInt": (_primitive, {}),
    "PrimitiveFloat": (_primitive, {}),
    "PrimitiveString": (_primitive, {}),
    "PrimitiveStringMultiline": (_primitive, {}),
    "PrimitiveBoolean": (_primitive, {}),
    "EmptyImage": (_empty_image, {}),
    "LoadImage": (
        _load_image_node("input"),
        {
            "combos": {"image": lambda p: p.input_images()},
            "validate": _validate_image_file("input"),
            "validate_inputs": ("image",),
            "is_changed": _file_hash("input"),
        },
    ),
    "LoadImageOutput": (
        _load_image_node("output"),
        {
            "validate": _validate_image_file("output"),
            "validate_inputs": ("image",),
            "is_changed": _file_hash("output"),
        },
    ),
    "SaveImage": (_save_node("output"), {}),
    "PreviewImage": (_save_node("temp"), {}),
    "ImageScale": (_image_op(_scale_node), {}),
    "ImageScaleBy": (_image_op(_scale_by_node), {}),
    "ImageInvert": (_image_op(lambda im, _i: _map_frames(im, ImageOps.invert)), {}),
    "ImageCrop": (_image_op(_crop), {}),
    "ImageBlur": (_image_op(_blur), {}),
    "ImageFlip": (_image_op(_flip), {}),
    "ImageRotate": (_image_op(_rotate), {}),
    "RepeatImageBatch": (_repeat_images, {}),
    "ImageBatch": (_image_batch, {}),
    "ImageFromBatch": (_image_op(_from_batch), {}),
    "GetImageSize": (_get_image_size, {}),
    "StringConcatenate": (_string_concatenate, {}),
    "StringLength": (_string_length, {}),
    "SolidMask": (_solid_mask, {}),
    "ImageToMask": (_image_to_mask, {}),
    "MaskToImage": (_mask_to_image, {}),
    "InvertMask": (_invert_mask, {}),
    "CheckpointLoaderSimple": (
        _checkpoint_loader,
        {"combos": {"ckpt_name": _models("checkpoints")}},
    ),
    "LoraLoader": (_lora_loader, {"combos": {"lora_name": _models("loras")}}),
    "LoraLoaderModelOnly": (_lora_model_only, {"combos": {"lora_name": _models("loras")}}),
    "VAELoader": (_vae_loader, {"combos": {"vae_name": _vae_names}}),
    "CLIPLoader": (
        _simple_loader("text_encoders", "CLIP", "clip_name"),
        {"combos": {"clip_name": _models("text_encoders")}},
    ),
    "DualCLIPLoader": (
        _simple_loader("text_encoders", "CLIP", "clip_name1", "clip_name2"),
        {
            "combos": {
                "clip_name1": _models("text_encoders"),
                "clip_name2": _models("text_encoders"),
            },
        },
    ),
    "UNETLoader": (
        _simple_loader("diffusion_models", "MODEL", "unet_name"),
        {"combos": {"unet_name": _models("diffusion_models")}},
    ),
    "CLIPSetLastLayer": (_clip_set_last_layer, {}),
    "CLIPTextEncode": (_clip_text_encode, {}),
    "ConditioningCombine": (_conditioning_combine, {}),
    "ControlNetLoader": (
        _simple_loader("controlnet", "CONTROL_NET", "control_net_name"),
        {"combos": {"control_net_name": _models("controlnet")}},
    ),
    "ControlNetApplyAdvanced": (_controlnet_apply, {}),
    "EmptyLatentImage": (_empty_latent, {}),
    "KSampler": (_sampler(advanced=False), {}),
    "KSamplerAdvanced": (_sampler(advanced=True), {}),
    "VAEEncode": (_vae_encode, {}),
    "VAEDecode": (_vae_decode, {}),
    "RepeatLatentBatch": (_repeat_latent, {}),
    "LatentUpscale": (_latent_upscale, {}),
    "LatentUpscaleBy": (_latent_upscale_by, {}),
}

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


def encode_preview(frame: Image.Image) -> bytes:
    """A PNG of ``frame`` (for binary preview frames)."""
    buffer = BytesIO()
    frame.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
