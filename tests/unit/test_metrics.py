"""Host metrics for heartbeats: zeros without a GPU, summed VRAM with GPUs, never a crash."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import pytest

from chiffon_worker import metrics
from chiffon_worker.metrics import GpuProbe, HostMetrics

GIB = 1024**3
LOGGER = "chiffon_worker.metrics"


@dataclass
class MemoryInfo:
    total: int
    used: int
    free: int


class FakeNvml:
    """The slice of pynvml that GpuProbe uses, for a host with the given GPUs."""

    def __init__(self, gpus: list[tuple[bytes, MemoryInfo]], init_error: Exception | None = None):
        self._gpus = gpus
        self._init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.init_calls += 1
        if self._init_error is not None:
            raise self._init_error

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> MemoryInfo:  # noqa: N802
        return self._gpus[handle][1]

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802
        return self._gpus[handle][0]


def as_module(fake: FakeNvml) -> ModuleType:
    return cast(ModuleType, fake)


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            (b"NVIDIA H200", MemoryInfo(total=80 * GIB, used=20 * GIB, free=60 * GIB)),
            (b"NVIDIA L4", MemoryInfo(total=24 * GIB, used=23 * GIB, free=1 * GIB)),
        ]
    )


def no_driver() -> FakeNvml:
    return FakeNvml([], init_error=OSError("libnvidia-ml.so.1: cannot open shared object file"))


def test_without_nvml_gpu_fields_are_zero() -> None:
    metrics = HostMetrics(GpuProbe(as_module(no_driver())))

    sample = metrics.sample()

    assert sample["gpu_vram_total_gb"] == 0
    assert sample["gpu_vram_available_gb"] == 0
    assert sample["gpus"] == []


def test_failed_nvml_init_is_logged_once_over_many_samples(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    nvml = no_driver()
    metrics = HostMetrics(GpuProbe(as_module(nvml)))

    for _ in range(5):
        metrics.sample()

    assert len([r for r in caplog.records if r.name == LOGGER]) == 1
    assert nvml.init_calls == 1


def test_each_gpu_is_reported_with_its_memory() -> None:
    metrics = HostMetrics(GpuProbe(as_module(two_gpus())))

    gpus = metrics.sample()["gpus"]

    assert gpus == [
        {
            "index": 0,
            "name": "NVIDIA H200",
            "vram_total_gb": 80.0,
            "vram_used_gb": 20.0,
            "vram_available_gb": 60.0,
        },
        {
            "index": 1,
            "name": "NVIDIA L4",
            "vram_total_gb": 24.0,
            "vram_used_gb": 23.0,
            "vram_available_gb": 1.0,
        },
    ]


def test_gpu_vram_totals_are_summed_over_gpus() -> None:
    sample = HostMetrics(GpuProbe(as_module(two_gpus()))).sample()

    assert sample["gpu_vram_total_gb"] == 104.0
    assert sample["gpu_vram_available_gb"] == 61.0


def test_gpu_failing_mid_run_reports_zeros_instead_of_raising() -> None:
    nvml = two_gpus()
    metrics = HostMetrics(GpuProbe(as_module(nvml)))
    metrics.sample()

    def fallen_off_the_bus(_index: int) -> Any:
        raise RuntimeError("GPU is lost")

    nvml.nvmlDeviceGetHandleByIndex = fallen_off_the_bus  # type: ignore[method-assign]

    assert metrics.sample()["gpus"] == []


@pytest.mark.parametrize("key", ["cpu_percent", "memory_percent"])
def test_cpu_and_memory_percent_are_within_zero_to_hundred(key: str) -> None:
    sample = HostMetrics(GpuProbe(as_module(no_driver()))).sample()

    assert 0 <= sample[key] <= 100


def test_close_shuts_nvml_down_once() -> None:
    nvml = two_gpus()
    metrics = HostMetrics(GpuProbe(as_module(nvml)))
    metrics.sample()

    metrics.close()
    metrics.close()

    assert nvml.shutdown_calls == 1


def test_close_without_a_working_nvml_does_not_shut_it_down() -> None:
    nvml = no_driver()
    metrics = HostMetrics(GpuProbe(as_module(nvml)))
    metrics.sample()

    metrics.close()

    assert nvml.shutdown_calls == 0


def test_without_the_nvml_library_pynvml_is_not_even_imported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ctypes
    import sys

    def no_library(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    probe = GpuProbe()
    with caplog.at_level(logging.INFO, logger="chiffon_worker.metrics"):
        assert probe.sample() == []
        assert probe.sample() == []
    assert "pynvml" not in sys.modules
    [record] = caplog.records
    assert "libnvidia-ml.so.1" in record.reason  # type: ignore[attr-defined]


def test_peak_memory_is_the_process_peak_read_again_once_it_is_a_second_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readings = iter([100 * 1024, 150 * 1024])  # ru_maxrss in KiB
    monkeypatch.setattr(
        metrics.resource, "getrusage", lambda _who: SimpleNamespace(ru_maxrss=next(readings))
    )
    clock = iter([1000.0, 1000.5, 1001.2])
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(metrics, "_peak", (float("-inf"), 0.0))

    assert metrics.peak_memory_mb() == 100.0
    assert metrics.peak_memory_mb() == 100.0  # half a second later: the same reading
    assert metrics.peak_memory_mb() == 150.0
