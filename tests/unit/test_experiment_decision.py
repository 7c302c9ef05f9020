"""The continue / promote / rollback decision and its rules, from seeded simulated arms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from visionfleet.experiments import Action, ArmSummary, DecisionPolicy, GuardrailStatus, Metric, decide

SPLIT = {"control": 0.5, "treatment": 0.5}


def arm(
    name: str,
    n: int,
    acc: float,
    rng: np.random.Generator,
    *,
    conf: tuple[float, float] = (8, 2),
    latency: float = 50.0,
    errors: int = 0,
    label_share: float = 1.0,
    detections: float | None = None,
) -> ArmSummary:
    """A simulated arm: per-request correctness, Beta confidences, gamma latencies."""
    correct = (rng.random(n) < acc).astype(float)
    correct[rng.random(n) >= label_share] = np.nan
    return ArmSummary.from_observations(
        name,
        rng.beta(*conf, size=n),
        correct=correct,
        latency_ms=rng.gamma(16.0, latency / 16.0, size=n),
        errors=errors,
        detections=None if detections is None else rng.poisson(detections, size=n),
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261126)


def test_better_accuracy_promotes(rng: np.random.Generator) -> None:
    d = decide(arm("control", 3000, 0.85, rng), arm("treatment", 3000, 0.90, rng), DecisionPolicy(), expected_share=SPLIT)
    assert d.action is Action.PROMOTE, d.reason
    assert "significantly better" in d.reason and d.test.direction == 1
    assert d.srm is not None and not d.srm.flagged
    assert all(g.status is GuardrailStatus.OK for g in d.guardrails)
    json.dumps(d.to_dict())  # JSON-ready for the CLI and the HTTP API


def test_worse_accuracy_rolls_back_and_equal_continues(rng: np.random.Generator) -> None:
    worse = decide(arm("control", 3000, 0.90, rng), arm("treatment", 3000, 0.85, rng), DecisionPolicy())
    assert worse.action is Action.ROLLBACK and "significantly worse" in worse.reason
    same = decide(arm("control", 3000, 0.90, rng), arm("treatment", 3000, 0.90, rng), DecisionPolicy())
    assert same.action is Action.CONTINUE and "no significant difference" in same.reason


def test_waits_for_minimum_labeled_samples(rng: np.random.Generator) -> None:
    # A large true difference, but only ~10% of the traffic is labeled: 150 < 200 labeled.
    d = decide(
        arm("control", 1500, 0.5, rng, label_share=0.1), arm("treatment", 1500, 0.99, rng, label_share=0.1), DecisionPolicy()
    )
    assert d.action is Action.CONTINUE and d.reason.startswith("waiting for data") and "labeled" in d.reason


@pytest.mark.parametrize(
    "kwargs, match",
    [({"latency": 80.0}, "p95 latency"), ({"errors": 150}, "error rate")],
)
def test_guardrail_breach_rolls_back_even_when_more_accurate(rng: np.random.Generator, kwargs: dict, match: str) -> None:
    d = decide(arm("control", 3000, 0.85, rng, errors=10), arm("treatment", 3000, 0.95, rng, **{"errors": 10, **kwargs}), DecisionPolicy())
    assert d.action is Action.ROLLBACK and d.reason.startswith("guardrail breached") and match in d.reason
    assert d.test.direction == 1  # the metric alone would have promoted


def test_srm_blocks_promotion_but_not_rollback(rng: np.random.Generator) -> None:
    skew = {"control": 0.9, "treatment": 0.1}  # configured 90/10, observed 50/50
    better = decide(arm("control", 3000, 0.85, rng), arm("treatment", 3000, 0.90, rng), DecisionPolicy(), expected_share=skew)
    assert better.srm.flagged and better.action is Action.CONTINUE
    assert "not promoting" in better.reason and "sample-ratio mismatch" in better.reason
    worse = decide(arm("control", 3000, 0.90, rng), arm("treatment", 3000, 0.80, rng), DecisionPolicy(), expected_share=skew)
    assert worse.action is Action.ROLLBACK and "sample-ratio mismatch" in worse.reason
    null = decide(arm("control", 3000, 0.9, rng), arm("treatment", 3000, 0.9, rng), DecisionPolicy(), expected_share=skew)
    assert null.action is Action.CONTINUE and "promotion blocked" in null.reason
    # Sticky experiments count clients, not requests: one heavy client is not a mismatch.
    c, t = arm("control", 3000, 0.9, rng), arm("treatment", 3000, 0.9, rng)
    c, t = ArmSummary(**{**c.to_dict(), "units": 500}), ArmSummary(**{**t.to_dict(), "units": 520})
    assert not decide(c, t, DecisionPolicy(), expected_share=SPLIT).srm.flagged


def test_confidence_metric_never_promotes_but_may_roll_back(rng: np.random.Generator) -> None:
    policy = DecisionPolicy(metric=Metric.CONFIDENCE)
    up = decide(arm("control", 3000, 0.9, rng, conf=(6, 4)), arm("treatment", 3000, 0.9, rng, conf=(8, 2)), policy)
    assert up.action is Action.CONTINUE and up.test.direction == 1
    assert "confidence alone never promotes" in up.reason
    down = decide(arm("control", 3000, 0.9, rng, conf=(8, 2)), arm("treatment", 3000, 0.9, rng, conf=(6, 4)), policy)
    assert down.action is Action.ROLLBACK and "mean confidence" in down.reason
    # Unlabeled traffic is enough for the confidence metric.
    unlabeled = decide(
        arm("control", 3000, 0.9, rng, conf=(8, 2), label_share=0), arm("treatment", 3000, 0.9, rng, conf=(5, 5), label_share=0), policy
    )
    assert unlabeled.action is Action.ROLLBACK
    # Whatever the data, a confidence experiment never promotes.
    for _ in range(30):
        a, b = rng.uniform(1, 10, 2), rng.uniform(1, 10, 2)
        d = decide(arm("control", 500, 0.5, rng, conf=tuple(a)), arm("treatment", 500, 0.99, rng, conf=tuple(b)), policy)
        assert d.action is not Action.PROMOTE


def test_detection_models_get_a_detections_per_image_guardrail(rng: np.random.Generator) -> None:
    policy = DecisionPolicy(metric=Metric.CONFIDENCE)
    ok = decide(arm("control", 2000, 0.9, rng, detections=3.0), arm("treatment", 2000, 0.9, rng, detections=3.0), policy)
    assert [g.name for g in ok.guardrails][-1] == "detections per image" and not ok.guardrails[-1].breached
    broken = decide(arm("control", 2000, 0.9, rng, detections=3.0), arm("treatment", 2000, 0.9, rng, detections=0.5), policy)
    assert broken.action is Action.ROLLBACK and "detections per image" in broken.reason


def test_aa_looks_rarely_act_and_previous_carries_the_running_values() -> None:
    """Chained decisions on A/A data (a look every 100 requests): wrong actions stay rare."""
    rng = np.random.default_rng(5)
    runs, acted, policy = 150, 0, DecisionPolicy(min_samples=100)
    for _ in range(runs):
        correct = (rng.random(4000) < 0.9).astype(float)
        is_t = rng.random(4000) < 0.5
        conf = rng.beta(8, 2, 4000)
        prev = None
        for k in range(100, 4001, 100):
            c = ArmSummary.from_observations("control", conf[:k][~is_t[:k]], correct=correct[:k][~is_t[:k]])
            t = ArmSummary.from_observations("treatment", conf[:k][is_t[:k]], correct=correct[:k][is_t[:k]])
            d = decide(c, t, policy, previous=prev)
            if prev is not None:
                assert d.test.p_value <= prev.test.p_value and d.test.ci_low >= prev.test.ci_low
            prev = d
            if d.action is not Action.CONTINUE:
                acted += 1
                break
    print(f"A/A decisions acted in {acted} of {runs} runs")
    assert acted / runs <= 0.05 + 2.03 * math.sqrt(0.05 * 0.95 / runs), acted


def test_summaries_round_trip_and_validation(rng: np.random.Generator) -> None:
    a = arm("control", 100, 0.9, rng, detections=2.0)
    assert ArmSummary.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert a.requests == 100 and a.accuracy == a.correct / a.labeled
    with pytest.raises(ValueError, match="correct <= labeled"):
        ArmSummary("x", n=10, labeled=5, correct=6)
    with pytest.raises(ValueError, match="confidences in"):
        ArmSummary("x", n=2, conf_sum=3.0, conf_sumsq=3.0)
    with pytest.raises(ValueError, match="unknown keys"):
        ArmSummary.from_dict({"name": "x", "n": 1, "acc": 0.9})
    with pytest.raises(ValueError, match="values in"):
        ArmSummary.from_observations("x", [0.5, 1.5])
    with pytest.raises(ValueError, match="alpha"):
        DecisionPolicy(alpha=0)
    with pytest.raises(ValueError):
        DecisionPolicy(metric="latency")
    with pytest.raises(ValueError, match="distinct names"):
        decide(a, a, DecisionPolicy())
