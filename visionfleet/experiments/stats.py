"""Experiment statistics: SRM check, always-valid sequential tests, guardrails, Thompson sampling.

The sequential test is the normal-mixture sequential probability ratio test (mSPRT)
of Johari, Koomen, Pekelis and Walsh, "Always Valid Inference: Continuous Monitoring
of A/B Tests" (Operations Research 70(3), 2022; arXiv:1512.04922), applied to the
difference of two means with plug-in variances. Its confidence interval is the
Gaussian-mixture asymptotic confidence sequence of Waudby-Smith, Arbour, Sinha,
Kennedy and Ramdas, "Time-uniform central limit theory and asymptotic confidence
sequences" (Annals of Statistics 52(6), 2024; arXiv:2103.06476) — the two are the same
boundary (see docs/ab-testing.md). With probability at least 1 - alpha the interval
holds the true difference at every look at once, so a user may look after every
request without inflating the false-positive rate.

Every function here is pure (numpy + scipy.special); arrays broadcast, so simulations
of thousands of experiments run as one vectorized call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, NamedTuple

import numpy as np
from scipy.special import chdtrc

__all__ = [
    "Metric",
    "MeanStats",
    "SRMResult",
    "srm_check",
    "SequentialResult",
    "SequentialPath",
    "DEFAULT_MIXTURE_SD",
    "mixture_log_lr",
    "mixture_radius",
    "sequential_test",
    "accuracy_test",
    "confidence_test",
    "sequential_path",
    "mean_interval",
    "GuardrailStatus",
    "GuardrailResult",
    "latency_guardrail",
    "error_rate_guardrail",
    "detections_guardrail",
    "thompson_weights",
]

# Outcomes in [0, 1] have variance at most 1/4. Ten pseudo-observations at that variance
# keep the plug-in variance honest while an arm is small: an arm that has seen 29
# successes in 29 labeled requests has a Bernoulli estimate p(1-p) = 0, and with only
# two pseudo-observations the A/A false-positive rate of a 90/10 split rose to 0.09
# (simulated, docs/ab-testing.md); with ten it is 0.04 and power at 50/50 is unchanged
# (their weight vanishes after a few hundred observations). The idea is the
# Agresti-Coull / Laplace adjustment of a binomial proportion.
_PRIOR_N = 10.0
_UNIT_PRIOR_VAR = 0.25


class Metric(str, Enum):
    """The primary metric of an experiment."""

    ACCURACY = "accuracy"  # top-1 correct, from labeled feedback (Bernoulli)
    CONFIDENCE = "confidence"  # top-1 (image-level) confidence in [0, 1], unlabeled


# Standard deviation of the normal mixture over the true difference, in metric units.
# It sets where the test is most sensitive: the interval is narrowest after about
# 8 (s_c^2 + s_t^2) / tau^2 observations per arm (s^2 the per-observation variances;
# Waudby-Smith et al. 2024, section on choosing rho). For accuracy near 0.9 (s^2 ~ 0.1)
# tau = 0.05 puts that at ~700 labeled requests per arm, the fixed-horizon size for a
# 5-point difference; confidences vary less (s^2 ~ 0.015 for Beta(8, 2)), and tau = 0.02
# puts it at the fixed-horizon size for a 2-point difference in mean confidence. Power
# is not sensitive to it: simulated power for 0.90 vs 0.85 within 3x the fixed-horizon
# size stayed between 0.96 and 0.99 for tau from 0.02 to 0.12 (docs/ab-testing.md).
DEFAULT_MIXTURE_SD: Mapping[Metric, float] = {Metric.ACCURACY: 0.05, Metric.CONFIDENCE: 0.02}


@dataclass(frozen=True)
class MeanStats:
    """Sufficient statistics of one arm's observations: count, sum and sum of squares."""

    n: int
    total: float
    total_sq: float

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 0:
            raise ValueError(f"Got {self.n!r} for n; expected an integer >= 0")
        if not (math.isfinite(self.total) and math.isfinite(self.total_sq)) or self.total_sq < 0:
            raise ValueError(f"Got total={self.total!r}, total_sq={self.total_sq!r}; expected finite sums, total_sq >= 0")

    @classmethod
    def from_bernoulli(cls, n: int, successes: int) -> MeanStats:
        """Counts of a 0/1 outcome (e.g. labeled requests and correct predictions)."""
        if not 0 <= successes <= n:
            raise ValueError(f"Got {successes!r} successes of {n!r}; expected 0 <= successes <= n")
        return cls(int(n), float(successes), float(successes))

    @classmethod
    def from_values(cls, values: Sequence[float] | np.ndarray) -> MeanStats:
        """Observations (e.g. per-request confidences)."""
        x = np.asarray(values, dtype=float).ravel()
        if not np.all(np.isfinite(x)):
            raise ValueError("Got non-finite values; expected finite numbers")
        return cls(int(x.size), float(x.sum()), float(np.square(x).sum()))

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    def __add__(self, other: MeanStats) -> MeanStats:
        return MeanStats(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)


