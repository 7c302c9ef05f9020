"""TensorRT paths: the ONNX Runtime TensorRT EP, standalone engines, torch-tensorrt.

Three ways to run a model on an NVIDIA GPU with TensorRT, all written against the
official APIs:

* **ONNX Runtime TensorRT execution provider** — the serving path: an ORT session whose
  provider list prefers TensorRT, then CUDA, then CPU, with FP16/INT8, engine and timing
  caches and an explicit optimization profile for the dynamic batch
  (:func:`ort_tensorrt_provider_options`, :func:`gpu_runtime_options`).
* **Standalone ``.plan`` engines** built with the TensorRT builder
  (:func:`build_engine`, :func:`run_engine`), for GPU servers and Jetson devices. An
  engine is native code for one GPU model and TensorRT version, so engines are only ever
  built on the machine that runs them, never accepted from outside.
* **torch-tensorrt** compilation of our PyTorch models (:func:`compile_torch`).

Nothing here imports ``tensorrt``, ``torch`` or ``onnxruntime`` at import time;
:func:`detect` finds what is installed without loading it (CUDA devices are counted
through the driver library with ``ctypes``). Where TensorRT or a CUDA device is missing,
:func:`require_tensorrt` raises :class:`TensorRTUnavailable` with the reason.

TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16``/``INT8``) and
implicit INT8 calibration; :func:`engine_build_plan` decides, per TensorRT version, how a
precision is obtained and refuses what that version cannot do.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "TensorRTUnavailable",
    "Precision",
    "EngineTarget",
    "TargetSpec",
    "TARGETS",
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
    "build_registered_engine",
    "MIN_AGREEMENT",
    "INSTALL_HINT",
]

TRT_PROVIDER = "TensorrtExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
INSTALL_HINT = (
    "install the GPU set in a CUDA environment (see docs/gpu.md: onnxruntime-gpu, tensorrt, torch-tensorrt)"
)
_GIB = 1 << 30
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


class TensorRTUnavailable(RuntimeError):
    """TensorRT, a CUDA device or torch-tensorrt is missing; the message says which."""


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class EngineTarget(str, enum.Enum):
    X86_GPU = "x86-gpu"
    JETSON = "jetson"


@dataclass(frozen=True)
class TargetSpec:
    """Build settings of an engine target: workspace and the dynamic-batch profile."""

    workspace_bytes: int
    min_batch: int
    opt_batch: int
    max_batch: int
    on_jetson: bool  # an engine runs only where it was built: Jetson engines are built on the Jetson
    description: str


TARGETS: dict[EngineTarget, TargetSpec] = {
    EngineTarget.X86_GPU: TargetSpec(4 * _GIB, 1, 8, 64, False, "discrete NVIDIA GPU in a server"),
    # Orin-class boards share 8-64 GB between CPU and GPU; a small workspace and batch
    # keep the builder inside what a camera pipeline leaves free.
    EngineTarget.JETSON: TargetSpec(1 * _GIB, 1, 1, 8, True, "NVIDIA Jetson (built on the device)"),
}


# ----------------------------------------------------------------------------- availability


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


# ----------------------------------------------------------------------------- ORT TensorRT EP


def _shape(input_name: str, batch: int, input_size: tuple[int, int]) -> str:
    h, w = input_size
    return f"{input_name}:{batch}x{h}x{w}x3"  # the contract's uint8 NHWC input


def _check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"Got batches min {min_batch}, opt {opt_batch}, max {max_batch}; expected 1 <= min <= opt <= max"
        )


def ort_tensorrt_provider_options(
    precision: Precision | str,
    cache_dir: str | os.PathLike[str],
    *,
    input_size: tuple[int, int] | None = None,
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
    rebuild.

    Args:
        precision: fp32, fp16 or int8. INT8 needs either a Q/DQ model (``qdq=True``:
            TensorRT takes the scales from the graph) or ``calibration_table``.
        cache_dir: where engines and the timing cache live (one folder per model
            version and precision: engines are not portable).
    Raises:
        ValueError: impossible combinations (int8 without scales, bad batches).
    """
    precision = Precision(precision)
    _check_batches(min_batch, opt_batch, max_batch)
    if workspace_bytes < 1 << 24:
        raise ValueError(f"Got {workspace_bytes} for workspace bytes; expected at least 16 MiB")
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
    if input_size is not None:
        opts["trt_profile_min_shapes"] = _shape(input_name, min_batch, input_size)
        opts["trt_profile_opt_shapes"] = _shape(input_name, opt_batch, input_size)
        opts["trt_profile_max_shapes"] = _shape(input_name, max_batch, input_size)
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


