"""Monitoring as pure functions: windows, drift tests, calibration, the retraining policy.

A :class:`Window` holds the recent values of each signal for one model version
(top-1 confidence, input brightness / contrast / blur, predicted class). Drift is a
comparison of the current window with a reference window of the same version:

* PSI (population stability index) over reference-quantile bins — a size-free effect
  measure, with the usual reading 0.1 (moderate) / 0.25 (large);
* the two-sample Kolmogorov–Smirnov test — a significance test;
* class-distribution shift of the predicted labels (PSI over classes, chi-square).

A signal drifts when PSI exceeds its threshold **and** KS rejects at ``ks_alpha``;
requiring both keeps tiny, significant-but-irrelevant shifts (large windows) and
large-but-noisy ones (small windows) from firing.

:func:`evaluate_policy` turns window metrics into a retrain decision with thresholds,
a minimum sample size, debounce (the condition must hold at several consecutive
looks) and a cooldown after each retrain.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "SIGNALS",
    "Window",
    "psi",
    "ks_test",
    "class_shift",
    "expected_calibration_error",
    "DriftThresholds",
    "SignalDrift",
    "DriftReport",
    "drift_report",
    "window_metrics",
    "RetrainPolicy",
    "PolicyState",
    "PolicyDecision",
    "evaluate_policy",
    "VersionMonitor",
    "drift_from_dict",
]

SIGNALS = ("confidence", "brightness", "contrast", "blur")
_EPS = 1e-4


@dataclass
class Window:
    """Bounded recent values per signal, plus predicted classes and labeled outcomes."""

    size: int = 500
    values: dict[str, deque] = field(default_factory=dict)
    classes: deque = field(default_factory=deque)
    outcomes: deque = field(default_factory=deque)  # (confidence, correct) of labeled predictions

    def __post_init__(self) -> None:
        if self.size < 10:
            raise ValueError(f"Got {self.size} for window size; expected >= 10")
        for s in SIGNALS:
            self.values.setdefault(s, deque(maxlen=self.size))
        self.classes = deque(self.classes, maxlen=self.size)
        self.outcomes = deque(self.outcomes, maxlen=self.size)

    def add(self, event: Mapping[str, Any]) -> None:
        for s in SIGNALS:
            v = event.get(s)
            if v is not None and math.isfinite(float(v)):
                self.values[s].append(float(v))
        if event.get("label") is not None:
            self.classes.append(str(event["label"]))

    def add_outcome(self, confidence: float, correct: bool) -> None:
        self.outcomes.append((float(confidence), bool(correct)))

    def __len__(self) -> int:
        return len(self.values["confidence"])

    def array(self, signal: str) -> np.ndarray:
        return np.fromiter(self.values[signal], dtype=np.float64)

    def full(self) -> bool:
        return len(self) >= self.size

    def to_dict(self) -> dict[str, Any]:
        """The window's values, JSON-ready (floats round-trip exactly): what the sink checkpoints."""
        return {"size": self.size, "values": {s: list(self.values[s]) for s in SIGNALS},
                "classes": list(self.classes), "outcomes": [[c, k] for c, k in self.outcomes]}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "Window":
        size = int(doc["size"])
        missing = set(SIGNALS) - set(doc["values"])
        if missing:
            raise ValueError(f"Got a window without {sorted(missing)}; expected values for {list(SIGNALS)}")
        w = cls(size, values={s: deque((float(v) for v in doc["values"][s]), maxlen=size) for s in SIGNALS},
                classes=deque(str(c) for c in doc["classes"]),
                outcomes=deque((float(c), bool(k)) for c, k in doc["outcomes"]))
        return w


