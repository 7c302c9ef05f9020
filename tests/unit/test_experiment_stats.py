"""Experiment statistics: SRM, the always-valid sequential test (closed form, small simulations),
guardrails and Thompson sampling. The full-size simulations are in tests/slow."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy import stats as sps

from visionfleet.experiments import (
    DEFAULT_MIXTURE_SD,
    GuardrailStatus,
    MeanStats,
    Metric,
    accuracy_test,
    confidence_test,
    detections_guardrail,
    error_rate_guardrail,
    latency_guardrail,
    mean_interval,
    mixture_log_lr,
    mixture_radius,
    sequential_path,
    sequential_test,
    srm_check,
    thompson_weights,
)

ALPHA = 0.05
RUNS = 400  # the slow tier runs 1,000
# The bounds are for 1,000 runs: FPR <= 0.064 is 0.05 + 2.03 binomial sd. With
# fewer runs the same z gives a correspondingly wider bound.
Z = (0.064 - 0.05) / math.sqrt(0.05 * 0.95 / 1000)


def fpr_bound(runs: int) -> float:
    return 0.05 + Z * math.sqrt(0.05 * 0.95 / runs)


def fixed_horizon_total(p1: float, p2: float, alpha: float = 0.05, power: float = 0.80) -> int:
    """Closed-form total sample size of a two-sided two-proportion z-test, equal arms."""
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    per_arm = z**2 * (p1 * (1 - p1) + p2 * (1 - p2)) / (p1 - p2) ** 2
    return 2 * math.ceil(per_arm)


def simulate_bernoulli(runs: int, p_control: float, p_treatment: float, looks: int, step: int, seed: int):
    """Cumulative per-arm counts at each look; each request is assigned 50/50 at random."""
    rng = np.random.default_rng(seed)
    nt = rng.binomial(step, 0.5, size=(runs, looks))
    nc = step - nt
    st, sc = rng.binomial(nt, p_treatment), rng.binomial(nc, p_control)
    return nc.cumsum(1), sc.cumsum(1), nt.cumsum(1), st.cumsum(1)


# ---------------------------------------------------------------- SRM


def test_srm_flags_48_52_at_20000_and_not_a_fair_split() -> None:
    rng = np.random.default_rng(4)
    a = int(rng.binomial(20_000, 0.48))
    skewed = srm_check({"control": a, "treatment": 20_000 - a}, {"control": 0.5, "treatment": 0.5})
    b = int(rng.binomial(20_000, 0.50))
    fair = srm_check({"control": b, "treatment": 20_000 - b}, {"control": 0.5, "treatment": 0.5})
    assert skewed.flagged, skewed
    assert not fair.flagged and fair.p_value > 0.001, fair
    exact = srm_check({"control": 9600, "treatment": 10_400}, {"control": 50, "treatment": 50})
    assert exact.flagged and exact.chi2 == pytest.approx(32.0)
    ref = sps.chisquare([a, 20_000 - a], [10_000, 10_000])
    assert skewed.chi2 == pytest.approx(ref.statistic) and skewed.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_srm_false_alarm_rate_and_edge_cases() -> None:
    rng = np.random.default_rng(8)
    counts = rng.multinomial(30_000, [0.9, 0.1], size=3000)
    flags = [srm_check({"c": int(x), "t": int(y)}, {"c": 9, "t": 1}).flagged for x, y in counts]
    assert np.mean(flags) <= 0.004  # nominal 0.001
    assert srm_check({"c": 0, "t": 0}, {"c": 1, "t": 1}).p_value == 1.0
    assert srm_check({"c": 100, "t": 1}, {"c": 1, "t": 0}).flagged  # traffic where none is expected
    with pytest.raises(ValueError, match="same arms"):
        srm_check({"c": 1}, {"c": 1, "t": 1})
    with pytest.raises(ValueError, match="summing to 0"):
        srm_check({"c": 1, "t": 1}, {"c": 0, "t": 0})


# ---------------------------------------------------------------- the mixture boundary


@pytest.mark.parametrize("diff, var, tau", [(0.03, 1e-4, 0.05), (-0.01, 4e-4, 0.02), (0.2, 1e-3, 0.1)])
def test_mixture_likelihood_ratio_matches_numerical_integration(diff: float, var: float, tau: float) -> None:
    # L = integral N(diff; theta, V) N(theta; 0, tau^2) dtheta / N(diff; 0, V)
    sd = math.sqrt(var)
    num, _ = integrate.quad(lambda th: sps.norm.pdf(diff, th, sd) * sps.norm.pdf(th, 0, tau), -1, 1, points=[0, diff], limit=200)
    assert float(mixture_log_lr(diff, var, tau)) == pytest.approx(math.log(num / sps.norm.pdf(diff, 0, sd)), rel=1e-6)


def test_interval_edge_is_exactly_the_rejection_boundary() -> None:
    var, tau = 2e-4, 0.05
    r = float(mixture_radius(var, tau, ALPHA))
    assert float(mixture_log_lr(r, var, tau)) == pytest.approx(math.log(1 / ALPHA))
    assert float(mixture_log_lr(0.999 * r, var, tau)) < math.log(1 / ALPHA) < float(mixture_log_lr(1.001 * r, var, tau))


def test_scalar_chain_equals_vectorized_path() -> None:
    nc, sc, nt, st = simulate_bernoulli(3, 0.9, 0.86, 60, 50, seed=11)
    path = sequential_path(nc, sc, sc, nt, st, st)
    for run in range(3):
        prev = None
        for k in range(60):
            prev = accuracy_test(int(nc[run, k]), int(sc[run, k]), int(nt[run, k]), int(st[run, k]), previous=prev)
            assert prev.p_value == pytest.approx(path.p_value[run, k], rel=1e-9)
            assert prev.estimate == pytest.approx(path.estimate[run, k])
            assert (prev.ci_low, prev.ci_high) == pytest.approx((path.ci_low[run, k], path.ci_high[run, k]))


def test_result_fields_and_edge_cases() -> None:
    r = accuracy_test(2000, 1800, 2000, 1700)
    assert r.estimate == pytest.approx(-0.05) and r.significant and r.direction == -1
    assert r.ci_low < -0.05 < r.ci_high < 0
    empty = accuracy_test(0, 0, 10, 9)
    assert math.isnan(empty.estimate) and empty.p_value == 1.0 and (empty.ci_low, empty.ci_high) == (-1.0, 1.0)
    assert empty.to_dict()["estimate"] is None
    # All successes on both arms: the shrunk variance keeps the test finite and quiet.
    perfect = accuracy_test(30, 30, 30, 30)
    assert perfect.p_value == 1.0 and perfect.ci_low < 0 < perfect.ci_high
    # Unbounded outcomes (counts): no clipping to [-1, 1] when bounds=None.
    counts = sequential_test(MeanStats.from_values([0.0] * 300), MeanStats.from_values([5.0] * 300), bounds=None, prior_var=1.0)
    assert counts.estimate == 5.0 and counts.ci_high > 5.0 and counts.direction == 1
    with pytest.raises(ValueError, match="alpha"):
        accuracy_test(1, 1, 1, 1, alpha=1.5)
    with pytest.raises(ValueError, match="successes"):
        accuracy_test(5, 6, 5, 1)
    with pytest.raises(ValueError, match="confidences in"):
        confidence_test(MeanStats(3, 4.0, 5.0), MeanStats(3, 1.0, 0.5))
    with pytest.raises(ValueError, match="same alpha"):
        accuracy_test(10, 9, 10, 9, previous=accuracy_test(10, 9, 10, 9, alpha=0.1))


def test_single_arm_interval_covers() -> None:
    lo, hi = mean_interval(MeanStats.from_bernoulli(1000, 900))
    assert lo < 0.9 < hi and hi - lo < 0.1
    assert mean_interval(MeanStats(0, 0.0, 0.0)) == (0.0, 1.0)


# ---------------------------------------------------------------- small simulations


def test_accuracy_aa_false_positive_rate_small() -> None:
    """A/A at 0.90, a look every 50 requests up to 10,000: P(ever significant) <= alpha."""
    nc, sc, nt, st = simulate_bernoulli(RUNS, 0.90, 0.90, looks=200, step=50, seed=1)
    fp = (sequential_path(nc, sc, sc, nt, st, st, alpha=ALPHA).p_value[:, -1] <= ALPHA).mean()
    print(f"accuracy A/A FPR over {RUNS} runs: {fp:.4f} (bound {fpr_bound(RUNS):.4f})")
    assert fp <= fpr_bound(RUNS)


def test_accuracy_aa_unbalanced_split_small() -> None:
    """A 90/10 split: the small arm starts with a handful of requests, often all correct."""
    rng = np.random.default_rng(12)
    nt = rng.binomial(50, 0.1, size=(RUNS, 200))
    nc = 50 - nt
    sc, st = rng.binomial(nc, 0.9).cumsum(1), rng.binomial(nt, 0.9).cumsum(1)
    fp = (sequential_path(nc.cumsum(1), sc, sc, nt.cumsum(1), st, st).p_value[:, -1] <= ALPHA).mean()
    print(f"accuracy A/A 90/10 FPR over {RUNS} runs: {fp:.4f} (bound {fpr_bound(RUNS):.4f})")
    assert fp <= fpr_bound(RUNS)


def test_accuracy_power_small() -> None:
    """0.90 vs 0.85 is detected, in the right direction, within 3x the fixed-horizon size."""
    horizon = 3 * fixed_horizon_total(0.90, 0.85)
    assert 1300 <= horizon / 3 <= 1400  # the "about 1,370"
    looks = horizon // 50
    nc, sc, nt, st = simulate_bernoulli(RUNS, 0.90, 0.85, looks=looks, step=50, seed=2)
    path = sequential_path(nc, sc, sc, nt, st, st, alpha=ALPHA)
    detected = (path.ci_high[:, -1] < 0).mean()
    bound = 0.80 - Z * math.sqrt(0.8 * 0.2 / RUNS)
    print(f"power within {looks * 50} requests over {RUNS} runs: {detected:.4f} (bound {bound:.4f})")
    assert detected >= bound


def test_confidence_aa_false_positive_rate_small() -> None:
    """A/A on Beta(8, 2) confidences (mean 0.8), looks every 50 requests up to 10,000."""
    rng = np.random.default_rng(3)
    runs, looks, step = 200, 200, 50
    conf = rng.beta(8, 2, size=(runs, looks * step))
    arm = rng.random((runs, looks * step)) < 0.5

    def cum(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
        return (values * mask).reshape(runs, looks, step).sum(-1).cumsum(1)
    one = np.ones_like(conf)
    path = sequential_path(
        cum(~arm, one), cum(~arm, conf), cum(~arm, conf**2), cum(arm, one), cum(arm, conf), cum(arm, conf**2),
        mixture_sd=DEFAULT_MIXTURE_SD[Metric.CONFIDENCE],
    )
    fp = (path.p_value[:, -1] <= ALPHA).mean()
    print(f"confidence A/A FPR over {runs} runs: {fp:.4f} (bound {fpr_bound(runs):.4f})")
    assert fp <= fpr_bound(runs)


def test_interval_covers_true_difference_at_every_look() -> None:
    nc, sc, nt, st = simulate_bernoulli(RUNS, 0.90, 0.87, looks=120, step=50, seed=6)
    path = sequential_path(nc, sc, sc, nt, st, st, alpha=ALPHA)
    missed = ((path.ci_low > -0.03) | (path.ci_high < -0.03)).any(axis=1).mean()
    assert missed <= fpr_bound(RUNS), missed


# ---------------------------------------------------------------- guardrails


def test_latency_guardrail() -> None:
    assert latency_guardrail(50.0, 500, 70.0, 500).status is GuardrailStatus.BREACH
    ok = latency_guardrail(50.0, 500, 58.0, 500)
    assert ok.status is GuardrailStatus.OK and ok.limit == pytest.approx(60.0)
    # 2 ms -> 3 ms is +50%, but within the absolute slack.
    assert latency_guardrail(2.0, 500, 3.0, 500).status is GuardrailStatus.OK
    low = latency_guardrail(50.0, 50, 500.0, 500)
    assert low.status is GuardrailStatus.INSUFFICIENT and "200 requests per arm" in low.reason
    assert latency_guardrail(None, 500, 50.0, 500).status is GuardrailStatus.INSUFFICIENT
    with pytest.raises(ValueError, match="max_relative_increase"):
        latency_guardrail(1, 1, 1, 1, max_relative_increase=-0.1)


def test_error_rate_guardrail() -> None:
    bad = error_rate_guardrail(2000, 20, 2000, 100)
    assert bad.breached and "5.00%" in bad.reason and "1.00%" in bad.reason
    assert error_rate_guardrail(2000, 20, 2000, 24).status is GuardrailStatus.OK
    assert error_rate_guardrail(2000, 20, 2000, 60, max_increase=0.05).status is GuardrailStatus.OK
    assert error_rate_guardrail(50, 0, 50, 40).status is GuardrailStatus.INSUFFICIENT


def test_detections_guardrail() -> None:
    rng = np.random.default_rng(9)
    base = MeanStats.from_values(rng.poisson(3.0, 2000))
    assert detections_guardrail(base, MeanStats.from_values(rng.poisson(3.0, 2000))).status is GuardrailStatus.OK
    fewer = detections_guardrail(base, MeanStats.from_values(rng.poisson(1.0, 2000)))
    assert fewer.breached and "beyond" in fewer.reason
    assert detections_guardrail(base, MeanStats.from_values(rng.poisson(6.0, 2000))).breached
    assert detections_guardrail(base, MeanStats.from_values([0.0] * 10)).status is GuardrailStatus.INSUFFICIENT


# ---------------------------------------------------------------- Thompson sampling


def test_thompson_weights_match_the_posterior_and_respect_the_floor() -> None:
    rng = np.random.default_rng(10)
    arms = {"a": MeanStats.from_bernoulli(200, 170), "b": MeanStats.from_bernoulli(200, 180)}
    w = thompson_weights(arms, metric=Metric.ACCURACY, floor=0.0, draws=200_000, rng=rng)
    # Exact P(B > A) for independent Beta posteriors, by quadrature.
    pa, pb = sps.beta(171, 31), sps.beta(181, 21)
    exact, _ = integrate.quad(lambda x: pb.pdf(x) * pa.cdf(x), 0, 1, limit=200)
    assert w["b"] == pytest.approx(exact, abs=0.005) and sum(w.values()) == pytest.approx(1.0)
    clear = thompson_weights(
        {"a": MeanStats.from_bernoulli(2000, 1700), "b": MeanStats.from_bernoulli(2000, 1900), "c": MeanStats.from_bernoulli(0, 0)},
        metric="accuracy", floor=0.05, rng=rng,
    )
    assert clear["a"] == pytest.approx(0.05, abs=1e-9) and clear["b"] > 0.8 and clear["c"] >= 0.05
    conf = thompson_weights(
        {"a": MeanStats.from_values(rng.beta(8, 2, 500)), "b": MeanStats.from_values(rng.beta(6, 4, 500))},
        metric=Metric.CONFIDENCE, floor=0.1, rng=rng,
    )
    assert conf["a"] == pytest.approx(0.9, abs=1e-3) and conf["b"] == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="floor"):
        thompson_weights(arms, metric=Metric.ACCURACY, floor=0.6, rng=rng)
    with pytest.raises(ValueError, match="Bernoulli counts"):
        thompson_weights({"a": MeanStats(3, 1.5, 1.0)}, metric=Metric.ACCURACY, rng=rng)
