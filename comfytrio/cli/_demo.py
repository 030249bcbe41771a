"""``comfytrio demo``: a split batch on bundled fake ComfyUI servers, through the real code path.

The fake servers are laid out as a ComfyUI install (a ``main.py`` that takes ComfyUI's flags)
and started by ``ComfyAPI`` as child processes, exactly as a real install would be.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from .. import ComfyUIInstance, GPUInfo, WorkflowOptions, make_plugin_manager
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_number,
    add_path,
    err,
    free_ports,
    setup_logging,
)
from ._job import Job, Setup, make_display, run_job

__all__ = ["DEMO_CHECKPOINT", "DEMO_WORKFLOW", "add_demo_arguments", "demo", "demo_picture"]

DEMO_CHECKPOINT = "demo.safetensors"
"""The (dummy) checkpoint the demo's fake servers load."""


def _node(class_type: str, title: str, **inputs: Any) -> dict[str, Any]:
    """A node as "Save (API)" writes it: its class, its inputs, its title."""
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


DEMO_WORKFLOW: dict[str, Any] = {
    "1": _node("PrimitiveInt", "API - BATCH SIZE", value=4),
    "2": _node("PrimitiveString", "API - PROMPT", value="a lighthouse at dusk"),
    "3": _node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=DEMO_CHECKPOINT),
    "4": _node("CLIPTextEncode", "Positive", text=["2", 0], clip=["3", 1]),
    "5": _node("CLIPTextEncode", "Negative", text="blurry", clip=["3", 1]),
    "6": _node(
        "EmptyLatentImage", "Empty Latent Image", width=256, height=256, batch_size=["1", 0]
    ),
    "7": _node(
        "KSampler",
        "KSampler",
        model=["3", 0],
        positive=["4", 0],
        negative=["5", 0],
        latent_image=["6", 0],
        seed=42,
        steps=4,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    ),
    "8": _node("VAEDecode", "VAE Decode", samples=["7", 0], vae=["3", 2]),
    "9": _node("SaveImage", "Save Image", images=["8", 0], filename_prefix="demo"),
    "10": _node("LoadImage", "API - PICTURE", image="example.png"),
    "11": _node("ImageInvert", "Invert", image=["10", 0]),
    "12": _node("SaveImage", "Save Inverted", images=["11", 0], filename_prefix="inverted"),
}
"""The demo's workflow, as exported with "Save (API)": txt2img with the seed in the
KSampler (the fake's simulated model: no weights), and a picture inverted."""

_SPLITS = {
    "single": "one shard: the workflow as given",
    "same-images": "image i is image i of the whole batch on one server, cut with LatentFromBatch",
    "distinct": "each shard draws its own part of the batch; not one server's images",
    "distinct-seeds": "each shard got seeds of its own: no image repeats",
    "unseeded": "nothing seeds the shards apart",
}


def demo_picture() -> bytes:
    """A small red PNG: the demo's input picture."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (128, 96), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Every argument of ``comfytrio demo``."""
    add_path(
        parser,
        "--dir",
        "DIR",
        "where the fake install, instances and images go (default: ./comfytrio-demo)",
        default=Path("comfytrio-demo"),
    )
    add_number(parser, "--instances", int, 2, "fake servers (default 2)")
    add_number(
        parser, "--batch", int, 4, "images in the batch, split across the servers (default 4)"
    )
    add_number(
        parser, "--seconds-per-image", float, 0.05, "simulated GPU seconds per image (default 0.05)"
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const="none",
        default="auto",
        help="no live display (it is only shown on a terminal anyway)",
    )


def _demo_job(batch: int, picture: bytes) -> Job:
    params: dict[str, dict[str, Any]] = {
        "batch_size": {
            "type": "integer",
            "value": batch,
            "gpu_scale": True,
            "node_mappings": "API - BATCH SIZE",
        },
        "prompt": {"type": "string", "value": "demo", "node_mappings": "API - PROMPT"},
        "picture": {"type": "image", "value": picture, "node_mappings": "API - PICTURE"},
    }
    return Job(dict(DEMO_WORKFLOW), WorkflowOptions(params=params))


def demo(args: argparse.Namespace) -> int:
    """``comfytrio demo``: lay out a fake install, run the batch on it, print the images."""
    try:
        from ..testing import lay_out_fake_comfyui_install

        picture = demo_picture()
    except ImportError as exc:  # the testing extra is missing
        err(f"comfytrio demo needs the testing extra: pip install 'comfytrio[testing]' ({exc})")
        return EXIT_USAGE
    if args.instances < 1 or args.batch < 1:
        err("comfytrio demo: error: --instances and --batch must be at least 1")
        return EXIT_USAGE
    display, console = make_display(args)
    if console is None:
        display = None  # no status lines for the demo: its output is the report below
    setup_logging(0, console)
    work = args.dir.resolve()
    install = lay_out_fake_comfyui_install(work / "ComfyUI")
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    setup = Setup(
        targets=[ComfyUIInstance(install, port) for port in free_ports(args.instances)],
        models_path=models,
        gpu=GPUInfo(cuda_available=False, device_count=args.instances),
        ready_timeout=60.0,
        state_dir=work / "instances",
        plugins=make_plugin_manager(),
        env={"COMFYTRIO_FAKE_SECONDS_PER_IMAGE": str(args.seconds_per_image)},
    )
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    (models / "checkpoints" / DEMO_CHECKPOINT).write_bytes(b"fake model weights")
    print(f"Starting {args.instances} fake ComfyUI servers under {work} ...", flush=True)
    code, result = run_job(setup, _demo_job(args.batch, picture), display, as_json=False)
    if result is None:
        return code
    for shard in result.shards:
        print(
            f"shard {shard.index} on {shard.instance}: {shard.scaled} from batch index "
            f"{shard.batch_offset}, seeds={shard.seeds}"
        )
    print(f"split: {result.split}: {_SPLITS.get(result.split, '')}")
    indices = [str(o.batch_index) for o in result.outputs if o.batch_index is not None]
    others = len(result.outputs) - len(indices)
    print(
        f"{len(result.outputs)} images (job {result.job_id}, "
        f"{result.finished_at - result.started_at:.2f} s), one path a line: batch indices "
        f"{', '.join(indices) or 'none'}"
        + (f", then {others} not from the batch:" if others else ":")
    )
    for output in result.outputs:
        print(f"  {output.path}")
    return EXIT_OK if result.ok else EXIT_FAILED
