"""Import a model from any framework so that it obeys the artifact contract.

An ONNX file exported by PyTorch, TensorFlow (tf2onnx), PaddlePaddle (paddle2onnx) or
anything else comes with its own input name, layout, dtype, normalization and channel
order. Everything is *declared* at import (nothing is guessed) and folded into a
wrapper graph around the unchanged original:

    images uint8 [N, H, W, 3] (RGB)
      -> channel flip (Gather, when the model wants BGR)
      -> Cast -> /255 (when mean/std are on the 0..1 scale) -> Sub mean -> Div std
      -> Cast float16 (when the model wants it) -> Transpose (when it wants NCHW)
      -> the original graph, node for node
      -> classification: Flatten, Softmax (for logits)       -> probs [N, C]
      -> detection (YOLO-style head): decode cx,cy,w,h boxes, NonMaxSuppression,
         pad to K rows                                        -> boxes [N, K, 4],
                                                                 scores [N, K],
                                                                 classes [N, K]

The wrapped model is checked against running the original by hand (numpy
preprocessing, ONNX Runtime on the original graph, numpy decoding and NMS) on real
images before it is registered. A PyTorch checkpoint of a built-in architecture is
imported with ``torch.load(weights_only=True)`` only and exported through
:func:`edge_export.onnx_export.export_onnx`.

Safety: ONNX external-data paths that leave the model's folder are refused, pickles
are never unpickled, TensorRT engines (``.plan``) are never accepted from outside
(build them locally with ``visionfleet tensorrt build``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from visionfleet.imaging import ResizeMode, decode_image, encode_image, resize_image
from visionfleet.spec import Lineage, ModelCard, Task

__all__ = [
    "Layout",
    "InputDType",
    "ChannelOrder",
    "PixelScale",
    "OutputKind",
    "HeadLayout",
    "Preprocessing",
    "DetectionOptions",
    "ImportSpec",
    "ImportRequest",
    "ImportParityError",
    "WrapInfo",
    "ImportParity",
    "load_onnx_safely",
    "check_source_file",
    "wrap_onnx",
    "check_import_parity",
    "reference_detections",
    "sample_images",
    "load_sample_images",
    "parse_labels",
    "import_onnx",
    "import_checkpoint",
    "import_model",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "DETECTION_OUTPUTS",
    "MIN_OPSET",
]

from visionfleet.names import DETECTION_OUTPUTS, INPUT_NAME, OUTPUT_NAME  # noqa: E402  (the contract's names)
# NonMaxSuppression, Range, CumSum, ScatterND, GatherND and TopK's K input all exist
# from opset 11; every op the wrapper adds is valid from there up to the newest opset.
MIN_OPSET = 11
MAX_DETECTIONS_LIMIT = 1000
# Class-aware NMS shifts box centres by class * this * max(H, W): centres and sizes of
# boxes near the input stay far apart across classes (8x the side leaves room for boxes
# reaching well outside the input).
_CLASS_OFFSET = 8
_PROTOBUF_LIMIT = 2**31 - 1
_ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
_CHECKPOINT_SUFFIXES = (".pt", ".pth")


class Layout(str, enum.Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"


class InputDType(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    UINT8 = "uint8"


class ChannelOrder(str, enum.Enum):
    RGB = "RGB"
    BGR = "BGR"


class PixelScale(str, enum.Enum):
    """The scale ``--mean``/``--std`` are given on: pixels divided by 255 first, or not."""

    UNIT = "0-1"
    BYTE = "0-255"


class OutputKind(str, enum.Enum):
    PROBS = "probs"
    LOGITS = "logits"


class HeadLayout(str, enum.Enum):
    """Where a YOLO-style head puts its features: ``[N, 4+C, A]`` or ``[N, A, 4+C]``."""

    AUTO = "auto"
    CHANNELS_FIRST = "channels-first"  # YOLOv8/v11 exports: [N, 4 + C, A]
    ANCHORS_FIRST = "anchors-first"  # YOLOv5/v7 exports: [N, A, 5 + C]


@dataclass(frozen=True)
class _DType:
    np_type: type
    onnx_type: int


_DTYPES: dict[InputDType, _DType] = {
    InputDType.FLOAT32: _DType(np.float32, TensorProto.FLOAT),
    InputDType.FLOAT16: _DType(np.float16, TensorProto.FLOAT16),
    InputDType.UINT8: _DType(np.uint8, TensorProto.UINT8),
}


class ImportParityError(RuntimeError):
    """The wrapped graph disagrees with running the original model by hand."""


# ----------------------------------------------------------------------------- declared options


@dataclass(frozen=True)
class Preprocessing:
    """What the original model expects, declared by the user.

    The model input is ``((pixels [/ 255]) - mean) / std`` with pixels in the model's
    channel order; ``mean`` and ``std`` list one value per input channel *in that order*
    (a BGR model's mean is B, G, R), on the scale ``scale`` says.
    """

    layout: Layout = Layout.NCHW
    dtype: InputDType = InputDType.FLOAT32
    channel_order: ChannelOrder = ChannelOrder.RGB
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: PixelScale = PixelScale.UNIT

    def __post_init__(self) -> None:
        for what, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
                raise ValueError(f"Got {list(vals)} for {what}; expected 3 finite numbers")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"Got {list(self.std)} for std; expected 3 positive numbers")
        if self.scale is PixelScale.UNIT and (max(self.mean) > 1.0 or min(self.mean) < 0.0 or max(self.std) > 1.0):
            # Pixels/255 lie in 0..1, so must their mean and spread; 123.7 is a 0-255 value.
            raise ValueError(
                f"Got mean {list(self.mean)}, std {list(self.std)} on the 0-1 scale; expected values within 0..1 "
                "(for values on the 0-255 scale pass --scale 0-255)"
            )
        if self.dtype is InputDType.UINT8 and not self.is_identity:
            raise ValueError(
                f"Got mean {list(self.mean)}, std {list(self.std)} on the {self.scale.value} scale for a uint8 "
                "input; expected mean 0,0,0, std 1,1,1 and scale 0-255 (a uint8 input takes raw pixels)"
            )

    @property
    def is_identity(self) -> bool:
        return self.scale is PixelScale.BYTE and self.mean == (0.0, 0.0, 0.0) and self.std == (1.0, 1.0, 1.0)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """The declared preprocessing by hand (numpy): uint8 NHWC RGB -> the model's input."""
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
            raise ValueError(f"Got images {x.dtype} {x.shape}; expected uint8 [N, H, W, 3]")
        if self.channel_order is ChannelOrder.BGR:
            x = x[..., ::-1]
        if self.dtype is not InputDType.UINT8:
            x = x.astype(np.float32)
            if self.scale is PixelScale.UNIT:
                x = x / np.float32(255.0)
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            x = x.astype(_DTYPES[self.dtype].np_type)
        if self.layout is Layout.NCHW:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.value,
            "dtype": self.dtype.value,
            "channel_order": self.channel_order.value,
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": self.scale.value,
        }


