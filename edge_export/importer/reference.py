"""The by-hand reference (numpy preprocessing, the original graph, numpy decode and NMS) and the parity check.

The wrapped model is checked against running the original by hand on real images
before it is registered; :func:`check_import_parity` raises
:class:`ImportParityError` when they disagree. The same by-hand run tells whether a
classifier already returns probabilities (:func:`output_kind`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edge_export.importer.spec import BoxFormat, HeadLayout, ImportSpec, InputDType, OutputKind
from edge_export.importer.wrap import WrapInfo
from visionfleet.names import INPUT_NAME
from visionfleet.spec import Task

__all__ = [
    "ImportParityError",
    "ImportParity",
    "OutputCheck",
    "reference_detections",
    "run_original",
    "output_kind",
    "check_import_parity",
]


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


def _nms_by_hand(
    xywh: np.ndarray, cls: np.ndarray, spec: ImportSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's cx,cy,w,h boxes [A, 4] and class scores [A, C] -> greedy NMS, as the graph does."""
    opts = spec.detection
    assert opts is not None and spec.input_size is not None
    n_cls = cls.shape[1]
    h, w = spec.input_size
    conf, ids = cls.max(axis=1), cls.argmax(axis=1)
    # NMS runs on the unclipped cx,cy,w,h boxes, as in the graph; the kept boxes are clipped.
    corners = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    boxes = np.minimum(np.maximum(corners, 0.0), np.array([w, h, w, h], np.float32))
    keep_b, keep_s, keep_c = [], [], []
    groups = [np.arange(len(conf))] if opts.class_agnostic else [np.flatnonzero(ids == c) for c in range(n_cls)]
    for members in groups:
        members = members[conf[members] > opts.score_threshold]
        order = members[np.argsort(-conf[members], kind="stable")]
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
    return (
        np.asarray(keep_b, np.float32).reshape(-1, 4)[order],
        np.asarray(keep_s, np.float32)[order],
        np.asarray(keep_c, np.int64)[order],
    )


