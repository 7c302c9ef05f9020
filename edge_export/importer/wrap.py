"""The wrapper graph around an unchanged original, so that it obeys the artifact contract.

    images uint8 [N, H, W, 3] (RGB)
      -> channel flip (Gather, when the model wants BGR), or gray levels
         round(0.299 R + 0.587 G + 0.114 B) for a 1-channel model
      -> Cast -> /255 (when mean/std are on the 0..1 scale) -> Sub mean -> Div std
      -> Cast float16 (when the model wants it) -> Transpose (when it wants NCHW)
      -> the original graph, node for node
      -> classification: Flatten, Softmax (for logits)       -> probs [N, C]
      -> detection (YOLO-style head): decode cx,cy,w,h boxes, NonMaxSuppression,
         pad to K rows                                        -> boxes [N, K, 4],
                                                                 scores [N, K],
                                                                 classes [N, K]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_export.importer.resolve import fmt_dims, normalize_dynamic_dims, resolve_head, resolve_spec, tensor_dims
from edge_export.importer.spec import (
    GRAY_WEIGHTS,
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


def _detection_nodes(
    b: _Nodes, spec: ImportSpec, source: str, dims: list[int | None], elem: int
) -> tuple[HeadLayout, bool, int | None]:
    """YOLO-style head -> boxes [N, K, 4], scores [N, K], classes [N, K] (decode + NMS + pad)."""
    opts = spec.detection
    assert opts is not None
    n_cls = len(spec.labels)
    layout, objectness, anchors = resolve_head(dims, n_cls, opts)
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
    fixed_batch = io.batch_of_one
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
    out_dims, out_elem = tensor_dims(out_vi), out_vi.type.tensor_type.elem_type
    if fixed_batch and out_dims and out_dims[0] == 1:
        out_dims[0] = None

    b = _Nodes()
    _preprocess_nodes(b, spec, in_name)
    assert spec.input_size is not None  # resolve_spec filled it
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
        channels=spec.preprocessing.channels or 3,
        dynamic_dims=tuple(dynamic_dims),
    )
    return wrapped, info
