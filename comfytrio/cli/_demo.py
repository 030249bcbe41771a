"""``comfytrio demo``: a split batch on bundled fake ComfyUI servers, through the real code path.

The fake servers are laid out as a ComfyUI install (a ``main.py`` that takes ComfyUI's flags)
and started by ``ComfyAPI`` as child processes, exactly as a real install would be.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from .. import ComfyUIInstance, GPUInfo, make_plugin_manager
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

__all__ = ["DEMO_WORKFLOW", "add_demo_arguments", "demo", "demo_picture"]

DEMO_WORKFLOW: dict[str, Any] = {
    "1": {
        "class_type": "PrimitiveInt",
        "inputs": {"value": 4},
        "_meta": {"title": "API - BATCH SIZE"},
    },
    "2": {
        "class_type": "PrimitiveString",
        "inputs": {"value": "demo"},
        "_meta": {"title": "API - PROMPT"},
    },
    "3": {
        "class_type": "EmptyImage",
        "inputs": {"width": 256, "height": 256, "batch_size": ["1", 0], "color": 3355443},
        "_meta": {"title": "Empty Image"},
    },
    "4": {
        "class_type": "SaveImage",
        "inputs": {"images": ["3", 0], "filename_prefix": ["2", 0]},
        "_meta": {"title": "Save Image"},
    },
    "5": {
        "class_type": "LoadImage",
        "inputs": {"image": "example.png"},
        "_meta": {"title": "API - PICTURE"},
    },
    "6": {"class_type": "ImageInvert", "inputs": {"image": ["5", 0]}, "_meta": {"title": "Invert"}},
    "7": {
        "class_type": "SaveImage",
        "inputs": {"images": ["6", 0], "filename_prefix": "inverted"},
        "_meta": {"title": "Save Inverted"},
    },
}
"""The model-free workflow of the demo (as exported with "Save (API)")."""


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
    return Job(
        dict(DEMO_WORKFLOW),
        {
            "batch_size": {
                "type": "integer",
                "value": batch,
                "gpu_scale": True,
                "node_mappings": "API - BATCH SIZE",
            },
            "prompt": {"type": "string", "value": "demo", "node_mappings": "API - PROMPT"},
            "picture": {"type": "image", "value": picture, "node_mappings": "API - PICTURE"},
        },
    )


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
    print(f"Starting {args.instances} fake ComfyUI servers under {work} ...", flush=True)
    code, result = run_job(setup, _demo_job(args.batch, picture), display, as_json=False)
    if result is None:
        return code
    for shard in result.shards:
        print(f"shard {shard.index} on {shard.instance}: {shard.scaled} seeds={shard.seeds}")
    print(
        f"{len(result.outputs)} images (job {result.job_id}, "
        f"{result.finished_at - result.started_at:.2f} s):"
    )
    for output in result.outputs:
        print(f"  {output.path}")
    return EXIT_OK if result.ok else EXIT_FAILED
