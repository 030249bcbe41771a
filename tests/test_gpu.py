"""GPU detection with NVML mocked (no GPU here or in CI)."""

from __future__ import annotations

from typing import Any

import pytest

from comfytrio import GPUDetectionError, GPUInfo, _gpu


class FakeNVML:
    def __init__(self, names: list[str], *, broken: bool = False) -> None:
        self.names = names
        self.broken = broken
        self.shutdown = False

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        if self.broken:
            raise RuntimeError("Unknown Error")
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.names[handle]

    def nvmlShutdown(self) -> None:
        self.shutdown = True


def test_counts_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNVML(["NVIDIA H100", "NVIDIA H100"])
    monkeypatch.setattr(_gpu, "_load_nvml", lambda: nvml)
    assert _gpu.detect_gpus() == GPUInfo(cuda_available=True, device_count=2)
    assert nvml.shutdown


def test_no_driver_means_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Any:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setattr(_gpu, "_load_nvml", missing)
    assert _gpu.detect_gpus() == GPUInfo(cuda_available=False, device_count=0)


def test_broken_driver_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gpu, "_load_nvml", lambda: FakeNVML(["x"], broken=True))
    with pytest.raises(GPUDetectionError, match="could not list"):
        _gpu.detect_gpus()