@dataclass(frozen=True)
class DetectionOptions:
    """Decoding and NMS settings baked into a detection model at import."""

    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 100
    head_layout: HeadLayout = HeadLayout.AUTO
    objectness: bool | None = None  # None: from the head's width (4 + C or 5 + C)
    class_agnostic: bool = False

    def __post_init__(self) -> None:
        # A score of 0 marks padding rows, so the threshold must keep them out.
        if not 0.0 < self.score_threshold < 1.0:
            raise ValueError(f"Got {self.score_threshold} for score threshold; expected 0 < t < 1")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"Got {self.iou_threshold} for IoU threshold; expected 0 < t <= 1")
        if not 1 <= self.max_detections <= MAX_DETECTIONS_LIMIT:
            raise ValueError(f"Got {self.max_detections} for max detections; expected 1..{MAX_DETECTIONS_LIMIT}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
            "head_layout": self.head_layout.value,
            "objectness": self.objectness,
            "class_agnostic": self.class_agnostic,
        }


@dataclass(frozen=True)
class ImportSpec:
    """Everything declared about a model to import."""

    task: Task
    labels: tuple[str, ...]
    input_size: tuple[int, int]  # (height, width)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    resize: ResizeMode = ResizeMode.STRETCH
    output: OutputKind | None = None  # None: probs for ONNX files, logits for checkpoints
    input_name: str | None = None  # None: the graph's only input
    output_name: str | None = None  # None: the graph's only output
    framework: str = "onnx"
    detection: DetectionOptions | None = None

    def __post_init__(self) -> None:
        if len(self.labels) < 1 or len(set(self.labels)) != len(self.labels) or any(not lb for lb in self.labels):
            raise ValueError(f"Got labels {list(self.labels)[:10]}; expected unique, non-empty names")
        h, w = self.input_size
        if not (8 <= h <= 4096 and 8 <= w <= 4096):
            raise ValueError(f"Got {h}x{w} for input size; expected HEIGHTxWIDTH within 8..4096")
        if self.task is Task.DETECTION:
            if self.detection is None:
                raise ValueError("Got no detection options for a detection import; expected DetectionOptions")
            if self.output is OutputKind.LOGITS:
                raise ValueError(
                    "Got --output logits for a detection model; expected probs (YOLO-style heads give scores)"
                )
        elif self.detection is not None:
            raise ValueError("Got detection options for a classification import; expected none")
        if self.task is Task.CLASSIFICATION and len(self.labels) < 2:
            raise ValueError(f"Got {len(self.labels)} label for classification; expected at least 2")


class ImportRequest(BaseModel):
    """The import options as the CLI (or an HTTP client) sends them, parsed once."""

    model_config = ConfigDict(extra="forbid")

    task: Task = Field(description="classification or detection")
    labels: list[str] = Field(description="class names, in the model's output order")
    input_size: tuple[int, int] = Field(description="model input (height, width)")
    layout: Layout = Field(default=Layout.NCHW, description="the original model's input layout")
    input_dtype: InputDType = Field(default=InputDType.FLOAT32, description="the original model's input dtype")
    channel_order: ChannelOrder = Field(default=ChannelOrder.RGB, description="channel order the model expects")
    mean: tuple[float, float, float] = Field(default=(0.0, 0.0, 0.0), description="per channel, model order")
    std: tuple[float, float, float] = Field(default=(1.0, 1.0, 1.0), description="per channel, model order")
    scale: PixelScale = Field(default=PixelScale.UNIT, description="scale mean/std are given on: 0-1 or 0-255")
    resize: ResizeMode = Field(default=ResizeMode.STRETCH, description="how images are resized to the input")
    output: OutputKind | None = Field(
        default=None, description="classification output: probs or logits (default probs; logits for checkpoints)"
    )
    input_name: str | None = Field(default=None, description="graph input to feed; default the only one")
    output_name: str | None = Field(default=None, description="graph output to read; default the only one")
    framework: str = Field(default="onnx", description="where the model came from (pytorch, tensorflow, …)")
    score_threshold: float = Field(default=0.25, description="detection: minimum box score kept")
    iou_threshold: float = Field(default=0.45, description="detection: NMS IoU threshold")
    max_detections: int = Field(default=100, description="detection: K rows per image")
    head_layout: HeadLayout = Field(default=HeadLayout.AUTO, description="detection: head layout")
    objectness: bool | None = Field(default=None, description="detection: head has an objectness column")
    class_agnostic: bool = Field(default=False, description="detection: one NMS across classes")

    @classmethod
    def parse(cls, **values: Any) -> "ImportRequest":
        """Validate, turning pydantic's report into one ``Got X for Y; expected …`` line."""
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "options"
            msg = str(first["msg"])
            msg = msg[len("Input should be ") :] if msg.startswith("Input should be ") else msg
            raise ValueError(f"Got {first.get('input')!r} for --{where.replace('_', '-')}; expected {msg}") from None

    def to_spec(self) -> ImportSpec:
        detection = None
        if self.task is Task.DETECTION:
            detection = DetectionOptions(
                score_threshold=self.score_threshold,
                iou_threshold=self.iou_threshold,
                max_detections=self.max_detections,
                head_layout=self.head_layout,
                objectness=self.objectness,
                class_agnostic=self.class_agnostic,
            )
        return ImportSpec(
            task=self.task,
            labels=tuple(self.labels),
            input_size=(int(self.input_size[0]), int(self.input_size[1])),
            preprocessing=Preprocessing(
                layout=self.layout,
                dtype=self.input_dtype,
                channel_order=self.channel_order,
                mean=tuple(float(v) for v in self.mean),  # type: ignore[arg-type]
                std=tuple(float(v) for v in self.std),  # type: ignore[arg-type]
                scale=self.scale,
            ),
            resize=self.resize,
            output=self.output,
            input_name=self.input_name,
            output_name=self.output_name,
            framework=self.framework,
            detection=detection,
        )


def parse_labels(text: str) -> list[str]:
    """``--labels FILE|a,b,c``: one label per line in a file, or a comma-separated list."""
    if not text or not text.strip():
        raise ValueError("Got an empty --labels; expected a file (one label per line) or a,b,c")
    path = Path(text).expanduser()
    if path.is_file():
        labels = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif "," not in text and ("/" in text or "\\" in text or path.suffix.lower() in (".txt", ".names", ".csv")):
        raise FileNotFoundError(f"no such labels file: {text}")
    else:
        labels = [v.strip() for v in text.split(",")]
    if not labels or any(not lb for lb in labels) or len(set(labels)) != len(labels):
        raise ValueError(f"Got labels {labels[:10]} from {text[:80]!r}; expected unique, non-empty names")
    return labels


# ----------------------------------------------------------------------------- safe loading


