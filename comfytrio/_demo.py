"""``comfytrio demo``: a split batch on bundled fake ComfyUI servers, through the real code path.

The fake servers are laid out as a ComfyUI install (a ``main.py`` that takes ComfyUI's flags)
and started by ``ComfyAPI`` as child processes, exactly as a real install would be.
"""

from __future__ import annotations

import io
from typing import Any

__all__ = ["DEMO_WORKFLOW", "demo_picture"]

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
