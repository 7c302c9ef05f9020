"""What is declared about a model to import: layout, dtype, channel order, normalization, head.

Nothing about a foreign model is guessed: :class:`ImportRequest` parses the options the
CLI (or an HTTP client) sends, once, into the frozen :class:`ImportSpec` that the
wrapper, the parity check and the registration read. An option left ``auto`` (or an
input size left out) is *read from the model* by :mod:`.resolve` — the graph's own
input shape and element type — or, for whether a classifier returns logits, measured on
the sample images; what was read and measured is recorded in the card.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from visionfleet.imaging import ResizeMode
from visionfleet.spec import Task

__all__ = [
    "Layout",
    "InputDType",
    "ChannelOrder",
    "PixelScale",
    "OutputKind",
    "HeadLayout",
    "BoxFormat",
    "NMS_IN_MODEL",
    "DType",
    "DTYPES",
    "GRAY_WEIGHTS",
    "rgb_to_gray",
    "Preprocessing",
    "DetectionOptions",
    "ImportSpec",
    "ImportRequest",
    "parse_labels",
    "MAX_DETECTIONS_LIMIT",
]

MAX_DETECTIONS_LIMIT = 1000


class Layout(str, enum.Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"
    AUTO = "auto"  # from the axis that holds 1 or 3 channels


class InputDType(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    UINT8 = "uint8"
    AUTO = "auto"  # the graph input's element type


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
    AUTO = "auto"  # measured on the sample images: rows that sum to 1 within [0, 1] are probabilities


class HeadLayout(str, enum.Enum):
    """The detection head a model ends in (see the table in docs/model-import.md)."""

    AUTO = "auto"
    CHANNELS_FIRST = "channels-first"  # YOLOv8/v11 exports: [N, 4 + C, A]
    ANCHORS_FIRST = "anchors-first"  # YOLOv5/v7/YOLOX exports: [N, A, 5 + C]
    END_TO_END = "end-to-end"  # YOLOv10, Ultralytics nms=True: [N, K, 6] rows x1, y1, x2, y2, score, class
    NMS_OUTPUTS = "nms-outputs"  # EfficientNMS-style: num_dets [N, 1], boxes [N, K, 4], scores [N, K], classes [N, K]
    BOXES_SCORES = "boxes-scores"  # SSD/YOLOX/NanoDet-style: boxes [N, A, 4] and scores [N, A, C]


# Heads that already ran NMS: the wrapper keeps theirs (score threshold and top-K only).
NMS_IN_MODEL = frozenset({HeadLayout.END_TO_END, HeadLayout.NMS_OUTPUTS})


class BoxFormat(str, enum.Enum):
    """How a head writes a box: corners or centre and size (in model-input pixels)."""

    AUTO = "auto"  # YOLO heads: cxcywh; end-to-end: xyxy; boxes-scores: from an output name saying xyxy/cxcywh
    XYXY = "xyxy"
    CXCYWH = "cxcywh"


@dataclass(frozen=True)
class DType:
    """How an input dtype is spelled in numpy and in ONNX."""

    np_type: type
    onnx_type: int


DTYPES: dict[InputDType, DType] = {
    InputDType.FLOAT32: DType(np.float32, TensorProto.FLOAT),
    InputDType.FLOAT16: DType(np.float16, TensorProto.FLOAT16),
    InputDType.UINT8: DType(np.uint8, TensorProto.UINT8),
}


# ITU-R BT.601 luma, as cv2.cvtColor(RGB2GRAY) and PIL's convert("L") compute it.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def rgb_to_gray(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] RGB -> float32 [N, H, W, 1] gray levels, rounded to whole levels.

    The wrapper computes the same float32 products and sums in the same order, so the
    rounding (half to even in both numpy and ONNX ``Round``) agrees bit for bit.
    """
    x = images.astype(np.float32)
    r, g, b = (np.float32(w) for w in GRAY_WEIGHTS)
    return np.round((x[..., 0:1] * r + x[..., 1:2] * g) + x[..., 2:3] * b)