def psi(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference``.

    Bins are reference quantiles (so each holds ~1/bins of the reference); empty bins
    are floored at a small probability so the index stays finite.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.size < bins or cur.size < 2:
        raise ValueError(f"Got {ref.size} reference and {cur.size} current values; expected >= {bins} and >= 2")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / ref.size
    q = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / cur.size
    p, q = np.clip(p, _EPS, None), np.clip(q, _EPS, None)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_test(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov statistic and p-value."""
    from scipy.stats import ks_2samp

    res = ks_2samp(np.asarray(reference, float), np.asarray(current, float))
    return float(res.statistic), float(res.pvalue)


def class_shift(reference: Iterable[str], current: Iterable[str]) -> dict[str, float]:
    """PSI and chi-square p-value of the predicted-class distribution."""
    from scipy.stats import chi2_contingency

    ref, cur = list(reference), list(current)
    labels = sorted(set(ref) | set(cur))
    if not ref or not cur or len(labels) < 2:
        return {"psi": 0.0, "p_value": 1.0}
    r = np.array([ref.count(c) for c in labels], float)
    c = np.array([cur.count(c) for c in labels], float)
    p, q = np.clip(r / r.sum(), _EPS, None), np.clip(c / c.sum(), _EPS, None)
    table = np.vstack([r, c]) + 0.5  # continuity: classes absent on one side
    p_value = float(chi2_contingency(table)[1])
    return {"psi": float(np.sum((q - p) * np.log(q / p))), "p_value": p_value}


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE: the gap between confidence and accuracy, weighted over confidence bins."""
    conf = np.asarray(confidence, float)
    corr = np.asarray(correct, float)
    if conf.size == 0:
        return float("nan")
    idx = np.clip((conf * bins).astype(int), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(corr[m].mean() - conf[m].mean())
    return float(ece)


@dataclass(frozen=True)
class DriftThresholds:
    psi: float = 0.25  # the conventional "large shift"
    ks_alpha: float = 0.001
    class_psi: float = 0.25
    min_samples: int = 100

    def __post_init__(self) -> None:
        if self.psi <= 0 or self.class_psi <= 0 or not 0 < self.ks_alpha < 1 or self.min_samples < 10:
            raise ValueError(f"Got {self}; expected psi > 0, class_psi > 0, 0 < ks_alpha < 1, min_samples >= 10")


@dataclass(frozen=True)
class SignalDrift:
    signal: str
    psi: float
    ks: float
    p_value: float
    drifted: bool
    reference_mean: float
    current_mean: float


@dataclass(frozen=True)
class DriftReport:
    n_reference: int
    n_current: int
    signals: tuple[SignalDrift, ...]
    class_psi: float
    class_p_value: float
    class_drifted: bool

    @property
    def drifted(self) -> bool:
        return self.class_drifted or any(s.drifted for s in self.signals)

    @property
    def drifted_signals(self) -> list[str]:
        out = [s.signal for s in self.signals if s.drifted]
        return out + (["predicted_class"] if self.class_drifted else [])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["drifted"] = self.drifted
        d["drifted_signals"] = self.drifted_signals
        return d


def drift_report(reference: Window, current: Window, thresholds: DriftThresholds = DriftThresholds()) -> DriftReport | None:
    """Compare two windows; None while either has fewer than ``min_samples`` values."""
    n_ref, n_cur = len(reference), len(current)
    if n_ref < thresholds.min_samples or n_cur < thresholds.min_samples:
        return None
    signals = []
    for s in SIGNALS:
        a, b = reference.array(s), current.array(s)
        if a.size < thresholds.min_samples or b.size < thresholds.min_samples:
            continue
        value = psi(a, b)
        stat, p = ks_test(a, b)
        signals.append(
            SignalDrift(s, value, stat, p, value > thresholds.psi and p < thresholds.ks_alpha, float(a.mean()), float(b.mean()))
        )
    cs = class_shift(reference.classes, current.classes)
    return DriftReport(
        n_reference=n_ref,
        n_current=n_cur,
        signals=tuple(signals),
        class_psi=cs["psi"],
        class_p_value=cs["p_value"],
        class_drifted=cs["psi"] > thresholds.class_psi and cs["p_value"] < thresholds.ks_alpha,
    )


def window_metrics(window: Window, low_threshold: float = 0.5) -> dict[str, float]:
    """The headline numbers of a window (logged to W&B and Prometheus, read by the policy)."""
    conf = window.array("confidence")
    out: dict[str, float] = {"n": float(conf.size)}
    if conf.size:
        out["confidence/mean"] = float(conf.mean())
        out["confidence/low_rate"] = float((conf < low_threshold).mean())
    if window.outcomes:
        c, k = zip(*window.outcomes)
        out["labeled/n"] = float(len(k))
        out["labeled/accuracy"] = float(np.mean(k))
        out["labeled/ece"] = expected_calibration_error(c, k)
    for s in ("brightness", "contrast", "blur"):
        a = window.array(s)
        if a.size:
            out[f"input/{s}"] = float(a.mean())
    return out


@dataclass(frozen=True)
class RetrainPolicy:
    """When degraded confidence (or drift) should start a retrain.

    Fires when, at ``debounce`` consecutive looks, the current window has at least
    ``min_samples`` predictions and either the mean confidence fell by more than
    ``max_confidence_drop`` below the reference's, or the low-confidence rate rose by
    more than ``max_low_rate_increase``, or (with ``on_drift``) the drift report says
    drifted; and the last retrain is at least ``cooldown_s`` ago, and at least
    ``min_labels`` new labeled samples are available to learn from.
    """

    max_confidence_drop: float = 0.08
    max_low_rate_increase: float = 0.10
    on_drift: bool = True
    min_samples: int = 200
    debounce: int = 3
    cooldown_s: float = 600.0
    min_labels: int = 200

    def __post_init__(self) -> None:
        if self.debounce < 1 or self.min_samples < 10 or self.min_labels < 1 or self.cooldown_s < 0:
            raise ValueError(f"Got {self}; expected debounce >= 1, min_samples >= 10, min_labels >= 1, cooldown >= 0")


@dataclass(frozen=True)
class PolicyState:
    streak: int = 0  # consecutive looks with the condition true
    last_fired: float | None = None
    fired: int = 0


@dataclass(frozen=True)
class PolicyDecision:
    fire: bool
    degraded: bool
    reasons: tuple[str, ...]
    state: PolicyState
    waiting_for: str | None = None  # why a degraded model is not retrained yet

    def to_dict(self) -> dict[str, Any]:
        return {
            "fire": self.fire,
            "degraded": self.degraded,
            "reasons": list(self.reasons),
            "waiting_for": self.waiting_for,
            "streak": self.state.streak,
        }


def evaluate_policy(
    policy: RetrainPolicy,
    state: PolicyState,
    *,
    current: Mapping[str, float],
    reference: Mapping[str, float],
    drift: DriftReport | None,
    labels_available: int,
    now: float,
) -> PolicyDecision:
    """One look: is the model degraded, and should a retrain start now?"""
    reasons: list[str] = []
    n = current.get("n", 0.0)
    if n >= policy.min_samples and reference.get("n", 0.0) >= policy.min_samples:
        drop = reference.get("confidence/mean", 0.0) - current.get("confidence/mean", 0.0)
        if drop > policy.max_confidence_drop:
            reasons.append(f"mean confidence fell {drop:.3f} (> {policy.max_confidence_drop})")
        rise = current.get("confidence/low_rate", 0.0) - reference.get("confidence/low_rate", 0.0)
        if rise > policy.max_low_rate_increase:
            reasons.append(f"low-confidence rate rose {rise:.3f} (> {policy.max_low_rate_increase})")
        if policy.on_drift and drift is not None and drift.drifted:
            reasons.append("drift in " + ", ".join(drift.drifted_signals))
    degraded = bool(reasons)
    streak = state.streak + 1 if degraded else 0
    new_state = replace(state, streak=streak)
    if not degraded:
        return PolicyDecision(False, False, (), new_state)
    if streak < policy.debounce:
        return PolicyDecision(False, True, tuple(reasons), new_state, f"debounce {streak}/{policy.debounce}")
    if state.last_fired is not None and now - state.last_fired < policy.cooldown_s:
        left = policy.cooldown_s - (now - state.last_fired)
        return PolicyDecision(False, True, tuple(reasons), new_state, f"cooldown ({left:.0f}s left)")
    if labels_available < policy.min_labels:
        return PolicyDecision(False, True, tuple(reasons), new_state, f"labels {labels_available}/{policy.min_labels}")
    fired = replace(new_state, streak=0, last_fired=now, fired=state.fired + 1)
    return PolicyDecision(True, True, tuple(reasons), fired)


class VersionMonitor:
    """Reference and current windows of one model version.

    The reference is the first ``reference_size`` predictions the version served (the
    traffic it was deployed into); the current window is the last ``window_size``.
    ``reset_reference`` starts a new reference (e.g. after an accepted shift).
    """

    def __init__(self, reference_size: int = 300, window_size: int = 300, low_threshold: float = 0.5) -> None:
        self.reference = Window(reference_size)
        self.current = Window(window_size)
        self.low_threshold = low_threshold
        self.seen = 0
        self._ref_start = 0
        self._ref_end = 0  # predictions [start, end) make up the reference

    def add(self, event: Mapping[str, Any]) -> int:
        """Add one prediction; returns its sequence number within this version."""
        seq = self.seen
        self.seen += 1
        if not self.reference.full():
            self.reference.add(event)
            self._ref_end = self.seen
        self.current.add(event)
        return seq

    def add_outcome(self, confidence: float, correct: bool, seq: int) -> None:
        """A label for prediction ``seq``: counted in each window the prediction is in."""
        if self._ref_start <= seq < self._ref_end:
            self.reference.add_outcome(confidence, correct)
        if seq >= self.seen - self.current.size:
            self.current.add_outcome(confidence, correct)

    def reset_reference(self) -> None:
        self.reference = Window(self.reference.size)
        self._ref_start = self._ref_end = self.seen

    def to_dict(self) -> dict[str, Any]:
        """Both windows and the counters that place a labeled prediction in them."""
        return {"reference": self.reference.to_dict(), "current": self.current.to_dict(),
                "low_threshold": self.low_threshold, "seen": self.seen, "ref_start": self._ref_start,
                "ref_end": self._ref_end}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "VersionMonitor":
        """The monitor :meth:`to_dict` described: same windows, same drift report."""
        m = cls(int(doc["reference"]["size"]), int(doc["current"]["size"]), float(doc["low_threshold"]))
        m.reference = Window.from_dict(doc["reference"])
        m.current = Window.from_dict(doc["current"])
        m.seen, m._ref_start, m._ref_end = int(doc["seen"]), int(doc["ref_start"]), int(doc["ref_end"])
        return m

    def snapshot(self, thresholds: DriftThresholds = DriftThresholds()) -> dict[str, Any]:
        drift = drift_report(self.reference, self.current, thresholds) if self.reference.full() else None
        return {
            "seen": self.seen,
            "reference": window_metrics(self.reference, self.low_threshold),
            "current": window_metrics(self.current, self.low_threshold),
            "drift": drift.to_dict() if drift else None,
        }


def drift_from_dict(doc: Mapping[str, Any] | None) -> DriftReport | None:
    """Rebuild a :class:`DriftReport` from :meth:`DriftReport.to_dict` output."""
    if not doc:
        return None
    return DriftReport(
        n_reference=doc["n_reference"],
        n_current=doc["n_current"],
        signals=tuple(SignalDrift(**s) for s in doc["signals"]),
        class_psi=doc["class_psi"],
        class_p_value=doc["class_p_value"],
        class_drifted=doc["class_drifted"],
    )
