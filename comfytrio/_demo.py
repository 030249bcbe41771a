"""``comfytrio demo``: a split batch on bundled fake ComfyUI servers, through the real code path.

The fake servers are laid out as a ComfyUI install (a ``main.py`` that takes ComfyUI's flags)
and started by ``ComfyAPI`` as child processes, exactly as a real install would be.
"""

from __future__ import annotations

import io
import logging
import socket
from pathlib import Path
from typing import Any

from ._api import ComfyAPI
from ._types import ComfyUIInstance, GPUInfo, JobResult

__all__ = ["DEMO_WORKFLOW", "run_demo"]

logger = logging.getLogger("comfytrio.demo")

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


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _picture() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (128, 96), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


async def run_demo(
    work_dir: Path, instances: int = 2, batch: int = 4, seconds_per_image: float = 0.05
) -> JobResult:
    """Start ``instances`` fake ComfyUI processes under ``work_dir`` and run a batch of
    ``batch`` images split across them, plus an inverted input picture on each.

    Needs the ``testing`` extra (the fake server). Returns the job's result.
    """
    from .testing import lay_out_fake_comfyui_install

    install = lay_out_fake_comfyui_install(work_dir / "ComfyUI")
    models = work_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    servers = [ComfyUIInstance(install, port) for port in _free_ports(instances)]
    async with ComfyAPI(
        servers,
        models,
        gpu=GPUInfo(cuda_available=False, device_count=instances),
        state_dir=work_dir / "instances",
        ready_timeout=60,
        env={"COMFYTRIO_FAKE_SECONDS_PER_IMAGE": str(seconds_per_image)},
    ) as api:
        return await api.run_workflow(
            DEMO_WORKFLOW,
            params={
                "batch_size": {
                    "type": "integer",
                    "value": batch,
                    "gpu_scale": True,
                    "node_mappings": "API - BATCH SIZE",
                },
                "prompt": {"type": "string", "value": "demo", "node_mappings": "API - PROMPT"},
                "picture": {"type": "image", "value": _picture(), "node_mappings": "API - PICTURE"},
            },
        )