def _topk_by_hand(
    xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray, spec: ImportSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's rows that already went through the model's NMS -> threshold and best K."""
    opts = spec.detection
    assert opts is not None and spec.input_size is not None
    h, w = spec.input_size
    keep = np.flatnonzero(scores > opts.score_threshold)
    order = keep[np.argsort(-scores[keep], kind="stable")][: opts.max_detections]
    boxes = np.minimum(np.maximum(xyxy[order], 0.0), np.array([w, h, w, h], np.float32))
    return boxes.astype(np.float32).reshape(-1, 4), scores[order].astype(np.float32), classes[order].astype(np.int64)


def _xyxy_to_cxcywh(b: np.ndarray) -> np.ndarray:
    return np.concatenate([(b[..., :2] + b[..., 2:]) * np.float32(0.5), b[..., 2:] - b[..., :2]], axis=-1)


def _cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    half = b[..., 2:] * np.float32(0.5)
    return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)


def reference_detections(
    raw: np.ndarray | list[np.ndarray], spec: ImportSpec, info: WrapInfo
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decode the head and run greedy NMS in numpy (the by-hand path); heads with NMS inside get threshold + top-K.

    ``raw`` is the head's output, or its outputs in :class:`.resolve.DetectionHead`
    order (boxes, scores; or num_dets, boxes, scores, classes). Returns one ``(boxes
    [n, 4] x1y1x2y2 clipped, scores [n], classes [n])`` per image, sorted by descending
    score, at most ``max_detections`` each.
    """
    opts = spec.detection
    assert opts is not None and info.head_layout is not None and spec.input_size is not None
    n_cls = len(spec.labels)
    kind = info.head_layout
    cxcywh = info.head is not None and info.head.box_format is BoxFormat.CXCYWH
    parts = [np.asarray(r, np.float32) for r in raw] if isinstance(raw, (list, tuple)) else [
        np.asarray(raw, np.float32)]
    results = []
    if kind is HeadLayout.END_TO_END:
        for img in parts[0]:
            boxes = _cxcywh_to_xyxy(img[:, :4]) if cxcywh else img[:, :4]
            results.append(_topk_by_hand(boxes, img[:, 4], img[:, 5], spec))
        return results
    if kind is HeadLayout.NMS_OUTPUTS:
        num, boxes, scores, classes = parts
        for i in range(len(scores)):
            valid = np.arange(scores.shape[1]) < int(np.asarray(num[i]).reshape(-1)[0])
            b = _cxcywh_to_xyxy(boxes[i]) if cxcywh else boxes[i]
            results.append(_topk_by_hand(b[valid], scores[i][valid], classes[i][valid], spec))
        return results
    if kind is HeadLayout.BOXES_SCORES:
        boxes, scores = parts
        for b, sc in zip(boxes, scores):
            results.append(_nms_by_hand(b if cxcywh else _xyxy_to_cxcywh(b), sc, spec))
        return results
    p = parts[0]
    if kind is HeadLayout.CHANNELS_FIRST:
        p = p.transpose(0, 2, 1)
    for img in p:
        cls = img[:, 5 : 5 + n_cls] * img[:, 4:5] if info.objectness else img[:, 4 : 4 + n_cls]
        results.append(_nms_by_hand(img[:, :4], cls, spec))
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


def run_original(
    session: Any,
    spec: ImportSpec,
    images: np.ndarray,
    *,
    input_name: str,
    output_name: str | Sequence[str],
    batch_of_one: bool,
) -> np.ndarray | list[np.ndarray]:
    """The original graph's raw output on ``images``, preprocessed by hand (numpy) as declared.

    ``spec`` must be resolved (:func:`.resolve.resolve_spec`); a model whose batch is fixed
    at 1 runs one image at a time. Several output names give a list of arrays (a
    detection head with separate outputs), one name one array.
    """
    names = [output_name] if isinstance(output_name, str) else list(output_name)
    if len(names) > 1:
        size = spec.input_size
        if size is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (*size, 3):
            raise ValueError(f"Got images {images.dtype} {images.shape}; expected uint8 [N, H, W, 3] at the model size")
        chunks = [session.run(names, {input_name: spec.preprocessing.apply(c)}) for c in _batches(images, batch_of_one)]
        return [np.concatenate([np.asarray(c[j]) for c in chunks]).astype(np.float32) for j in range(len(names))]
    output_name = names[0]
    size = spec.input_size
    if size is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (*size, 3):
        want = f"[N, {size[0]}, {size[1]}, 3]" if size else "[N, H, W, 3] at the model's size"
        raise ValueError(f"Got images {images.dtype} {images.shape}; expected uint8 {want}")
    return np.concatenate(
        [
            np.asarray(session.run([output_name], {input_name: spec.preprocessing.apply(chunk)})[0])
            for chunk in _batches(images, batch_of_one)
        ]
    ).astype(np.float32)


@dataclass(frozen=True)
class OutputCheck:
    """What a classifier's raw output looked like on the sample images, and what it was taken for."""

    kind: OutputKind  # logits (the wrapper adds a softmax) or probs (kept as they are)
    measured: bool  # True: --outputs-are auto decided; False: declared and checked
    n: int
    min: float
    max: float
    max_row_sum_error: float  # max |sum of a row - 1|

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_kind": self.kind.value,
            "output_kind_from": "measured" if self.measured else "declared",
            "softmax_added": self.kind is OutputKind.LOGITS,
            "output_values": {
                "n": self.n,
                "min": self.min,
                "max": self.max,
                "max_row_sum_error": self.max_row_sum_error,
            },
        }