@dataclass(frozen=True)
class Preprocessing:
    """What the original model expects, declared by the user (or read from the model).

    The model input is ``((pixels [/ 255]) - mean) / std`` with pixels in the model's
    channel order; ``mean`` and ``std`` list one value per input channel *in that order*
    (a BGR model's mean is B, G, R), on the scale ``scale`` says. A 1-channel model gets
    gray levels (:data:`GRAY_WEIGHTS`) and one mean and std. ``layout``/``dtype`` may be
    ``auto`` and ``channels`` and ``scale`` ``None`` until :func:`.resolve.resolve_spec`
    reads them from the graph (``scale`` ``None``: 0-1 for a float input, raw pixels for
    a uint8 one).
    """

    layout: Layout = Layout.NCHW
    dtype: InputDType = InputDType.FLOAT32
    channel_order: ChannelOrder = ChannelOrder.RGB
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: PixelScale | None = PixelScale.UNIT
    channels: int | None = None  # 1 or 3; None: the model's (3 where it does not say)

    def __post_init__(self) -> None:
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        for what, vals in (("mean", mean), ("std", std)):
            if len(vals) not in (1, 3) or not all(math.isfinite(v) for v in vals):
                raise ValueError(
                    f"Got {list(vals)} for {what}; expected 3 finite numbers (one per channel; one value applies to "
                    "all)"
                )
        if any(v <= 0 for v in std):
            raise ValueError(f"Got {list(std)} for std; expected 3 positive numbers")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"Got {self.channels} input channels; expected 1 (grayscale) or 3 (color)")
        if self.channels == 1:
            for what, vals in (("mean", mean), ("std", std)):
                if len(set(vals)) != 1:
                    raise ValueError(
                        f"Got {list(vals)} for {what} of a 1-channel (grayscale) input; expected one value"
                    )
            if self.channel_order is ChannelOrder.BGR:
                raise ValueError(
                    "Got --channel-order BGR for a 1-channel (grayscale) input; expected RGB (the wrapper makes gray "
                    "from the RGB image as 0.299 R + 0.587 G + 0.114 B)"
                )
            mean, std = mean[:1], std[:1]
        elif len(mean) == 1 or len(std) == 1:
            # One value is every channel's (a "0.5" normalization); stored per channel.
            mean, std = mean * (3 // len(mean)), std * (3 // len(std))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.scale is None and self.dtype is not InputDType.AUTO:
            # Not given: pixels / 255 for a float input; a uint8 input can only take raw pixels.
            object.__setattr__(self, "scale", PixelScale.BYTE if self.dtype is InputDType.UINT8 else PixelScale.UNIT)
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
        return self.scale is PixelScale.BYTE and not any(self.mean) and all(v == 1.0 for v in self.std)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """The declared preprocessing by hand (numpy): uint8 NHWC RGB -> the model's input."""
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
            raise ValueError(f"Got images {x.dtype} {x.shape}; expected uint8 [N, H, W, 3]")
        if self.layout is Layout.AUTO or self.dtype is InputDType.AUTO or self.scale is None:
            raise ValueError(
                f"Got layout {self.layout.value}, dtype {self.dtype.value}; expected them read from the model first "
                "(edge_export.importer.resolve_spec)"
            )
        if self.channels == 1:
            x = rgb_to_gray(x)  # float32 gray levels 0..255
            if self.dtype is InputDType.UINT8:
                x = x.astype(np.uint8)
        elif self.channel_order is ChannelOrder.BGR:
            x = x[..., ::-1]
        if self.dtype is not InputDType.UINT8:
            x = x.astype(np.float32)
            if self.scale is PixelScale.UNIT:
                x = x / np.float32(255.0)
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            x = x.astype(DTYPES[self.dtype].np_type)
        if self.layout is Layout.NCHW:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "layout": self.layout.value,
            "dtype": self.dtype.value,
            "channel_order": self.channel_order.value,
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": self.scale.value if self.scale is not None else None,
            "channels": self.channels or 3,
        }
        if self.channels == 1:
            d["gray"] = "round(0.299 R + 0.587 G + 0.114 B)"
        return d


@dataclass(frozen=True)
class DetectionOptions:
    """Decoding and NMS settings baked into a detection model at import."""

    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 100
    head_layout: HeadLayout = HeadLayout.AUTO
    objectness: bool | None = None  # None: from the head's width (4 + C or 5 + C)
    class_agnostic: bool = False
    box_format: BoxFormat = BoxFormat.AUTO

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
            "box_format": self.box_format.value,
        }


@dataclass(frozen=True)
class ImportSpec:
    """Everything declared about a model to import."""

    task: Task
    labels: tuple[str, ...]
    input_size: tuple[int, int] | None = None  # (height, width); None: the model's fixed size
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    resize: ResizeMode = ResizeMode.STRETCH
    # None: auto for ONNX classifiers (measured on the sample images), logits for checkpoints.
    output: OutputKind | None = None
    input_name: str | None = None  # None: the graph's only input
    output_name: str | None = None  # None: the graph's only output (or the one output that fits)
    framework: str = "onnx"
    detection: DetectionOptions | None = None

    def __post_init__(self) -> None:
        if len(self.labels) < 1 or len(set(self.labels)) != len(self.labels) or any(not lb for lb in self.labels):
            raise ValueError(f"Got labels {list(self.labels)[:10]}; expected unique, non-empty names")
        if self.input_size is not None:
            h, w = self.input_size
            if not (8 <= h <= 4096 and 8 <= w <= 4096):
                raise ValueError(f"Got {h}x{w} for input size; expected HEIGHTxWIDTH within 8..4096")
        if self.task is Task.DETECTION:
            if self.detection is None:
                raise ValueError("Got no detection options for a detection import; expected DetectionOptions")
            if self.output is OutputKind.LOGITS:
                raise ValueError(
                    "Got --outputs-are logits for a detection model; expected probs or auto (YOLO-style heads give "
                    "scores)"
                )
        elif self.detection is not None:
            raise ValueError("Got detection options for a classification import; expected none")
        if self.task is Task.CLASSIFICATION and len(self.labels) < 2:
            raise ValueError(f"Got {len(self.labels)} label for classification; expected at least 2")


