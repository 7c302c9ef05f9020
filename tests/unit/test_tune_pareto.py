"""Feasibility, score, Pareto front, best feasible config, and the report files built from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tune.pareto import (
    COMPLETE,
    ERROR,
    STOPPED,
    Constraints,
    TrialRecord,
    best_feasible,
    checks,
    is_feasible,
    pareto_front,
    score,
)
from tune.report import list_sweeps, load_report, write_report
from tune.trial import is_hopeless
from visionfleet.targets import profile

C = Constraints(latency_ms=1.0, max_model_mb=10.0, max_peak_memory_mb=100.0, max_input_size=224)


def rec(key: str, top1: float | None, p95: float | None, *, status: str = COMPLETE, size: float = 1.0,
        mem: float | None = 10.0, n: int = 64, precision: str = "int8", probe_min: float | None = None) -> TrialRecord:
    cfg = {"prune": 0.0, "quantize": "none", "input_size": n, "threads": 2, "provider": "CPUExecutionProvider"}
    return TrialRecord(key=key, config=cfg, status=status, top1=top1, p95_ms=p95, p50_ms=None if p95 is None else p95 / 2,
                       size_mb=size, peak_memory_mb=mem, precision=precision, input_size=n, probe_min_ms=probe_min)


def test_constraints_combine_the_sweep_budget_with_the_target_profile() -> None:
    x86 = profile("x86-cpu")
    c = Constraints.for_target(x86, 4.0)
    assert (c.latency_ms, c.max_model_mb, c.max_peak_memory_mb, c.max_input_size, c.precision) == (
        4.0, x86.max_model_mb, x86.max_peak_memory_mb, 224, None)
    assert Constraints.for_target(x86, 500.0).latency_ms == x86.max_p95_ms  # the target's budget is tighter
    assert Constraints.for_target(x86, None).latency_ms == x86.max_p95_ms
    assert Constraints.for_target(x86, 4.0, require_precision=True).precision == "int8"
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="latency budget"):
            Constraints(latency_ms=bad)
    with pytest.raises(ValueError, match="max_model_mb"):
        Constraints(latency_ms=1.0, max_model_mb=0)


def test_feasibility() -> None:
    assert is_feasible(rec("ok", 0.9, 0.99), C)
    assert is_feasible(rec("edge", 0.9, 1.0), C)  # at the budget is within it
    assert not is_feasible(rec("slow", 0.99, 1.01), C)  # over the latency budget: never feasible
    assert not is_feasible(rec("big", 0.9, 0.5, size=11.0), C)
    assert not is_feasible(rec("memory", 0.9, 0.5, mem=101.0), C)
    assert not is_feasible(rec("input", 0.9, 0.5, n=256), C)
    assert is_feasible(rec("no-memory-measured", 0.9, 0.5, mem=None), C)  # an unmeasured budget does not count
    assert not is_feasible(rec("stopped", None, None, status=STOPPED, probe_min=2.0), C)
    assert not is_feasible(rec("error", None, None, status=ERROR), C)
    assert not is_feasible(rec("no-accuracy", None, 0.5), C)
    strict = Constraints(latency_ms=1.0, precision="int8")
    assert is_feasible(rec("int8", 0.9, 0.5), strict)
    assert not is_feasible(rec("fp32", 0.9, 0.5, precision="fp32"), strict)
    assert is_feasible(rec("fp32-any", 0.9, 0.5, precision="fp32"), C)


def test_checks_name_what_failed_and_a_stopped_trial_is_judged_on_its_probe() -> None:
    failed = [x.name for x in checks(rec("both", 0.9, 2.0, size=20.0), C) if x.ok is False]
    assert failed == ["p95 latency (ms)", "model size (MB)"]
    stopped = checks(rec("s", None, None, status=STOPPED, probe_min=3.0), C)[0]
    assert (stopped.measured, stopped.ok, stopped.overrun) == (3.0, False, 3.0)


def test_score_is_top1_when_feasible_and_top1_minus_a_penalty_for_the_overrun() -> None:
    assert score(rec("ok", 0.93, 0.5), C) == pytest.approx(0.93)
    a, b = score(rec("a", 0.90, 1.5), C), score(rec("b", 0.90, 3.0), C)
    assert a == pytest.approx(0.90 - 0.5 * 0.5) and b == pytest.approx(0.90 - 0.5 * 2.0) and b < a
    assert score(rec("a", 0.90, 1.5), C, penalty=1.0) == pytest.approx(0.40)
    # an accurate config a little over budget steers the search above a weak feasible one;
    # it can still never be chosen (best_feasible only looks at feasible trials)
    near, weak = rec("near", 0.85, 1.2), rec("weak", 0.50, 0.9)
    assert score(near, C) > score(weak, C) and best_feasible([near, weak], C).key == "weak"
    assert score(rec("err", None, None, status=ERROR), C) == -10.0
    assert score(rec("s", None, None, status=STOPPED, probe_min=2.0), C) == pytest.approx(-0.5)  # no top-1: 0
    assert score(rec("fp32", 0.9, 0.5, precision="fp32"), Constraints(latency_ms=1.0, precision="int8")) == (
        pytest.approx(0.9 - 0.5 * 9))


def test_pareto_front() -> None:
    trials = [
        rec("fast-weak", 0.80, 0.2),
        rec("mid", 0.90, 0.5),
        rec("dominated", 0.85, 0.6),  # slower and less accurate than mid
        rec("slow-strong", 0.95, 2.0),  # over budget but still on the front
        rec("tie-a", 0.92, 0.8),
        rec("tie-b", 0.92, 0.8),  # identical: neither dominates, both kept
        rec("same-acc-slower", 0.90, 0.7),
        rec("stopped", None, None, status=STOPPED, probe_min=5.0),
        rec("error", None, None, status=ERROR),
    ]
    assert [t.key for t in pareto_front(trials)] == ["fast-weak", "mid", "tie-a", "tie-b", "slow-strong"]
    assert pareto_front([]) == []


def test_best_feasible_never_picks_a_trial_over_budget() -> None:
    trials = [rec("slow-strong", 0.99, 1.2), rec("ok", 0.90, 0.9), rec("ok-faster", 0.90, 0.4, size=2.0),
              rec("ok-faster-smaller", 0.90, 0.4, size=1.0), rec("weak", 0.5, 0.1)]
    assert best_feasible(trials, C).key == "ok-faster-smaller"  # ties: lower p95, then smaller file
    assert best_feasible([rec("slow", 0.99, 1.2), rec("s", None, None, status=STOPPED, probe_min=9.0)], C) is None


def test_hopeless_only_when_even_the_fastest_probe_query_is_over_budget() -> None:
    assert is_hopeless(1.01, 1.0) and not is_hopeless(1.0, 1.0)
    assert not is_hopeless(1.4, 1.0, factor=1.5) and is_hopeless(1.6, 1.0, factor=1.5)


def test_report_files_round_trip(tmp_path: Path) -> None:
    trials = [rec("a", 0.80, 0.2), rec("b", 0.90, 0.5), rec("c", 0.95, 2.0),
              rec("d", None, None, status=STOPPED, probe_min=4.0)]
    best = best_feasible(trials, C)
    summary = {"sweep": "s1", "model": "demo:1", "target": "x86-cpu", "constraints": C.to_dict(),
               "budget_source": "--latency-budget-ms 1", "trials": 4, "unique_configs": 4, "space_points": 84,
               "wall_s": 12.0, "started_at": "2026-11-26T10:00:00+00:00",
               "best": {"key": best.key, "top1": best.top1, "p95_ms": best.p95_ms}, "registered": "demo:2"}
    files = write_report(tmp_path / "tune" / "s1", summary, trials, C, best)
    assert Path(files["front_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    front = json.loads(Path(files["front_json"]).read_text())
    assert [t["key"] for t in front["front"]] == ["a", "b", "c"] and front["best"] == "b"
    assert [t["feasible"] for t in front["front"]] == [True, True, False]
    md = Path(files["front_md"]).read_text()
    assert "Best feasible: `b`" in md and "| **best** |" in md and "no: p95 latency (ms)" in md and "stopped" in md
    r = load_report(tmp_path, "s1")
    assert r.best.key == "b" and [t.key for t in r.front] == ["a", "b", "c"] and r.constraints == C
    assert list_sweeps(tmp_path) == [{
        "sweep": "s1", "model": "demo:1", "target": "x86-cpu", "budget_ms": 1.0, "trials": 4, "best": "b",
        "top1": 0.9, "p95_ms": 0.5, "registered": "demo:2", "started_at": "2026-11-26T10:00:00+00:00", "wall_s": 12.0,
    }]
    with pytest.raises(FileNotFoundError, match="expected one of \\['s1'\\]"):
        load_report(tmp_path, "s2")
    with pytest.raises(ValueError, match="sweep id"):
        load_report(tmp_path, "../s1")


def test_report_says_no_feasible_config(tmp_path: Path) -> None:
    trials = [rec("slow", 0.9, 3.0)]
    summary = {"sweep": "s2", "model": "demo:1", "target": "x86-cpu", "constraints": C.to_dict(), "best": None,
               "no_feasible_reason": "the fastest trial, slow, took 3.000 ms against a budget of 1 ms"}
    files = write_report(tmp_path, summary, trials, C, None)
    assert "No feasible config" in Path(files["front_md"]).read_text()
    assert json.loads(Path(files["front_json"]).read_text())["best"] is None
