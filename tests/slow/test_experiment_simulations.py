"""Full-size proof that the experiment statistics are right (issue 4), printing the measured rates.

A/A false-positive rates with a look after every 50 requests, power against the
closed-form fixed-horizon sample size, SRM detection, coverage at every look, and a
Thompson-sampling bandit driving re-weights. Requests go through the real ``assign``
and looks through the scalar, chained ``accuracy_test`` the ingress uses; the
vectorized path is checked against it. Run with ``make test-slow`` (-s shows the rates).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats as sps

from visionfleet.experiments import (
    DEFAULT_MIXTURE_SD,
    MeanStats,
    Metric,
    accuracy_test,
    assign,
    bucket,
    initial_allocation,
    reweight,
    sequential_path,
    srm_check,
    thompson_weights,
)

pytestmark = pytest.mark.slow

ALPHA = 0.05
RUNS = 1000
STEP = 50  # a look after every 50 requests
SPLIT = {"control": 0.5, "treatment": 0.5}


def fixed_horizon_total(p1: float, p2: float, alpha: float = 0.05, power: float = 0.80) -> int:
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return 2 * math.ceil(z**2 * (p1 * (1 - p1) + p2 * (1 - p2)) / (p1 - p2) ** 2)


def run_bernoulli(p_control: float, p_treatment: float, requests: int, seed: int) -> tuple[np.ndarray, ...]:
    """RUNS experiments, each request assigned by ``assign`` (no client key: a per-request draw).

    Returns cumulative (control n, control correct, treatment n, treatment correct) per look.
    """
    alloc = initial_allocation(SPLIT)
    looks = requests // STEP
    out = np.zeros((4, RUNS, looks), dtype=np.int64)
    np_rng = np.random.default_rng(seed)
    for r in range(RUNS):
        rng = random.Random(seed * 100_003 + r)
        is_t = np.fromiter((assign(alloc, None, "aa", rng) == "treatment" for _ in range(looks * STEP)), bool, looks * STEP)
        correct = np_rng.random(looks * STEP) < np.where(is_t, p_treatment, p_control)
        out[:, r] = [m.reshape(looks, STEP).sum(1).cumsum() for m in (~is_t, ~is_t & correct, is_t, is_t & correct)]
    return tuple(out)


def chained_first_rejection(nc: np.ndarray, sc: np.ndarray, nt: np.ndarray, st: np.ndarray) -> np.ndarray:
    """The look at which the chained scalar test first has p <= alpha (-1: never)."""
    first = np.full(nc.shape[0], -1)
    for r in range(nc.shape[0]):
        prev = None
        for k in range(nc.shape[1]):
            prev = accuracy_test(int(nc[r, k]), int(sc[r, k]), int(nt[r, k]), int(st[r, k]), alpha=ALPHA, previous=prev)
            if prev.significant:
                first[r] = k
                break
    return first


def test_accuracy_aa_false_positive_rate_full() -> None:
    nc, sc, nt, st = run_bernoulli(0.90, 0.90, 10_000, seed=1)
    first = chained_first_rejection(nc, sc, nt, st)
    fpr = (first >= 0).mean()
    vec = sequential_path(nc, sc, sc, nt, st, st, alpha=ALPHA).p_value[:, -1] <= ALPHA
    print(f"\naccuracy A/A at 0.90, {RUNS} runs x 10,000 requests, a look every {STEP}: FPR {fpr:.4f}")
    assert np.array_equal(vec, first >= 0)  # the vectorized path agrees run by run
    assert fpr <= 0.064


def test_accuracy_power_full() -> None:
    fixed = fixed_horizon_total(0.90, 0.85)
    horizon = 3 * fixed
    nc, sc, nt, st = run_bernoulli(0.90, 0.85, horizon, seed=2)
    first = chained_first_rejection(nc, sc, nt, st)
    path = sequential_path(nc, sc, sc, nt, st, st, alpha=ALPHA)
    detected = path.ci_high[:, -1] < 0  # significant, and in the right direction
    wrong_way = (path.ci_low[:, -1] > 0).mean()
    at = (first[first >= 0] + 1) * STEP
    print(
        f"\npower 0.90 vs 0.85: fixed-horizon n = {fixed} total, detected within {horizon // STEP * STEP} "
        f"requests in {detected.mean():.4f} of {RUNS} runs; median requests to detection {np.median(at):.0f} "
        f"(p25 {np.percentile(at, 25):.0f}, p75 {np.percentile(at, 75):.0f}); wrong direction {wrong_way:.4f}"
    )
    assert 1300 <= fixed <= 1400
    assert detected.mean() >= 0.80 and wrong_way == 0.0


def test_confidence_aa_false_positive_rate_full() -> None:
    rng = np.random.default_rng(3)
    looks, requests = 200, 10_000
    fpr = []
    for a, b in ((8.0, 2.0), (2.0, 2.0), (30.0, 1.5)):  # typical, wide, near-saturated confidences
        cols = [np.zeros((RUNS, looks)) for _ in range(6)]
        for r in range(RUNS):
            conf = rng.beta(a, b, requests)
            is_t = rng.random(requests) < 0.5
            for i, (mask, v) in enumerate(((~is_t, 1.0), (~is_t, conf), (~is_t, conf**2), (is_t, 1.0), (is_t, conf), (is_t, conf**2))):
                cols[i][r] = (mask * v).reshape(looks, STEP).sum(1).cumsum()
        tau = DEFAULT_MIXTURE_SD[Metric.CONFIDENCE]
        rate = (sequential_path(*cols, alpha=ALPHA, mixture_sd=tau).p_value[:, -1] <= ALPHA).mean()
        fpr.append(rate)
        print(f"\nconfidence A/A on Beta({a:g}, {b:g}), {RUNS} runs x 10,000 requests, a look every {STEP}: FPR {rate:.4f}")
    assert max(fpr) <= 0.064


def test_confidence_power_full() -> None:
    """Mean confidence 0.80 vs 0.78 (Beta(8, 2) vs Beta(7.09, 2)), unlabeled, default mixture sd."""
    rng = np.random.default_rng(9)
    c_dist, t_dist = sps.beta(8, 2), sps.beta(2 * 0.78 / 0.22, 2)
    diff = t_dist.mean() - c_dist.mean()
    z = sps.norm.ppf(1 - ALPHA / 2) + sps.norm.ppf(0.80)
    fixed = 2 * math.ceil(z**2 * (c_dist.var() + t_dist.var()) / diff**2)
    looks = 3 * fixed // STEP
    is_t = rng.random((RUNS, looks * STEP)) < 0.5
    conf = np.where(is_t, t_dist.rvs((RUNS, looks * STEP), random_state=rng), c_dist.rvs((RUNS, looks * STEP), random_state=rng))
    cols = [(m * v).reshape(RUNS, looks, STEP).sum(-1).cumsum(1) for m in (~is_t, is_t) for v in (1.0, conf, conf**2)]
    path = sequential_path(*cols, alpha=ALPHA, mixture_sd=DEFAULT_MIXTURE_SD[Metric.CONFIDENCE])
    power = (path.ci_high[:, -1] < 0).mean()
    print(f"\nconfidence power, mean {c_dist.mean():.2f} vs {t_dist.mean():.2f}: fixed-horizon n = {fixed} total, "
          f"detected within {looks * STEP} requests in {power:.4f} of {RUNS} runs")
    assert abs(diff + 0.02) < 1e-6 and power >= 0.80


def test_unbalanced_split_and_mixture_sd_sweep() -> None:
    """A 90/10 split keeps its FPR; FPR and power are not sensitive to the mixture's sd."""
    rng = np.random.default_rng(4)

    def sim(p_c: float, p_t: float, share_t: float, looks: int) -> tuple[np.ndarray, ...]:
        nt = rng.binomial(STEP, share_t, size=(RUNS, looks))
        nc = STEP - nt
        return nc.cumsum(1), rng.binomial(nc, p_c).cumsum(1), nt.cumsum(1), rng.binomial(nt, p_t).cumsum(1)

    nc, sc, nt, st = sim(0.9, 0.9, 0.1, 200)
    fpr_90_10 = (sequential_path(nc, sc, sc, nt, st, st).p_value[:, -1] <= ALPHA).mean()
    print(f"\naccuracy A/A at 0.90 with a 90/10 split: FPR {fpr_90_10:.4f}")
    assert fpr_90_10 <= 0.064
    aa = sim(0.9, 0.9, 0.5, 200)
    horizon_looks = 3 * fixed_horizon_total(0.90, 0.85) // STEP
    alt = sim(0.9, 0.85, 0.5, horizon_looks)
    for tau in (0.02, 0.035, 0.05, 0.08, 0.12):
        fpr = (sequential_path(aa[0], aa[1], aa[1], aa[2], aa[3], aa[3], mixture_sd=tau).p_value[:, -1] <= ALPHA).mean()
        power = (sequential_path(alt[0], alt[1], alt[1], alt[2], alt[3], alt[3], mixture_sd=tau).ci_high[:, -1] < 0).mean()
        print(f"mixture sd {tau:<5}: A/A FPR {fpr:.4f}, power within 3x fixed horizon {power:.4f}")
        assert fpr <= 0.064 and power >= 0.80


