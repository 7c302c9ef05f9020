"""ONNX Runtime's TensorRT execution provider: the serving path on an NVIDIA GPU.

An ORT session whose provider list prefers TensorRT, then CUDA, then CPU, with
FP16/INT8, engine and timing caches and an explicit optimization profile for the
dynamic batch. Names as in
https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from edge_export.tensorrt.availability import CPU_PROVIDER, CUDA_PROVIDER, TRT_PROVIDER, require_tensorrt
from visionfleet.targets import Precision, check_engine_build, hw_profile

__all__ = ["ort_tensorrt_provider_options", "ort_cuda_provider_options", "gpu_runtime_options", "create_gpu_session"]

_GIB = 1 << 30


def _shape(input_name: str, batch: int, input_size: tuple[int, int]) -> str:
    h, w = input_size
    return f"{input_name}:{batch}x{h}x{w}x3"  # the contract's uint8 NHWC input


def ort_tensorrt_provider_options(
    precision: Precision | str,
    cache_dir: str | os.PathLike[str],
    *,
    input_size: tuple[int, int] | None = None,
    input_sizes: Sequence[tuple[int, int]] | None = None,
    input_name: str = "images",
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 64,
    workspace_bytes: int = 2 * _GIB,
    qdq: bool = False,
    calibration_table: str | None = None,
    device_id: int = 0,
    timing_cache: bool = True,
    builder_optimization_level: int = 3,
) -> dict[str, Any]:
    """Options for ONNX Runtime's ``TensorrtExecutionProvider``.

    Names as in https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html.
    The engine cache is always on (building takes seconds to minutes; a cache turns
    that into a file read on the next start); ``input_size`` pins one optimization
    profile covering ``min_batch..max_batch`` so a new batch size never triggers a
    rebuild. ``input_sizes`` (a card's sizes, default first; ``input_size`` must be the
    first when both are given) widens the profile's height and width to cover every
    listed size (:func:`visionfleet.targets.hw_profile`: min/max per axis, opt = default).

    Args:
        precision: fp32, fp16 or int8. INT8 needs either a Q/DQ model (``qdq=True``:
            TensorRT takes the scales from the graph) or ``calibration_table``.
        cache_dir: where engines and the timing cache live (one folder per model
            version and precision: engines are not portable).
    Raises:
        ValueError: impossible combinations (int8 without scales, bad batches).
    """
    precision = Precision(precision)
    check_engine_build(min_batch, opt_batch, max_batch, workspace_bytes)
    if not 0 <= builder_optimization_level <= 5:
        raise ValueError(f"Got {builder_optimization_level} for builder optimization level; expected 0..5")
    if precision is not Precision.INT8 and (qdq or calibration_table):
        raise ValueError(f"Got INT8 scales (qdq/calibration table) for precision {precision.value}; expected int8")
    if precision is Precision.INT8:
        if qdq and calibration_table:
            # TensorRT refuses a calibration table for a graph that carries Q/DQ nodes.
            raise ValueError("Got a calibration table for a Q/DQ model; expected one or the other")
        if not qdq and not calibration_table:
            raise ValueError(
                "Got precision int8 without INT8 scales; expected a Q/DQ model (visionfleet optimize "
                "--quantize int8-static) or a calibration table"
            )
    cache = os.fspath(Path(cache_dir))
    opts: dict[str, Any] = {
        "device_id": int(device_id),
        "trt_max_workspace_size": int(workspace_bytes),
        "trt_fp16_enable": precision is not Precision.FP32,  # INT8 engines keep FP16 for non-quantized layers
        "trt_int8_enable": precision is Precision.INT8,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": bool(timing_cache),
        "trt_builder_optimization_level": int(builder_optimization_level),
    }
    if timing_cache:
        opts["trt_timing_cache_path"] = cache
    if calibration_table:
        opts["trt_int8_calibration_table_name"] = calibration_table
        opts["trt_int8_use_native_calibration_table"] = False
    if input_sizes:
        if input_size is not None and tuple(input_size) != tuple(input_sizes[0]):
            raise ValueError(f"Got input_size {input_size} and input_sizes {list(input_sizes)}; expected input_size "
                             "to be the first listed")
        lo, opt, hi = hw_profile(input_sizes)
    elif input_size is not None:
        lo = opt = hi = tuple(input_size)  # type: ignore[assignment]
    if input_size is not None or input_sizes:
        opts["trt_profile_min_shapes"] = _shape(input_name, min_batch, lo)
        opts["trt_profile_opt_shapes"] = _shape(input_name, opt_batch, opt)
        opts["trt_profile_max_shapes"] = _shape(input_name, max_batch, hi)
    return opts


def ort_cuda_provider_options(device_id: int = 0) -> dict[str, Any]:
    """Options for ``CUDAExecutionProvider`` (the fallback for subgraphs TensorRT rejects)."""
    return {"device_id": int(device_id), "cudnn_conv_algo_search": "HEURISTIC"}


def gpu_runtime_options(
    precision: Precision | str,
    cache_dir: str | os.PathLike[str],
    *,
    threads: int = 1,
    available: Sequence[str] | None = None,
    **trt_options: Any,
):
    """:class:`visionfleet.inference.RuntimeOptions` preferring TensorRT, then CUDA, then CPU.

    Only providers present in ``available`` (default: what ONNX Runtime reports) are
    listed, so the same call works on a CPU box (CPU only) and on a GPU server.
    ``trt_options`` go to :func:`ort_tensorrt_provider_options`.
    """
    from visionfleet.inference import RuntimeOptions, best_providers

    providers = best_providers(available)
    options: dict[str, dict[str, Any]] = {}
    if TRT_PROVIDER in providers:
        options[TRT_PROVIDER] = ort_tensorrt_provider_options(precision, cache_dir, **trt_options)
    if CUDA_PROVIDER in providers:
        options[CUDA_PROVIDER] = ort_cuda_provider_options(int(trt_options.get("device_id", 0)))
    if CPU_PROVIDER not in providers:
        providers = [*providers, CPU_PROVIDER]
    return RuntimeOptions(threads=threads, providers=tuple(providers), provider_options=options)


def create_gpu_session(
    onnx_path: str | os.PathLike[str],
    precision: Precision | str,
    cache_dir: str | os.PathLike[str],
    *,
    threads: int = 1,
    require_tensorrt_ep: bool = True,
    **trt_options: Any,
):
    """An ONNX Runtime session on the TensorRT EP (CUDA and CPU as fallbacks).

    Raises:
        TensorRTUnavailable: ``require_tensorrt_ep`` and the TensorRT EP or a CUDA device
            is missing (the session would silently run on the CPU otherwise).
    """
    from visionfleet.inference import create_session

    if require_tensorrt_ep:
        require_tensorrt("ort-tensorrt")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    opts = gpu_runtime_options(precision, cache_dir, threads=threads, **trt_options)
    return create_session(onnx_path, opts)
