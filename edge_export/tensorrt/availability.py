"""What this machine offers for the GPU paths, found without importing TensorRT or torch.

:func:`detect` looks for the ``tensorrt`` and ``torch_tensorrt`` modules without loading
them, counts CUDA devices through the driver library with ``ctypes`` and asks ONNX
Runtime for its providers. Where TensorRT or a CUDA device is missing,
:func:`require_tensorrt` raises :class:`TensorRTUnavailable` with the reason.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "TensorRTUnavailable",
    "Availability",
    "detect",
    "require_tensorrt",
    "torch_cuda",
    "INSTALL_HINT",
    "TRT_PROVIDER",
    "CUDA_PROVIDER",
    "CPU_PROVIDER",
]

TRT_PROVIDER = "TensorrtExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
INSTALL_HINT = (
    "install the GPU set in a CUDA environment (see docs/gpu.md: onnxruntime-gpu, tensorrt, torch-tensorrt)"
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT, a CUDA device or torch-tensorrt is missing; the message says which."""


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cuda_devices() -> tuple[str, ...]:
    """Names of the CUDA devices the driver sees (empty without a driver or device).

    The driver API through ctypes: no torch or CUDA toolkit needed, nothing heavy loaded.
    """
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return ()
    try:
        if cuda.cuInit(0) != 0:
            return ()
        count = ctypes.c_int(0)
        if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return ()
        names = []
        for i in range(count.value):
            dev = ctypes.c_int(0)
            buf = ctypes.create_string_buffer(256)
            if cuda.cuDeviceGet(ctypes.byref(dev), i) == 0 and cuda.cuDeviceGetName(buf, 256, dev) == 0:
                names.append(buf.value.decode(errors="replace"))
            else:
                names.append(f"cuda:{i}")
        return tuple(names)
    except (AttributeError, OSError):
        return ()


def _is_jetson() -> bool:
    # L4T writes this file on every Jetson; the device tree names the board too.
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return "jetson" in Path("/proc/device-tree/model").read_text(errors="ignore").lower()
    except OSError:
        return False


def _ort_providers() -> tuple[str, ...]:
    try:
        import onnxruntime as ort  # light enough; the device set has it anyway
    except ImportError:
        return ()
    return tuple(ort.get_available_providers())


@dataclass(frozen=True)
class Availability:
    """What this machine offers for the GPU paths."""

    tensorrt: str | None  # version, or "installed" when the module exists without metadata
    torch_tensorrt: str | None
    cuda_devices: tuple[str, ...]
    ort_providers: tuple[str, ...]
    jetson: bool
    machine: str = field(default_factory=platform.machine)

    def problem(self, *, need: str = "tensorrt") -> str | None:
        """Why a path cannot run here (None when it can): ``need`` is tensorrt, torch-tensorrt or ort-tensorrt."""
        missing = []
        if need == "tensorrt" and self.tensorrt is None:
            missing.append("TensorRT is not installed (no `tensorrt` Python module)")
        if need == "torch-tensorrt" and self.torch_tensorrt is None:
            missing.append("torch-tensorrt is not installed")
        if need == "ort-tensorrt" and TRT_PROVIDER not in self.ort_providers:
            missing.append(f"ONNX Runtime has no {TRT_PROVIDER} (the CPU onnxruntime package is installed)")
        if not self.cuda_devices:
            missing.append("no CUDA device (no NVIDIA driver or GPU visible)")
        if not missing:
            return None
        return "; ".join(missing) + f"; {INSTALL_HINT}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensorrt": self.tensorrt,
            "torch_tensorrt": self.torch_tensorrt,
            "cuda_devices": list(self.cuda_devices),
            "ort_providers": list(self.ort_providers),
            "jetson": self.jetson,
            "machine": self.machine,
            "tensorrt_builder_ready": self.problem(need="tensorrt") is None,
            "ort_tensorrt_ready": self.problem(need="ort-tensorrt") is None,
            "torch_tensorrt_ready": self.problem(need="torch-tensorrt") is None,
        }


def detect() -> Availability:
    """Find TensorRT, torch-tensorrt, CUDA devices and ORT providers without importing TensorRT."""
    trt = None
    if importlib.util.find_spec("tensorrt") is not None:
        trt = _dist_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11") or "installed"
    ttrt = _dist_version("torch-tensorrt", "torch_tensorrt") if importlib.util.find_spec("torch_tensorrt") else None
    return Availability(
        tensorrt=trt,
        torch_tensorrt=ttrt,
        cuda_devices=_cuda_devices(),
        ort_providers=_ort_providers(),
        jetson=_is_jetson(),
    )


def require_tensorrt(need: str = "tensorrt", availability: Availability | None = None) -> Availability:
    """Availability, or :class:`TensorRTUnavailable` saying what is missing."""
    av = availability or detect()
    problem = av.problem(need=need)
    if problem:
        raise TensorRTUnavailable(problem)
    return av


def torch_cuda():
    """torch with a CUDA device: device buffers for calibration and engine I/O."""
    try:
        import torch
    except ImportError:
        raise TensorRTUnavailable(f"torch is not installed; {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"this torch build sees no CUDA device (torch {torch.__version__}); {INSTALL_HINT}")
    return torch
