"""Detection outputs -> the HTTP response shape, in original-image pixels (pure numpy).

A registered detection model (see ``docs/model-import.md``) returns, per image, a fixed
number ``K`` of rows: ``boxes`` float32 ``[K, 4]`` (x1, y1, x2, y2 in model-input
pixels), ``scores`` float32 ``[K]`` and ``classes`` int64 ``[K]``, sorted by score and
padded with score 0 (class -1). This module drops the padding, maps the boxes back to
the original image through :class:`visionfleet.imaging.ResizeInfo` and builds::

    {"detections": [{"label", "class_id", "score", "box": [x1, y1, x2, y2]}],
     "score": highest box score (0 when empty), "count": n}

It imports neither torch nor onnxruntime, so the server, batch jobs and the edge agent
share it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from visionfleet.imaging import ResizeInfo

__all__ = ["DETECTION_OUTPUTS", "detection_result", "detection_confidence_stats"]

from visionfleet.names import DETECTION_OUTPUTS  # noqa: E402  (output names of a registered detection model, in order)


def _one_image(arr: np.ndarray, trailing: tuple[int, ...], what: str) -> np.ndarray:
    """Accept ``[K, *trailing]`` or a batch of one ``[1, K, *trailing]``."""
    a = np.asarray(arr)
    if a.ndim == len(trailing) + 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != len(trailing) + 1 or tuple(a.shape[1:]) != trailing:
        want = "[K" + "".join(f", {t}" for t in trailing) + "]"
        raise ValueError(f"Got {what} of shape {tuple(np.shape(arr))}; expected {want} for one image")
    return a


def detection_result(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    labels: Sequence[str],
    resize: ResizeInfo | None = None,
) -> dict[str, Any]:
    """One image's detection outputs as the response dict, boxes in original pixels.

    Args:
        boxes: ``[K, 4]`` x1, y1, x2, y2 in model-input pixels (or ``[1, K, 4]``).
        scores: ``[K]`` box scores; rows with score <= 0 are padding and dropped.
        classes: ``[K]`` class ids into ``labels``.
        labels: the card's labels.
        resize: how the original image was resized to the model input; None keeps
            model-input pixels.
    Returns:
        ``{"detections": [...], "score": max box score or 0.0, "count": n}``,
        detections sorted by descending score.
    Raises:
        ValueError: shapes disagree, or a kept row names a class outside ``labels``.
    """
    b = _one_image(boxes, (4,), "boxes").astype(np.float32)
    s = _one_image(scores, (), "scores").astype(np.float64)
    c = _one_image(classes, (), "classes").astype(np.int64)
    if not (len(b) == len(s) == len(c)):
        raise ValueError(f"Got {len(b)} boxes, {len(s)} scores and {len(c)} classes; expected the same count")
    keep = s > 0.0
    b, s, c = b[keep], s[keep], c[keep]
    bad = c[(c < 0) | (c >= len(labels))]
    if bad.size:
        raise ValueError(
            f"Got class id {int(bad[0])} for a detection; expected 0..{len(labels) - 1} ({len(labels)} labels)"
        )
    order = np.argsort(-s, kind="stable")
    b, s, c = b[order], s[order], c[order]
    if resize is not None and len(b):
        b = resize.to_original(b)
    detections = [
        {
            "label": labels[int(ci)],
            "class_id": int(ci),
            "score": float(si),
            "box": [float(v) for v in bi],
        }
        for bi, si, ci in zip(b, s, c)
    ]
    return {
        "detections": detections,
        "score": float(s[0]) if len(s) else 0.0,
        "count": len(detections),
    }


def detection_confidence_stats(scores: np.ndarray) -> dict[str, float | int]:
    """Telemetry for one image: the same ``confidence``/``margin`` keys as classification.

    ``confidence`` is the highest box score (0 when nothing was detected), ``margin``
    the gap to the runner-up box (the top score when there is only one), ``count`` the
    number of detections and ``mean_score`` their mean score (0 when empty). Padding
    rows (score <= 0) are ignored.
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
