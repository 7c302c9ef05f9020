"""Raw anchor-based detection heads decoded in the graph into the one head the importer takes.

Many shipped detectors stop before box decoding: an SSD/BlazeFace model returns
regressors against a fixed anchor grid and raw score logits, a PP-PicoDet (GFL) model
returns per-stride class scores and box *distributions*. The importer's detection
wrapper (:mod:`.wrap`) takes one YOLO-style, anchors-first head ``[N, A, 4 + C]``:
``cx, cy, w, h`` in model-input pixels, then C class scores in [0, 1]. The functions
here append the decoding to the original graph (its nodes untouched) so that its only
output is such a head, named :data:`HEAD`; the result is then imported with
``head_layout=anchors-first``, and decoding, NMS and padding all live in the one file.

* :func:`ssd_anchor_centers` / :func:`ssd_head`: MediaPipe's SSD anchors
  (``ssd_anchors_calculator``, fixed anchor size) and its BlazeFace decoding
  (``tflite_tensors_to_detections``: centres offset from the anchor, sizes as given,
  scores clipped to +-80 and put through a sigmoid).
* :func:`gfl_head`: PP-PicoDet's generalized-focal-loss boxes: per stride, a softmax
  over ``reg_max + 1`` bins per side, its expectation times the stride is the distance
  from the cell centre to each side (left, top, right, bottom); scores already sigmoid.
* :func:`yolox_head`: YOLOX exported without its decoding (``decode_in_inference=False``):
  ``[N, A, 5 + C]`` with grid offsets and log sizes; the centre is ``(offset + cell) x
  stride``, the size ``exp(log size) x stride``; objectness and class scores are kept
  (import it with ``objectness=True``: the score is objectness x class score).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["HEAD", "ssd_anchor_centers", "ssd_head", "gfl_centers", "gfl_head", "yolox_head"]

HEAD = "head"


def ssd_anchor_centers(input_size: tuple[int, int], strides: list[int], interpolated: bool) -> np.ndarray:
    """Anchor centres in model-input pixels ``[A, 2]`` (x, y), MediaPipe's order.

    Consecutive layers of equal stride share one grid; each cell holds two anchors per
    such layer when ``interpolated`` (aspect ratio 1 plus the interpolated scale), else one.
    """
    h, w = input_size
    out = []
    i = 0
    while i < len(strides):
        j = i
        while j < len(strides) and strides[j] == strides[i]:
            j += 1
        per_cell = (j - i) * (2 if interpolated else 1)
        s = strides[i]
        fh, fw = int(np.ceil(h / s)), int(np.ceil(w / s))
        for y in range(fh):
            for x in range(fw):
                out.extend([((x + 0.5) / fw * w, (y + 0.5) / fh * h)] * per_cell)
        i = j
    return np.asarray(out, np.float32)


def _const(g: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _slice(g: onnx.GraphProto, src: str, start: int, end: int, name: str) -> str:
    starts = _const(g, f"{name}__starts", np.array([start], np.int64))
    ends = _const(g, f"{name}__ends", np.array([end], np.int64))
    axes = _const(g, f"{name}__axes", np.array([-1], np.int64))
    g.node.append(helper.make_node("Slice", [src, starts, ends, axes], [name]))
    return name


def _finish(model: onnx.ModelProto, n_anchors: int, n_classes: int) -> onnx.ModelProto:
    g = model.graph
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(HEAD, TensorProto.FLOAT, ["N", n_anchors, 4 + n_classes]))
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < 11:
            op.version = 11
    onnx.checker.check_model(model)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _output_dims(model: onnx.ModelProto, name: str) -> list[int]:
    for o in model.graph.output:
        if o.name == name:
            return [d.dim_value if d.HasField("dim_value") else -1 for d in o.type.tensor_type.shape.dim]
    names = [o.name for o in model.graph.output]
    raise ValueError(f"Got no output {name!r} in the model; expected one of {names}")


def ssd_head(
    model: onnx.ModelProto, boxes: str, scores: str, anchors: np.ndarray, *, score_clip: float = 80.0
) -> onnx.ModelProto:
    """BlazeFace/SSD regressors ``[N, A, >=4]`` + logits ``[N, A, C]`` -> :data:`HEAD` ``[N, A, 4 + C]``.

    ``anchors`` are centres in input pixels (:func:`ssd_anchor_centers`); the regressors'
    first four values are the centre offset and the size, in input pixels.
    """
    a = np.asarray(anchors, np.float32)
    bd, sd = _output_dims(model, boxes), _output_dims(model, scores)
    if len(bd) != 3 or bd[1] != len(a) or bd[2] < 4 or len(sd) != 3 or sd[1] != len(a):
        raise ValueError(
            f"Got outputs {boxes!r} {bd} and {scores!r} {sd} for {len(a)} anchors; expected [N, {len(a)}, >=4] "
            f"regressors and [N, {len(a)}, C] scores"
        )
    m = _copy(model)
    g = m.graph
    xy = _slice(g, boxes, 0, 2, "ssd_xy_offset")
    wh = _slice(g, boxes, 2, 4, "ssd_wh")
    g.node.append(helper.make_node("Add", [xy, _const(g, "ssd_anchor_xy", a)], ["ssd_xy"]))
    lo = _const(g, "ssd_clip_lo", np.array(-score_clip, np.float32))
    hi = _const(g, "ssd_clip_hi", np.array(score_clip, np.float32))
    g.node.append(helper.make_node("Clip", [scores, lo, hi], ["ssd_logits"]))
    g.node.append(helper.make_node("Sigmoid", ["ssd_logits"], ["ssd_scores"]))
    g.node.append(helper.make_node("Concat", ["ssd_xy", wh, "ssd_scores"], [HEAD], axis=-1))
    return _finish(m, len(a), sd[2])


def gfl_centers(input_size: tuple[int, int], strides: list[int]) -> list[np.ndarray]:
    """Cell centres ``[A_s, 2]`` (x, y) in input pixels per stride, row by row (PicoDet's order)."""
    h, w = input_size
    out = []
    for s in strides:
        ys, xs = np.arange(h / s), np.arange(w / s)
        xx, yy = np.meshgrid(xs, ys)
        out.append(np.stack([(xx.ravel() + 0.5) * s, (yy.ravel() + 0.5) * s], axis=1).astype(np.float32))
    return out


def gfl_head(
    model: onnx.ModelProto,
    score_outputs: list[str],
    box_outputs: list[str],
    strides: list[int],
    input_size: tuple[int, int],
) -> onnx.ModelProto:
    """PP-PicoDet per-stride scores ``[N, A_s, C]`` + distributions ``[N, A_s, 4 (R + 1)]`` -> :data:`HEAD`."""
    if not (len(score_outputs) == len(box_outputs) == len(strides)):
        raise ValueError(
            f"Got {len(score_outputs)} score outputs, {len(box_outputs)} box outputs and {len(strides)} strides; "
            "expected one of each per stride"
        )
    centers = gfl_centers(input_size, strides)
    m = _copy(model)
    g = m.graph
    n_classes, total = None, 0
    xys, whs = [], []
    for i, (sc, bx, s, c) in enumerate(zip(score_outputs, box_outputs, strides, centers)):
        sd, bd = _output_dims(model, sc), _output_dims(model, bx)
        if len(sd) != 3 or len(bd) != 3 or sd[1] != len(c) or bd[1] != len(c) or bd[2] % 4:
            raise ValueError(
                f"Got {sc!r} {sd} and {bx!r} {bd} at stride {s} of a {input_size[0]}x{input_size[1]} input; expected "
                f"[N, {len(c)}, C] scores and [N, {len(c)}, 4 (reg_max + 1)] distributions"
            )
        n_classes = sd[2] if n_classes is None else n_classes
        bins = bd[2] // 4
        shape4 = _const(g, f"gfl{i}_shape4", np.array([0, -1, 4, bins], np.int64))
        g.node.append(helper.make_node("Reshape", [bx, shape4], [f"gfl{i}_bins"]))
        g.node.append(helper.make_node("Softmax", [f"gfl{i}_bins"], [f"gfl{i}_p"], axis=-1))
        proj = _const(g, f"gfl{i}_proj", (np.arange(bins, dtype=np.float32) * s).reshape(bins, 1))
        g.node.append(helper.make_node("MatMul", [f"gfl{i}_p", proj], [f"gfl{i}_d1"]))
        shape3 = _const(g, f"gfl{i}_shape3", np.array([0, -1, 4], np.int64))
        g.node.append(helper.make_node("Reshape", [f"gfl{i}_d1", shape3], [f"gfl{i}_ltrb"]))
        lt = _slice(g, f"gfl{i}_ltrb", 0, 2, f"gfl{i}_lt")
        rb = _slice(g, f"gfl{i}_ltrb", 2, 4, f"gfl{i}_rb")
        g.node.append(helper.make_node("Sub", [rb, lt], [f"gfl{i}_shift2"]))
        half = _const(g, f"gfl{i}_half", np.array(0.5, np.float32))
        g.node.append(helper.make_node("Mul", [f"gfl{i}_shift2", half], [f"gfl{i}_shift"]))
        g.node.append(helper.make_node("Add", [f"gfl{i}_shift", _const(g, f"gfl{i}_c", c)], [f"gfl{i}_xy"]))
        g.node.append(helper.make_node("Add", [lt, rb], [f"gfl{i}_wh"]))
        xys.append(f"gfl{i}_xy")
        whs.append(f"gfl{i}_wh")
        total += len(c)
    g.node.append(helper.make_node("Concat", xys, ["gfl_xy"], axis=1))
    g.node.append(helper.make_node("Concat", whs, ["gfl_wh"], axis=1))
    g.node.append(helper.make_node("Concat", list(score_outputs), ["gfl_scores"], axis=1))
    g.node.append(helper.make_node("Concat", ["gfl_xy", "gfl_wh", "gfl_scores"], [HEAD], axis=-1))
    return _finish(m, total, int(n_classes or 0))


def yolox_head(model: onnx.ModelProto, output: str, strides: list[int], input_size: tuple[int, int]) -> onnx.ModelProto:
    """YOLOX raw grid ``[N, A, 5 + C]`` -> :data:`HEAD` ``[N, A, 5 + C]`` (cx, cy, w, h in pixels, obj, classes)."""
    h, w = input_size
    grids, steps = [], []
    for s in strides:
        xv, yv = np.meshgrid(np.arange(w // s), np.arange(h // s))
        grids.append(np.stack([xv.ravel(), yv.ravel()], axis=1))
        steps.append(np.full((grids[-1].shape[0], 1), s))
    grid = np.concatenate(grids).astype(np.float32)
    stride = np.concatenate(steps).astype(np.float32)
    dims = _output_dims(model, output)
    if len(dims) != 3 or dims[1] != len(grid) or dims[2] < 6:
        raise ValueError(
            f"Got output {output!r} {dims} for strides {strides} of a {h}x{w} input; expected [N, {len(grid)}, 5 + C]"
        )
    m = _copy(model)
    g = m.graph
    xy = _slice(g, output, 0, 2, "yolox_xy_offset")
    wh = _slice(g, output, 2, 4, "yolox_log_wh")
    rest = _slice(g, output, 4, dims[2], "yolox_scores")
    st = _const(g, "yolox_stride", stride)
    g.node.append(helper.make_node("Add", [xy, _const(g, "yolox_grid", grid)], ["yolox_cell"]))
    g.node.append(helper.make_node("Mul", ["yolox_cell", st], ["yolox_xy"]))
    g.node.append(helper.make_node("Exp", [wh], ["yolox_exp_wh"]))
    g.node.append(helper.make_node("Mul", ["yolox_exp_wh", st], ["yolox_wh"]))
    g.node.append(helper.make_node("Concat", ["yolox_xy", "yolox_wh", rest], [HEAD], axis=-1))
    return _finish(m, len(grid), dims[2] - 4)
