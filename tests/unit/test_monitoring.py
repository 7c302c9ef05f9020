"""Drift tests, windows, the retraining policy and the active-learning sampler (pure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from visionfleet.monitoring import (
    DriftThresholds,
    PolicyState,
    RetrainPolicy,
    VersionMonitor,
    Window,
    class_shift,
    drift_report,
    evaluate_policy,
    expected_calibration_error,
    ks_test,
    psi,
    window_metrics,
)
from visionfleet.sampling import ActiveSampler, SamplingPolicy, is_candidate


def _events(rng: np.random.Generator, n: int, *, conf_a: float = 9, conf_b: float = 1.5, bright: float = 120):
    labels = ["a", "b", "c", "d"]
    for _ in range(n):
        yield {
            "confidence": float(rng.beta(conf_a, conf_b)),
            "brightness": float(rng.normal(bright, 15)),
            "contrast": float(rng.normal(50, 8)),
            "blur": float(rng.lognormal(6, 0.3)),
            "label": labels[int(rng.integers(0, 4))],
        }


def test_psi_and_ks_basics() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)
    assert psi(a, b) < 0.02 and ks_test(a, b)[1] > 0.01
    c = rng.normal(1.0, 1, 2000)
    assert psi(a, c) > 0.25 and ks_test(a, c)[1] < 1e-6
    with pytest.raises(ValueError):
        psi([1.0, 2.0], [1.0])
    same = class_shift(["a", "b"] * 100, ["a", "b"] * 100)
    assert same["psi"] < 1e-9 and same["p_value"] > 0.5
    shifted = class_shift(["a", "b"] * 100, ["a"] * 180 + ["b"] * 20)
    assert shifted["psi"] > 0.25 and shifted["p_value"] < 0.001


def test_ece() -> None:
    assert expected_calibration_error([0.9] * 10, [True] * 9 + [False]) < 1e-9
    assert abs(expected_calibration_error([0.9] * 10, [False] * 10) - 0.9) < 1e-9


def test_no_false_trigger_on_stable_traffic_over_a_long_run() -> None:
    rng = np.random.default_rng(1)
    mon = VersionMonitor(reference_size=300, window_size=300)
    policy = RetrainPolicy(min_samples=200, debounce=3, cooldown_s=0, min_labels=1)
    state = PolicyState()
    th = DriftThresholds()
    fired = degraded_looks = 0
    for look, ev in enumerate(_events(rng, 30_000)):
        mon.add(ev)
        if look % 50 == 49 and mon.reference.full():
            snap = mon.snapshot(th)
            from visionfleet.monitoring import drift_from_dict

            d = evaluate_policy(policy, state, current=snap["current"], reference=snap["reference"],
                                drift=drift_from_dict(snap["drift"]), labels_available=10_000, now=float(look))
            state = d.state
            fired += d.fire
            degraded_looks += d.degraded
    assert fired == 0, f"fired {fired} times on stable traffic ({degraded_looks} degraded looks)"


def test_triggers_on_a_shift_within_500_predictions() -> None:
    from visionfleet.monitoring import drift_from_dict

    rng = np.random.default_rng(2)
    mon = VersionMonitor(reference_size=300, window_size=300)
    policy = RetrainPolicy(min_samples=200, debounce=2, cooldown_s=0, min_labels=1)
    state = PolicyState()
    for ev in _events(rng, 1000):
        mon.add(ev)
    onset = mon.seen
    fired_at = None
    for i, ev in enumerate(_events(rng, 2000, conf_a=3, conf_b=2, bright=70)):  # darker, less confident
        mon.add(ev)
        if i % 25 == 24:
            snap = mon.snapshot()
            d = evaluate_policy(policy, state, current=snap["current"], reference=snap["reference"],
                                drift=drift_from_dict(snap["drift"]), labels_available=500, now=float(i))
            state = d.state
            if d.fire:
                fired_at = mon.seen
                assert any("confidence" in r for r in d.reasons) and any("brightness" in r for r in d.reasons)
                break
    assert fired_at is not None and fired_at - onset <= 500


def test_policy_debounce_cooldown_and_labels() -> None:
    pol = RetrainPolicy(min_samples=10, debounce=2, cooldown_s=100, min_labels=50)
    ref = {"n": 100, "confidence/mean": 0.9, "confidence/low_rate": 0.05}
    bad = {"n": 100, "confidence/mean": 0.6, "confidence/low_rate": 0.4}
    s = PolicyState()
    d = evaluate_policy(pol, s, current=bad, reference=ref, drift=None, labels_available=100, now=0)
    assert not d.fire and d.degraded and d.waiting_for == "debounce 1/2"
    d = evaluate_policy(pol, d.state, current=bad, reference=ref, drift=None, labels_available=10, now=1)
    assert not d.fire and d.waiting_for == "labels 10/50"
    d = evaluate_policy(pol, d.state, current=bad, reference=ref, drift=None, labels_available=100, now=2)
    assert d.fire and d.state.last_fired == 2 and d.state.fired == 1
    for now in (3, 4):
        d = evaluate_policy(pol, d.state, current=bad, reference=ref, drift=None, labels_available=100, now=now)
    assert not d.fire and d.waiting_for.startswith("cooldown")
    d = evaluate_policy(pol, d.state, current=ref, reference=ref, drift=None, labels_available=100, now=500)
    assert not d.degraded and d.state.streak == 0
    with pytest.raises(ValueError):
        RetrainPolicy(debounce=0)


def test_window_metrics_and_outcomes() -> None:
    w = Window(20)
    for c in (0.9, 0.3, 0.8, 0.45):
        w.add({"confidence": c, "label": "a"})
    w.add_outcome(0.9, True)
    w.add_outcome(0.3, False)
    m = window_metrics(w, low_threshold=0.5)
    assert m["n"] == 4 and abs(m["confidence/mean"] - 0.6125) < 1e-9 and m["confidence/low_rate"] == 0.5
    assert m["labeled/accuracy"] == 0.5 and m["labeled/n"] == 2
    mon = VersionMonitor(reference_size=20, window_size=20)
    seqs = [mon.add({"confidence": 0.9}) for _ in range(30)]
    mon.add_outcome(0.9, True, seqs[0])  # in the reference, not in the current window
    mon.add_outcome(0.9, False, seqs[-1])  # in the current window only
    assert len(mon.reference.outcomes) == 1 and len(mon.current.outcomes) == 1


def test_sampler_candidates_and_limits() -> None:
    pol = SamplingPolicy(low_confidence=0.6, margin=0.1, random_share=0.0, rate_per_s=1.0, burst=3, per_class_cap=2, period_s=100)
    assert is_candidate(pol, 0.5, 0.4, 0.99) == "low_confidence"
    assert is_candidate(pol, 0.7, 0.05, 0.99) == "near_threshold"
    assert is_candidate(pol, 0.9, 0.8, 0.99) is None
    assert is_candidate(SamplingPolicy(random_share=0.5), 0.9, 0.8, 0.1) == "random"
    t = [0.0]
    s = ActiveSampler(pol, clock=lambda: t[0])
    assert s.keep(predicted="a", image_hash="h1") and s.keep(predicted="a", image_hash="h2")
    assert not s.keep(predicted="a", image_hash="h3")  # class cap
    assert s.keep(predicted="b", image_hash="h4")
    assert not s.keep(predicted="c", image_hash="h5")  # bucket empty
    assert not s.keep(predicted="c", image_hash="h4")  # duplicate image
    t[0] = 5.0
    assert s.keep(predicted="c", image_hash="h6")  # refilled
    assert s.counts == {"considered": 7, "kept": 4, "rate_limited": 1, "capped": 1, "duplicate": 1}


def test_sink_monitoring_sampling_and_labels(tmp_path: Path) -> None:
    from serve_apps.telemetry import TelemetrySinkImpl
    from visionfleet.labeling import LabelingQueue
    from visionfleet.telemetry import make_event

    sink = TelemetrySinkImpl(str(tmp_path))
    sink.configure(monitoring={"reference_size": 20, "window_size": 20, "min_samples": 20}, sampling={"rate_per_s": 100, "burst": 100})
    rng = np.random.default_rng(3)
    events = [make_event(request_id=f"r{i}", model="m", version=1, variant="default", status=200, latency_ms=5.0,
                         label="a", confidence=float(rng.beta(9, 1.5)), brightness=float(rng.normal(120, 10)))
              for i in range(60)]
    samples = [{"sample_id": "r3", "image": b"png-bytes-3", "predicted": "a", "model": "m", "version": 1},
               {"sample_id": "r4", "image": b"png-bytes-3", "predicted": "a", "model": "m", "version": 1}]  # same image
    sink.record(events, 0, samples)
    snap = sink.monitor_snapshot()["m:1"]
    assert snap["seen"] == 60 and snap["current"]["n"] == 20 and snap["reference"]["n"] == 20
    assert snap["drift"] is not None and snap["drift"]["drifted"] is False
    assert sink.labeling_counts() == {"samples": 1, "labeled": 0, "pending": 1}  # the duplicate image was dropped
    assert sink.feedback("r3", "a")["matched"] is True
    assert sink.feedback("r59", "b")["correct"] is False
    assert LabelingQueue(tmp_path).counts()["labeled"] == 1
    assert sink.monitor_snapshot()["m:1"]["current"]["labeled/n"] == 1.0
