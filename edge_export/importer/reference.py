"""The by-hand reference (numpy preprocessing, the original graph, numpy decode and NMS) and the parity check.

The wrapped model is checked against running the original by hand on real images
before it is registered; :func:`check_import_parity` raises
:class:`ImportParityError` when they disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_export.importer.spec import HeadLayout, ImportSpec, InputDType, OutputKind
from edge_export.importer.wrap import WrapInfo
from visionfleet.names import INPUT_NAME
from visionfleet.spec import Task

__all__ = ["ImportParityError", "ImportParity", "reference_detections", "check_import_parity"]


class ImportParityError(RuntimeError):
    """The wrapped graph disagrees with running the original model by hand."""


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