def _regularized_var(n: Any, total: Any, total_sq: Any, prior_var: float) -> Any:
    """Per-observation variance estimate shrunk toward ``prior_var`` by _PRIOR_N pseudo-observations."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), 0.0)
        var = np.maximum(total_sq / np.maximum(n, 1) - mean * mean, 0.0)
    return (n * var + _PRIOR_N * prior_var) / (n + _PRIOR_N)


# ---------------------------------------------------------------- sample ratio mismatch


@dataclass(frozen=True)
class SRMResult:
    """Chi-square goodness of fit of observed arm counts against the expected shares."""

    chi2: float
    p_value: float
    flagged: bool
    threshold: float
    observed: Mapping[str, int]
    expected: Mapping[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "observed": dict(self.observed), "expected": dict(self.expected)}


def srm_check(observed: Mapping[str, int], expected_share: Mapping[str, float], *, threshold: float = 0.001) -> SRMResult:
    """Flag a sample-ratio mismatch: are the arm counts plausible under the configured split?

    A mismatch means assignment or logging is broken (a crashing arm, a bot, a bad
    hash), which biases any comparison; the usual threshold is p < 0.001 (Fabijan et
    al., "Diagnosing Sample Ratio Mismatch in Online Controlled Experiments", KDD 2019).
    Count randomization units: requests when assigned per request, distinct clients
    when sticky (one heavy client would otherwise look like a mismatch).

    Args:
        observed: arm -> count.
        expected_share: arm -> expected share (normalized here); the same arms as ``observed``.
        threshold: flag when the p-value is below it.
    """
    if set(observed) != set(expected_share):
        raise ValueError(f"Got arms {sorted(observed)} and {sorted(expected_share)}; expected the same arms in both")
    if not 0 < threshold < 1:
        raise ValueError(f"Got {threshold!r} for threshold; expected a number in (0, 1)")
    if any(c < 0 for c in observed.values()) or any(not math.isfinite(w) or w < 0 for w in expected_share.values()):
        raise ValueError(f"Got {dict(observed)} / {dict(expected_share)}; expected non-negative counts and shares")
    wsum = sum(expected_share.values())
    if wsum <= 0:
        raise ValueError(f"Got expected shares {dict(expected_share)} summing to 0; expected a positive sum")
    share = {a: w / wsum for a, w in expected_share.items()}
    total = sum(observed.values())
    expected = {a: share[a] * total for a in share}
    if total == 0:
        return SRMResult(0.0, 1.0, False, threshold, dict(observed), expected)
    # Traffic on an arm that should get none is a mismatch whatever the counts.
    if any(share[a] == 0 and observed[a] > 0 for a in share):
        return SRMResult(math.inf, 0.0, True, threshold, dict(observed), expected)
    live = [a for a in share if share[a] > 0]
    chi2 = sum((observed[a] - expected[a]) ** 2 / expected[a] for a in live)
    p = float(chdtrc(len(live) - 1, chi2)) if len(live) > 1 else 1.0
    return SRMResult(float(chi2), p, p < threshold, threshold, dict(observed), expected)


# ---------------------------------------------------------------- sequential test


def mixture_log_lr(diff: Any, var: Any, tau: float) -> Any:
    """Log of the normal-mixture likelihood ratio against "difference = 0".

    ``diff`` is the estimated difference, ``var`` its variance (e.g.
    ``s1^2/n1 + s2^2/n2``) and ``tau`` the mixture's standard deviation:
    ``log L = 1/2 log(V / (V + tau^2)) + tau^2 diff^2 / (2 V (V + tau^2))``.
    Under the null, ``L`` is (asymptotically) a nonnegative martingale with mean 1, so
    by Ville's inequality it exceeds ``1/alpha`` at any time with probability <= alpha.
    """
    t2 = tau * tau
    return 0.5 * np.log(var / (var + t2)) + t2 * np.square(diff) / (2.0 * var * (var + t2))


def mixture_radius(var: Any, tau: float, alpha: float) -> Any:
    """Half-width of the always-valid interval: the differences not rejected at level ``alpha``."""
    t2 = tau * tau
    return np.sqrt(var * (var + t2) / t2 * (2.0 * math.log(1.0 / alpha) + np.log((var + t2) / var)))


@dataclass(frozen=True)
class SequentialResult:
    """One look of the always-valid test of ``treatment mean - control mean``.

    ``p_value`` and ``[ci_low, ci_high]`` are valid at this look whatever happened at
    earlier looks; passing the previous result as ``previous`` makes them monotone (the
    running minimum p-value and the running intersection of intervals), which is
    equally valid and never wider.
    """

    n_control: int
    n_treatment: int
    control_mean: float
    treatment_mean: float
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    alpha: float
    mixture_sd: float

    @property
    def significant(self) -> bool:
        return self.p_value <= self.alpha

    @property
    def direction(self) -> int:
        """+1 treatment significantly higher, -1 significantly lower, 0 neither."""
        if self.ci_low > 0:
            return 1
        if self.ci_high < 0:
            return -1
        return 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(significant=self.significant, direction=self.direction)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _check_alpha_tau(alpha: float, tau: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"Got {alpha!r} for alpha; expected a number in (0, 1)")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"Got {tau!r} for mixture_sd; expected a positive number")


def sequential_test(
    control: MeanStats,
    treatment: MeanStats,
    *,
    alpha: float = 0.05,
    mixture_sd: float = 0.05,
    previous: SequentialResult | None = None,
    prior_var: float = _UNIT_PRIOR_VAR,
    bounds: tuple[float, float] | None = (-1.0, 1.0),
) -> SequentialResult:
    """Always-valid test and interval for the difference of means, treatment - control.

    Args:
        control, treatment: the arms' sufficient statistics.
        alpha: the level; the interval covers the true difference at all looks with
            probability >= 1 - alpha, and P(p_value <= alpha ever | no difference) <= alpha.
        mixture_sd: the mixture's standard deviation in metric units (see DEFAULT_MIXTURE_SD).
        previous: the result of the previous look of the same experiment, if any.
        prior_var: the per-observation variance the estimate is shrunk toward
            (1/4 for outcomes in [0, 1]).
        bounds: where the difference must lie (clipped to it); None for unbounded.

    Until both arms have an observation the estimate is NaN, the p-value 1 and the
    interval ``bounds``.
    """
    _check_alpha_tau(alpha, mixture_sd)
    lo, hi = bounds if bounds is not None else (-math.inf, math.inf)
    if control.n == 0 or treatment.n == 0:
        est, ci_low, ci_high, p = math.nan, lo, hi, 1.0
    else:
        var = _regularized_var(control.n, control.total, control.total_sq, prior_var) / control.n + _regularized_var(
            treatment.n, treatment.total, treatment.total_sq, prior_var
        ) / treatment.n
        est = treatment.mean - control.mean
        p = float(min(1.0, math.exp(-float(mixture_log_lr(est, var, mixture_sd)))))
        r = float(mixture_radius(var, mixture_sd, alpha))
        ci_low, ci_high = max(lo, est - r), min(hi, est + r)
    if previous is not None:
        if previous.alpha != alpha or previous.mixture_sd != mixture_sd:
            raise ValueError(
                f"Got previous look with alpha={previous.alpha}, mixture_sd={previous.mixture_sd}; "
                f"expected the same alpha={alpha}, mixture_sd={mixture_sd}"
            )
        p = min(p, previous.p_value)
        # An empty intersection can only happen on the <= alpha event where coverage
        # failed; keep the latest interval then rather than report nonsense.
        if max(ci_low, previous.ci_low) <= min(ci_high, previous.ci_high):
            ci_low, ci_high = max(ci_low, previous.ci_low), min(ci_high, previous.ci_high)
    return SequentialResult(
        control.n, treatment.n, control.mean, treatment.mean, est, ci_low, ci_high, p, alpha, mixture_sd
    )


def accuracy_test(
    control_labeled: int,
    control_correct: int,
    treatment_labeled: int,
    treatment_correct: int,
    *,
    alpha: float = 0.05,
    mixture_sd: float = DEFAULT_MIXTURE_SD[Metric.ACCURACY],
    previous: SequentialResult | None = None,
) -> SequentialResult:
    """Always-valid test of the difference in accuracy (treatment - control) from labeled outcomes."""
    return sequential_test(
        MeanStats.from_bernoulli(control_labeled, control_correct),
        MeanStats.from_bernoulli(treatment_labeled, treatment_correct),
        alpha=alpha,
        mixture_sd=mixture_sd,
        previous=previous,
    )


def confidence_test(
    control: MeanStats,
    treatment: MeanStats,
    *,
    alpha: float = 0.05,
    mixture_sd: float = DEFAULT_MIXTURE_SD[Metric.CONFIDENCE],
    previous: SequentialResult | None = None,
) -> SequentialResult:
    """Always-valid test of the difference in mean confidence (values in [0, 1], unlabeled)."""
    for name, s in (("control", control), ("treatment", treatment)):
        if s.n and not (0.0 <= s.total <= s.n * (1 + 1e-9) and s.total_sq <= s.total + 1e-9 * s.n):
            raise ValueError(f"Got {name} sums n={s.n}, total={s.total}, total_sq={s.total_sq}; expected confidences in [0, 1]")
    return sequential_test(control, treatment, alpha=alpha, mixture_sd=mixture_sd, previous=previous)


class SequentialPath(NamedTuple):
    """Vectorized looks: arrays shaped like the inputs; the last axis is time."""

    estimate: np.ndarray
    ci_low: np.ndarray  # running intersection (monotone)
    ci_high: np.ndarray
    p_value: np.ndarray  # running minimum (monotone)


def sequential_path(
    control_n: Any,
    control_total: Any,
    control_total_sq: Any,
    treatment_n: Any,
    treatment_total: Any,
    treatment_total_sq: Any,
    *,
    alpha: float = 0.05,
    mixture_sd: float = 0.05,
    prior_var: float = _UNIT_PRIOR_VAR,
    bounds: tuple[float, float] | None = (-1.0, 1.0),
) -> SequentialPath:
    """:func:`sequential_test` at every look at once, from cumulative sums along the last axis.

    Used by the report (the interval over time) and by simulations (thousands of
    experiments as rows). Equal, look by look, to chaining :func:`sequential_test` with
    ``previous`` — except that an empty running intersection stays empty here (NaN-free:
    low > high), which only happens on the <= alpha event of a coverage failure.
    """
    _check_alpha_tau(alpha, mixture_sd)
    nc, sc, ssc, nt, st, sst = (np.asarray(a, dtype=float) for a in (control_n, control_total, control_total_sq, treatment_n, treatment_total, treatment_total_sq))
    lo, hi = bounds if bounds is not None else (-np.inf, np.inf)
    ready = (nc > 0) & (nt > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = _regularized_var(nc, sc, ssc, prior_var) / np.maximum(nc, 1) + _regularized_var(nt, st, sst, prior_var) / np.maximum(nt, 1)
        est = np.where(ready, st / np.maximum(nt, 1) - sc / np.maximum(nc, 1), np.nan)
        p = np.where(ready, np.minimum(1.0, np.exp(-mixture_log_lr(np.nan_to_num(est), var, mixture_sd))), 1.0)
        r = mixture_radius(var, mixture_sd, alpha)
    low = np.where(ready, np.maximum(lo, est - r), lo)
    high = np.where(ready, np.minimum(hi, est + r), hi)
    return SequentialPath(
        est,
        np.maximum.accumulate(low, axis=-1),
        np.minimum.accumulate(high, axis=-1),
        np.minimum.accumulate(p, axis=-1),
    )


def mean_interval(
    stats: MeanStats,
    *,
    alpha: float = 0.05,
    mixture_sd: float = 0.05,
    prior_var: float = _UNIT_PRIOR_VAR,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> tuple[float, float]:
    """Always-valid interval for one arm's mean (the same mixture boundary, one sample)."""
    _check_alpha_tau(alpha, mixture_sd)
    lo, hi = bounds if bounds is not None else (-math.inf, math.inf)
    if stats.n == 0:
        return lo, hi
    var = float(_regularized_var(stats.n, stats.total, stats.total_sq, prior_var)) / stats.n
    r = float(mixture_radius(var, mixture_sd, alpha))
    return max(lo, stats.mean - r), min(hi, stats.mean + r)


