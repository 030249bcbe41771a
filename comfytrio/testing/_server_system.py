"""What the fake says about itself: the ComfyUI version it imitates, ``GET /system_stats``
(its command line, memory and device) and ``GET /features``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COMFYUI_VERSION", "MAX_UPLOAD_SIZE", "SERVER_FEATURES", "SystemInfo"]

COMFYUI_VERSION = "0.3.64"
"""The ComfyUI version the fake imitates by default (the one recorded)."""

MAX_UPLOAD_SIZE = 100 * 1024 * 1024
"""``--max-upload-size`` (100 MB), in bytes."""

SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE}
"""``GET /features``, and the ``feature_flags`` websocket answer."""


def _ram() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3, 8 * 1024**3


@dataclass
class SystemInfo:
    """What ``/system_stats`` reports besides memory."""

    argv: list[str] = field(default_factory=lambda: ["main.py"])
    cpu: bool = True
    cuda_visible_devices: str | None = None
    version: str = COMFYUI_VERSION
    """The ``comfyui_version`` it reports (the server's profile sets it)."""

    def stats(self) -> dict[str, Any]:
        """The ``GET /system_stats`` body."""
        ram_total, ram_free = _ram()
        if self.cpu:
            device = {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": ram_total,
                "vram_free": ram_free,
                "torch_vram_total": ram_total,
                "torch_vram_free": ram_free,
            }
        else:
            visible = self.cuda_visible_devices
            label = (
                f"CUDA_VISIBLE_DEVICES={visible}"
                if visible is not None
                else ("CUDA_VISIBLE_DEVICES unset")
            )
            vram = 24 * 1024**3
            device = {
                "name": f"cuda:0 fake ({label})",
                "type": "cuda",
                "index": 0,
                "vram_total": vram,
                "vram_free": vram - 512 * 1024**2,
                "torch_vram_total": 0,
                "torch_vram_free": 0,
            }
        return {
            "system": {
                "os": os.name,
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": self.version,
                "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.95",
                "required_templates_version": "0.1.95",
                "python_version": sys.version,
                "pytorch_version": "0.0.0+comfytrio.fake",
                "embedded_python": False,
                "argv": list(self.argv),
            },
            "devices": [device],
        }
