"""The wrapper graph around an unchanged original, so that it obeys the artifact contract.

    images uint8 [N, H, W, 3] (RGB)
      -> channel flip (Gather, when the model wants BGR), or gray levels
         round(0.299 R + 0.587 G + 0.114 B) for a 1-channel model
      -> Cast -> /255 (when mean/std are on the 0..1 scale) -> Sub mean -> Div std
      -> Cast float16 (when the model wants it) -> Transpose (when it wants NCHW)
      -> the original graph, node for node
      -> classification: Flatten, Softmax (for logits)       -> probs [N, C]
      -> detection, a head without NMS (YOLO [N, 4+C, A] / [N, A, 4|5+C], or
         boxes [N, A, 4] + scores [N, A, C]): decode to cx,cy,w,h,
         NonMaxSuppression, pad to K rows                     -> boxes [N, K, 4],
                                                                 scores [N, K],
                                                                 classes [N, K]
      -> detection, a head that already ran NMS (end-to-end [N, R, 6], or
         num_dets/boxes/scores/classes): score threshold, best K, pad (no second NMS)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_export.importer.resolve import DetectionHead, fmt_dims, normalize_dynamic_dims, resolve_spec, tensor_dims
from edge_export.importer.spec import (
    GRAY_WEIGHTS,
    BoxFormat,
    ChannelOrder,
    HeadLayout,
    ImportSpec,
    InputDType,
    Layout,
    OutputKind,
    PixelScale,
)
from visionfleet.names import DETECTION_OUTPUTS, INPUT_NAME, OUTPUT_NAME  # the contract's names
from visionfleet.spec import Task

__all__ = ["WrapInfo", "wrap_onnx", "MIN_OPSET"]

# NonMaxSuppression, Range, CumSum, ScatterND, GatherND and TopK's K input all exist
# from opset 11; every op the wrapper adds is valid from there up to the newest opset.
MIN_OPSET = 11
# Class-aware NMS shifts box centres by class * this * max(H, W): centres and sizes of
# boxes near the input stay far apart across classes (8x the side leaves room for boxes
# reaching well outside the input).
_CLASS_OFFSET = 8


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
    channels: int = 3
    dynamic_dims: tuple[str, ...] = ()  # the graph's -1/0 dims, read as dynamic
    original_outputs: tuple[str, ...] = ()  # a detection head's outputs, in DetectionHead order
    head: DetectionHead | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "original_input": self.original_input,
            "original_output": self.original_output,
            "opset": self.opset,
            "batch_relaxed": self.batch_relaxed,
            "renamed_with_prefix": self.renamed,
            "channels": self.channels,
        }
        if self.dynamic_dims:
            d["dynamic_dims"] = list(self.dynamic_dims)
        if self.head_layout is not None:
            d |= {"head_layout": self.head_layout.value, "objectness": self.objectness, "num_anchors": self.num_anchors}
        if self.head is not None:
            d["head"] = self.head.to_dict()
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


def _gray_nodes(b: _Nodes, images: str) -> str:
    """uint8 RGB [N, H, W, 3] -> float32 gray levels [N, H, W, 1], as :func:`.spec.rgb_to_gray`.

    Per-channel Gather, Mul and Add in the same order as the numpy reference (no MatMul,
    whose summation order and FMA use are the kernel's), then Round (half to even, like
    numpy): the two agree bit for bit, which a uint8 input needs.
    """
    x = b.op("Cast", [images], "gray_f", to=TensorProto.FLOAT)
    parts = [
        b.op("Mul", [b.op("Gather", [x, b.const([i], np.int64)], f"ch{i}", axis=3), b.const(w, np.float32)], f"w{i}")
        for i, w in enumerate(GRAY_WEIGHTS)
    ]
    rg = b.op("Add", [parts[0], parts[1]], "rg")
    return b.op("Round", [b.op("Add", [rg, parts[2]], "luma")], "gray")


def _preprocess_nodes(b: _Nodes, spec: ImportSpec, target: str) -> None:
    """images (uint8 NHWC RGB) -> the original model's input tensor ``target``."""
    pre = spec.preprocessing
    x = INPUT_NAME
    steps: list[tuple[str, list[str], dict]] = []
    if pre.channels == 1:
        x = _gray_nodes(b, x)  # float32 gray levels [N, H, W, 1]
        if pre.dtype is InputDType.UINT8:
            steps.append(("Cast", [], {"to": TensorProto.UINT8}))
    elif pre.channel_order is ChannelOrder.BGR:
        # Flip on uint8, before the cast: a quarter of the bytes to move.
        steps.append(("Gather", [b.const([2, 1, 0], np.int64, "bgr")], {"axis": 3}))
    if pre.dtype is not InputDType.UINT8:
        if pre.channels != 1:
            steps.append(("Cast", [], {"to": TensorProto.FLOAT}))
        if pre.scale is PixelScale.UNIT:
            steps.append(("Div", [b.const(255.0, np.float32, "u8max")], {}))
        if any(pre.mean):
            steps.append(("Sub", [b.const(np.reshape(pre.mean, (1, 1, 1, -1)), np.float32, "mean")], {}))
        if any(s != 1.0 for s in pre.std):
            steps.append(("Div", [b.const(np.reshape(pre.std, (1, 1, 1, -1)), np.float32, "std")], {}))
        if pre.dtype is InputDType.FLOAT16:
            steps.append(("Cast", [], {"to": TensorProto.FLOAT16}))
    if pre.layout is Layout.NCHW:
        steps.append(("Transpose", [], {"perm": [0, 3, 1, 2]}))
    if not steps:
        steps.append(("Identity", [], {}))  # the original input is a named tensor of its own
    for i, (op_type, extra, attrs) in enumerate(steps):
        last = i == len(steps) - 1
        x = b.op(op_type, [x, *extra], op_type.lower(), out=target if last else None, **attrs)


