"""The HTML report: produced from a seeded simulated experiment, with the table values and real PNGs."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from visionfleet.experiments import ArmSummary, DecisionPolicy, decide, mean_interval, write_report

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def simulate(seed: int, acc: tuple[float, float], requests: int = 6000, every: int = 200, detections: bool = False):
    """A 50/50 experiment: per-request arm, correctness (80% labeled), confidence, latency."""
    rng = np.random.default_rng(seed)
    is_t = rng.random(requests) < 0.5
    p = np.where(is_t, acc[1], acc[0])
    correct = (rng.random(requests) < p).astype(float)
    correct[rng.random(requests) < 0.2] = np.nan
    conf = rng.beta(np.where(is_t, 9, 8), 2)
    latency = rng.gamma(16.0, np.where(is_t, 3.3, 3.0))
    dets = rng.poisson(3.0, requests) if detections else None

    def summary(name: str, mask: np.ndarray) -> ArmSummary:
        return ArmSummary.from_observations(
            name, conf[mask], correct=correct[mask], latency_ms=latency[mask], errors=0,
            detections=None if dets is None else dets[mask],
        )

    series = []
    for k in range(every, requests + 1, every):
        m = np.arange(requests) < k
        series.append({"control": summary("control", m & ~is_t), "treatment": summary("treatment", m & is_t), "t": k / 20.0})
    return series


def images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_has_table_values_plots_and_decision(tmp_path: Path) -> None:
    series = simulate(7, (0.85, 0.90))
    final = series[-1]
    experiment = {
        "name": "int8-vs-fp32",
        "metric": "accuracy",
        "control": final["control"],
        "treatment": final["treatment"].to_dict(),  # dicts work too (from JSON)
        "models": {"control": "demo:1", "treatment": "demo:2"},
        "expected_share": {"control": 0.5, "treatment": 0.5},
    }
    out = write_report(tmp_path / "reports" / "int8-vs-fp32.html", experiment, series)
    page = out.read_text()
    expected = decide(final["control"], final["treatment"], DecisionPolicy(), expected_share=experiment["expected_share"])
    assert f"Decision: {expected.action.value}" in page and "demo:2" in page
    for a in (final["control"], final["treatment"]):
        lo, hi = mean_interval(a.accuracy_stats())
        assert f"<td>{a.requests}</td>" in page
        assert f"{a.accuracy:.4f} [{lo:.4f}, {hi:.4f}]" in page
        assert f"{a.p95_latency_ms:.1f}" in page
    assert "chi-square" in page and "not flagged" in page and "p95 latency" in page and "error rate" in page
    pngs = images(page)
    assert len(pngs) == 3 and all(p.startswith(PNG_MAGIC) and len(p) > 5000 for p in pngs)


def test_report_shows_a_chained_decision_consistent_with_the_plot(tmp_path: Path) -> None:
    series = simulate(3, (0.90, 0.80))
    out = write_report(tmp_path / "r.html", {"name": "bad-candidate", "metric": "accuracy", **series[-1]}, series)
    page = out.read_text()
    assert "Decision: rollback" in page and "significantly worse" in page
    prev = None
    for s in series:
        prev = decide(s["control"], s["treatment"], DecisionPolicy(), previous=prev)
    assert f"[{prev.test.ci_low:+.4f}, {prev.test.ci_high:+.4f}]" in page


def test_confidence_report_for_a_detection_model_and_a_taken_decision(tmp_path: Path) -> None:
    series = simulate(5, (0.9, 0.9), requests=2000, detections=True)
    experiment = {
        "name": "<det> & co",
        "metric": "confidence",
        **series[-1],
        "policy": {"alpha": 0.01, "min_samples": 100},
        "decision": {"action": "rollback", "reason": "stopped by hand"},
        "notes": "manual stop",
    }
    page = write_report(tmp_path / "d.html", experiment, series).read_text()
    assert "&lt;det&gt; &amp; co" in page and "<det>" not in page
    assert "Decision: rollback" in page and "stopped by hand" in page
    assert "detections / image" in page and "detections per image" in page and "always-valid 99%" in page
    assert all(p.startswith(PNG_MAGIC) for p in images(page))


def test_bad_report_input_is_refused(tmp_path: Path) -> None:
    series = simulate(1, (0.9, 0.9), requests=400)
    with pytest.raises(ValueError, match="without \\['metric'\\]"):
        write_report(tmp_path / "x.html", {"name": "x", **series[-1]}, series)
    with pytest.raises(ValueError, match="expected the same"):
        write_report(tmp_path / "x.html", {"name": "x", "metric": "accuracy", **series[-1], "policy": {"metric": "confidence"}}, series)
    renamed = [{**s, "treatment": ArmSummary(**{**s["treatment"].to_dict(), "name": "other"})} for s in series]
    with pytest.raises(ValueError, match="series\\[0\\]"):
        write_report(tmp_path / "x.html", {"name": "x", "metric": "accuracy", **series[-1]}, renamed)


def test_importing_experiments_leaves_heavy_modules_out() -> None:
    code = "import sys, visionfleet.experiments; print(' '.join(m for m in ('torch', 'ray', 'pyarrow', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == ""
