"""Export the built-in detector two ways: the artifact contract (decode + NMS inside) and Ultralytics-style.

* :func:`export_detector` writes what ``visionfleet train`` registers: uint8 NHWC
  ``images`` in, normalization folded, the raw maps of
  :class:`train.detect_models.AnchorFreeDetector`, then a decode and per-class NMS tail
  built here node by node (all named ``vf_post_*``, so quantization can keep them in
  FP32) -> ``boxes [N, K, 4]``, ``scores [N, K]``, ``classes [N, K]`` (padding rows:
  score 0, class -1), the same contract ``visionfleet models import`` produces. Serving,
  ``visionfleet predict`` and the edge agent run it unchanged.
* :func:`export_ultralytics_style` writes what a YOLOv8 export looks like (the TorchScript
  exporter, as Ultralytics uses): float32 NCHW
  ``images`` in 0..1, one output ``output0 [N, 4 + C, A]`` of cx, cy, w, h (input pixels)
  and class scores, no NMS. Importing that file with ``visionfleet models import --task
  detection`` must give the same mAP as the native export: a check of the importer's
  decode, which shares no code with the tail here.

An export-time parity check compares ONNX Runtime with torch plus a numpy NMS
(:func:`reference_nms`) on real images and refuses the file when they disagree.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edge_export.onnx_metadata import write_metadata
from train.detect_models import STRIDE, decode, grid_points
from visionfleet.names import DETECTION_OUTPUTS, INPUT_NAME

__all__ = [
    "PostprocessOptions",
    "export_detector",
    "export_ultralytics_style",
    "reference_nms",
    "DetectorParityError",
]

_RAW = ("vf_cls_logits", "vf_ctr_logits", "vf_reg_logits")
_OPSET = 18


class DetectorParityError(RuntimeError):
    """ONNX Runtime and torch (+ numpy NMS) disagree on the exported detector."""


@dataclass(frozen=True)
class PostprocessOptions:
    """Score threshold, NMS IoU and K baked into the exported graph (the importer's defaults)."""

    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 100

    def __post_init__(self) -> None:
        if not 0.0 < self.score_threshold < 1.0:
            raise ValueError(f"Got {self.score_threshold} for score threshold; expected 0 < t < 1")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"Got {self.iou_threshold} for IoU threshold; expected 0 < t <= 1")
        if not 1 <= self.max_detections <= 1000:
            raise ValueError(f"Got {self.max_detections} for max detections; expected 1..1000")

    def to_dict(self) -> dict[str, Any]:
        return {"score_threshold": self.score_threshold, "iou_threshold": self.iou_threshold,
                "max_detections": self.max_detections}


class _RawMaps(nn.Module):
    """uint8 NHWC -> normalized NCHW -> the detector's raw maps."""

    def __init__(self, core: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor):
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return self.core(x)


