"""The telemetry sink survives a restart: killed mid-experiment and under drift, it comes back
with the same A/B decision, the same drift alarm and its pending label joins (SQLite + local
store, PostgreSQL + S3); a store outage keeps acknowledged rows and writes them when it returns."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from serve_apps.telemetry import TelemetrySinkImpl
from visionfleet.experiments import DecisionPolicy, decide
from visionfleet.monitoring import VersionMonitor, drift_report
from visionfleet.settings import Settings
from visionfleet.store import open_store
from visionfleet.telemetry import ArmAccumulator, make_event

MONITORING = {"reference_size": 100, "window_size": 100, "min_samples": 50, "wandb": False}
ARMS = {"control": (1, 0.70), "treatment": (2, 0.85)}  # version, accuracy
CLASSES = ("a", "b", "c")
N = 1200


def _traffic(seed: int = 7, t0: float = 1_700_000_000.0) -> list[tuple]:
    """Seeded A/B traffic with a real difference, inputs that drift halfway, and labels
    (15% of them sent before their prediction). A list of ``("events", [..])`` / ``("label", rid, y)``."""
    rng = np.random.default_rng(seed)
    ops: list[tuple] = []
    batch: list[dict] = []
    early: list[tuple] = []  # labels that come before their event
    later: list[tuple] = []
    for i in range(N):
        rid = f"r{i}"
        arm = "control" if rng.random() < 0.5 else "treatment"
        version, acc = ARMS[arm]
        truth = CLASSES[int(rng.integers(3))]
        pred = truth if rng.random() < acc else CLASSES[(CLASSES.index(truth) + 1) % 3]
        drifted = i >= N // 2
        batch.append(make_event(
            request_id=rid, model="m", version=version, variant=arm, experiment="e1", status=200,
            latency_ms=float(rng.gamma(4, 3)), label=pred, confidence=float(rng.beta(8 if pred == truth else 3, 2)),
            brightness=float(rng.normal(160 if drifted else 120, 10)), contrast=float(rng.normal(50, 5)),
            blur=float(rng.normal(300, 30)), client_key=f"c{i}", ts=t0 + i))
        u = rng.random()
        if u < 0.15:
            early.append(("label", rid, truth))
        elif u < 0.85:
            later.append(("label", rid, truth))
        if len(batch) == 50:
            ops += early + [("events", batch)] + later
            batch, early, later = [], [], []
    return ops


def _play(sink: TelemetrySinkImpl, ops: list[tuple], flush_every: int = 4) -> None:
    batches = 0
    for op in ops:
        if op[0] == "events":
            sink.record(op[1])
            batches += 1
            if batches % flush_every == 0:
                sink.flush()
        else:
            sink.feedback(op[1], op[2])


def _outcome(sink: TelemetrySinkImpl) -> dict:
    """What the coordinator decides (the same ``decide`` on ``arm_summaries``) and the monitors say."""
    s = sink.arm_summaries("e1", False, ["control", "treatment"])
    policy = DecisionPolicy(metric="accuracy", alpha=0.05, min_samples=200)
    d = decide(s["control"], s["treatment"], policy, expected_share={"control": 0.5, "treatment": 0.5})
    st = sink.stats()
    return {"decision": d.to_dict(), "arms": {k: v.to_dict() for k, v in s.items()},
            "monitors": sink.monitor_snapshot(), "summary": sink.experiment_summary("e1")["arms"],
            "counters": {k: st[k] for k in ("received", "labels", "labels_late", "written")},
            "pending": st["pending_labels"]}


def _lake(settings: Settings, prefix: str) -> list[dict]:
    """Every row of the lake's parts (and of compacted files, where the sink's maintenance ran)."""
    store = open_store(settings.store_uri("telemetry"))
    rows: list[dict] = []
    for key, _, is_dir in store.list(prefix, recursive=True):
        if not is_dir and key.rsplit("/", 1)[-1].startswith(("part-", "compact-")):
            rows += pq.read_table(io.BytesIO(store.read_bytes(key))).to_pylist()
    return rows


def _kill_and_restore(base: Settings, make_settings) -> None:  # noqa: ANN001
    ops = _traffic()
    half = next(i for i, op in enumerate(ops) if op[0] == "events" and op[1][0]["request_id"] == f"r{N // 2}")

    # the uninterrupted run (its figures are all in memory: the same on every backend)
    a = TelemetrySinkImpl(str(base.home), settings=base)
    a.configure(monitoring=MONITORING)
    _play(a, ops)
    a.flush()
    want = _outcome(a)

    # the same traffic, the sink killed halfway: after its last flush it took two more batches
    # and their labels (journaled only), then died without flushing
    cut = make_settings("cut")
    b = TelemetrySinkImpl(str(cut.home), settings=cut)
    b.configure(monitoring=MONITORING)
    _play(b, ops[:half], flush_every=4)
    b.flush()
    more = [i for i, op in enumerate(ops[half:], half) if op[0] == "events"][2]
    _play(b, ops[half:more], flush_every=10**9)
    pending_before = b.stats()["pending_labels"]
    assert pending_before > 0  # labels whose events come after the restart
    retry = [next(op for op in reversed(ops[:more]) if op[0] == "events"), ops[half]]  # journaled only; checkpointed
    del b  # killed: nothing flushed after the last batches

    c = TelemetrySinkImpl(str(cut.home), settings=cut)
    assert c.restored["replayed"] > 100 and c.restored["unwritten"] > 100
    assert c.stats()["pending_labels"] == pending_before
    for op in retry:  # a client resending a batch it sent before the kill: not counted again
        assert c.record(op[1]) == 0
    _play(c, ops[more:])
    c.flush()
    got = _outcome(c)

    assert want["decision"]["action"] == "promote", want["decision"]["reason"]
    assert want["monitors"]["m:1"]["drift"]["drifted"] and want["monitors"]["m:2"]["drift"]["drifted"]
    assert "brightness" in want["monitors"]["m:1"]["drift"]["drifted_signals"]
    assert got == want  # decision, arm figures, windows and drift report, counters, pending joins
    assert want["pending"] == 0  # every early label found its event

    for s in (base, cut):  # the lake has every acknowledged row exactly once
        events = _lake(s, "events")
        assert len(events) == N and len({e["request_id"] for e in events}) == N
        labels = [r for r in _lake(s, "feedback")]
        assert len(labels) == want["counters"]["labels"]


def test_sink_killed_mid_experiment_restores_decision_drift_and_joins_sqlite(tmp_path: Path) -> None:
    _kill_and_restore(Settings(home=tmp_path / "base"), lambda name: Settings(home=tmp_path / name))


@pytest.mark.slow  # ~10 s on a quiet 2-core VM (2,400 PostgreSQL transactions, S3 parts): over make test's budget
def test_sink_killed_mid_experiment_restores_decision_drift_and_joins_postgres_s3(
        tmp_path: Path, s3_env: str, pg_url: str) -> None:
    _kill_and_restore(Settings(home=tmp_path / "base"),
                      lambda name: Settings(home=tmp_path / name, store=f"{s3_env}/{name}", db_url=pg_url))
    assert not (tmp_path / "cut" / "telemetry").exists()  # nothing of the lake on the local disk


def test_store_outage_keeps_acknowledged_rows_and_writes_them_back(
        tmp_path: Path, s3_env: str, s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONFLEET_S3_TIMEOUT", "1")
    settings = Settings(home=tmp_path, store=f"{s3_env}/vf")
    sink = TelemetrySinkImpl(str(tmp_path), settings=settings, max_buffer_rows=30)
    evs = [make_event(request_id=f"r{i}", model="m", version=1, status=200, confidence=0.9, label="a",
                      ts=1_700_000_000.0 + i) for i in range(100)]
    sink.record(evs[:20])
    assert sink.flush() == 20
    s3_server.pause()
    try:
        for i in range(20, 100, 20):
            assert sink.record(evs[i:i + 20]) == 20  # acknowledged while the store is away
        sink.feedback("r5", "a")
        assert sink.flush() == 0
        st = sink.stats()
        assert st["lake_failures"] >= 1 and st["buffered"] == 30 and st["spilled"]  # bounded memory
        assert st["lake_spilled"] == 51 and st["lake_dropped"] == 0  # the rest waits in the journal
    finally:
        s3_server.resume()
    assert sink.flush() == 30
    while sink.stats()["buffered"] or sink.stats()["spilled"]:
        sink.flush()
    events = _lake(settings, "events")
    assert sorted(e["request_id"] for e in events) == sorted(e["request_id"] for e in evs)
    assert [r["request_id"] for r in _lake(settings, "feedback")] == ["r5"]
    assert not (tmp_path / "telemetry").exists()


def test_accumulator_and_monitor_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    acc = ArmAccumulator("t")
    mon = VersionMonitor(50, 50)
    for i in range(200):
        ev = {"status": 200 if i % 17 else 503, "confidence": float(rng.random()), "latency_ms": float(rng.gamma(3, 4)),
              "version": 2, "client_key": f"c{i % 40}", "detections": int(rng.integers(5)), "label": "ab"[i % 2],
              "brightness": float(rng.normal(100 + i / 4, 5)), "contrast": 40.0, "blur": float(rng.random())}
        acc.add_event(ev)
        seq = mon.add(ev)
        if i % 3 == 0:
            acc.add_label(i % 2 == 0)
            mon.add_outcome(ev["confidence"], i % 2 == 0, seq)
    back = ArmAccumulator.from_dict(acc.to_dict())
    assert back.to_dict() == acc.to_dict() and back.arm_summary(sticky=True) == acc.arm_summary(sticky=True)
    m2 = VersionMonitor.from_dict(mon.to_dict())
    assert m2.snapshot() == mon.snapshot()
    assert drift_report(m2.reference, m2.current) == drift_report(mon.reference, mon.current)
    with pytest.raises(ValueError, match="Got keys"):
        ArmAccumulator.from_dict({"name": "x"})