# ----------------------------------------------------------------------------- TensorRT builder


@dataclass(frozen=True)
class EnginePlan:
    """How the TensorRT builder gets a precision on a given TensorRT version."""

    trt_major: int
    precision: Precision
    strongly_typed: bool  # network creation flag: precisions come from the graph's types
    flags: tuple[str, ...]  # BuilderFlag names to set
    calibrate: bool  # attach an entropy calibrator fed with real images
    explicit_batch_flag: bool  # TensorRT 8 needs NetworkDefinitionCreationFlag.EXPLICIT_BATCH


def engine_build_plan(
    trt_major: int,
    precision: Precision | str,
    *,
    qdq: bool,
    fp16_weights: bool,
    calibration: bool,
) -> EnginePlan:
    """Decide flags, typing and calibration for ``precision`` on TensorRT ``trt_major``.

    * TensorRT 8.6-10: FP16 by the ``FP16`` flag; INT8 from Q/DQ nodes (explicit
      quantization) or from an entropy calibrator on real images.
    * TensorRT 11+: strongly typed networks only; the ONNX must already carry the
      precision (FP16 weights, or Q/DQ nodes for INT8).

    Raises:
        ValueError: the combination cannot be built on that version, with what to do.
    """
    precision = Precision(precision)
    if trt_major < 8:
        raise ValueError(f"Got TensorRT {trt_major}; expected 8.6 or newer")
    if calibration and (precision is not Precision.INT8 or qdq):
        raise ValueError(
            "Got calibration images for "
            + ("a Q/DQ model (its scales are in the graph)" if qdq else f"precision {precision.value}")
            + "; expected them only for int8 on a model without Q/DQ nodes"
        )
    explicit = trt_major < 10
    if precision is Precision.FP32 and (qdq or fp16_weights):
        raise ValueError(
            "Got precision fp32 for a model that carries " + ("Q/DQ nodes" if qdq else "FP16 weights")
            + f"; expected --precision {'int8' if qdq else 'fp16'}"
        )
    if trt_major >= 11:
        if precision is Precision.FP16 and not fp16_weights:
            raise ValueError(
                "Got precision fp16 on TensorRT 11+, which has no FP16 builder flag; expected an FP16 ONNX "
                "(visionfleet optimize MODEL:VERSION --quantize fp16, then build from that version)"
            )
        if precision is Precision.INT8 and not qdq:
            raise ValueError(
                "Got precision int8 on TensorRT 11+, which has no calibrator; expected a Q/DQ model "
                "(visionfleet optimize MODEL:VERSION --quantize int8-static, then build from that version)"
            )
        return EnginePlan(trt_major, precision, True, (), False, False)
    if precision is Precision.FP32:
        return EnginePlan(trt_major, precision, False, (), False, explicit)
    if precision is Precision.FP16:
        if fp16_weights and trt_major >= 10:  # the graph already says where FP16 is; let TensorRT follow it
            return EnginePlan(trt_major, precision, True, (), False, explicit)
        return EnginePlan(trt_major, precision, False, ("FP16",), False, explicit)
    if qdq:
        # Explicit quantization: INT8 where the graph's Q/DQ say so, FP16 elsewhere.
        return EnginePlan(trt_major, precision, False, ("INT8", "FP16"), False, explicit)
    if not calibration:
        raise ValueError(
            "Got precision int8 for a model without Q/DQ nodes and no calibration images; expected "
            "--calibration N (images from the model's dataset) or a Q/DQ model"
        )
    return EnginePlan(trt_major, precision, False, ("INT8", "FP16"), True, explicit)


