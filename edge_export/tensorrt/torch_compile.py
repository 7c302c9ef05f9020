"""torch-tensorrt compilation of our PyTorch models (FP32/FP16), for experiments."""

from __future__ import annotations

from typing import Any

from edge_export.tensorrt.availability import Availability, require_tensorrt, torch_cuda
from visionfleet.targets import Precision, check_engine_build

__all__ = ["compile_torch"]

_GIB = 1 << 30
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
            with NVIDIA ModelOpt first; use :func:`edge_export.tensorrt.build_engine` with a Q/DQ ONNX or
            calibration images instead.
    Raises:
        ValueError: int8 requested, or bad batches.
        TensorRTUnavailable: torch-tensorrt or a CUDA device is missing.
    """
    precision = Precision(precision)
    check_engine_build(min_batch, opt_batch, max_batch)
    if precision not in _TORCH_PRECISIONS:
        raise ValueError(
            "Got precision int8 for torch-tensorrt; expected fp32 or fp16 (INT8 needs a ModelOpt-quantized model; "
            "use `visionfleet tensorrt build --precision int8` on the ONNX instead)"
        )
    require_tensorrt("torch-tensorrt", availability)
    torch = torch_cuda()
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
