"""TensorRT paths: the ONNX Runtime TensorRT EP, standalone engines, torch-tensorrt.

Three ways to run a model on an NVIDIA GPU with TensorRT, all written against the
official APIs, one module each:

* :mod:`.ort_provider` — **ONNX Runtime TensorRT execution provider**, the serving path:
  an ORT session whose provider list prefers TensorRT, then CUDA, then CPU, with
  FP16/INT8, engine and timing caches and an explicit optimization profile for the
  dynamic batch (:func:`ort_tensorrt_provider_options`, :func:`gpu_runtime_options`).
* :mod:`.builder` — **standalone ``.plan`` engines** built with the TensorRT builder
  (:func:`build_engine`, :func:`run_engine`), for GPU servers and Jetson devices; an
  engine is native code for one GPU model and TensorRT version, so engines are only
  ever built on the machine that runs them, never accepted from outside.
* :mod:`.torch_compile` — **torch-tensorrt** compilation of our PyTorch models
  (:func:`compile_torch`).

:mod:`.availability` finds what is installed (:func:`detect`) without importing
``tensorrt``, ``torch`` or ``onnxruntime``'s GPU parts, and :func:`require_tensorrt`
raises :class:`TensorRTUnavailable` with the reason; :mod:`.register` builds an engine
from a registered ONNX version, checks it against ONNX Runtime and registers it.

Precisions are :class:`visionfleet.targets.Precision`; the per-target build settings
(workspace, batch profile, built on a Jetson or not) are the ``engine`` of the
``x86-gpu`` and ``jetson`` profiles in :data:`visionfleet.targets.TARGETS`.
"""

from edge_export.tensorrt.availability import (
    INSTALL_HINT,
    Availability,
    TensorRTUnavailable,
    detect,
    require_tensorrt,
)
from edge_export.tensorrt.builder import EnginePlan, EngineReport, build_engine, engine_build_plan, onnx_traits, run_engine
from edge_export.tensorrt.ort_provider import (
    create_gpu_session,
    gpu_runtime_options,
    ort_cuda_provider_options,
    ort_tensorrt_provider_options,
)
from edge_export.tensorrt.register import (
    ENGINE_TARGETS,
    MIN_AGREEMENT,
    build_registered_engine,
    engine_parity,
    engine_profile,
)
from edge_export.tensorrt.torch_compile import compile_torch

__all__ = [
    "TensorRTUnavailable",
    "Availability",
    "detect",
    "require_tensorrt",
    "ort_tensorrt_provider_options",
    "ort_cuda_provider_options",
    "gpu_runtime_options",
    "create_gpu_session",
    "EnginePlan",
    "engine_build_plan",
    "onnx_traits",
    "EngineReport",
    "build_engine",
    "run_engine",
    "compile_torch",
    "engine_parity",
    "engine_profile",
    "build_registered_engine",
    "ENGINE_TARGETS",
    "MIN_AGREEMENT",
    "INSTALL_HINT",
]