# ---------------------------------------------------------------- guardrails


class GuardrailStatus(str, Enum):
    OK = "ok"
    BREACH = "breach"
    INSUFFICIENT = "insufficient"  # not enough data to judge yet


@dataclass(frozen=True)
class GuardrailResult:
    """The verdict of one guardrail, with the numbers behind it and a sentence saying why."""

    name: str
    status: GuardrailStatus
    reason: str
    control: float
    treatment: float
    limit: float

    @property
    def breached(self) -> bool:
        return self.status is GuardrailStatus.BREACH

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


def latency_guardrail(
    control_p95_ms: float | None,
    control_n: int,
    treatment_p95_ms: float | None,
    treatment_n: int,
    *,
    max_relative_increase: float = 0.20,
    min_increase_ms: float = 2.0,
    min_samples: int = 200,
) -> GuardrailResult:
    """p95 latency regression: breach when the treatment's p95 exceeds the control's by more
    than ``max_relative_increase`` (relative) *and* ``min_increase_ms`` (absolute).

    The absolute slack keeps millisecond jitter on a fast model (2 ms vs 2.5 ms) from
    counting as a 25% regression; ``min_samples`` per arm keeps a p95 from a handful
    of requests (dominated by warm-up) from deciding anything.
    """
    if max_relative_increase < 0 or min_increase_ms < 0 or min_samples < 1:
        raise ValueError(
            f"Got max_relative_increase={max_relative_increase}, min_increase_ms={min_increase_ms}, "
            f"min_samples={min_samples}; expected >= 0, >= 0 and >= 1"
        )
    name = "p95 latency"
    c = math.nan if control_p95_ms is None else float(control_p95_ms)
    t = math.nan if treatment_p95_ms is None else float(treatment_p95_ms)
    if min(control_n, treatment_n) < min_samples or math.isnan(c) or math.isnan(t):
        return GuardrailResult(
            name, GuardrailStatus.INSUFFICIENT,
            f"p95 latency needs {min_samples} requests per arm (have {control_n} / {treatment_n})", c, t, math.nan,
        )
    limit = max(c * (1 + max_relative_increase), c + min_increase_ms)
    if t > limit:
        return GuardrailResult(
            name, GuardrailStatus.BREACH,
            f"treatment p95 latency {t:.1f} ms exceeds the limit {limit:.1f} ms "
            f"(control {c:.1f} ms + max({max_relative_increase:.0%}, {min_increase_ms:g} ms))", c, t, limit,
        )
    return GuardrailResult(name, GuardrailStatus.OK, f"treatment p95 {t:.1f} ms within the limit {limit:.1f} ms", c, t, limit)