def test_naive_peeking_would_inflate_false_positives() -> None:
    """Why the sequential test exists: a fixed-sample z-test read at every look lies."""
    rng = np.random.default_rng(8)
    nt = rng.binomial(STEP, 0.5, size=(RUNS, 200))
    nc = STEP - nt
    sc, st = rng.binomial(nc, 0.9).cumsum(1), rng.binomial(nt, 0.9).cumsum(1)
    nc, nt = nc.cumsum(1), nt.cumsum(1)
    pc, pt = sc / nc, st / nt
    se = np.sqrt(np.maximum(pc * (1 - pc) / nc + pt * (1 - pt) / nt, 1e-12))
    naive = (np.abs(pt - pc) / se > sps.norm.ppf(1 - ALPHA / 2)).any(axis=1).mean()
    once = (np.abs(pt - pc) / se > sps.norm.ppf(1 - ALPHA / 2))[:, -1].mean()
    valid = (sequential_path(nc, sc, sc, nt, st, st).p_value[:, -1] <= ALPHA).mean()
    print(f"\nA/A, a look every {STEP} up to 10,000: z-test read once at the end {once:.4f}, "
          f"z-test read at every look {naive:.4f}, always-valid test {valid:.4f}")
    assert naive > 3 * ALPHA and valid <= 0.064


