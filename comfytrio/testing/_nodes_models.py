"""Node family: the model side, simulated (no weights are read).

Loaders check that their file is listed and hand on a labelled ``SimObject``; text
encoders and LoRAs add to the label; samplers spend ``seconds_per_step`` per step and latent
and report progress; VAE decoders spend ``seconds_per_image`` per image and paint frames of
the latent's size in colours derived from what made the latent (model, prompt, seed...).
Samplers draw their simulated noise by ComfyUI's rule (``_noise_keys``): each item's from
the seed and its index in the batch (``batch_index``, as ``LatentFromBatch`` sets it), so a
split batch repeats images exactly where a real one would.
"""

from __future__ import annotations

import hashlib
from typing import Any

from PIL import Image

from ._nodes_base import ComboFn, Family, NodeContext, NodeResult
from ._nodes_images import target_size
from ._nodes_values import Images, Latent, SimObject
from ._paths import FakePaths

__all__ = ["NODES", "draws_noise_while_sampling"]

NODES = Family()
"""The loader, conditioning, sampler, latent and VAE nodes."""


def _models(folder: str) -> ComboFn:
    return lambda paths: paths.list_models(folder) or []


def _model_file(ctx: NodeContext, folder: str, name: Any) -> str:
    if ctx.paths.find_model(folder, str(name)) is None:
        raise FileNotFoundError(f"Model in folder '{folder}' with filename '{name}' not found.")
    return str(name)


# --- loaders ----------------------------------------------------------------------------------