def error_rate_guardrail(
    control_requests: int,
    control_errors: int,
    treatment_requests: int,
    treatment_errors: int,
    *,
    max_increase: float = 0.0,
    alpha: float = 0.05,
    mixture_sd: float = 0.02,
    min_samples: int = 100,
) -> GuardrailResult:
    """Error-rate regression: breach when the always-valid interval for ``treatment - control``
    error rate lies entirely above ``max_increase``.

    It uses the sequential test because the guardrail is checked at every look too; a
    fixed-sample test checked continuously would roll back healthy treatments.
    """
    if not 0 <= max_increase < 1 or min_samples < 1:
        raise ValueError(f"Got max_increase={max_increase}, min_samples={min_samples}; expected 0 <= max_increase < 1, min_samples >= 1")
    name = "error rate"
    res = sequential_test(
        MeanStats.from_bernoulli(control_requests, control_errors),
        MeanStats.from_bernoulli(treatment_requests, treatment_errors),
        alpha=alpha,
        mixture_sd=mixture_sd,
    )
    c, t = res.control_mean, res.treatment_mean
    if min(control_requests, treatment_requests) < min_samples:
        return GuardrailResult(
            name, GuardrailStatus.INSUFFICIENT,
            f"error rate needs {min_samples} requests per arm (have {control_requests} / {treatment_requests})",
            c, t, max_increase,
        )
    if res.ci_low > max_increase:
        return GuardrailResult(
            name, GuardrailStatus.BREACH,
            f"treatment error rate {t:.2%} vs control {c:.2%}: increase at least {res.ci_low:.2%} "
            f"(always-valid {1 - alpha:.0%} interval), above the allowed {max_increase:.2%}", c, t, max_increase,
        )
    return GuardrailResult(
        name, GuardrailStatus.OK, f"error rate {t:.2%} vs control {c:.2%}: no significant increase above {max_increase:.2%}",
        c, t, max_increase,
    )