def test_interval_covers_the_true_difference_at_every_look() -> None:
    rng = np.random.default_rng(5)
    nt = rng.binomial(STEP, 0.5, size=(RUNS, 200))
    nc = STEP - nt
    sc, st = rng.binomial(nc, 0.80).cumsum(1), rng.binomial(nt, 0.83).cumsum(1)
    path = sequential_path(nc.cumsum(1), sc, sc, nt.cumsum(1), st, st)
    miss = ((path.ci_low > 0.03) | (path.ci_high < 0.03)).any(axis=1).mean()
    print(f"\ninterval misses the true difference at some look in {miss:.4f} of {RUNS} runs")
    assert miss <= 0.064


def test_srm_detection_and_false_alarms() -> None:
    rng = np.random.default_rng(6)
    skew = [srm_check({"control": int(a), "treatment": 20_000 - int(a)}, SPLIT).flagged for a in rng.binomial(20_000, 0.48, RUNS)]
    fair = [srm_check({"control": int(a), "treatment": 20_000 - int(a)}, SPLIT).flagged for a in rng.binomial(20_000, 0.50, RUNS)]
    print(f"\nSRM at n = 20,000: 48/52 flagged in {np.mean(skew):.4f}, 50/50 flagged in {np.mean(fair):.4f} of {RUNS}")
    assert np.mean(skew) >= 0.95 and np.mean(fair) <= 0.005


def test_thompson_bandit_with_sticky_clients_moves_traffic_to_the_best_arm() -> None:
    """A 3-arm bandit re-weighting every 500 requests: the best arm ends with most traffic, and
    a sticky client only ever leaves an arm that was shrinking."""
    acc = {"a": 0.80, "b": 0.86, "c": 0.90}
    rng = np.random.default_rng(7)
    clients = [f"user-{i}" for i in range(3000)]
    alloc = initial_allocation(dict.fromkeys(acc, 1.0))
    seen: dict[str, str] = {}
    counts = {a: [0, 0] for a in acc}  # labeled, correct
    moves, unkeyed = 0, random.Random(0)
    for _ in range(60):
        for c in rng.choice(len(clients), 500):
            key = clients[c]
            arm = assign(alloc, key, "bandit", unkeyed)
            assert seen.setdefault(key, arm) == arm  # sticky between re-weights
            counts[arm][0] += 1
            counts[arm][1] += int(rng.random() < acc[arm])
        stats = {a: MeanStats.from_bernoulli(*counts[a]) for a in acc}
        new = reweight(alloc, thompson_weights(stats, metric=Metric.ACCURACY, floor=0.05, rng=rng))
        shrank = {a for a in acc if new.ticks()[a] < alloc.ticks()[a]}
        for key, arm in seen.items():
            now = new.arm_at(bucket(key, "bandit"))
            assert now == arm or arm in shrank
            moves += now != arm
            seen[key] = now
        alloc = new
    w = alloc.weights()
    print(f"\nbandit after 30,000 requests: weights {({a: round(x, 3) for a, x in w.items()})}, clients moved by re-weights {moves} of {len(seen)}, each off a shrinking arm")
    assert w["c"] > 0.6 and min(w.values()) >= 0.05 - 1e-9