def check_source_file(path: str | os.PathLike[str]) -> Path:
    """Refuse what is never imported (engines, pickles, unknown formats) before reading it."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in _ENGINE_SUFFIXES:
        raise ValueError(
            f"Got {p.name!r}: TensorRT engines are never accepted from outside (an engine is native code for one "
            "GPU and cannot be verified); import the ONNX model and build the engine here with "
            "`visionfleet tensorrt build`"
        )
    if suffix not in (".onnx", *_CHECKPOINT_SUFFIXES):
        raise ValueError(
            f"Got {p.name!r}; expected a .onnx model or a .pt/.pth PyTorch state dict "
            "(pickles and TensorRT engines are refused)"
        )
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    return p


def _graph_tensors(graph: onnx.GraphProto):
    """Every tensor stored in a graph: initializers, sparse ones, node attributes, subgraphs."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for g in attr.graphs:
                yield from _graph_tensors(g)


def _model_tensors(model: onnx.ModelProto):
    yield from _graph_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> int:
    """Refuse external-data references that leave ``base_dir``; returns how many there are."""
    base = base_dir.resolve()
    count = 0
    for tensor in _model_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        count += 1
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        # Resolve symlinks too: a link inside the folder pointing outside escapes it.
        target = (base / location).resolve() if location else base
        if (
            not location
            or os.path.isabs(location)
            or Path(location).drive
            or ".." in Path(location.replace("\\", "/")).parts
            or not target.is_relative_to(base)
            or target == base
        ):
            raise ValueError(
                f"Got external data location {location!r} for tensor {tensor.name!r}; expected a file inside the "
                f"model's folder {base} (paths that leave it are refused)"
            )
        if not target.is_file():
            raise FileNotFoundError(f"tensor {tensor.name!r} names external data {location!r}, which is missing")
    return count


def load_onnx_safely(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX file for import: external data vetted, ``onnx.checker`` passed.

    Raises:
        ValueError: not an ONNX model, external data outside the model's folder, or the
            model fails ``onnx.checker``.
    """
    p = Path(path)
    try:
        model = onnx.load(os.fspath(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for garbage
        raise ValueError(f"{p.name} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise ValueError(f"{p.name} is not a readable ONNX model (no graph nodes)")
    if _check_external_data(model, p.parent):
        onnx.load_external_data_for_model(model, os.fspath(p.parent.resolve()))
        if model.ByteSize() > _PROTOBUF_LIMIT:
            raise ValueError(
                f"{p.name} holds more than 2 GB of weights; models over the protobuf limit are not supported"
            )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - ValidationError and C++ errors alike
        raise ValueError(f"{p.name} fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None
    return model


def _ort_session(model_bytes: bytes, what: str):
    """A single-threaded CPU session, with a clear error when ONNX Runtime refuses the model."""
    from visionfleet.inference import RuntimeOptions, create_session

    try:
        return create_session(model_bytes, RuntimeOptions(threads=1, providers=("CPUExecutionProvider",)))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind exception types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"ONNX Runtime cannot load {what}: {msg}") from None


# ----------------------------------------------------------------------------- graph wrapping


@dataclass(frozen=True)
class WrapInfo:
    """What the wrapper found and did; recorded in the card's lineage."""

    original_input: str
    original_output: str
    opset: int
    batch_relaxed: bool
    renamed: bool
    num_classes: int
    head_layout: HeadLayout | None = None
    objectness: bool | None = None
    num_anchors: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "original_input": self.original_input,
            "original_output": self.original_output,
            "opset": self.opset,
            "batch_relaxed": self.batch_relaxed,
            "renamed_with_prefix": self.renamed,
        }
        if self.head_layout is not None:
            d |= {"head_layout": self.head_layout.value, "objectness": self.objectness, "num_anchors": self.num_anchors}
        return d


class _Nodes:
    """Collects the wrapper's nodes and constants with unique ``vf_`` names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"vf_{hint}_{self._n}"

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def op(self, op_type: str, inputs: Sequence[str], hint: str, *, out: str | None = None, n_out: int = 1, **attrs):
        outs = [out] if out is not None else [self.name(hint) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("Got a model without an ai.onnx opset import; expected a standard ONNX model")


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    """Static dims as ints, symbolic or unknown ones as None."""
    shape = vi.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _fmt(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _pick(values: Sequence[onnx.ValueInfoProto], name: str | None, what: str, flag: str) -> onnx.ValueInfoProto:
    names = [v.name for v in values]
    if name is not None:
        for v in values:
            if v.name == name:
                return v
        raise ValueError(f"Got {name!r} for {flag}; expected one of the model's {what}s {names}")
    if len(values) != 1:
        raise ValueError(f"Got a model with {len(values)} {what}s {names}; expected one, or name it with {flag}")
    return values[0]


def _check_input(vi: onnx.ValueInfoProto, spec: ImportSpec) -> bool:
    """Check the declared input against the graph; returns True when its batch is fixed at 1."""
    pre = spec.preprocessing
    elem = vi.type.tensor_type.elem_type
    want = _DTYPES[pre.dtype].onnx_type
    if elem != want:
        raise ValueError(
            f"Got --input-dtype {pre.dtype.value}, but the model's input {vi.name!r} is "
            f"{TensorProto.DataType.Name(elem).lower() if elem else 'untyped'}; expected them to match"
        )
    dims = _dims(vi)
    if len(dims) != 4:
        raise ValueError(f"Got a model input {vi.name!r} of shape {_fmt(dims)}; expected a 4-D image batch")
    h, w = spec.input_size
    c_at, hw_at = (1, (2, 3)) if pre.layout is Layout.NCHW else (3, (1, 2))
    other_c = 3 if pre.layout is Layout.NCHW else 1
    if dims[c_at] not in (None, 3):
        hint = f" (it looks {('NHWC' if pre.layout is Layout.NCHW else 'NCHW')})" if dims[other_c] == 3 else ""
        raise ValueError(
            f"Got --layout {pre.layout.value}, but the model's input {vi.name!r} is {_fmt(dims)}{hint}; "
            "expected 3 channels where the layout puts them"
        )
    model_hw = (dims[hw_at[0]], dims[hw_at[1]])
    if any(m is not None and m != d for m, d in zip(model_hw, (h, w))):
        raise ValueError(
            f"Got --input-size {h}x{w}, but the model's input {vi.name!r} is {_fmt(dims)} ({pre.layout.value}); "
            "expected them to match"
        )
    if dims[0] not in (None, 1):
        raise ValueError(
            f"Got a model input {vi.name!r} with a fixed batch of {dims[0]}; expected a dynamic batch (or 1)"
        )
    return dims[0] == 1


def _relax_batch(graph: onnx.GraphProto, input_name: str) -> None:
    """Make a batch-1 graph's batch symbolic; the parity check then proves it still runs."""
    relax = [vi for vi in graph.input if vi.name == input_name] + list(graph.output)
    for vi in relax:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    # Intermediate shapes recorded for batch 1 would contradict the new batch; they are
    # only hints, ONNX Runtime infers them again.
    del graph.value_info[:]


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names |= set(node.input) | set(node.output)
        names.add(node.name)
    return names


