"""GPU detection with NVML (pynvml), kept apart so tests can replace it."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from ._errors import GPUDetectionError
from ._types import GPUInfo

__all__ = ["detect_gpus"]

logger = logging.getLogger("comfytrio.gpu")


def _load_nvml() -> Any:
    # The `pynvml` distribution (12+) warns on import that it wraps `nvidia-ml-py`; both give
    # the same `pynvml` module, and a user cannot act on that warning from our import.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The pynvml package is deprecated", FutureWarning)
        import pynvml

    return pynvml


def detect_gpus() -> GPUInfo:
    """Ask NVML how many CUDA devices this machine has.

    No NVIDIA driver or library means no GPU: ``GPUInfo(cuda_available=False,
    device_count=0)``. Raises ``GPUDetectionError`` when NVML starts but cannot count the
    devices (a broken driver), because running on the CPU by surprise would be worse.
    """
    try:
        nvml = _load_nvml()
        nvml.nvmlInit()
    except Exception as exc:  # the library or the driver is missing: a CPU-only machine
        logger.info("NVML unavailable (%s): no CUDA GPU", exc)
        return GPUInfo(cuda_available=False, device_count=0)
    try:
        count = int(nvml.nvmlDeviceGetCount())
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            logger.info("GPU %d: %s", index, name.decode() if isinstance(name, bytes) else name)
    except Exception as exc:
        raise GPUDetectionError(f"NVML started but could not list the GPUs: {exc}") from exc
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # pragma: no cover - shutdown failures change nothing
            logger.debug("nvmlShutdown failed", exc_info=True)
    return GPUInfo(cuda_available=count > 0, device_count=count)
