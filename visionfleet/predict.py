"""The one prediction path: a model's outputs -> a typed :class:`Prediction` (pure numpy).

Every place that turns model outputs into an answer calls :func:`predictions`: the
ingress (``/v1/predict``, ``/v1/predict/batch``, the v2 routes, the WebSocket stream,
shadow traffic), the edge agent, offline inference and the Ray Data batch job. What a
prediction says (its HTTP shape, its telemetry fields, its Parquet row) is derived from
the one :class:`Prediction`, so train, serve and edge cannot disagree on it.

Classification: ``outputs[0]`` is ``probs [N, C]``. Detection: ``outputs`` are
``boxes [N, K, 4]`` (model-input pixels), ``scores [N, K]``, ``classes [N, K]`` in the
order :data:`visionfleet.names.DETECTION_OUTPUTS` (``visionfleet.inference`` loads
models with that order); boxes are mapped back to original-image pixels through each
image's :class:`~visionfleet.imaging.ResizeInfo`. A detection model's image-level
confidence is its highest box score (0 when nothing was found), and its margin the gap
to the runner-up box, as for classification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from visionfleet.imaging import ResizeInfo
from visionfleet.spec import ModelCard, Task

__all__ = ["Detection", "Prediction", "predictions", "classification_stats", "detection_stats", "event_fields"]


@dataclass(frozen=True)
class Detection:
    """One box, in original-image pixels."""

    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "class_id": self.class_id, "score": self.score, "box": list(self.box)}


@dataclass(frozen=True)
class Prediction:
    """What a model said about one image.

    ``label``/``class_id``/``score`` are the top-1 class (detection: the highest box's;
    ``None``/0.0 when nothing was detected); ``margin`` is the gap to the runner-up.
    Classification carries ``probs`` (top-k, descending) and ``entropy`` (normalized);
    detection carries ``detections`` (descending score).
    """

    task: Task
    label: str | None
    class_id: int | None
    score: float
    margin: float
    width: int | None = None  # the original image
    height: int | None = None
    entropy: float | None = None
    probs: tuple[tuple[str, float], ...] | None = None
    detections: tuple[Detection, ...] | None = None
    input_size: tuple[int, int] | None = None  # (height, width) the image was served at: one of the card's sizes

    @property
    def size(self) -> str | None:
        """The model-input size used, as ``HEIGHTxWIDTH`` (what a request's ``size`` names)."""
        return None if self.input_size is None else f"{self.input_size[0]}x{self.input_size[1]}"

    @property
    def count(self) -> int | None:
        return None if self.detections is None else len(self.detections)

    def response(self) -> dict[str, Any]:
        """The HTTP response's prediction fields (``/v1/predict``, batch items, the stream), with ``size`` used."""
        if self.task is Task.CLASSIFICATION:
            out = {"label": self.label, "class_id": self.class_id, "score": self.score, "probs": dict(self.probs or ())}
        else:
            out = {"detections": [d.to_dict() for d in self.detections or ()], "score": self.score, "count": self.count}
        if self.input_size is not None:  # the size the image was served at (always known on the server)
            out["size"] = self.size
        return out

    def telemetry(self) -> dict[str, Any]:
        """The prediction's fields of a telemetry event (names as in ``EVENT_FIELDS``)."""
        fields: dict[str, Any] = {"task": self.task.value, "label": self.label, "class_id": self.class_id,
                                  "confidence": self.score, "margin": self.margin,
                                  "width": self.width, "height": self.height, "input_size": self.size}
        if self.task is Task.CLASSIFICATION:
            fields["entropy"] = self.entropy
        else:
            fields["detections"] = self.count
        return fields

    def row(self) -> dict[str, Any]:
        """A flat result row for Parquet (``visionfleet.offline.result_fields``)."""
        row: dict[str, Any] = {"label": self.label, "class_id": self.class_id, "score": self.score}
        if self.task is Task.CLASSIFICATION:
            row["probs"] = [{"label": k, "prob": v} for k, v in self.probs or ()]
        else:
            row["detections"] = [d.to_dict() for d in self.detections or ()]
            row["count"] = self.count
        row.update(confidence=self.score, margin=self.margin)
        if self.task is Task.CLASSIFICATION:
            row["entropy"] = self.entropy
        row.update(width=self.width, height=self.height, input_size=self.size, error=None)
        return row


def classification_stats(probs: np.ndarray) -> dict[str, float]:
    """Top-1 confidence, margin to the runner-up and normalized entropy of one prob vector."""
    p = np.asarray(probs, dtype=np.float64)
    top2 = np.sort(p)[-2:] if p.size >= 2 else np.array([0.0, float(p.max())])
    ent = float(-(p * np.log(np.clip(p, 1e-12, 1.0))).sum())
    return {
        "confidence": float(top2[-1]),
        "margin": float(top2[-1] - top2[-2]),
        "entropy": ent / math.log(p.size) if p.size > 1 else 0.0,
    }


def detection_stats(scores: np.ndarray) -> dict[str, float | int]:
    """Highest box score, gap to the runner-up (the top score when alone), count and mean score.

    Padding rows (score <= 0) are ignored; all 0 when nothing was detected.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = np.sort(s[s > 0.0])[::-1]
    if s.size == 0:
        return {"confidence": 0.0, "margin": 0.0, "count": 0, "mean_score": 0.0}
    return {
        "confidence": float(s[0]),
        "margin": float(s[0] - (s[1] if s.size > 1 else 0.0)),
        "count": int(s.size),
        "mean_score": float(s.mean()),
    }


def _one_image(arr: np.ndarray, trailing: tuple[int, ...], what: str) -> np.ndarray:
    """Accept ``[K, *trailing]`` or a batch of one ``[1, K, *trailing]``."""
    a = np.asarray(arr)
    if a.ndim == len(trailing) + 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != len(trailing) + 1 or tuple(a.shape[1:]) != trailing:
        want = "[K" + "".join(f", {t}" for t in trailing) + "]"
        raise ValueError(f"Got {what} of shape {tuple(np.shape(arr))}; expected {want} for one image")
    return a


def _classification(probs: np.ndarray, labels: Sequence[str], top_k: int, info: ResizeInfo | None) -> Prediction:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size != len(labels):
        raise ValueError(f"Got probs of shape {p.shape}; expected ({len(labels)},)")
    order = np.argsort(-p)
    k = max(1, min(int(top_k), p.size))
    best = int(order[0])
    st = classification_stats(p)
    return Prediction(
        task=Task.CLASSIFICATION, label=labels[best], class_id=best, score=float(p[best]), margin=st["margin"],
        entropy=st["entropy"], probs=tuple((labels[int(i)], float(p[int(i)])) for i in order[:k]),
        width=info.original_width if info else None, height=info.original_height if info else None,
        input_size=info.input_size if info else None,
    )


def _detection(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, labels: Sequence[str],
               info: ResizeInfo | None) -> Prediction:
    b = _one_image(boxes, (4,), "boxes").astype(np.float32)
    s = _one_image(scores, (), "scores").astype(np.float64)
    c = _one_image(classes, (), "classes").astype(np.int64)
    if not (len(b) == len(s) == len(c)):
        raise ValueError(f"Got {len(b)} boxes, {len(s)} scores and {len(c)} classes; expected the same count")
    keep = s > 0.0  # padding rows have score 0 (class -1)
    b, s, c = b[keep], s[keep], c[keep]
    bad = c[(c < 0) | (c >= len(labels))]
    if bad.size:
        raise ValueError(
            f"Got class id {int(bad[0])} for a detection; expected 0..{len(labels) - 1} ({len(labels)} labels)"
        )
    order = np.argsort(-s, kind="stable")
    b, s, c = b[order], s[order], c[order]
    if info is not None and len(b):
        b = info.to_original(b)
    dets = tuple(Detection(labels[int(ci)], int(ci), float(si), tuple(float(v) for v in bi))  # type: ignore[arg-type]
                 for bi, si, ci in zip(b, s, c))
    st = detection_stats(s)
    top = dets[0] if dets else None
    return Prediction(
        task=Task.DETECTION, label=top.label if top else None, class_id=top.class_id if top else None,
        score=float(st["confidence"]), margin=float(st["margin"]), detections=dets,
        width=info.original_width if info else None, height=info.original_height if info else None,
        input_size=info.input_size if info else None,
    )


def predictions(card: ModelCard, outputs: Sequence[np.ndarray], infos: Sequence[ResizeInfo | None], *,
                top_k: int = 5) -> list[Prediction]:
    """One :class:`Prediction` per image of a batch's model outputs.

    Args:
        card: the card of the model that ran (task and labels).
        outputs: the session outputs for the batch, first dimension = image
            (classification: ``probs``; detection: ``boxes, scores, classes``).
        infos: how each image was resized (maps boxes back; gives the original size);
            ``None`` keeps model-input pixels.
        top_k: classes kept in ``probs``.
    Raises:
        ValueError: the outputs do not match the card or the number of images.
    """
    n = len(infos)
    rows = [np.asarray(o) for o in outputs]
    if card.task is Task.CLASSIFICATION:
        if not rows or rows[0].shape[:1] != (n,):
            raise ValueError(f"Got outputs {[r.shape for r in rows]} for {n} images; expected probs [{n}, C]")
        return [_classification(rows[0][i], card.labels, top_k, infos[i]) for i in range(n)]
    if len(rows) < 3 or any(r.shape[:1] != (n,) for r in rows[:3]):
        raise ValueError(f"Got outputs {[r.shape for r in rows]} for {n} images; expected boxes, scores, classes")
    boxes, scores, classes = rows[:3]
    return [_detection(boxes[i], scores[i], classes[i], card.labels, infos[i]) for i in range(n)]


def event_fields(prediction: Prediction, img: np.ndarray | None) -> dict[str, Any]:
    """A telemetry event's prediction and input fields (server and device alike)."""
    from visionfleet.telemetry import input_stats

    fields = prediction.telemetry()
    if img is not None:
        fields.update(input_stats(img))
    return fields