def _preprocess_nodes(b: _Nodes, spec: ImportSpec, target: str) -> None:
    """images (uint8 NHWC RGB) -> the original model's input tensor ``target``."""
    pre = spec.preprocessing
    x = INPUT_NAME
    steps: list[tuple[str, list[str], dict]] = []
    if pre.channel_order is ChannelOrder.BGR:
        # Flip on uint8, before the cast: a quarter of the bytes to move.
        steps.append(("Gather", [b.const([2, 1, 0], np.int64, "bgr")], {"axis": 3}))
    if pre.dtype is not InputDType.UINT8:
        steps.append(("Cast", [], {"to": TensorProto.FLOAT}))
        if pre.scale is PixelScale.UNIT:
            steps.append(("Div", [b.const(255.0, np.float32, "u8max")], {}))
        if any(pre.mean):
            steps.append(("Sub", [b.const(np.reshape(pre.mean, (1, 1, 1, 3)), np.float32, "mean")], {}))
        if any(s != 1.0 for s in pre.std):
            steps.append(("Div", [b.const(np.reshape(pre.std, (1, 1, 1, 3)), np.float32, "std")], {}))
        if pre.dtype is InputDType.FLOAT16:
            steps.append(("Cast", [], {"to": TensorProto.FLOAT16}))
    if pre.layout is Layout.NCHW:
        steps.append(("Transpose", [], {"perm": [0, 3, 1, 2]}))
    if not steps:
        steps.append(("Identity", [], {}))
    for i, (op_type, extra, attrs) in enumerate(steps):
        last = i == len(steps) - 1
        x = b.op(op_type, [x, *extra], op_type.lower(), out=target if last else None, **attrs)


def _classification_nodes(b: _Nodes, spec: ImportSpec, source: str, dims: list[int | None], elem: int) -> int:
    """Original output -> ``probs`` [N, C]; returns C."""
    n_labels = len(spec.labels)
    rest = dims[1:]
    if not rest or (all(d is not None for d in rest) and math.prod(rest) != n_labels):  # type: ignore[arg-type]
        raise ValueError(
            f"Got a model output of shape {_fmt(dims)}; expected [N, {n_labels}] for {n_labels} labels"
        )
    x = source
    if elem == TensorProto.FLOAT16:
        x = b.op("Cast", [x], "f32", to=TensorProto.FLOAT)
    elif elem != TensorProto.FLOAT:
        raise ValueError("Got a non-float model output; expected float32 or float16 scores")
    if len(dims) != 2:
        x = b.op("Flatten", [x], "flat", axis=1)
    if spec.output is OutputKind.LOGITS:
        # Softmax on a 2-D tensor along axis 1 means the same in every opset.
        b.op("Softmax", [x], "softmax", out=OUTPUT_NAME, axis=1)
    else:
        b.op("Identity", [x], "probs", out=OUTPUT_NAME)
    return n_labels


def _resolve_head(
    dims: list[int | None], n_classes: int, opts: DetectionOptions
) -> tuple[HeadLayout, bool, int | None]:
    """(layout, objectness, anchors) of a YOLO-style head output ``dims``."""
    if len(dims) != 3:
        raise ValueError(
            f"Got a detection output of shape {_fmt(dims)}; expected [N, 4 + C, A] or [N, A, 4 + C] (YOLO-style)"
        )
    widths = {4 + n_classes: False, 5 + n_classes: True}
    if opts.objectness is not None:
        widths = {k: v for k, v in widths.items() if v == opts.objectness}
    fits = {HeadLayout.CHANNELS_FIRST: dims[1] in widths, HeadLayout.ANCHORS_FIRST: dims[2] in widths}
    want = " or ".join(f"{k} ({'5' if v else '4'} + {n_classes})" for k, v in widths.items())
    if opts.head_layout is HeadLayout.AUTO:
        matches = [k for k, ok in fits.items() if ok]
        if len(matches) != 1:
            raise ValueError(
                f"Got a detection output of shape {_fmt(dims)} for {n_classes} labels; expected one axis of width "
                f"{want} (name the layout with --head-layout channels-first|anchors-first)"
            )
        layout = matches[0]
    else:
        layout = opts.head_layout
        if not fits[layout]:
            raise ValueError(
                f"Got --head-layout {layout.value} and a detection output of shape {_fmt(dims)}; expected a feature "
                f"axis of width {want} for {n_classes} labels"
            )
    width = dims[1] if layout is HeadLayout.CHANNELS_FIRST else dims[2]
    anchors = dims[2] if layout is HeadLayout.CHANNELS_FIRST else dims[1]
    return layout, widths[width], anchors  # type: ignore[index]


