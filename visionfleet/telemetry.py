"""Telemetry events and their aggregation, as plain data and pure functions.

Every prediction (server, shadow or edge) becomes one :func:`make_event` dict keyed by
``(request_id, role)``; ``role`` is ``primary`` or ``shadow``, so a retried request
(same id) never counts twice and a shadow answer never counts as the primary's.
:class:`ArmAccumulator` keeps the running per-variant figures an experiment needs
(requests, errors, latency, confidence, accuracy where labeled, detections).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "EVENT_FIELDS",
    "make_event",
    "input_stats",
    "event_key",
    "ArmAccumulator",
    "LatencyHistogram",
]

# Column order of the Parquet event lake (the sink builds its schema from this).
EVENT_FIELDS: dict[str, str] = {
    "request_id": "string",
    "role": "string",  # primary | shadow
    "ts": "float64",  # unix seconds
    "source": "string",  # server | edge:<device>
    "model": "string",
    "version": "int64",
    "variant": "string",  # default | <arm name> | shadow
    "experiment": "string",
    "client_key": "string",
    "status": "int64",
    "error": "string",
    "latency_ms": "float64",
    "task": "string",
    "label": "string",  # predicted label (top-1)
    "class_id": "int64",
    "confidence": "float64",  # top-1 probability; detection: highest box score (0 if none)
    "margin": "float64",
    "entropy": "float64",
    "detections": "int64",
    "width": "int64",  # original image size
    "height": "int64",
    "input_size": "string",  # the model-input size used, HEIGHTxWIDTH (one of the card's input_sizes)
    "brightness": "float64",  # of the model input, 0..255
    "contrast": "float64",
    "blur": "float64",  # variance of the Laplacian (low = blurry)
}


def event_key(event: dict[str, Any]) -> tuple[str, str]:
    return (str(event["request_id"]), str(event.get("role") or "primary"))


def input_stats(img: np.ndarray) -> dict[str, float]:
    """Cheap statistics of a model input (uint8 HxWx3): brightness, contrast, blur."""
    import cv2

    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return {
        "brightness": float(gray.mean()),
        "contrast": float(gray.std()),
        "blur": float(cv2.Laplacian(gray, cv2.CV_32F).var()),
    }


def make_event(**fields: Any) -> dict[str, Any]:
    """An event dict with every field of :data:`EVENT_FIELDS` (missing ones None)."""
    unknown = set(fields) - set(EVENT_FIELDS)
    if unknown:
        raise ValueError(f"Got unknown event fields {sorted(unknown)}; expected {sorted(EVENT_FIELDS)}")
    ev = {k: None for k in EVENT_FIELDS}
    ev.update(fields)
    if ev["request_id"] is None:
        raise ValueError("an event needs a request_id")
    ev["role"] = ev["role"] or "primary"
    ev["ts"] = ev["ts"] if ev["ts"] is not None else time.time()
    return ev


class LatencyHistogram:
    """Log-spaced latency histogram (0.1 ms .. 100 s): constant memory, p-quantiles."""

    _EDGES = np.logspace(-1, 5, 241)  # 40 buckets per decade

    def __init__(self) -> None:
        self.counts = np.zeros(len(self._EDGES) + 1, dtype=np.int64)
        self.n = 0

    def add(self, ms: float) -> None:
        self.counts[int(np.searchsorted(self._EDGES, ms))] += 1
        self.n += 1

    def quantile(self, q: float) -> float:
        if self.n == 0:
            return float("nan")
        target = q * self.n
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, target))
        if i == 0:
            return float(self._EDGES[0])
        if i >= len(self._EDGES):
            return float(self._EDGES[-1])
        return float(math.sqrt(self._EDGES[i - 1] * self._EDGES[i]))  # geometric bucket middle

    def to_dict(self) -> dict[str, Any]:
        """The non-empty buckets (JSON-ready; the sink checkpoints it)."""
        nz = np.flatnonzero(self.counts)
        return {"n": int(self.n), "buckets": [[int(i), int(self.counts[i])] for i in nz]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "LatencyHistogram":
        h = cls()
        for i, c in doc["buckets"]:
            if not 0 <= int(i) < len(h.counts) or int(c) < 0:
                raise ValueError(f"Got bucket {i}={c} for a latency histogram; expected 0..{len(h.counts) - 1} and a count >= 0")
            h.counts[int(i)] = int(c)
        h.n = int(doc["n"])
        return h


@dataclass
class ArmAccumulator:
    """Running figures of one variant of an experiment."""

    name: str
    n: int = 0
    errors: int = 0
    conf_sum: float = 0.0
    conf_sq: float = 0.0
    labeled: int = 0
    correct: int = 0
    det_sum: float = 0.0
    det_sq: float = 0.0
    detection_model: bool = False
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    versions: set[int] = field(default_factory=set)
    clients: set[str] = field(default_factory=set)  # randomization units of sticky experiments
    _MAX_CLIENTS = 1_000_000

    def add_event(self, ev: dict[str, Any]) -> None:
        self.n += 1
        if ev.get("version") is not None:
            self.versions.add(int(ev["version"]))
        if ev.get("client_key") and len(self.clients) < self._MAX_CLIENTS:
            self.clients.add(str(ev["client_key"]))
        if ev.get("status") not in (None, 200):
            self.errors += 1
            return
        c = float(ev.get("confidence") or 0.0)
        self.conf_sum += c
        self.conf_sq += c * c
        if ev.get("detections") is not None:
            self.detection_model = True
            self.det_sum += float(ev["detections"])
            self.det_sq += float(ev["detections"]) ** 2
        if ev.get("latency_ms") is not None:
            self.latency.add(float(ev["latency_ms"]))

    def add_label(self, correct: bool) -> None:
        self.labeled += 1
        self.correct += int(bool(correct))

    _SCALARS = ("n", "errors", "conf_sum", "conf_sq", "labeled", "correct", "det_sum", "det_sq", "detection_model")

    def to_dict(self) -> dict[str, Any]:
        """Every figure, JSON-ready (floats round-trip exactly); the sink checkpoints it."""
        return {"name": self.name, **{k: getattr(self, k) for k in self._SCALARS},
                "latency": self.latency.to_dict(), "versions": sorted(self.versions), "clients": sorted(self.clients)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "ArmAccumulator":
        known = {"name", "latency", "versions", "clients", *cls._SCALARS}
        if set(doc) != known:
            raise ValueError(f"Got keys {sorted(doc)} for an arm accumulator; expected {sorted(known)}")
        return cls(name=doc["name"], **{k: doc[k] for k in cls._SCALARS},
                   latency=LatencyHistogram.from_dict(doc["latency"]),
                   versions={int(v) for v in doc["versions"]}, clients={str(c) for c in doc["clients"]})

    @property
    def ok(self) -> int:
        return self.n - self.errors

    def arm_summary(self, sticky: bool = False):
        """The :class:`visionfleet.experiments.ArmSummary` the decision rules read."""
        from visionfleet.experiments import ArmSummary

        ok = max(self.ok, 0)
        p95 = self.latency.quantile(0.95)
        return ArmSummary(
            name=self.name,
            n=ok,
            errors=self.errors,
            labeled=min(self.labeled, ok),
            correct=min(self.correct, self.labeled, ok),
            conf_sum=min(self.conf_sum, float(ok)),
            conf_sumsq=min(self.conf_sq, self.conf_sum, float(ok)),
            p95_latency_ms=None if math.isnan(p95) else p95,
            units=len(self.clients) if sticky and self.clients else None,
            det_sum=self.det_sum if self.detection_model else None,
            det_sumsq=self.det_sq if self.detection_model else None,
        )

    def summary(self) -> dict[str, Any]:
        ok = max(self.ok, 0)
        mean = self.conf_sum / ok if ok else float("nan")
        var = max(self.conf_sq / ok - mean * mean, 0.0) if ok else float("nan")
        return {
            "name": self.name,
            "n": self.n,
            "ok": ok,
            "errors": self.errors,
            "error_rate": self.errors / self.n if self.n else 0.0,
            "conf_mean": mean,
            "conf_var": var,
            "labeled": self.labeled,
            "correct": self.correct,
            "accuracy": self.correct / self.labeled if self.labeled else float("nan"),
            "detections_mean": self.det_sum / ok if ok else float("nan"),
            "p50_latency_ms": self.latency.quantile(0.5),
            "p95_latency_ms": self.latency.quantile(0.95),
            "versions": sorted(self.versions),
            "clients": len(self.clients),
        }
