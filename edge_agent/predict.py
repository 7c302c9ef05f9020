"""One frame in, one prediction out: the same preprocessing and decoding as the server.

Decoding and resizing go through :func:`visionfleet.imaging.load_for_model`, outputs
through :func:`visionfleet.inference.classification_result` /
:func:`visionfleet.detection.detection_result`, and the telemetry fields through
:func:`visionfleet.inference.confidence_stats` and
:func:`visionfleet.telemetry.input_stats` — the code the ingress runs — so a device
and the server give the same answer for the same image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionfleet.imaging import ResizeInfo, load_for_model, resize_image
from visionfleet.inference import LoadedModel, classification_result, confidence_stats
from visionfleet.spec import Task
from visionfleet.telemetry import input_stats

__all__ = ["Prediction", "predict_bytes", "predict_rgb", "run_model"]


@dataclass(frozen=True)
class Prediction:
    """A prediction and the telemetry fields of its event (names as in ``EVENT_FIELDS``)."""

    result: dict[str, Any]  # the HTTP response's shape: label/score/probs or detections
    fields: dict[str, Any]  # task, label, class_id, confidence, margin, entropy, detections, width, height, stats
    latency_ms: float

    @property
    def confidence(self) -> float:
        return float(self.fields.get("confidence") or 0.0)


def run_model(model: LoadedModel, img: np.ndarray) -> list[np.ndarray]:
    """Run one resized uint8 HxWx3 image; outputs keep their batch dimension of 1."""
    return model.run(img[None])


def _finish(model: LoadedModel, img: np.ndarray, info: ResizeInfo, t0: float, top_k: int) -> Prediction:
    outputs = run_model(model, img)
    card = model.card
    fields: dict[str, Any] = {
        "task": card.task.value,
        "width": info.original_width,
        "height": info.original_height,
        **input_stats(img),
    }
    if card.task is Task.CLASSIFICATION:
        probs = outputs[0][0]
        result = classification_result(probs, card.labels, top_k)
        st = confidence_stats(probs)
        fields.update(label=result["label"], class_id=result["class_id"], confidence=result["score"],
                      margin=st["margin"], entropy=st["entropy"])
    else:
        from visionfleet.detection import detection_confidence_stats, detection_result

        boxes, scores, classes = (o[0] for o in outputs[:3])
        result = detection_result(boxes, scores, classes, card.labels, info)
        st = detection_confidence_stats(scores)
        fields.update(confidence=result["score"], margin=st["margin"], detections=result["count"])
    return Prediction(result, fields, (time.perf_counter() - t0) * 1000.0)


def predict_bytes(model: LoadedModel, data: bytes, top_k: int = 5, max_pixels: int = 40_000_000) -> Prediction:
    """Decode an encoded image (JPEG, PNG, …), resize it as the card says, run the model.

    Raises:
        visionfleet.imaging.ImageError: the bytes are not a usable image.
    """
    t0 = time.perf_counter()
    img, info = load_for_model(data, tuple(model.card.input_size), model.card.resize, max_pixels=max_pixels)
    return _finish(model, img, info, t0, top_k)


def predict_rgb(model: LoadedModel, rgb: np.ndarray, top_k: int = 5) -> Prediction:
    """Run a decoded RGB uint8 frame (a video or camera frame)."""
    t0 = time.perf_counter()
    img, info = resize_image(rgb, tuple(model.card.input_size), model.card.resize)
    return _finish(model, img, info, t0, top_k)
