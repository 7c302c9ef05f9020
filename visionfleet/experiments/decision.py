"""The experiment decision: continue, promote or roll back, with the reason.

``decide`` is a pure function of the two arms' summaries and a policy, so the ingress
(with ``--auto-decide``), the CLI and the report reach the same verdict from the same
numbers. The rules, in order:

1. a guardrail breach (p95 latency, error rate, detections per image) rolls back;
2. before the minimum sample size, continue;
3. a significant degradation of the primary metric rolls back;
4. a significant improvement promotes — only for accuracy, and only without a
   sample-ratio mismatch (confidence is not accuracy: a model can be confidently
   wrong, so a confidence-only experiment never promotes on its own);
5. otherwise continue (saying whether an SRM blocks promotion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np

from visionfleet.experiments.stats import (
    DEFAULT_MIXTURE_SD,
    GuardrailResult,
    MeanStats,
    Metric,
    SequentialResult,
    SRMResult,
    detections_guardrail,
    error_rate_guardrail,
    latency_guardrail,
    sequential_test,
    srm_check,
)

__all__ = ["Action", "ArmSummary", "DecisionPolicy", "Decision", "decide"]


class Action(str, Enum):
    CONTINUE = "continue"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class ArmSummary:
    """Cumulative statistics of one arm, as the telemetry sink keeps them.

    Sums rather than means, so summaries add up across windows and replicas.

    Attributes:
        name: the variant name (e.g. ``control``).
        n: successful predictions (each has a confidence).
        errors: failed requests (``n + errors`` requests were routed to the arm).
        labeled: predictions with a ground-truth label from feedback.
        correct: labeled predictions whose top-1 was right.
        conf_sum, conf_sumsq: sum and sum of squares of the top-1 confidence over the
            ``n`` predictions; for a detection model the image-level confidence (the
            highest box score, 0 when nothing was detected).
        p95_latency_ms: the arm's p95 latency, if measured.
        units: randomization units for the SRM check (distinct clients when sticky);
            None means requests (``n + errors``).
        det_sum, det_sumsq: sum and sum of squares of detections per image (detection
            models only; None otherwise).
    """

    name: str
    n: int
    errors: int = 0
    labeled: int = 0
    correct: int = 0
    conf_sum: float = 0.0
    conf_sumsq: float = 0.0
    p95_latency_ms: float | None = None
    units: int | None = None
    det_sum: float | None = None
    det_sumsq: float | None = None

    def __post_init__(self) -> None:
        for f in ("n", "errors", "labeled", "correct"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"Got {v!r} for {self.name}.{f}; expected an integer >= 0")
        if self.labeled > self.n or self.correct > self.labeled:
            raise ValueError(f"Got labeled={self.labeled}, correct={self.correct}, n={self.n} for {self.name}; expected correct <= labeled <= n")
        tol = 1e-9 * max(1, self.n)  # float sums over many requests round
        if not (0 <= self.conf_sum <= self.n + tol and 0 <= self.conf_sumsq <= self.conf_sum + tol):
            raise ValueError(f"Got conf_sum={self.conf_sum}, conf_sumsq={self.conf_sumsq} for {self.name} (n={self.n}); expected confidences in [0, 1]")
        if (self.det_sum is None) != (self.det_sumsq is None):
            raise ValueError(f"Got det_sum={self.det_sum}, det_sumsq={self.det_sumsq} for {self.name}; expected both or neither")
        if self.p95_latency_ms is not None and not (math.isfinite(self.p95_latency_ms) and self.p95_latency_ms >= 0):
            raise ValueError(f"Got {self.p95_latency_ms!r} for {self.name}.p95_latency_ms; expected a finite number >= 0")

    @classmethod
    def from_observations(
        cls,
        name: str,
        confidence: Sequence[float] | np.ndarray,
        *,
        correct: Sequence[float] | np.ndarray | None = None,
        latency_ms: Sequence[float] | np.ndarray | None = None,
        errors: int = 0,
        detections: Sequence[float] | np.ndarray | None = None,
        units: int | None = None,
    ) -> ArmSummary:
        """Summarize per-prediction arrays; ``correct`` holds 1/0, or NaN where unlabeled."""
        conf = np.asarray(confidence, dtype=float)
        if conf.size and (conf.min() < 0 or conf.max() > 1):
            raise ValueError(f"Got confidences in [{conf.min()}, {conf.max()}]; expected values in [0, 1]")
        labeled = correct_n = 0
        if correct is not None:
            c = np.asarray(correct, dtype=float)
            if c.shape != conf.shape:
                raise ValueError(f"Got {c.shape} for correct and {conf.shape} for confidence; expected the same shape")
            known = ~np.isnan(c)
            if not np.isin(c[known], (0.0, 1.0)).all():
                raise ValueError("Got values other than 0, 1 or NaN for correct")
            labeled, correct_n = int(known.sum()), int(c[known].sum())
        p95 = float(np.percentile(latency_ms, 95)) if latency_ms is not None and len(latency_ms) else None
        det = None if detections is None else np.asarray(detections, dtype=float)
        return cls(
            name=name,
            n=int(conf.size),
            errors=errors,
            labeled=labeled,
            correct=correct_n,
            conf_sum=float(conf.sum()),
            conf_sumsq=float(np.square(conf).sum()),
            p95_latency_ms=p95,
            units=units,
            det_sum=None if det is None else float(det.sum()),
            det_sumsq=None if det is None else float(np.square(det).sum()),
        )

    @property
    def requests(self) -> int:
        return self.n + self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.labeled if self.labeled else math.nan

    @property
    def conf_mean(self) -> float:
        return self.conf_sum / self.n if self.n else math.nan

    def accuracy_stats(self) -> MeanStats:
        return MeanStats.from_bernoulli(self.labeled, self.correct)

    def confidence_stats(self) -> MeanStats:
        return MeanStats(self.n, self.conf_sum, self.conf_sumsq)

    def detection_stats(self) -> MeanStats | None:
        return None if self.det_sum is None else MeanStats(self.n, self.det_sum, self.det_sumsq)

    def metric_stats(self, metric: Metric) -> MeanStats:
        return self.accuracy_stats() if metric is Metric.ACCURACY else self.confidence_stats()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ArmSummary:
        known = {f.name for f in fields(cls)}
        extra = set(doc) - known
        if extra:
            raise ValueError(f"Got unknown keys {sorted(extra)} for an arm summary; expected some of {sorted(known)}")
        return cls(**doc)


@dataclass(frozen=True)
class DecisionPolicy:
    """How ``decide`` judges an experiment (built from the CLI/YAML at the edge)."""

    metric: Metric = Metric.ACCURACY
    alpha: float = 0.05
    min_samples: int = 200  # per arm: labeled predictions for accuracy, predictions for confidence
    mixture_sd: float | None = None  # None: DEFAULT_MIXTURE_SD[metric]
    srm_threshold: float = 0.001
    latency_max_increase: float = 0.20
    latency_min_increase_ms: float = 2.0
    latency_min_samples: int = 200
    error_max_increase: float = 0.0
    error_min_samples: int = 100
    detections_max_change: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", Metric(self.metric))
        if not 0 < self.alpha < 1:
            raise ValueError(f"Got {self.alpha!r} for alpha; expected a number in (0, 1)")
        if self.min_samples < 1:
            raise ValueError(f"Got {self.min_samples!r} for min_samples; expected >= 1")
        if self.mixture_sd is not None and not self.mixture_sd > 0:
            raise ValueError(f"Got {self.mixture_sd!r} for mixture_sd; expected a positive number or None")

    @property
    def tau(self) -> float:
        return self.mixture_sd if self.mixture_sd is not None else DEFAULT_MIXTURE_SD[self.metric]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metric": self.metric.value}


@dataclass(frozen=True)
class Decision:
    """The verdict, why, and the numbers behind it (``details`` is JSON-ready)."""

    action: Action
    reason: str
    metric: Metric
    test: SequentialResult
    srm: SRMResult | None = None
    guardrails: tuple[GuardrailResult, ...] = field(default_factory=tuple)

    @property
    def details(self) -> dict[str, Any]:
        return {
            "metric": self.metric.value,
            "test": self.test.to_dict(),
            "srm": None if self.srm is None else self.srm.to_dict(),
            "guardrails": [g.to_dict() for g in self.guardrails],
        }

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action.value, "reason": self.reason, **self.details}


def _fmt_test(t: SequentialResult, metric: Metric) -> str:
    what = "accuracy" if metric is Metric.ACCURACY else "mean confidence"
    return (
        f"{what} {t.treatment_mean:.4f} vs {t.control_mean:.4f}: difference {t.estimate:+.4f}, "
        f"always-valid {1 - t.alpha:.0%} CI [{t.ci_low:+.4f}, {t.ci_high:+.4f}], p = {t.p_value:.3g}"
    )


def decide(
    control: ArmSummary,
    treatment: ArmSummary,
    policy: DecisionPolicy,
    *,
    expected_share: Mapping[str, float] | None = None,
    previous: Decision | None = None,
) -> Decision:
    """Continue, promote or roll back the treatment, and why.

    Args:
        control, treatment: cumulative summaries of the two arms.
        policy: metric, alpha, minimum samples and guardrail tolerances.
        expected_share: the share of randomization units each arm should have received,
            keyed by arm name (the configured split; for a bandit, the time-weighted
            weights). None skips the SRM check.
        previous: the decision at the previous look, to carry the running p-value and
            interval (see ``SequentialResult``).
    """
    if control.name == treatment.name:
        raise ValueError(f"Got the same name {control.name!r} for both arms; expected distinct names")
    metric = policy.metric
    prev_test = previous.test if previous is not None and previous.metric is metric else None
    test = sequential_test(
        control.metric_stats(metric), treatment.metric_stats(metric), alpha=policy.alpha, mixture_sd=policy.tau, previous=prev_test
    )

    srm = None
    if expected_share is not None:
        units = {a.name: a.units if a.units is not None else a.requests for a in (control, treatment)}
        srm = srm_check(units, expected_share, threshold=policy.srm_threshold)
    guardrails = [
        latency_guardrail(
            control.p95_latency_ms, control.requests, treatment.p95_latency_ms, treatment.requests,
            max_relative_increase=policy.latency_max_increase, min_increase_ms=policy.latency_min_increase_ms,
            min_samples=policy.latency_min_samples,
        ),
        error_rate_guardrail(
            control.requests, control.errors, treatment.requests, treatment.errors,
            max_increase=policy.error_max_increase, alpha=policy.alpha, min_samples=policy.error_min_samples,
        ),
    ]
    det_c, det_t = control.detection_stats(), treatment.detection_stats()
    if det_c is not None and det_t is not None:
        guardrails.append(
            detections_guardrail(det_c, det_t, max_relative_change=policy.detections_max_change, alpha=policy.alpha, min_samples=policy.min_samples)
        )

    def made(action: Action, reason: str) -> Decision:
        return Decision(action, reason, metric, test, srm, tuple(guardrails))

    srm_note = (
        f"sample-ratio mismatch (p = {srm.p_value:.2g} < {srm.threshold}): assignment or logging is biased"
        if srm is not None and srm.flagged
        else ""
    )

    breached = [g for g in guardrails if g.breached]
    if breached:
        return made(Action.ROLLBACK, "guardrail breached: " + "; ".join(g.reason for g in breached))

    have = (control.labeled, treatment.labeled) if metric is Metric.ACCURACY else (control.n, treatment.n)
    if min(have) < policy.min_samples:
        unit = "labeled predictions" if metric is Metric.ACCURACY else "predictions"
        reason = f"waiting for data: {min(have)} of {policy.min_samples} {unit} in the smaller arm"
        return made(Action.CONTINUE, reason + (f"; {srm_note}" if srm_note else ""))

    summary = _fmt_test(test, metric)
    if test.significant and test.direction < 0:
        return made(Action.ROLLBACK, f"treatment is significantly worse: {summary}" + (f"; also {srm_note}" if srm_note else ""))
    if test.significant and test.direction > 0:
        if metric is Metric.CONFIDENCE:
            return made(
                Action.CONTINUE,
                f"treatment is significantly more confident ({summary}), but confidence alone never promotes "
                "(confidence is not accuracy): label traffic through /v1/feedback and use the accuracy metric",
            )
        if srm_note:
            return made(Action.CONTINUE, f"treatment looks better ({summary}), but not promoting: {srm_note}")
        return made(Action.PROMOTE, f"treatment is significantly better: {summary}")
    if srm_note:
        return made(Action.CONTINUE, f"no significant difference yet ({summary}); promotion blocked: {srm_note}")
    return made(Action.CONTINUE, f"no significant difference yet: {summary}")