def _classification_nodes(b: _Nodes, spec: ImportSpec, source: str, dims: list[int | None], elem: int) -> int:
    """Original output -> ``probs`` [N, C]; returns C."""
    n_labels = len(spec.labels)
    rest = dims[1:]
    if not rest or (all(d is not None for d in rest) and math.prod(rest) != n_labels):  # type: ignore[arg-type]
        raise ValueError(
            f"Got a model output of shape {fmt_dims(dims)}; expected [N, {n_labels}] for {n_labels} labels"
        )
    x = source
    if elem == TensorProto.FLOAT16:
        x = b.op("Cast", [x], "f32", to=TensorProto.FLOAT)
    elif elem != TensorProto.FLOAT:
        raise ValueError(
            f"Got a model output {source!r} of type {TensorProto.DataType.Name(elem).lower()}; expected float32 or "
            "float16 scores (pick another with --output NAME)"
        )
    if len(dims) != 2:
        x = b.op("Flatten", [x], "flat", axis=1)
    if spec.output is OutputKind.LOGITS:
        # Softmax on a 2-D tensor along axis 1 means the same in every opset.
        b.op("Softmax", [x], "softmax", out=OUTPUT_NAME, axis=1)
    else:
        b.op("Identity", [x], "probs", out=OUTPUT_NAME)
    return n_labels


def _float_in(b: _Nodes, x: str, elem: int, what: str) -> str:
    if elem == TensorProto.FLOAT16:
        return b.op("Cast", [x], "f32", to=TensorProto.FLOAT)
    if elem != TensorProto.FLOAT:
        raise ValueError(f"Got a non-float detection output {what!r}; expected float32 or float16")
    return x


def _slice(b: _Nodes, x: str, start: int, end: int, hint: str, axis: int = 2) -> str:
    i64 = np.int64
    return b.op("Slice", [x, b.const([start], i64), b.const([end], i64), b.const([axis], i64)], hint)