def onnx_traits(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"qdq": bool, "fp16_weights": bool, "input_name": str}`` of an ONNX file."""
    import onnx

    m = onnx.load(os.fspath(onnx_path), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    init = {t.name for t in m.graph.initializer}
    inputs = [i.name for i in m.graph.input if i.name not in init]
    return {
        "qdq": bool(ops & _QDQ_OPS),
        "fp16_weights": any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer),
        "input_name": inputs[0] if inputs else "images",
    }


@dataclass(frozen=True)
class EngineReport:
    """What a build produced and how."""

    plan_path: str
    bytes: int
    tensorrt: str
    device: str
    compute_capability: str | None
    precision: str
    strongly_typed: bool
    flags: tuple[str, ...]
    calibration_images: int
    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["flags"] = list(self.flags)
        return d


def _torch_cuda():
    """torch with a CUDA device: device buffers for calibration and engine I/O."""
    try:
        import torch
    except ImportError:
        raise TensorRTUnavailable(f"torch is not installed; {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"this torch build sees no CUDA device (torch {torch.__version__}); {INSTALL_HINT}")
    return torch


def _make_calibrator(trt: Any, torch: Any, images: np.ndarray, batch: int, cache_file: Path):
    """An entropy calibrator feeding real uint8 NHWC images from device memory."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._images = images
            self._batch = batch
            self._pos = 0
            self._device = torch.empty((batch, *images.shape[1:]), dtype=torch.uint8, device="cuda")

        def get_batch_size(self) -> int:
            return self._batch

        def get_batch(self, names: list[str]):  # noqa: ARG002 - one input
            if self._pos + self._batch > len(self._images):
                return None
            chunk = torch.from_numpy(np.ascontiguousarray(self._images[self._pos : self._pos + self._batch]))
            self._device.copy_(chunk)
            self._pos += self._batch
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.exists() else None

        def write_calibration_cache(self, cache) -> None:
            cache_file.write_bytes(bytes(cache))

    return _Calibrator()


