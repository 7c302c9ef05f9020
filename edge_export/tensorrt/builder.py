"""Standalone TensorRT engines (``.plan``): build one with the TensorRT builder, run it.

For GPU servers and Jetson devices. An engine is native code for one GPU model and
TensorRT version, so engines are only ever built on the machine that runs them, never
accepted from outside.

TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16``/``INT8``) and
implicit INT8 calibration; :func:`engine_build_plan` decides, per TensorRT version, how a
precision is obtained and refuses what that version cannot do. ``tensorrt`` and ``torch``
are imported only inside the functions that build or run an engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_export.tensorrt.availability import Availability, TensorRTUnavailable, require_tensorrt, torch_cuda
from visionfleet.targets import Precision, check_engine_build, hw_profile

__all__ = ["EnginePlan", "engine_build_plan", "onnx_traits", "EngineReport", "build_engine", "run_engine"]

_GIB = 1 << 30
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


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
    input_sizes: Sequence[tuple[int, int]] | None = None,
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

    check_engine_build(min_batch, opt_batch, max_batch, workspace_bytes)
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
    # One profile covering every listed size (hw_profile: min/max per axis, opt = the default).
    (lh, lw), (oh, ow), (hh, hw_) = hw_profile(input_sizes or [input_size])
    profile.set_shape(input_name, (min_batch, lh, lw, 3), (opt_batch, oh, ow, 3), (max_batch, hh, hw_, 3))
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        tc = Path(timing_cache)
        cache = config.create_timing_cache(tc.read_bytes() if tc.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    n_calib = 0
    if plan.calibrate:
        torch = torch_cuda()
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
        torch = torch_cuda()
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
    torch = torch_cuda()
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