def _xyxy_to_cxcywh(b: _Nodes, boxes: str) -> str:
    x1y1, x2y2 = _slice(b, boxes, 0, 2, "x1y1"), _slice(b, boxes, 2, 4, "x2y2")
    cxcy = b.op("Mul", [b.op("Add", [x1y1, x2y2], "sum"), b.const(0.5, np.float32)], "cxcy")
    return b.op("Concat", [cxcy, b.op("Sub", [x2y2, x1y1], "wh")], "xywh", axis=2)


def _cxcywh_to_xyxy(b: _Nodes, xywh: str) -> str:
    xy, wh = _slice(b, xywh, 0, 2, "xy"), _slice(b, xywh, 2, 4, "wh")
    half = b.op("Mul", [wh, b.const(0.5, np.float32)], "half")
    return b.op("Concat", [b.op("Sub", [xy, half], "x1y1"), b.op("Add", [xy, half], "x2y2")], "xyxy", axis=2)


def _clip(b: _Nodes, xyxy: str, h: int, w: int) -> str:
    f32 = np.float32
    return b.op("Min", [b.op("Max", [xyxy, b.const(0.0, f32)], "lo"), b.const([w, h, w, h], f32, "hi")], "clip")


def _nms_nodes(b: _Nodes, spec: ImportSpec, xywh: str, cls_scores: str) -> None:
    """cx,cy,w,h boxes [N, A, 4] and class scores [N, A, C] -> the contract's padded boxes, scores, classes."""
    opts = spec.detection
    assert opts is not None and spec.input_size is not None
    k = opts.max_detections
    h, w = spec.input_size
    i64, f32 = np.int64, np.float32
    conf, cls_id = b.op("TopK", [cls_scores, b.const([1], i64)], "best", n_out=2, axis=2)  # [N, A, 1]
    xyxy = _clip(b, _cxcywh_to_xyxy(b, xywh), h, w)
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
    n = b.op("Gather", [b.op("Shape", [cls_scores], "shape"), b.const(0, i64)], "n")  # scalar
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


def _topk_nodes(b: _Nodes, spec: ImportSpec, xyxy: str, scores: str, classes: str, valid: str | None) -> None:
    """Rows that already went through the model's NMS -> threshold, best K by score, padded to K.

    ``xyxy`` [N, R, 4], ``scores`` [N, R] float, ``classes`` [N, R] (any number type),
    ``valid`` [N, R] bool (rows past num_dets are not detections) or None.
    """
    opts = spec.detection
    assert opts is not None and spec.input_size is not None
    k = opts.max_detections
    h, w = spec.input_size
    i64, f32 = np.int64, np.float32
    keep = b.op("Greater", [scores, b.const([opts.score_threshold], f32, "thr")], "keep")
    if valid is not None:
        keep = b.op("And", [keep, valid], "keep_valid")
    kept = b.op("Where", [keep, scores, b.const(0.0, f32)], "kept")  # [N, R]
    rows = b.op("Slice", [b.op("Shape", [kept], "shape_nr"), b.const([1], i64), b.const([2], i64)], "rows")  # [1]
    k_c = b.const([k], i64, "k")
    # min(R, K) without Min (int64 Min needs opset 12; the wrapper stays valid from 11).
    kk = b.op("Where", [b.op("Less", [rows, k_c], "fewer"), rows, k_c], "kk")
    top_s, idx = b.op("TopK", [kept, kk], "top", n_out=2, axis=1)  # [N, kk]
    found = b.op("Greater", [top_s, b.const(0.0, f32)], "found")
    cls64 = b.op("Cast", [classes], "cls64", to=TensorProto.INT64)
    top_c = b.op("Where", [found, b.op("GatherElements", [cls64, idx], "top_c", axis=1), b.const(-1, i64)], "cls")
    idx4 = b.op("Expand", [b.op("Reshape", [idx, b.const([0, 0, 1], i64)], "idx3"),
                           b.op("Concat", [b.op("Shape", [idx], "shape_nk"), b.const([4], i64)], "nk4", axis=0)],
                "idx4")
    top_b = b.op("GatherElements", [_clip(b, xyxy, h, w), idx4], "top_b", axis=1)
    found3 = b.op("Reshape", [found, b.const([0, 0, 1], i64)], "found3")
    top_b = b.op("Where", [found3, top_b, b.const(0.0, f32)], "box")
    # Pad from min(R, K) up to K rows: score 0, class -1, box 0, as every other head.
    short = b.op("Sub", [k_c, kk], "short")  # [1]
    z2 = b.const([0, 0, 0], i64, "z3")
    pads2 = b.op("Concat", [z2, short], "pads2", axis=0)  # [0, 0, 0, short]
    pads3 = b.op("Concat", [b.const([0, 0, 0, 0], i64, "z4"), short, b.const([0], i64, "z1")], "pads3", axis=0)
    b.op("Pad", [top_s, pads2, b.const(0.0, f32, "pad0")], "scores", out=DETECTION_OUTPUTS[1], mode="constant")
    b.op("Pad", [top_c, pads2, b.const(-1, i64, "pad_1")], "classes", out=DETECTION_OUTPUTS[2], mode="constant")
    b.op("Pad", [top_b, pads3, b.const(0.0, f32, "padb")], "boxes", out=DETECTION_OUTPUTS[0], mode="constant")


