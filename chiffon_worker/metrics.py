"""Host metrics for heartbeats: CPU and memory from psutil, GPU memory from NVML.

NVML is initialised once. A host without a GPU or without the NVIDIA driver
reports zeros and says so in one log line, never an exception per heartbeat.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import resource
import threading
import time
from types import ModuleType
from typing import Any

import psutil

logger = logging.getLogger(__name__)

_GIB = 1024**3


# The library pynvml itself loads on Linux.
NVML_LIBRARY = "libnvidia-ml.so.1"


def _load_nvml() -> ModuleType | None:
    """pynvml, or None where it cannot work.

    Without the driver's NVML library pynvml fails at nvmlInit() anyway; not
    importing it then keeps 2 MiB out of every GPU-less worker.
    """
    try:
        ctypes.CDLL(NVML_LIBRARY)
        return importlib.import_module("pynvml")
    except (OSError, ImportError):
        return None


class GpuProbe:
    """Reads per-GPU memory through an NVML module (pynvml, or a fake in tests)."""

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml = nvml if nvml is not None else _load_nvml()
        self._lock = threading.Lock()
        self._ready = False
        self._gave_up = False

    def _start(self) -> bool:
        if self._ready:
            return True
        if self._gave_up:
            return False
        try:
            if self._nvml is None:
                raise RuntimeError(f"no NVIDIA driver ({NVML_LIBRARY} not found) or no pynvml")
            self._nvml.nvmlInit()
        except Exception as exc:  # NVML raises its own error types, or OSError without a driver
            self._gave_up = True
            logger.info("no GPU metrics: GPU fields report zeros", extra={"reason": str(exc)})
            return False
        self._ready = True
        return True

    def sample(self) -> list[dict[str, Any]]:
        """One dict per GPU; an empty list where there is no GPU or NVML failed."""
        with self._lock:
            if not self._start():
                return []
            assert self._nvml is not None
            try:
                return [self._one(index) for index in range(self._nvml.nvmlDeviceGetCount())]
            except Exception as exc:  # a GPU falling off the bus must not stop heartbeats
                logger.warning("GPU metrics failed", extra={"reason": str(exc)})
                return []

    def _one(self, index: int) -> dict[str, Any]:
        assert self._nvml is not None
        handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        name = self._nvml.nvmlDeviceGetName(handle)
        return {
            "index": index,
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "vram_total_gb": round(memory.total / _GIB, 3),
            "vram_used_gb": round(memory.used / _GIB, 3),
            "vram_available_gb": round(memory.free / _GIB, 3),
        }

    def close(self) -> None:
        with self._lock:
            if self._ready and self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:  # shutting down; nothing useful to do with it
                    logger.debug("nvmlShutdown failed", exc_info=True)
            self._ready = False


class HostMetrics:
    """The `resources` object of a StatusUpdate."""

    def __init__(self, gpu: GpuProbe | None = None) -> None:
        self._gpu = gpu or GpuProbe()
        # cpu_percent(interval=None) compares with the previous call; prime it
        # so the first heartbeat is not a meaningless 0.0.
        psutil.cpu_percent(interval=None)

    def sample(self) -> dict[str, Any]:
        gpus = self._gpu.sample()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_percent": psutil.virtual_memory().percent,
            "gpu_vram_available_gb": round(sum(g["vram_available_gb"] for g in gpus), 3),
            "gpu_vram_total_gb": round(sum(g["vram_total_gb"] for g in gpus), 3),
            "gpus": gpus,
        }

    def close(self) -> None:
        self._gpu.close()


# (monotonic time of the reading, MiB): every result carries the peak, and a
# system call per task for a figure that only ever creeps up is waste.
_peak: tuple[float, float] = (float("-inf"), 0.0)
PEAK_REFRESH_SECONDS = 1.0


def peak_memory_mb() -> float:
    """This process's peak resident memory so far, at most a second old."""
    global _peak
    now = time.monotonic()
    read_at, peak = _peak
    if now - read_at >= PEAK_REFRESH_SECONDS:
        # Linux reports KiB.
        peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        _peak = (now, peak)
    return peak