def detections_guardrail(
    control: MeanStats,
    treatment: MeanStats,
    *,
    max_relative_change: float = 0.25,
    alpha: float = 0.05,
    mixture_sd: float = 0.5,
    min_samples: int = 200,
) -> GuardrailResult:
    """Detections per image (detection models): breach when the mean count has changed, in
    either direction, by more than ``max_relative_change`` of the control's mean, with
    always-valid confidence.

    A model that suddenly finds far fewer (or far more) boxes per image is broken in a
    way the image-level confidence can hide. Counts are unbounded, so the variance is
    shrunk toward 1 (a Poisson count with mean 1) instead of 1/4.
    """
    if max_relative_change <= 0 or min_samples < 1:
        raise ValueError(f"Got max_relative_change={max_relative_change}, min_samples={min_samples}; expected > 0 and >= 1")
    name = "detections per image"
    if min(control.n, treatment.n) < min_samples:
        return GuardrailResult(
            name, GuardrailStatus.INSUFFICIENT,
            f"detections per image needs {min_samples} images per arm (have {control.n} / {treatment.n})",
            control.mean, treatment.mean, math.nan,
        )
    res = sequential_test(control, treatment, alpha=alpha, mixture_sd=mixture_sd, prior_var=1.0, bounds=None)
    allowed = max_relative_change * max(control.mean, 1.0 / control.n)
    c, t = control.mean, treatment.mean
    if res.ci_low > allowed or res.ci_high < -allowed:
        return GuardrailResult(
            name, GuardrailStatus.BREACH,
            f"detections per image {t:.2f} vs control {c:.2f}: the change [{res.ci_low:+.2f}, {res.ci_high:+.2f}] "
            f"(always-valid {1 - alpha:.0%}) is beyond ±{max_relative_change:.0%} of control", c, t, allowed,
        )
    return GuardrailResult(
        name, GuardrailStatus.OK, f"detections per image {t:.2f} vs control {c:.2f}: no change beyond ±{max_relative_change:.0%}",
        c, t, allowed,
    )