def _detection_nodes(b: _Nodes, spec: ImportSpec, head: DetectionHead, sources: Sequence[str],
                     elems: Sequence[int]) -> None:
    """The head's outputs -> boxes [N, K, 4], scores [N, K], classes [N, K] (see the module docstring)."""
    n_cls = len(spec.labels)
    if head.kind in (HeadLayout.CHANNELS_FIRST, HeadLayout.ANCHORS_FIRST):
        x = _float_in(b, sources[0], elems[0], head.outputs[0])
        if head.kind is HeadLayout.CHANNELS_FIRST:
            x = b.op("Transpose", [x], "nac", perm=[0, 2, 1])  # [N, A, F]
        xywh = _slice(b, x, 0, 4, "xywh")
        if head.objectness:  # YOLOv5: score = objectness * class probability
            cls_scores = b.op("Mul", [_slice(b, x, 5, 5 + n_cls, "cls"), _slice(b, x, 4, 5, "obj")], "score")
        else:
            cls_scores = _slice(b, x, 4, 4 + n_cls, "cls")
        _nms_nodes(b, spec, xywh, cls_scores)
    elif head.kind is HeadLayout.BOXES_SCORES:
        boxes = _float_in(b, sources[0], elems[0], head.outputs[0])
        scores = _float_in(b, sources[1], elems[1], head.outputs[1])
        xywh = boxes if head.box_format is BoxFormat.CXCYWH else _xyxy_to_cxcywh(b, boxes)
        _nms_nodes(b, spec, xywh, scores)
    elif head.kind is HeadLayout.END_TO_END:
        x = _float_in(b, sources[0], elems[0], head.outputs[0])
        boxes = _slice(b, x, 0, 4, "e2e_boxes")
        if head.box_format is BoxFormat.CXCYWH:
            boxes = _cxcywh_to_xyxy(b, boxes)
        i64 = np.int64
        scores = b.op("Reshape", [_slice(b, x, 4, 5, "e2e_s"), b.const([0, -1], i64)], "e2e_scores")
        classes = b.op("Reshape", [_slice(b, x, 5, 6, "e2e_c"), b.const([0, -1], i64)], "e2e_classes")
        _topk_nodes(b, spec, boxes, scores, classes, None)
    else:  # NMS_OUTPUTS: num_dets, boxes, scores, classes
        i64 = np.int64
        num = b.op("Reshape", [b.op("Cast", [sources[0]], "num64", to=TensorProto.INT64), b.const([-1, 1], i64)],
                   "num")  # [N, 1]
        boxes = _float_in(b, sources[1], elems[1], head.outputs[1])
        if head.box_format is BoxFormat.CXCYWH:
            boxes = _cxcywh_to_xyxy(b, boxes)
        scores = _float_in(b, sources[2], elems[2], head.outputs[2])
        r = b.op("Gather", [b.op("Shape", [scores], "shape_s"), b.const(1, i64)], "r")
        rng = b.op("Reshape", [b.op("Range", [b.const(0, i64), r, b.const(1, i64)], "rng"), b.const([1, -1], i64)],
                   "rng2")  # [1, R]
        valid = b.op("Less", [rng, num], "valid")  # [N, R]: rows past num_dets are not detections
        _topk_nodes(b, spec, boxes, scores, sources[3], valid)