def _detection_nodes(
    b: _Nodes, spec: ImportSpec, source: str, dims: list[int | None], elem: int
) -> tuple[HeadLayout, bool, int | None]:
    """YOLO-style head -> boxes [N, K, 4], scores [N, K], classes [N, K] (decode + NMS + pad)."""
    opts = spec.detection
    assert opts is not None
    n_cls = len(spec.labels)
    layout, objectness, anchors = _resolve_head(dims, n_cls, opts)
    k = opts.max_detections
    h, w = spec.input_size
    i64, f32 = np.int64, np.float32

    def sl(x: str, start: int, end: int, hint: str) -> str:
        return b.op("Slice", [x, b.const([start], i64), b.const([end], i64), b.const([2], i64)], hint)

    x = source
    if elem == TensorProto.FLOAT16:
        x = b.op("Cast", [x], "f32", to=TensorProto.FLOAT)
    elif elem != TensorProto.FLOAT:
        raise ValueError("Got a non-float detection output; expected float32 or float16")
    if layout is HeadLayout.CHANNELS_FIRST:
        x = b.op("Transpose", [x], "nac", perm=[0, 2, 1])  # [N, A, F]
    xywh = sl(x, 0, 4, "xywh")
    if objectness:  # YOLOv5: score = objectness * class probability
        cls_scores = b.op("Mul", [sl(x, 5, 5 + n_cls, "cls"), sl(x, 4, 5, "obj")], "score")
    else:
        cls_scores = sl(x, 4, 4 + n_cls, "cls")
    conf, cls_id = b.op("TopK", [cls_scores, b.const([1], i64)], "best", n_out=2, axis=2)  # [N, A, 1]
    xy, wh = sl(xywh, 0, 2, "xy"), sl(xywh, 2, 4, "wh")
    half = b.op("Mul", [wh, b.const(0.5, f32)], "half")
    xyxy = b.op("Concat", [b.op("Sub", [xy, half], "x1y1"), b.op("Add", [xy, half], "x2y2")], "xyxy", axis=2)
    xyxy = b.op("Min", [b.op("Max", [xyxy, b.const(0.0, f32)], "lo"), b.const([w, h, w, h], f32, "hi")], "clip")
    nms_scores = b.op("Transpose", [conf], "nms_scores", perm=[0, 2, 1])  # [N, 1, A]
    nms_boxes = xywh
    if not opts.class_agnostic:
        # Per-class NMS with one NMS class: shift each box's centre by class * offset so
        # boxes of different classes never overlap (the batched-NMS trick). One label per
        # box, as YOLO exports do by default. Cheaper than an [N, C, A] score tensor,
        # whose C classes ONNX Runtime's NMS scans one by one.
        offset = float(_CLASS_OFFSET * max(h, w))
        shift = b.op("Mul", [b.op("Cast", [cls_id], "cls_f", to=TensorProto.FLOAT), b.const(offset, f32)], "shift")
        shift4 = b.op("Mul", [shift, b.const([1.0, 1.0, 0.0, 0.0], f32, "xy_only")], "shift4")  # [N, A, 4]
        nms_boxes = b.op("Add", [xywh, shift4], "nms_boxes")
    # One NMS class, max_output_boxes_per_class = K: at most K selections per image.
    selected = b.op(
        "NonMaxSuppression",
        [nms_boxes, nms_scores, b.const([k], i64, "k"), b.const([opts.iou_threshold], f32, "iou"),
         b.const([opts.score_threshold], f32, "thr")],
        "selected",
        center_point_box=1,  # boxes are cx, cy, w, h
    )  # [M, 3]: (image, 0, anchor)
    img = b.op("Gather", [selected, b.const([0], i64)], "img", axis=1)  # [M, 1]
    img_anchor = b.op("Gather", [selected, b.const([0, 2], i64)], "img_anchor", axis=1)  # [M, 2]
    sel_scores = b.op("GatherND", [nms_scores, selected], "sel_scores")  # [M]
    sel_boxes = b.op("GatherND", [xyxy, img_anchor], "sel_boxes")  # [M, 4]
    sel_ids = b.op("GatherND", [cls_id, img_anchor], "sel_ids1")  # [M, 1]
    sel_ids = b.op("Reshape", [sel_ids, b.const([-1], i64)], "sel_ids")  # [M] (also for M = 0)
    # Each selection's row within its image: how many selections of the same image come
    # before it (CumSum over a one-hot of image ids), whatever order NMS returns them in.
    n = b.op("Gather", [b.op("Shape", [x], "shape"), b.const(0, i64)], "n")  # scalar
    per_image = b.op("Range", [b.const(0, i64), n, b.const(1, i64)], "images")  # [N]
    onehot = b.op("Cast", [b.op("Equal", [img, per_image], "same")], "onehot", to=TensorProto.INT64)
    counts = b.op("CumSum", [onehot, b.const(0, i64)], "counts")  # [M, N]
    row = b.op("Sub", [b.op("GatherElements", [counts, img], "count", axis=1), b.const(1, i64)], "row")
    where = b.op("Concat", [img, row], "where", axis=1)  # [M, 2]
    n1 = b.op("Reshape", [n, b.const([1], i64)], "n1")
    shape_ns = b.op("Concat", [n1, b.const([k], i64)], "shape_ns", axis=0)
    shape_ns4 = b.op("Concat", [shape_ns, b.const([4], i64)], "shape_ns4", axis=0)
    zero_f = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
    pad_scores = b.op("ScatterND", [b.op("ConstantOfShape", [shape_ns], "zs", value=zero_f), where, sel_scores], "ps")
    pad_boxes = b.op("ScatterND", [b.op("ConstantOfShape", [shape_ns4], "zb", value=zero_f), where, sel_boxes], "pb")
    minus1 = helper.make_tensor("v", TensorProto.INT64, [1], [-1])
    pad_ids = b.op("ScatterND", [b.op("ConstantOfShape", [shape_ns], "zc", value=minus1), where, sel_ids], "pc")
    # The best K rows per image, by score; padding (score 0) sorts last.
    top_scores, top_idx = b.op("TopK", [pad_scores, b.const([k], i64)], "top", n_out=2, axis=1)
    b.op("Identity", [top_scores], "scores", out=DETECTION_OUTPUTS[1])
    b.op("GatherElements", [pad_ids, top_idx], "classes", out=DETECTION_OUTPUTS[2], axis=1)
    idx3 = b.op("Reshape", [top_idx, b.const([0, 0, 1], i64)], "idx3")
    shape_nk4 = b.op("Concat", [b.op("Shape", [top_idx], "shape_nk"), b.const([4], i64)], "shape_nk4", axis=0)
    idx4 = b.op("Expand", [idx3, shape_nk4], "idx4")
    b.op("GatherElements", [pad_boxes, idx4], "boxes", out=DETECTION_OUTPUTS[0], axis=1)
    return layout, objectness, anchors