def output_kind(raw: np.ndarray, declared: OutputKind | None, *, float16: bool = False) -> OutputCheck:
    """Logits or probabilities, from the classifier's raw output on sample images.

    Probabilities lie in [0, 1] and each row sums to 1 (within 1e-3, 1e-2 for a float16
    output); anything reaching outside [0, 1] is logits (log-probabilities too: a softmax
    of them gives the probabilities back). A declared kind is checked the same way, so a
    softmax is never applied twice and logits are never served as probabilities.

    Raises:
        ValueError: non-finite outputs; ``auto`` on scores within [0, 1] that do not sum
            to 1 (sigmoid outputs); ``logits`` declared for probabilities, or ``probs``
            declared for values outside [0, 1].
    """
    if not len(raw):
        raise ValueError("Got no sample images to look at the model's output; expected at least one")
    x = np.asarray(raw, np.float64).reshape(len(raw), -1)
    n = len(x)
    if not np.isfinite(x).all():
        raise ValueError(
            f"Got non-finite values (NaN or inf) in the model's output on {n} sample images; expected finite scores "
            "(check the declared preprocessing: --mean, --std, --scale)"
        )
    tol = 1e-2 if float16 else 1e-3
    lo, hi = float(x.min()), float(x.max())
    sums = x.sum(axis=1)
    err = float(np.abs(sums - 1.0).max())
    in_unit = lo >= -tol and hi <= 1.0 + tol
    looks = OutputKind.PROBS if in_unit and err <= tol else OutputKind.LOGITS if not in_unit else None
    values = f"values in [{lo:.3g}, {hi:.3g}], rows summing to {sums.min():.4g}..{sums.max():.4g} on {n} sample images"
    declared = declared or OutputKind.AUTO
    if declared is OutputKind.AUTO and looks is None:
        raise ValueError(
            f"Got {values} (independent scores, e.g. a sigmoid?); expected probabilities summing to 1 or raw logits: "
            "say --outputs-are probs to keep them as they are, or --outputs-are logits to add a softmax"
        )
    if declared is OutputKind.LOGITS and looks is OutputKind.PROBS:
        raise ValueError(
            f"Got --outputs-are logits, but the output has {values} (the model already ends in a softmax); expected "
            "raw logits: say --outputs-are probs (or auto), or a softmax would be applied twice"
        )
    if declared is OutputKind.PROBS and not in_unit:
        raise ValueError(
            f"Got --outputs-are probs, but the output has {values}; expected probabilities within [0, 1]: say "
            "--outputs-are logits (or auto) to add a softmax"
        )
    kind = looks if declared is OutputKind.AUTO else declared
    assert kind is not None
    return OutputCheck(kind=kind, measured=declared is OutputKind.AUTO, n=n, min=lo, max=hi, max_row_sum_error=err)


def check_import_parity(
    original_session: Any,
    wrapped_session: Any,
    spec: ImportSpec,
    info: WrapInfo,
    images: np.ndarray,
    *,
    atol: float | None = None,
    reference: np.ndarray | None = None,
) -> ImportParity:
    """Compare the wrapped model with the original run by hand on the same uint8 images.

    The wrapped model runs on the whole batch (which also proves the dynamic batch); the
    original runs with numpy preprocessing, one image at a time when its batch was
    fixed at 1. ``spec`` is the resolved one the wrapper was built from; ``reference``
    is :func:`run_original`'s output when it was already computed.

    Raises:
        ImportParityError: outputs differ beyond ``atol`` or a top-1 / detection differs.
    """
    if atol is None:
        atol = 2e-3 if spec.preprocessing.dtype is InputDType.FLOAT16 else 1e-4
    raw = reference
    if raw is None:
        raw = run_original(original_session, spec, images, input_name=info.original_input,
                           output_name=info.original_outputs or info.original_output, batch_of_one=info.batch_relaxed)
    elif len(raw[0] if isinstance(raw, list) else raw) != len(images):
        raise ValueError(f"Got a reference of {len(raw)} rows for {len(images)} images; expected one per image")
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
        ref = np.asarray(raw, np.float32).reshape(len(images), -1)
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
    box_tol = max(1e-3, atol * max(spec.input_size or (1, 1)))
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