# ---------------------------------------------------------------- Thompson sampling


def thompson_weights(
    arms: Mapping[str, MeanStats],
    *,
    metric: Metric | str,
    floor: float = 0.05,
    draws: int = 4000,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Traffic weights from Thompson sampling: each arm's posterior probability of being best,
    mixed with a floor so that no arm starves (and its estimate keeps improving).

    Accuracy uses Beta(1 + correct, 1 + wrong) posteriors (``MeanStats.from_bernoulli``);
    confidence a normal approximation of the mean's posterior, with the variance shrunk
    as in the sequential test. The result (``floor + (1 - k floor) * P(best)``) sums to 1
    and is ready for :func:`visionfleet.experiments.reweight`.

    Note: bandit allocation changes the split over time, so compare arms with the
    sequential test on data collected while the split was fixed, or accept that the
    test's guarantee is then approximate; the SRM check needs the time-weighted shares.
    """
    metric = Metric(metric)
    names = list(arms)
    k = len(names)
    if k < 1:
        raise ValueError("Got no arms for thompson_weights; expected at least one")
    if not 0 <= floor <= 1 / k:
        raise ValueError(f"Got {floor!r} for floor with {k} arms; expected 0 <= floor <= {1 / k:.4f}")
    if draws < 1:
        raise ValueError(f"Got {draws!r} for draws; expected >= 1")
    samples = np.empty((k, draws))
    for i, a in enumerate(names):
        s = arms[a]
        if metric is Metric.ACCURACY:
            if not 0 <= s.total <= s.n or s.total != round(s.total):
                raise ValueError(f"Got {s} for arm {a!r}; expected Bernoulli counts (MeanStats.from_bernoulli)")
            samples[i] = rng.beta(1.0 + s.total, 1.0 + s.n - s.total, size=draws)
        else:
            var = float(_regularized_var(s.n, s.total, s.total_sq, _UNIT_PRIOR_VAR))
            mean = (s.total + _PRIOR_N * 0.5) / (s.n + _PRIOR_N)
            samples[i] = rng.normal(mean, math.sqrt(var / (s.n + _PRIOR_N)), size=draws)
    best = np.bincount(np.argmax(samples, axis=0), minlength=k) / draws
    weights = floor + (1.0 - k * floor) * best
    return {a: float(w) for a, w in zip(names, weights)}