class _UltralyticsStyle(nn.Module):
    """float NCHW 0..1 -> [N, 4 + C, A] (cx, cy, w, h in input pixels, then class scores), as YOLOv8 exports."""

    def __init__(self, core: nn.Module, mean: Sequence[float], std: Sequence[float], size: tuple[int, int]) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("points", grid_points(*size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, boxes = decode(self.core((x * 255.0 - self.mean) / self.std), self.points)  # [N, C, A], [N, A, 4]
        xy = (boxes[..., :2] + boxes[..., 2:]) / 2
        wh = boxes[..., 2:] - boxes[..., :2]
        return torch.cat([torch.cat([xy, wh], 2).transpose(1, 2), scores], 1)


def _torch_export(module: nn.Module, example: torch.Tensor, input_name: str, output_names: Sequence[str]):
    batch = torch.export.Dim("batch", min=1, max=4096)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            module.eval(), (example,), input_names=[input_name], output_names=list(output_names),
            dynamic_shapes=({0: batch},),
            opset_version=_OPSET, dynamo=True, verbose=False, optimize=True,
        )
    return program.model_proto


# ------------------------------------------------------------------ the graph's tail


class _Tail:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"vf_post_{hint}_{self._n}"

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        n = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def op(self, op_type: str, inputs: Sequence[str], hint: str, *, out: str | None = None, n_out: int = 1, **attrs):
        outs = [out] if out is not None else [self._name(hint) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs


def _add_tail(proto: onnx.ModelProto, size: tuple[int, int], n_cls: int, opts: PostprocessOptions) -> None:
    """raw maps -> scores, single-label per-class NMS, top K padded (in place)."""
    h, w = size
    pts = grid_points(h, w, STRIDE).numpy()
    a = len(pts)
    k = min(opts.max_detections, n_cls * a)
    t = _Tail()
    i64, f32 = np.int64, np.float32
    cls, ctr, reg = _RAW
    scores = t.op("Sqrt", [t.op("Mul", [t.op("Sigmoid", [cls], "pc"), t.op("Sigmoid", [ctr], "pz")], "pcz")], "score")
    # one label per point, as YOLO exports do: only its best class keeps its score
    best = t.op("ReduceMax", [scores, t.const([1], i64)], "best", keepdims=1)  # [N, 1, A]
    single = t.op("Mul", [scores, t.op("Cast", [t.op("Equal", [scores, best], "isbest")], "m", to=TensorProto.FLOAT)],
                  "single")  # [N, C, A]
    dist = t.op("Mul", [t.op("Softplus", [reg], "sp"), t.const(float(STRIDE), f32)], "dist")  # [N, 4, A]
    dist = t.op("Transpose", [dist], "dist_t", perm=[0, 2, 1])  # [N, A, 4]
    corners = np.concatenate([pts, pts], 1).astype(f32)  # [A, 4]: px, py, px, py
    sign = np.array([-1, -1, 1, 1], f32)
    boxes = t.op("Add", [t.const(corners, f32, "pts"), t.op("Mul", [dist, t.const(sign, f32, "sign")], "sd")], "xyxy")
    selected = t.op(
        "NonMaxSuppression",
        [boxes, single, t.const([k], i64, "k"), t.const([opts.iou_threshold], f32, "iou"),
         t.const([opts.score_threshold], f32, "thr")],
        "selected", center_point_box=0,
    )  # [M, 3]: image, class, point
    m = t.op("Slice", [t.op("Shape", [selected], "sel_shape"), t.const([0], i64), t.const([1], i64)], "m")
    ones = t.op("ConstantOfShape", [m], "ones", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    keep = t.op("ScatterND", [t.op("Mul", [single, t.const(0.0, f32)], "zeros"), selected, ones], "keep")
    kept = t.op("Mul", [single, keep], "kept")  # [N, C, A]: NMS survivors keep their score, the rest 0
    flat = t.op("Reshape", [kept, t.const([0, n_cls * a], i64)], "flat")
    top_s, top_i = t.op("TopK", [flat, t.const([k], i64)], "top", n_out=2, axis=1)  # [N, K]
    cls_id = t.op("Div", [top_i, t.const(a, i64)], "cls_id")
    point = t.op("Mod", [top_i, t.const(a, i64)], "point")
    valid = t.op("Greater", [top_s, t.const(0.0, f32)], "valid")
    t.op("Identity", [top_s], "scores", out=DETECTION_OUTPUTS[1])
    t.op("Where", [valid, cls_id, t.const(-1, i64)], "classes", out=DETECTION_OUTPUTS[2])
    clipped = t.op("Min", [t.op("Max", [boxes, t.const(0.0, f32)], "lo"), t.const([w, h, w, h], f32, "hi")], "clip")
    idx = t.op("Expand", [t.op("Unsqueeze", [point, t.const([2], i64)], "p3"),
                          t.op("Concat", [t.op("Shape", [top_i], "nk"), t.const([4], i64)], "nk4", axis=0)], "idx4")
    chosen = t.op("GatherElements", [clipped, idx], "chosen", axis=1)
    t.op("Where", [t.op("Unsqueeze", [valid, t.const([2], i64)], "v3"), chosen, t.const(0.0, f32)], "boxes",
         out=DETECTION_OUTPUTS[0])
    g = proto.graph
    g.node.extend(t.nodes)
    g.initializer.extend(t.inits)
    del g.output[:]
    g.output.extend([
        helper.make_tensor_value_info(DETECTION_OUTPUTS[0], TensorProto.FLOAT, ["batch", k, 4]),
        helper.make_tensor_value_info(DETECTION_OUTPUTS[1], TensorProto.FLOAT, ["batch", k]),
        helper.make_tensor_value_info(DETECTION_OUTPUTS[2], TensorProto.INT64, ["batch", k]),
    ])


# ------------------------------------------------------------------ reference and parity


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    ix1, iy1 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    ix2, iy2 = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(others) - inter, 1e-9)


def reference_nms(scores: np.ndarray, boxes: np.ndarray, size: tuple[int, int], opts: PostprocessOptions):
    """Greedy per-class NMS in numpy on one image's ``scores [C, A]`` and unclipped ``boxes [A, 4]``.

    Returns ``(boxes [n, 4] clipped, scores [n], classes [n])`` by descending score, at most K.
    """
    h, w = size
    best = scores.max(0)
    label = scores.argmax(0)
    out_b, out_s, out_c = [], [], []
    for c in range(scores.shape[0]):
        members = np.flatnonzero((label == c) & (best > opts.score_threshold))
        order = members[np.argsort(-best[members], kind="stable")]
        chosen: list[int] = []
        for i in order:
            if len(chosen) >= opts.max_detections:
                break
            if chosen and (_iou(boxes[i], boxes[chosen]) > opts.iou_threshold).any():
                continue
            chosen.append(int(i))
        out_b += [np.clip(boxes[i], 0, [w, h, w, h]) for i in chosen]
        out_s += [best[i] for i in chosen]
        out_c += [c] * len(chosen)
    order = np.argsort(-np.asarray(out_s, np.float32), kind="stable")[: opts.max_detections]
    return (np.asarray(out_b, np.float32).reshape(-1, 4)[order], np.asarray(out_s, np.float32)[order],
            np.asarray(out_c, np.int64)[order])


def _session(path: Path):
    from visionfleet.inference import RuntimeOptions, create_session

    return create_session(path, RuntimeOptions(threads=1, providers=("CPUExecutionProvider",)))


def _check_parity(module: _RawMaps, path: Path, images: np.ndarray, size, opts: PostprocessOptions) -> dict[str, Any]:
    sess = _session(path)
    pts = grid_points(*size)
    with torch.no_grad():
        scores, boxes = decode(module(torch.from_numpy(images)), pts)
    got_b, got_s, got_c = sess.run(list(DETECTION_OUTPUTS), {INPUT_NAME: images})
    matched = total = 0
    max_diff = 0.0
    for i in range(len(images)):
        rb, rs, rc = reference_nms(scores[i].numpy(), boxes[i].numpy(), size, opts)
        n = int((got_s[i] > 0).sum())
        total += max(n, len(rs))
        for b, s, c in zip(rb, rs, rc):  # each reference box must be in the graph's answer
            hit = np.flatnonzero((got_c[i][:n] == c) & (np.abs(got_s[i][:n] - s) < 1e-4))
            if hit.size:
                d = float(np.abs(got_b[i][hit] - b).max(1).min())
                if d < 1e-2:
                    matched += 1
                    max_diff = max(max_diff, d)
    agreement = matched / total if total else 1.0
    report = {"n": len(images), "detections": total, "agreement": agreement, "max_box_diff_px": max_diff}
    if agreement < 0.98:
        raise DetectorParityError(
            f"ONNX Runtime and torch + numpy NMS disagree on {len(images)} real images: {agreement:.1%} of "
            f"{total} detections match (expected >= 98%)"
        )
    return report


# ------------------------------------------------------------------------- exports


def export_detector(
    core: nn.Module,
    out_path: str | os.PathLike[str],
    *,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    labels: Sequence[str],
    metadata: Mapping[str, object],
    options: PostprocessOptions = PostprocessOptions(),
    parity_images: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """Export the detector as a contract-obeying ONNX file (decode + NMS inside); returns the parity report.

    Raises:
        DetectorParityError: the graph disagrees with torch + numpy NMS on ``parity_images``.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    h, w = input_size
    module = _RawMaps(core.eval(), mean, std).eval()
    proto = _torch_export(module, torch.zeros((2, h, w, 3), dtype=torch.uint8), INPUT_NAME, _RAW)
    _add_tail(proto, (h, w), len(labels), options)
    write_metadata(proto, {
        "input_name": INPUT_NAME, "output_names": list(DETECTION_OUTPUTS), "input_layout": "NHWC",
        "input_dtype": "uint8", "input_size": [h, w], "labels": list(labels),
        "normalization": {"mean": list(map(float, mean)), "std": list(map(float, std)), "scale": "0-255"},
        "max_detections": min(options.max_detections, len(labels) * len(grid_points(h, w))),
        "detection": {**options.to_dict(), "nms": "per-class, one label per point", "decode": "fcos-ltrb"},
        **metadata,
    })
    onnx.checker.check_model(proto)
    tmp = out_path.with_suffix(".onnx.tmp")
    onnx.save_model(proto, str(tmp))
    tmp.replace(out_path)
    if parity_images is None:
        return None
    return _check_parity(module, out_path, parity_images, (h, w), options)


def export_ultralytics_style(
    core: nn.Module,
    out_path: str | os.PathLike[str],
    *,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    check_images: np.ndarray | None = None,
) -> Path:
    """Export the raw head the way ``yolo export format=onnx`` does: ``images`` float NCHW 0..1 -> ``output0 [N, 4+C, A]``.

    No visionfleet metadata: the file is to be imported as a third-party model would be.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    h, w = input_size
    module = _UltralyticsStyle(core.eval(), mean, std, (h, w)).eval()
    # The TorchScript exporter, opset 17, a dynamic batch: what `yolo export format=onnx dynamic=True` runs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.zeros((1, 3, h, w)),), str(out_path), input_names=["images"], output_names=["output0"],
            dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    proto = onnx.load(str(out_path))
    # The tracer leaves the output's feature and anchor dims unknown; at a fixed input size they are
    # [batch, 4 + C, A], as Ultralytics' files state them.
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    n_anchors = len(grid_points(h, w))
    for d, v in zip(list(dims)[1:], (4 + int(core.num_classes), n_anchors)):
        d.Clear()
        d.dim_value = v
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(out_path))
    if check_images is not None:
        x = check_images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        got = _session(out_path).run(None, {"images": x})[0]
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        diff = float(np.abs(got - ref).max())
        if diff > 1e-2:  # pixels (boxes) and scores alike
            raise DetectorParityError(f"the Ultralytics-style export disagrees with torch: max |diff| {diff:.2e}")
    return out_path
