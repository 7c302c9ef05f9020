"""One frame in, one prediction out: the server's preprocessing and prediction path.

Decoding, the choice of input size and resizing go through
:func:`visionfleet.imaging.preprocess`, outputs through
:func:`visionfleet.predict.predictions` and the event fields through
:func:`visionfleet.predict.event_fields` — the code the ingress runs — so a device and
the server give the same answer, and record the same fields, for the same image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionfleet.imaging import ResizeInfo, preprocess
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


def predict_bytes(model: LoadedModel, data: bytes, top_k: int = 5, max_pixels: int = 40_000_000,
                  size: str | None = None) -> DevicePrediction:
    """Decode an encoded image (JPEG, PNG, …), resize it as the card says, run the model.

    ``size`` picks one of the card's ``input_sizes`` (``"320x320"``); without it the image
    goes to the listed size nearest its own, as on the server.

    Raises:
        visionfleet.imaging.ImageError: the bytes are not a usable image.
        visionfleet.imaging.SizeNotServed: ``size`` is not one of the card's sizes.
    """
    t0 = time.perf_counter()
    img, info = preprocess(data, model.card.sizes, model.card.resize, size=size, max_pixels=max_pixels)
    return _finish(model, img, info, t0, top_k)


def predict_rgb(model: LoadedModel, rgb: np.ndarray, top_k: int = 5, size: str | None = None) -> DevicePrediction:
    """Run a decoded RGB uint8 frame (a video or camera frame); ``size`` as in :func:`predict_bytes`."""
    t0 = time.perf_counter()
    img, info = preprocess(rgb, model.card.sizes, model.card.resize, size=size)
    return _finish(model, img, info, t0, top_k)