def wrap_onnx(model: onnx.ModelProto, spec: ImportSpec) -> tuple[onnx.ModelProto, WrapInfo]:
    """Wrap ``model`` so that it takes uint8 NHWC ``images`` and obeys the output contract.

    The original nodes, initializers and functions are kept as they are; names are
    prefixed with ``src/`` only when they collide with the contract's names.

    Options left ``auto`` are read from the graph first (:func:`.resolve.resolve_spec`);
    a classifier's output kind must be known (``logits`` or ``probs``).

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
    spec, io = resolve_spec(model, spec)
    if spec.task is Task.CLASSIFICATION and spec.output is OutputKind.AUTO:
        raise ValueError(
            "Got --outputs-are auto for wrap_onnx; expected logits or probs (import_onnx measures which on sample "
            "images: edge_export.importer.output_kind)"
        )
    # The graph's -1/0 dims become unknown dims; the nodes stay as they are.
    src, dynamic_dims = normalize_dynamic_dims(model)
    graph = src.graph
    vi_in = next(vi for vi in graph.input if vi.name == io.input_name)
    vi_out = next(vi for vi in graph.output if vi.name == io.output_name)
    out_names = list(io.output_names or (io.output_name,))
    fixed_batch = io.batch_of_one
    reserved = {INPUT_NAME, OUTPUT_NAME, *DETECTION_OUTPUTS}
    names = _all_names(graph)
    renamed = bool(names & reserved) or any(n.startswith("vf_") for n in names)
    in_name, out_name = vi_in.name, vi_out.name
    if renamed:
        src = onnx.compose.add_prefix(src, "src/")
        graph = src.graph
        in_name, out_name = "src/" + in_name, "src/" + out_name
        out_names = ["src/" + o for o in out_names]
    if fixed_batch:
        _relax_batch(graph, in_name)
    out_vi = next(v for v in graph.output if v.name == out_name)
    out_dims, out_elem = tensor_dims(out_vi), out_vi.type.tensor_type.elem_type
    if fixed_batch and out_dims and out_dims[0] == 1:
        out_dims[0] = None

    b = _Nodes()
    _preprocess_nodes(b, spec, in_name)
    assert spec.input_size is not None  # resolve_spec filled it
    h, w = spec.input_size
    head = io.head
    if spec.task is Task.CLASSIFICATION:
        n_cls = _classification_nodes(b, spec, out_name, out_dims, out_elem)
        outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_cls])]
    else:
        assert spec.detection is not None
        n_cls = len(spec.labels)
        assert head is not None
        elems = [next(v for v in graph.output if v.name == o).type.tensor_type.elem_type for o in out_names]
        _detection_nodes(b, spec, head, out_names, elems)
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
        head_layout=head.kind if head else None,
        objectness=head.objectness if head else None,
        num_anchors=head.rows if head else None,
        original_outputs=tuple(io.output_names) if head else (),
        head=head,
        channels=spec.preprocessing.channels or 3,
        dynamic_dims=tuple(dynamic_dims),
    )
    return wrapped, info