# The CLI flag of each ImportRequest field whose flag is not simply its name.
_FLAGS = {"output": "--outputs-are", "output_name": "--output"}


def _spellings(enum_type: type[enum.Enum]) -> str:
    names = [f"{m.value!r}" for m in enum_type if m.value != "auto"]
    text = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
    if any(m.value == "auto" for m in enum_type):
        text += " (or 'auto': read from the model)"
    return text


class ImportRequest(BaseModel):
    """The import options as the CLI (or an HTTP client) sends them, parsed once.

    The defaults are a built-in architecture's (NCHW, float32); ``layout``,
    ``input_dtype`` and ``output`` also take ``"auto"`` and ``input_size`` ``None``, which
    read them from the model (the CLI's defaults). Enum values are case-insensitive.
    """

    model_config = ConfigDict(extra="forbid")

    task: Task = Field(description="classification or detection")
    labels: list[str] = Field(description="class names, in the model's output order")
    input_size: tuple[int, int] | None = Field(
        default=None, description="model input (height, width); None: the model's fixed size"
    )
    layout: Layout = Field(default=Layout.NCHW, description="the original model's input layout, or auto")
    input_dtype: InputDType = Field(default=InputDType.FLOAT32, description="the original input's dtype, or auto")
    channel_order: ChannelOrder = Field(default=ChannelOrder.RGB, description="channel order the model expects")
    mean: tuple[float, ...] = Field(default=(0.0, 0.0, 0.0), description="per channel (model order), or one value")
    std: tuple[float, ...] = Field(default=(1.0, 1.0, 1.0), description="per channel (model order), or one value")
    scale: PixelScale | None = Field(
        default=None, description="scale mean/std are given on: 0-1 or 0-255 (default 0-1; raw pixels for uint8)"
    )
    resize: ResizeMode = Field(default=ResizeMode.STRETCH, description="how images are resized to the input")
    output: OutputKind | None = Field(
        default=None,
        description="classification output: probs, logits or auto (default auto for ONNX, logits for checkpoints)",
    )
    input_name: str | None = Field(default=None, description="graph input to feed; default the only one")
    output_name: str | None = Field(
        default=None, description="graph output to read; default the only one (or the only one that fits)"
    )
    framework: str = Field(default="onnx", description="where the model came from (pytorch, tensorflow, …)")
    score_threshold: float = Field(default=0.25, description="detection: minimum box score kept")
    iou_threshold: float = Field(default=0.45, description="detection: NMS IoU threshold")
    max_detections: int = Field(default=100, description="detection: K rows per image")
    head_layout: HeadLayout = Field(default=HeadLayout.AUTO, description="detection: head layout")
    objectness: bool | None = Field(default=None, description="detection: head has an objectness column")
    class_agnostic: bool = Field(default=False, description="detection: one NMS across classes")
    box_format: BoxFormat = Field(default=BoxFormat.AUTO, description="detection: xyxy or cxcywh boxes, or auto")

    @field_validator("layout", "input_dtype", "channel_order", "output", "head_layout", "box_format", mode="before")
    @classmethod
    def _any_case(cls, value: Any, info: ValidationInfo) -> Any:
        """``nchw``, ``NCHW`` and ``Nchw`` are the same layout (``--layout auto|nchw|nhwc``)."""
        enum_type = {"layout": Layout, "input_dtype": InputDType, "channel_order": ChannelOrder,
                     "output": OutputKind, "head_layout": HeadLayout, "box_format": BoxFormat}[info.field_name]
        if value is None or isinstance(value, enum_type):
            return value
        if isinstance(value, str):
            for member in enum_type:
                if member.value.lower() == value.strip().lower():
                    return member
        raise ValueError(_spellings(enum_type))

    @classmethod
    def parse(cls, **values: Any) -> "ImportRequest":
        """Validate, turning pydantic's report into one ``Got X for Y; expected …`` line."""
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "options"
            msg = str(first["msg"])
            for prefix in ("Input should be ", "Value error, "):
                msg = msg[len(prefix) :] if msg.startswith(prefix) else msg
            flag = _FLAGS.get(where, "--" + where.replace("_", "-"))
            raise ValueError(f"Got {first.get('input')!r} for {flag}; expected {msg}") from None

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
                box_format=self.box_format,
            )
        return ImportSpec(
            task=self.task,
            labels=tuple(self.labels),
            input_size=(int(self.input_size[0]), int(self.input_size[1])) if self.input_size else None,
            preprocessing=Preprocessing(
                layout=self.layout,
                dtype=self.input_dtype,
                channel_order=self.channel_order,
                mean=tuple(float(v) for v in self.mean),
                std=tuple(float(v) for v in self.std),
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
