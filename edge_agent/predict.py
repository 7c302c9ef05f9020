"""One frame in, one prediction out: the server's preprocessing and prediction path.

Decoding and resizing go through :func:`visionfleet.imaging.load_for_model` /
:func:`visionfleet.imaging.resize_image`, outputs through
:func:`visionfleet.predict.predictions` and the event fields through
:func:`visionfleet.predict.event_fields` — the code the ingress runs — so a device and
the server give the same answer, and record the same fields, for the same image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionfleet.imaging import ResizeInfo, load_for_model, resize_image
from visionfleet.inference import LoadedModel
from visionfleet.predict import Prediction, event_fields, predictions

__all__ = ["DevicePrediction", "predict_bytes", "predict_rgb", "run_model"]


@dataclass(frozen=True)
class DevicePrediction:
    """A prediction, the fields of its telemetry event (names as in ``EVENT_FIELDS``) and its latency."""

    prediction: Prediction
    fields: dict[str, Any]
    latency_ms: float

    @property
    def confidence(self) -> float:
        return self.prediction.score

    @property
    def result(self) -> dict[str, Any]:
        """The HTTP response's shape: label/score/probs or detections."""
        return self.prediction.response()


def run_model(model: LoadedModel, img: np.ndarray) -> list[np.ndarray]:
    """Run one resized uint8 HxWx3 image; outputs keep their batch dimension of 1."""
    return model.run(img[None])


def _finish(model: LoadedModel, img: np.ndarray, info: ResizeInfo, t0: float, top_k: int) -> DevicePrediction:
    (pred,) = predictions(model.card, run_model(model, img), [info], top_k=top_k)
    return DevicePrediction(pred, event_fields(pred, img), (time.perf_counter() - t0) * 1000.0)


def predict_bytes(model: LoadedModel, data: bytes, top_k: int = 5, max_pixels: int = 40_000_000) -> DevicePrediction:
    """Decode an encoded image (JPEG, PNG, …), resize it as the card says, run the model.

    Raises:
        visionfleet.imaging.ImageError: the bytes are not a usable image.
    """
    t0 = time.perf_counter()
    img, info = load_for_model(data, tuple(model.card.input_size), model.card.resize, max_pixels=max_pixels)
    return _finish(model, img, info, t0, top_k)


def predict_rgb(model: LoadedModel, rgb: np.ndarray, top_k: int = 5) -> DevicePrediction:
    """Run a decoded RGB uint8 frame (a video or camera frame)."""
    t0 = time.perf_counter()
    img, info = resize_image(rgb, tuple(model.card.input_size), model.card.resize)
    return _finish(model, img, info, t0, top_k)