def wrap_onnx(model: onnx.ModelProto, spec: ImportSpec) -> tuple[onnx.ModelProto, WrapInfo]:
    """Wrap ``model`` so that it takes uint8 NHWC ``images`` and obeys the output contract.

    The original nodes, initializers and functions are kept as they are; names are
    prefixed with ``src/`` only when they collide with the contract's names.

    Raises:
        ValueError: the declared options do not fit the graph (dtype, layout, size,
            number of classes, head shape, opset < 11).
    """
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        raise ValueError(
            f"Got a model with opset {opset}; expected >= {MIN_OPSET} (convert it with "
            "onnx.version_converter.convert_version(model, 13) and import the result)"
        )
    src = onnx.ModelProto()
    src.CopyFrom(model)
    graph = src.graph
    init_names = {t.name for t in graph.initializer}
    real_inputs = [vi for vi in graph.input if vi.name not in init_names]
    vi_in = _pick(real_inputs, spec.input_name, "input", "--input-name")
    vi_out = _pick(list(graph.output), spec.output_name, "output", "--output-name")
    others = [vi.name for vi in real_inputs if vi.name != vi_in.name]
    if others:
        raise ValueError(f"Got a model with further inputs {others} besides {vi_in.name!r}; expected one image input")
    fixed_batch = _check_input(vi_in, spec)
    reserved = {INPUT_NAME, OUTPUT_NAME, *DETECTION_OUTPUTS}
    names = _all_names(graph)
    renamed = bool(names & reserved) or any(n.startswith("vf_") for n in names)
    in_name, out_name = vi_in.name, vi_out.name
    if renamed:
        src = onnx.compose.add_prefix(src, "src/")
        graph = src.graph
        in_name, out_name = "src/" + in_name, "src/" + out_name
    if fixed_batch:
        _relax_batch(graph, in_name)
    out_vi = next(v for v in graph.output if v.name == out_name)
    out_dims, out_elem = _dims(out_vi), out_vi.type.tensor_type.elem_type
    if fixed_batch and out_dims and out_dims[0] == 1:
        out_dims[0] = None

    b = _Nodes()
    _preprocess_nodes(b, spec, in_name)
    h, w = spec.input_size
    head: tuple[HeadLayout, bool, int | None] | None = None
    if spec.task is Task.CLASSIFICATION:
        n_cls = _classification_nodes(b, spec, out_name, out_dims, out_elem)
        outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_cls])]
    else:
        assert spec.detection is not None
        n_cls = len(spec.labels)
        head = _detection_nodes(b, spec, out_name, out_dims, out_elem)
        k = spec.detection.max_detections
        outputs = [
            helper.make_tensor_value_info(DETECTION_OUTPUTS[0], TensorProto.FLOAT, ["batch", k, 4]),
            helper.make_tensor_value_info(DETECTION_OUTPUTS[1], TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info(DETECTION_OUTPUTS[2], TensorProto.INT64, ["batch", k]),
        ]
    pre_count = next(i for i, nd in enumerate(b.nodes) if in_name in nd.output) + 1
    wrapped_graph = helper.make_graph(
        [*b.nodes[:pre_count], *graph.node, *b.nodes[pre_count:]],
        "visionfleet_import",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", h, w, 3])],
        outputs,
        initializer=[*graph.initializer, *b.inits],
        sparse_initializer=list(graph.sparse_initializer),
        value_info=list(graph.value_info),
    )
    wrapped = helper.make_model(
        wrapped_graph,
        opset_imports=list(src.opset_import),
        producer_name="visionfleet-import",
        ir_version=max(src.ir_version, 4),  # IR 4+: initializers need not be listed as inputs
        functions=list(src.functions),
    )
    try:
        onnx.checker.check_model(wrapped)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"the wrapped model fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None
    info = WrapInfo(
        original_input=vi_in.name,
        original_output=vi_out.name,
        opset=opset,
        batch_relaxed=fixed_batch,
        renamed=renamed,
        num_classes=n_cls,
        head_layout=head[0] if head else None,
        objectness=head[1] if head else None,
        num_anchors=head[2] if head else None,
    )
    return wrapped, info


# ----------------------------------------------------------------------------- parity


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(box) + area(others) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def reference_detections(
    raw: np.ndarray, spec: ImportSpec, info: WrapInfo
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decode a YOLO-style head and run greedy NMS in numpy (the by-hand path).

    Returns one ``(boxes [n, 4] x1y1x2y2 clipped, scores [n], classes [n])`` per image,
    sorted by descending score, at most ``max_detections`` each.
    """
    opts = spec.detection
    assert opts is not None and info.head_layout is not None
    n_cls = len(spec.labels)
    h, w = spec.input_size
    p = np.asarray(raw, dtype=np.float32)
    if info.head_layout is HeadLayout.CHANNELS_FIRST:
        p = p.transpose(0, 2, 1)
    results = []
    for img in p:
        xywh = img[:, :4]
        cls = img[:, 5 : 5 + n_cls] * img[:, 4:5] if info.objectness else img[:, 4 : 4 + n_cls]
        conf, ids = cls.max(axis=1), cls.argmax(axis=1)
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
        boxes = np.minimum(np.maximum(boxes, 0.0), np.array([w, h, w, h], np.float32))
        keep_b, keep_s, keep_c = [], [], []
        groups = [np.arange(len(conf))] if opts.class_agnostic else [np.flatnonzero(ids == c) for c in range(n_cls)]
        for members in groups:
            members = members[conf[members] > opts.score_threshold]
            order = members[np.argsort(-conf[members], kind="stable")]
            # NMS runs on the unclipped cx,cy,w,h boxes, as in the graph.
            corners = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
            chosen: list[int] = []
            for i in order:
                if len(chosen) >= opts.max_detections:
                    break
                if chosen and (_iou(corners[i], corners[chosen]) > opts.iou_threshold).any():
                    continue
                chosen.append(int(i))
            keep_b += [boxes[i] for i in chosen]
            keep_s += [conf[i] for i in chosen]
            keep_c += [ids[i] for i in chosen]
        order = np.argsort(-np.asarray(keep_s, np.float32), kind="stable")[: opts.max_detections]
        results.append(
            (
                np.asarray(keep_b, np.float32).reshape(-1, 4)[order],
                np.asarray(keep_s, np.float32)[order],
                np.asarray(keep_c, np.int64)[order],
            )
        )
    return results


@dataclass(frozen=True)
class ImportParity:
    """How the wrapped model compares with running the original by hand."""

    n: int
    max_abs_diff: float
    agreement: float  # top-1 agreement (classification) or matched detections (detection)
    detections: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"n": self.n, "max_abs_diff": self.max_abs_diff, "agreement": self.agreement}
        if self.detections is not None:
            d["detections"] = self.detections
        return d


def _batches(images: np.ndarray, fixed_batch: bool) -> list[np.ndarray]:
    step = 1 if fixed_batch else 16
    return [images[i : i + step] for i in range(0, len(images), step)]


def check_import_parity(
    original_session: Any,
    wrapped_session: Any,
    spec: ImportSpec,
    info: WrapInfo,
    images: np.ndarray,
    *,
    atol: float | None = None,
) -> ImportParity:
    """Compare the wrapped model with the original run by hand on the same uint8 images.

    The wrapped model runs on the whole batch (which also proves the dynamic batch); the
    original runs with numpy preprocessing, one image at a time when its batch was
    fixed at 1.

    Raises:
        ImportParityError: outputs differ beyond ``atol`` or a top-1 / detection differs.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (*spec.input_size, 3):
        raise ValueError(f"Got images {images.dtype} {images.shape}; expected uint8 [N, {spec.input_size[0]}, "
                         f"{spec.input_size[1]}, 3]")
    if atol is None:
        atol = 2e-3 if spec.preprocessing.dtype is InputDType.FLOAT16 else 1e-4
    in_name = info.original_input
    out_name = info.original_output
    raw = np.concatenate(
        [
            np.asarray(original_session.run([out_name], {in_name: spec.preprocessing.apply(chunk)})[0])
            for chunk in _batches(images, info.batch_relaxed)
        ]
    ).astype(np.float32)
    try:
        got = wrapped_session.run(None, {INPUT_NAME: images})
    except Exception as exc:  # noqa: BLE001 - ORT's own exception types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if info.batch_relaxed:
            raise ValueError(
                f"the model's input has a fixed batch of 1 and does not run on a batch of {len(images)} ({msg[:300]}); "
                "re-export it with a dynamic batch axis"
            ) from None
        raise ImportParityError(f"the wrapped model fails on {len(images)} images: {msg[:300]}") from None
    if spec.task is Task.CLASSIFICATION:
        ref = raw.reshape(len(images), -1)
        if spec.output is OutputKind.LOGITS:
            ref = _softmax(ref.astype(np.float64)).astype(np.float32)
        probs = got[0]
        if probs.shape != ref.shape:
            hint = ""
            if info.batch_relaxed:
                hint = " (the fixed batch of 1 could not be made dynamic; re-export with a dynamic batch)"
            raise ImportParityError(f"the wrapped model returned {probs.shape}; by hand gave {ref.shape}{hint}")
        diff = float(np.abs(probs - ref).max()) if len(images) else 0.0
        agree = float((probs.argmax(1) == ref.argmax(1)).mean()) if len(images) else 1.0
        if diff > atol or agree < 1.0:
            raise ImportParityError(
                f"the wrapped model and the original run by hand disagree on {len(images)} images: max |diff| = "
                f"{diff:.2e} (tolerance {atol:.0e}), top-1 agreement {agree:.2%}"
            )
        return ImportParity(n=len(images), max_abs_diff=diff, agreement=agree)
    boxes, scores, classes = got
    ref_dets = reference_detections(raw, spec, info)
    box_tol = max(1e-3, atol * max(spec.input_size))
    worst, total, matched = 0.0, 0, 0
    for i, (rb, rs, rc) in enumerate(ref_dets):
        keep = scores[i] > 0
        gb, gs, gc = boxes[i][keep], scores[i][keep], classes[i][keep]
        total += len(rs)
        if len(gs) != len(rs):
            raise ImportParityError(
                f"image {i}: the wrapped model kept {len(gs)} detections, decoding by hand kept {len(rs)}"
            )
        used = np.zeros(len(gs), bool)
        for b_, s_, c_ in zip(rb, rs, rc):
            cand = np.flatnonzero(~used & (gc == c_) & (np.abs(gs - s_) <= atol))
            if cand.size == 0:
                raise ImportParityError(f"image {i}: no wrapped detection of class {c_} with score {s_:.4f}")
            d = np.abs(gb[cand] - b_).max(axis=1)
            j = cand[int(d.argmin())]
            if d.min() > box_tol:
                raise ImportParityError(f"image {i}: box {b_.tolist()} came out as {gb[j].tolist()}")
            used[j] = True
            matched += 1
            worst = max(worst, float(d.min()), float(abs(gs[j] - s_)))
    return ImportParity(
        n=len(images), max_abs_diff=worst, agreement=(matched / total) if total else 1.0, detections=total
    )


# ----------------------------------------------------------------------------- sample images


def sample_images(size: tuple[int, int], resize: ResizeMode | str, n: int = 24, seed: int = 20240) -> np.ndarray:
    """Real encoded images (procedural, JPEG round trip) preprocessed like serving does.

    Used for parity checks when the user gives no images of their own; the originals
    have varied aspect ratios so letterbox and center-crop paths are exercised.
    """
    from visionfleet.datasets.synth import render_sample

    out = []
    for i in range(n):
        img, _ = render_sample(seed, i, size=96)
        crop = img[: 64 + (i % 3) * 16] if i % 2 else img[:, : 64 + (i % 3) * 16]
        decoded = decode_image(encode_image(np.ascontiguousarray(crop), "jpeg", quality=90))
        out.append(resize_image(decoded, size, resize)[0])
    return np.stack(out)


def load_sample_images(folder: str | os.PathLike[str], size: tuple[int, int], resize: ResizeMode | str,
                       limit: int = 32) -> np.ndarray:
    """Decode and resize up to ``limit`` images from ``folder`` (sorted by name)."""
    p = Path(folder)
    if not p.is_dir():
        raise NotADirectoryError(f"no such folder: {p}")
    images = []
    for f in sorted(p.iterdir()):
        if len(images) >= limit:
            break
        if f.is_file() and f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"):
            images.append(resize_image(decode_image(f.read_bytes()), size, resize)[0])
    if not images:
        raise ValueError(f"Got no images in {p}; expected JPEG, PNG, WebP, BMP or TIFF files")
    return np.stack(images)


# ----------------------------------------------------------------------------- import + register


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _precision_of(model: onnx.ModelProto) -> str:
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"}:
        return "int8"
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def _set_metadata(model: onnx.ModelProto, metadata: Mapping[str, object]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            prop = model.metadata_props.add()
            prop.key, prop.value = key, text


def _card_preprocessing(spec: ImportSpec, info: WrapInfo | None) -> dict[str, Any]:
    d = {
        **spec.preprocessing.to_dict(),
        "input_name": info.original_input if info else None,
        "output": (spec.output or OutputKind.PROBS).value,
        "folded_into_graph": True,
        "resize": spec.resize.value,
    }
    if spec.detection is not None:
        d["postprocessing"] = {"decode": "yolo-cxcywh", "nms": "onnx NonMaxSuppression", **spec.detection.to_dict()}
    return d


def import_onnx(
    path: str | os.PathLike[str],
    registry: Any,
    name: str,
    spec: ImportSpec,
    *,
    images: np.ndarray | None = None,
    description: str = "",
) -> ModelCard:
    """Import an ONNX model from any framework: wrap, check parity, register.

    Args:
        path: the ``.onnx`` file (external data, if any, must sit inside its folder).
        registry: a :class:`visionfleet.registry.Registry`.
        name: the model name to register under (a new version).
        spec: everything declared about the model.
        images: uint8 NHWC images at the model size for the parity check; default
            :func:`sample_images`.
    Returns:
        The stored card.
    Raises:
        ValueError: unsafe or invalid file, or declared options that do not fit it.
        ImportParityError: the wrapped graph disagrees with running the original by hand.
    """
    p = check_source_file(path)
    if p.suffix.lower() != ".onnx":
        raise ValueError(f"Got {p.name!r} for import_onnx; expected a .onnx file")
    original = load_onnx_safely(p)
    original_session = _ort_session(original.SerializeToString(), p.name)
    wrapped, info = wrap_onnx(original, spec)
    if images is None:
        images = sample_images(spec.input_size, spec.resize)
    wrapped_session = _ort_session(wrapped.SerializeToString(), f"the wrapped {p.name}")
    parity = check_import_parity(original_session, wrapped_session, spec, info, images)
    source_sha = _sha256(p)
    source_meta = {pr.key: pr.value for pr in original.metadata_props}
    metadata: dict[str, object] = {
        "task": spec.task.value,
        "labels": list(spec.labels),
        "input_name": INPUT_NAME,
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "input_size": list(spec.input_size),
        "resize": spec.resize.value,
        "normalization": spec.preprocessing.to_dict(),
        "framework": spec.framework,
        "model_name": name,
        "imported_from": {"file": p.name, "sha256": source_sha, **info.to_dict()},
    }
    if spec.task is Task.CLASSIFICATION:
        metadata["output_name"] = OUTPUT_NAME
    else:
        assert spec.detection is not None
        metadata["output_names"] = list(DETECTION_OUTPUTS)
        metadata["max_detections"] = spec.detection.max_detections
        metadata["detection"] = spec.detection.to_dict()
    if source_meta:
        text = json.dumps(source_meta)
        metadata["source_metadata"] = text if len(text) <= 65536 else json.dumps({"truncated": True})
    _set_metadata(wrapped, metadata)
    step = {
        "op": "import",
        "format": "onnx",
        "source": p.name,
        "sha256": source_sha,
        "framework": spec.framework,
        **info.to_dict(),
    }
    if spec.detection is not None:
        step["detection"] = spec.detection.to_dict()
    card = ModelCard(
        name=name,
        task=spec.task,
        labels=list(spec.labels),
        input_size=spec.input_size,
        resize=spec.resize,
        model_file="model.onnx",
        format="onnx",
        precision=_precision_of(original),
        framework=spec.framework,
        preprocessing=_card_preprocessing(spec, info),
        metrics={"import_parity": parity.to_dict()},
        lineage=Lineage(steps=[step]),
        description=description or f"imported from {p.name}",
    )
    with tempfile.TemporaryDirectory(prefix="vf-import-") as tmp:
        out = Path(tmp) / "model.onnx"
        onnx.save_model(wrapped, os.fspath(out))
        return registry.register(card, {"onnx": out})


def _load_state_dict(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from the weights-only unpickler
            blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; quote only the refused item.
        found = re.search(r"(Trying to load unsupported GLOBAL [^\n]*|Unsupported [^\n]*)", str(exc))
        why = found.group(1).strip() if found else "not tensors and plain containers only"
        raise ValueError(
            f"{path.name} is not a weights-only checkpoint: torch.load(weights_only=True) refused it ({why[:200]}). "
            "visionfleet never unpickles code; save a state dict with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - zip/format errors of every kind
        raise ValueError(f"{path.name} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path.name} holds no state dict; expected {{name: tensor}} (or a dict with a 'state_dict' entry)"
        )
    return dict(state)


def import_checkpoint(
    path: str | os.PathLike[str],
    registry: Any,
    name: str,
    spec: ImportSpec,
    arch: Mapping[str, Any],
    *,
    images: np.ndarray | None = None,
    description: str = "",
) -> ModelCard:
    """Import a state dict of a built-in architecture: load safely, export, register.

    Args:
        path: a ``.pt``/``.pth`` file loaded with ``torch.load(weights_only=True)``.
        spec: labels, input size, resize and normalization; the layout is NCHW float32
            RGB and the output logits, as for every built-in architecture.
        arch: the :class:`train.models.ArchSpec` fields (``num_classes`` comes from the labels).
    Raises:
        ValueError: unsafe or unreadable file, or a state dict that does not fit ``arch``.
        ExportParityError: the exported ONNX disagrees with torch.
    """
    p = check_source_file(path)
    if p.suffix.lower() not in _CHECKPOINT_SUFFIXES:
        raise ValueError(f"Got {p.name!r} for import_checkpoint; expected a .pt or .pth file")
    pre = spec.preprocessing
    fixed = {
        "--task": (spec.task, Task.CLASSIFICATION),
        "--layout": (pre.layout, Layout.NCHW),
        "--input-dtype": (pre.dtype, InputDType.FLOAT32),
        "--channel-order": (pre.channel_order, ChannelOrder.RGB),
        "--output": (spec.output or OutputKind.LOGITS, OutputKind.LOGITS),
    }
    for flag, (got, want) in fixed.items():
        if got is not want:
            raise ValueError(
                f"Got {flag} {got.value} for a PyTorch checkpoint; expected {want.value} (built-in architectures "
                "are RGB NCHW float32 classifiers returning logits)"
            )
    for flag, got in (("--input-name", spec.input_name), ("--output-name", spec.output_name)):
        if got is not None:
            raise ValueError(f"Got {flag} for a PyTorch checkpoint; expected none (it applies to ONNX files)")
    from train.models import ArchSpec, build_model

    arch_dict = {k: v for k, v in dict(arch).items() if v is not None}
    if "num_classes" in arch_dict and int(arch_dict["num_classes"]) != len(spec.labels):
        raise ValueError(f"Got num_classes {arch_dict['num_classes']} and {len(spec.labels)} labels; expected equal")
    arch_spec = ArchSpec.from_dict({**arch_dict, "num_classes": len(spec.labels)})
    state = _load_state_dict(p)
    model = build_model(arch_spec)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            pairs = (f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:3])
            parts.append("shape mismatch " + ", ".join(pairs))
        raise ValueError(f"Got a state dict that does not fit {arch_spec.to_dict()}: " + "; ".join(parts))
    model.load_state_dict(state)
    model.eval()
    # export_onnx folds mean/std on the 0..255 scale.
    factor = 255.0 if pre.scale is PixelScale.UNIT else 1.0
    mean255 = [m * factor for m in pre.mean]
    std255 = [s * factor for s in pre.std]
    if images is None:
        images = sample_images(spec.input_size, spec.resize)
    import torch

    from edge_export.onnx_export import export_onnx

    source_sha = _sha256(p)
    with tempfile.TemporaryDirectory(prefix="vf-import-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        parity = export_onnx(
            model,
            onnx_path,
            input_size=spec.input_size,
            mean=mean255,
            std=std255,
            metadata={
                "task": Task.CLASSIFICATION.value,
                "labels": list(spec.labels),
                "resize": spec.resize.value,
                "model_name": name,
                "framework": spec.framework,
                "arch": arch_spec.to_dict(),
                "imported_from": {"file": p.name, "sha256": source_sha},
            },
            parity_images=images,
        )
        # Re-saved in the training loop's checkpoint format (tensors and plain values
        # only), so fine-tuning and pruning can start from an imported version.
        torch_path = Path(tmp) / "model.pt"
        torch.save(
            {
                "state_dict": model.state_dict(),
                "arch": arch_spec.to_dict(),
                "labels": list(spec.labels),
                "input_size": list(spec.input_size),
                "resize": spec.resize.value,
                "mean": mean255,
                "std": std255,
                "metrics": "{}",
                "dataset": None,
            },
            torch_path,
        )
        card = ModelCard(
            name=name,
            task=Task.CLASSIFICATION,
            labels=list(spec.labels),
            input_size=spec.input_size,
            resize=spec.resize,
            model_file="model.onnx",
            format="onnx",
            precision="fp32",
            framework=spec.framework,
            arch=arch_spec.to_dict(),
            preprocessing={**_card_preprocessing(spec, None), "input_name": None, "mean_0_255": mean255,
                           "std_0_255": std255},
            metrics={"export_parity": parity.to_dict() if parity else None},
            lineage=Lineage(
                steps=[{"op": "import", "format": "pytorch-state-dict", "source": p.name, "sha256": source_sha,
                        "framework": spec.framework, "arch": arch_spec.to_dict()}]
            ),
            description=description or f"imported from {p.name}",
        )
        return registry.register(card, {"onnx": onnx_path, "torch": torch_path})


def import_model(
    path: str | os.PathLike[str],
    registry: Any,
    name: str,
    spec: ImportSpec,
    *,
    arch: Mapping[str, Any] | None = None,
    images: np.ndarray | None = None,
    description: str = "",
) -> ModelCard:
    """Import ``.onnx`` (any framework) or ``.pt``/``.pth`` (built-in architecture) by suffix."""
    p = check_source_file(path)
    arch = {k: v for k, v in (arch or {}).items() if v is not None}
    if p.suffix.lower() == ".onnx":
        if arch:
            raise ValueError(f"Got {sorted(arch)} for an ONNX file; expected architecture options only with .pt/.pth")
        return import_onnx(p, registry, name, spec, images=images, description=description)
    if not arch.get("arch"):
        raise ValueError(f"Got {p.name!r} without --arch; expected the built-in architecture (resnet or mobilenetv3)")
    return import_checkpoint(p, registry, name, spec, arch, images=images, description=description)