@NODES.node("CheckpointLoaderSimple", combos={"ckpt_name": _models("checkpoints")})
async def _checkpoint_loader(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    name = _model_file(ctx, "checkpoints", inputs["ckpt_name"])
    return (SimObject("MODEL", name), SimObject("CLIP", name), SimObject("VAE", name)), None


@NODES.node("LoraLoader", combos={"lora_name": _models("loras")})
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


@NODES.node("LoraLoaderModelOnly", combos={"lora_name": _models("loras")})
async def _lora_model_only(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    model: SimObject = inputs["model"]
    strength = float(inputs["strength_model"])
    if strength == 0:
        return (model,), None
    name = _model_file(ctx, "loras", inputs["lora_name"])
    return (model.with_part(f"lora {name} ({strength:g})"),), None


_TAESD = ("taesd", "taesdxl", "taesd3", "taef1")


def _vae_names(paths: FakePaths) -> list[str]:
    names = list(paths.list_models("vae") or [])
    approx = paths.list_models("vae_approx") or []
    for family in _TAESD:
        halves = (f"{family}_encoder.", f"{family}_decoder.")
        if all(any(a.startswith(half) for a in approx) for half in halves):
            names.append(family)
    names.append("pixel_space")
    return names


@NODES.node("VAELoader", combos={"vae_name": _vae_names})
async def _vae_loader(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    name = str(inputs["vae_name"])
    if name != "pixel_space" and name not in _TAESD:
        _model_file(ctx, "vae", name)
    return (SimObject("VAE", name),), None


def _simple_loader(class_type: str, folder: str, kind: str, *names: str) -> None:
    """Register ``class_type``: a loader that only opens the files its inputs ``names`` name
    in the model folder ``folder``, and hands on a ``kind`` labelled with them."""

    async def run(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
        files = [_model_file(ctx, folder, inputs[n]) for n in names]
        return (SimObject(kind, " + ".join(files)),), None

    NODES.node(class_type, combos=dict.fromkeys(names, _models(folder)))(run)


_simple_loader("CLIPLoader", "text_encoders", "CLIP", "clip_name")
_simple_loader("DualCLIPLoader", "text_encoders", "CLIP", "clip_name1", "clip_name2")
_simple_loader("UNETLoader", "diffusion_models", "MODEL", "unet_name")
_simple_loader("ControlNetLoader", "controlnet", "CONTROL_NET", "control_net_name")


# --- conditioning -------------------------------------------------------------------------------


@NODES.node("CLIPSetLastLayer")
async def _clip_set_last_layer(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    clip: SimObject = inputs["clip"]
    return (clip.with_part(f"last layer {inputs['stop_at_clip_layer']}"),), None


@NODES.node("CLIPTextEncode")
async def _clip_text_encode(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    clip = inputs["clip"]
    if clip is None:
        raise RuntimeError("ERROR: clip input is invalid: None")
    return (SimObject("CONDITIONING", str(inputs["text"]), (str(clip),)),), None


@NODES.node("ConditioningCombine")
async def _conditioning_combine(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    a, b = inputs["conditioning_1"], inputs["conditioning_2"]
    return (
        SimObject("CONDITIONING", f"{getattr(a, 'label', a)} | {getattr(b, 'label', b)}"),
    ), None


@NODES.node("ControlNetApplyAdvanced")
async def _controlnet_apply(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    net = str(inputs["control_net"])
    pos: SimObject = inputs["positive"]
    neg: SimObject = inputs["negative"]
    return (pos.with_part(net), neg.with_part(net)), None


# --- sampling and latents -----------------------------------------------------------------------


@NODES.node("EmptyLatentImage")
async def _empty_latent(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    count = int(inputs["batch_size"])
    return (Latent(["empty"] * count, int(inputs["width"]) // 8, int(inputs["height"]) // 8),), None


_NOISY_WORDS = frozenset({"ancestral", "sde", "ddpm", "lcm", "seeds", "sa"})
"""The words of a sampler's name that say it draws noise while it samples, as ComfyUI's
k-diffusion samplers are named for their method: ``*_ancestral`` (Euler, DPM-2, DPM++ 2S,
RES multistep), ``*_sde`` (DPM++ SDE, 2M/3M SDE, ER-SDE), ``ddpm``, ``lcm``, ``seeds_*``
(SEEDS) and ``sa_solver*`` (stochastic Adams)."""


def draws_noise_while_sampling(sampler: str) -> bool:
    """Whether ComfyUI's sampler ``sampler`` draws fresh noise for the whole batch at each
    step (as ``KSampler`` sets it), so that what it makes depends on the batch: a word of its
    name, between underscores, is one of ``_NOISY_WORDS``."""
    return not _NOISY_WORDS.isdisjoint(sampler.split("_"))


def _noise_keys(latent: Latent, seed: int, sampler: str, add_noise: bool) -> list[str]:
    """What each item's noise is a function of, as ``comfy.sample.prepare_noise`` draws it.

    With ``batch_index`` (``LatentFromBatch``), one ``torch.randn`` per sample for i = 0 ..
    max(index): item ``j`` gets the noise of sample ``batch_index[j]`` of the seed. Without,
    one ``torch.randn`` for the whole batch: item ``i`` gets sample ``i``'s noise, the same
    as with ``batch_index`` only when a sample holds a multiple of 16 values (torch draws
    normals 16 at a time; 4 channels here) or the batch holds one item. A stochastic
    sampler also draws noise for the whole batch at every step: its items depend on which
    indices are in the batch too."""
    count = len(latent.items)
    indices = latent.batch_index if latent.batch_index is not None else list(range(count))
    aligned = (
        latent.batch_index is not None or count == 1 or (4 * latent.width * latent.height) % 16 == 0
    )
    keys = []
    for index in indices:
        key = f"seed {seed} sample {index}" if add_noise else "no noise"
        if add_noise and not aligned:
            key += f" of a batch of {count}"
        if draws_noise_while_sampling(sampler):
            key += f", stepped with seed {seed} over samples {indices}"
        keys.append(key)
    return keys


async def _sample(
    ctx: NodeContext, inputs: dict[str, Any], seed: int, total: int, *, add_noise: bool = True
) -> NodeResult:
    """``total`` steps of simulated sampling; each latent item remembers what made it: the
    model, the prompt, its noise (``_noise_keys``), what it was, the sampler and the cfg."""
    latent: Latent = inputs["latent_image"]
    positive = getattr(inputs["positive"], "label", str(inputs["positive"]))
    model = str(inputs["model"])
    sampler = str(inputs["sampler_name"])
    for step in range(total):
        await ctx.gpu_sleep(ctx.settings.seconds_per_step * len(latent.items))
        await ctx.progress(step + 1, total)
    noises = _noise_keys(latent, seed, sampler, add_noise)
    items = [
        f"{model}|{positive}|{noise}|{item}|{sampler}|{inputs['cfg']}"
        for noise, item in zip(noises, latent.items, strict=True)
    ]
    return (Latent(items, latent.width, latent.height, latent.batch_index),), None


@NODES.node("KSampler")
async def _ksampler(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return await _sample(ctx, inputs, int(inputs["seed"]), int(inputs["steps"]))


@NODES.node("KSamplerAdvanced")
async def _ksampler_advanced(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    start = int(inputs["start_at_step"])
    end = min(int(inputs["end_at_step"]), int(inputs["steps"]))
    add_noise = inputs["add_noise"] != "disable"
    total = max(end - start, 0)
    return await _sample(ctx, inputs, int(inputs["noise_seed"]), total, add_noise=add_noise)


@NODES.node("RepeatLatentBatch")
async def _repeat_latent(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    latent: Latent = inputs["samples"]
    amount = int(inputs["amount"])
    index = latent.batch_index
    if index is not None:  # as ComfyUI: each copy's indices follow the last one's
        offset = max(index) - min(index) + 1
        index = index + [i + n * offset for n in range(1, amount) for i in index]
    return (Latent(latent.items * amount, latent.width, latent.height, index),), None


@NODES.node("LatentFromBatch")
async def _latent_from_batch(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    """Samples ``batch_index`` .. ``batch_index + length - 1`` (clamped to the batch, as
    ComfyUI does), with the indices they had: the ones given, or their positions."""
    latent: Latent = inputs["samples"]
    count = len(latent.items)
    start = min(count - 1, int(inputs["batch_index"]))
    length = min(count - start, int(inputs["length"]))
    cut = slice(start, start + length)
    index = latent.batch_index[cut] if latent.batch_index is not None else list(range(count))[cut]
    return (Latent(latent.items[cut], latent.width, latent.height, index),), None


@NODES.node("LatentUpscale")
async def _latent_upscale(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    latent: Latent = inputs["samples"]
    width, height = int(inputs["width"]), int(inputs["height"])
    if width == 0 and height == 0:
        return (latent,), None
    w, h = target_size(latent.width * 8, latent.height * 8, width, height)
    size = (max(w // 8, 1), max(h // 8, 1))
    return (Latent(list(latent.items), *size, latent.batch_index),), None


@NODES.node("LatentUpscaleBy")
async def _latent_upscale_by(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    latent: Latent = inputs["samples"]
    factor = float(inputs["scale_by"])
    size = (round(latent.width * factor), round(latent.height * factor))
    return (Latent(list(latent.items), *size, latent.batch_index),), None


# --- VAE ----------------------------------------------------------------------------------------


def _digest_color(key: str) -> tuple[int, int, int]:
    d = hashlib.sha256(key.encode()).digest()
    return (d[0], d[1], d[2])


@NODES.node("VAEEncode")
async def _vae_encode(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    images: Images = inputs["pixels"]

    def encode() -> Latent:
        keys = [hashlib.sha256(f.tobytes()).hexdigest()[:16] for f in images.frames]
        return Latent([f"pixels {k}" for k in keys], images.width // 8, images.height // 8)

    return (await ctx.in_thread(encode),), None


@NODES.node("VAEDecode")
async def _vae_decode(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    latent: Latent = inputs["samples"]
    await ctx.gpu_sleep(ctx.settings.seconds_per_image * len(latent.items))
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