def build_engine(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    precision: Precision | str,
    *,
    input_size: tuple[int, int],
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 64,
    workspace_bytes: int = 2 * _GIB,
    calibration_images: np.ndarray | None = None,
    calibration_batch: int = 8,
    timing_cache: str | os.PathLike[str] | None = None,
    availability: Availability | None = None,
) -> EngineReport:
    """Build a serialized TensorRT engine (``.plan``) from a contract ONNX model.

    Uses ``tensorrt.Builder`` → ``create_network`` → ``OnnxParser`` → ``BuilderConfig``
    (memory pool limit, precision per :func:`engine_build_plan`, one optimization
    profile for the dynamic batch of the uint8 NHWC ``images`` input, an entropy
    calibrator on real images for INT8 without Q/DQ) → ``build_serialized_network``.

    Raises:
        TensorRTUnavailable: TensorRT or a CUDA device is missing.
        ValueError: bad options, or a precision this TensorRT cannot build for the model.
        RuntimeError: the parser or the builder failed (their messages included).
    """
    import time

    _check_batches(min_batch, opt_batch, max_batch)
    if workspace_bytes < 1 << 24:
        raise ValueError(f"Got {workspace_bytes} for workspace bytes; expected at least 16 MiB")
    traits = onnx_traits(onnx_path)
    if calibration_images is not None:
        if calibration_images.dtype != np.uint8 or calibration_images.shape[1:] != (*input_size, 3):
            raise ValueError(
                f"Got calibration images {calibration_images.dtype} {calibration_images.shape}; expected uint8 "
                f"[N, {input_size[0]}, {input_size[1]}, 3]"
            )
        if len(calibration_images) < calibration_batch:
            raise ValueError(f"Got {len(calibration_images)} calibration images; expected >= {calibration_batch}")
    av = require_tensorrt("tensorrt", availability)
    import tensorrt as trt  # noqa: PLC0415 - heavy, GPU-only

    major = int(trt.__version__.split(".")[0])
    plan = engine_build_plan(
        major, precision, qdq=traits["qdq"], fp16_weights=traits["fp16_weights"],
        calibration=calibration_images is not None,
    )
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan.strongly_typed and major < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT's ONNX parser failed: " + " | ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for name in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    h, w = input_size
    input_name = network.get_input(0).name
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, h, w, 3), (opt_batch, h, w, 3), (max_batch, h, w, 3))
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        tc = Path(timing_cache)
        cache = config.create_timing_cache(tc.read_bytes() if tc.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    n_calib = 0
    if plan.calibrate:
        torch = _torch_cuda()
        assert calibration_images is not None
        calib_profile = builder.create_optimization_profile()
        shape = (calibration_batch, h, w, 3)
        calib_profile.set_shape(input_name, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
        cache_file = Path(plan_path).with_suffix(".calib")
        config.int8_calibrator = _make_calibrator(trt, torch, calibration_images, calibration_batch, cache_file)
        n_calib = (len(calibration_images) // calibration_batch) * calibration_batch
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT's builder returned no engine (see the TensorRT log above)")
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)
    if cache is not None and timing_cache is not None:
        Path(timing_cache).write_bytes(bytes(cache.serialize()))
    cc = None
    try:
        torch = _torch_cuda()
        cc = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except TensorRTUnavailable:
        pass
    return EngineReport(
        plan_path=os.fspath(plan_path),
        bytes=plan_path.stat().st_size,
        tensorrt=trt.__version__,
        device=av.cuda_devices[0],
        compute_capability=cc,
        precision=plan.precision.value,
        strongly_typed=plan.strongly_typed,
        flags=plan.flags,
        calibration_images=n_calib,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_bytes=int(workspace_bytes),
        seconds=time.perf_counter() - t0,
    )


def run_engine(plan: str | os.PathLike[str] | bytes, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run a locally built engine on uint8 NHWC images; outputs by tensor name.

    TensorRT's name-based I/O API (``set_input_shape``, ``set_tensor_address``,
    ``execute_async_v3``) with torch CUDA tensors as device buffers.

    Raises:
        TensorRTUnavailable: TensorRT, torch with CUDA, or a CUDA device is missing.
    """
    require_tensorrt("tensorrt")
    torch = _torch_cuda()
    import tensorrt as trt  # noqa: PLC0415

    data = plan if isinstance(plan, bytes) else Path(plan).read_bytes()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        raise RuntimeError("TensorRT could not deserialize the engine (built by another TensorRT or GPU?)")
    ctx = engine.create_execution_context()
    x = torch.from_numpy(np.ascontiguousarray(images)).cuda()
    outputs: dict[str, Any] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            ctx.set_input_shape(name, tuple(x.shape))
            ctx.set_tensor_address(name, int(x.data_ptr()))
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            buf = torch.from_numpy(np.empty(shape, dtype=dtype)).cuda()
            ctx.set_tensor_address(name, int(buf.data_ptr()))
            outputs[name] = buf
    stream = torch.cuda.current_stream()
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return {k: v.cpu().numpy() for k, v in outputs.items()}


# ----------------------------------------------------------------------------- torch-tensorrt


_TORCH_PRECISIONS: dict[Precision, str] = {Precision.FP32: "float32", Precision.FP16: "float16"}


def compile_torch(
    model: Any,
    example: Any,
    precision: Precision | str = Precision.FP16,
    *,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 64,
    workspace_bytes: int = 2 * _GIB,
    availability: Availability | None = None,
) -> Any:
    """Compile a PyTorch module with ``torch_tensorrt.compile(ir="dynamo")``.

    Args:
        model: an ``nn.Module`` (our :class:`edge_export.onnx_export.Deployable` takes
            uint8 NHWC; a bare architecture takes float NCHW).
        example: one example input tensor; its shape (batch axis aside) and dtype
            define the input spec, with a dynamic batch ``min..max``.
        precision: fp32 or fp16. INT8 through torch-tensorrt needs a model quantized
            with NVIDIA ModelOpt first; use :func:`build_engine` with a Q/DQ ONNX or
            calibration images instead.
    Raises:
        ValueError: int8 requested, or bad batches.
        TensorRTUnavailable: torch-tensorrt or a CUDA device is missing.
    """
    precision = Precision(precision)
    _check_batches(min_batch, opt_batch, max_batch)
    if precision not in _TORCH_PRECISIONS:
        raise ValueError(
            "Got precision int8 for torch-tensorrt; expected fp32 or fp16 (INT8 needs a ModelOpt-quantized model; "
            "use `visionfleet tensorrt build --precision int8` on the ONNX instead)"
        )
    require_tensorrt("torch-tensorrt", availability)
    torch = _torch_cuda()
    import torch_tensorrt  # noqa: PLC0415

    shape = tuple(example.shape[1:])
    spec = torch_tensorrt.Input(
        min_shape=(min_batch, *shape),
        opt_shape=(opt_batch, *shape),
        max_shape=(max_batch, *shape),
        dtype=example.dtype,
    )
    return torch_tensorrt.compile(
        model.eval().cuda(),
        ir="dynamo",
        inputs=[spec],
        enabled_precisions={getattr(torch, _TORCH_PRECISIONS[precision])},
        workspace_size=int(workspace_bytes),
    )


# ----------------------------------------------------------------------------- registry


# Minimum agreement between the engine and ONNX Runtime (CPU) on real images before a
# built engine is registered; TF32/FP16/INT8 move probabilities, near-ties may flip.
MIN_AGREEMENT: dict[Precision, float] = {Precision.FP32: 0.99, Precision.FP16: 0.99, Precision.INT8: 0.95}


def engine_parity(task: str, engine_out: Mapping[str, np.ndarray], ort_out: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Compare engine outputs with ONNX Runtime's on the same images (pure numpy).

    Classification: top-1 agreement and max |Δp|. Detection: agreement of the
    per-image detection count and of the top box's class, max |Δ top score|.
    """
    if task == "classification":
        a, b = np.asarray(engine_out["probs"], np.float64), np.asarray(ort_out["probs"], np.float64)
        return {
            "n": int(len(a)),
            "agreement": float((a.argmax(1) == b.argmax(1)).mean()) if len(a) else 1.0,
            "max_abs_diff": float(np.abs(a - b).max()) if len(a) else 0.0,
        }
    s_e, s_o = np.asarray(engine_out["scores"], np.float64), np.asarray(ort_out["scores"], np.float64)
    c_e, c_o = np.asarray(engine_out["classes"]), np.asarray(ort_out["classes"])
    count_ok = (s_e > 0).sum(1) == (s_o > 0).sum(1)
    top_ok = (c_e[:, 0] == c_o[:, 0]) | ((s_e[:, 0] <= 0) & (s_o[:, 0] <= 0))
    return {
        "n": int(len(s_e)),
        "agreement": float((count_ok & top_ok).mean()) if len(s_e) else 1.0,
        "max_abs_diff": float(np.abs(s_e[:, 0] - s_o[:, 0]).max()) if len(s_e) else 0.0,
    }


def build_registered_engine(
    registry: Any,
    ref: str,
    precision: Precision | str,
    target: EngineTarget | str = EngineTarget.X86_GPU,
    *,
    images: np.ndarray,
    calibration_images: np.ndarray | None = None,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_bytes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    availability: Availability | None = None,
):
    """Build an engine from a registered ONNX version, check it, register a new version.

    The new version's ``model.plan`` is the engine (``format: plan``); its source
    ``model.onnx`` is kept beside it (role ``onnx``) so hosts without TensorRT, and ONNX
    Runtime, still load the version. Registered only when the engine agrees with ONNX
    Runtime on ``images`` (real images at the model size) per :data:`MIN_AGREEMENT`.

    Raises:
        ValueError: bad options, a version that is not ONNX, a target this machine is not.
        TensorRTUnavailable: TensorRT or a CUDA device is missing.
        RuntimeError: build failure, or the engine disagrees with ONNX Runtime.
    """
    import tempfile

    from visionfleet.inference import RuntimeOptions, create_session
    from visionfleet.spec import Lineage

    precision = Precision(precision)
    target = EngineTarget(target)
    spec = TARGETS[target]
    batches = (min_batch or spec.min_batch, opt_batch or spec.opt_batch, max_batch or spec.max_batch)
    _check_batches(*batches)
    resolved = registry.resolve(ref)
    card = registry.card(resolved.name, resolved.version)
    if card.format != "onnx" or not card.model_file.endswith(".onnx"):
        raise ValueError(f"Got {card.ref} in format {card.format!r}; expected an ONNX version to build from")
    av = require_tensorrt("tensorrt", availability)
    if spec.on_jetson != av.jetson:
        where = "on the Jetson itself" if spec.on_jetson else "on the x86 GPU server that will run it"
        raise ValueError(
            f"Got --target {target.value} on a {'Jetson' if av.jetson else 'non-Jetson'} machine; expected to build "
            f"{where} (an engine runs only on the GPU model and TensorRT version that built it)"
        )
    src_dir = registry.local_dir(resolved.name, resolved.version)
    onnx_path = src_dir / card.model_file
    with tempfile.TemporaryDirectory(prefix="vf-trt-") as tmp:
        plan_path = Path(tmp) / "model.plan"
        report = build_engine(
            onnx_path,
            plan_path,
            precision,
            input_size=tuple(card.input_size),  # type: ignore[arg-type]
            min_batch=batches[0],
            opt_batch=batches[1],
            max_batch=batches[2],
            workspace_bytes=workspace_bytes or spec.workspace_bytes,
            calibration_images=calibration_images,
            timing_cache=(Path(cache_dir) / "timing.cache") if cache_dir else None,
            availability=av,
        )
        sess = create_session(onnx_path, RuntimeOptions(threads=2, providers=("CPUExecutionProvider",)))
        names = [o.name for o in sess.get_outputs()]
        chunks = [images[i : i + batches[2]] for i in range(0, len(images), batches[2])]
        ort_parts = [dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: c}))) for c in chunks]
        eng_parts = [run_engine(plan_path, c) for c in chunks]
        ort_out = {k: np.concatenate([p[k] for p in ort_parts]) for k in names}
        eng_out = {k: np.concatenate([p[k] for p in eng_parts]) for k in names}
        parity = engine_parity(card.task.value, eng_out, ort_out)
        if parity["agreement"] < MIN_AGREEMENT[precision]:
            raise RuntimeError(
                f"the {precision.value} engine agrees with ONNX Runtime on {parity['agreement']:.2%} of "
                f"{parity['n']} images (needs {MIN_AGREEMENT[precision]:.0%}); not registered"
            )
        onnx_copy = Path(tmp) / "model.onnx"
        onnx_copy.write_bytes(onnx_path.read_bytes())
        step = {"op": "tensorrt-build", "target": target.value, **report.to_dict()}
        step.pop("plan_path", None)
        new = card.model_copy(
            update={
                "version": None,
                "files": [],
                "model_file": "model.plan",
                "format": "plan",
                "precision": precision.value,
                "metrics": {"engine_parity": parity},
                "lineage": Lineage(
                    parent=card.ref,
                    dataset=card.lineage.dataset,
                    run=card.lineage.run,
                    steps=[*card.lineage.steps, step],
                ),
                "description": f"TensorRT {report.tensorrt} {precision.value} engine for {report.device}",
            }
        )
        stored = registry.register(new, {"plan": plan_path, "onnx": onnx_copy}, set_production_if_none=False)
    return stored, report, parity
