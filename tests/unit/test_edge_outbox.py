"""The device outbox (SQLite WAL, synchronous=FULL) and the server's exactly-once fleet database."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _rec(i: int, **kw) -> dict:
    return {"id": f"rec{i:08d}", "ts": 1_790_000_000.0 + i, "model": "toy", "version": 1, "task": "classification",
            "label": "star", "class_id": 6, "confidence": 0.4, "status": 200, **kw}


def test_outbox_is_durable_and_deduplicates_frames(tmp_path: Path) -> None:
    from edge_agent.outbox import Outbox

    path = tmp_path / "outbox.sqlite"
    with Outbox(path, max_unsent_samples=2) as ob:
        assert ob._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert ob.add(_rec(1), frame_key="file:a.png:1:1")
        assert not ob.add(_rec(2), frame_key="file:a.png:1:1")  # the same frame again: nothing stored
        assert ob.has_frame("file:a.png:1:1")
        for i in range(3, 6):
            ob.add(_rec(i), sample=(b"\x89PNG" + bytes([i]), {"id": f"rec{i:08d}", "ts": 1.0}))
        ob.add_report({"id": "report0001", "ts": 2.0, "outcome": "installed"})
        assert ob.backlog() == {"records": 4, "samples": 2, "reports": 1, "dropped_samples": 1}  # the oldest image went
        batch = ob.pending(max_records=3)
        assert [r["id"] for r in batch.records] == ["rec00000001", "rec00000003", "rec00000004"]
        assert [s["id"] for s in batch.samples] == ["rec00000004", "rec00000005"] and batch.samples[0]["image"]
        assert ob.ack(records=[r["id"] for r in batch.records], samples=["rec00000004"], reports=["report0001"]) == 5
        assert ob.ack(records=["rec00000001"]) == 0  # acknowledged twice: no change
    # A new process (a restart) sees exactly what was committed.
    out = subprocess.run([sys.executable, "-c", f"from edge_agent.outbox import Outbox; o = Outbox({str(path)!r}); "
                          "print(o.backlog(), o.record_ids(sent=False))"], capture_output=True, text=True, cwd=REPO,
                         check=True)
    assert "'records': 1" in out.stdout and "rec00000005" in out.stdout
    with Outbox(path) as ob:
        assert ob.prune(sent_older_than_s=-1) >= 4 and ob.has_frame("file:a.png:1:1")


def _batch(n: int, start: int = 0) -> list[dict]:
    return [_rec(i) for i in range(start, start + n)]


def _lake_ids(home: Path) -> list[str]:
    import pyarrow.parquet as pq

    ids: list[str] = []
    for p in sorted((home / "telemetry" / "events").rglob("part-*.parquet")):
        ids += pq.read_table(p, columns=["request_id"]).column("request_id").to_pylist()
    return ids


def test_fleet_ingest_is_exactly_once_across_restarts_and_crashes(tmp_path: Path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    import visionfleet.fleet as F
    from visionfleet.telemetry import EVENT_FIELDS

    home = tmp_path / "home"
    db = F.FleetDB(home)
    status = {"model": "toy", "version": 1, "bundle_id": "toy-v1", "target": "x86-cpu", "health": "ok",
              "backlog": {"records": 7}}
    res = db.ingest("cam-17", status=status, records=_batch(5))
    assert res.new["records"] == 5 and res.duplicates["records"] == 0 and len(res.acked["records"]) == 5
    files = list((home / "telemetry" / "events").rglob("part-*.parquet"))
    assert len(files) == 1 and "source=edge_cam-17" in str(files[0]) and "date=" in str(files[0])
    t = pq.read_table(files[0])
    assert t.column_names == list(EVENT_FIELDS)
    assert set(t.column("source").to_pylist()) == {"edge:cam-17"}
    assert t.column("request_id").to_pylist()[0] == "cam-17:rec00000000"
    # The server restarts; the device resends the batch it never saw acknowledged, plus new records.
    db2 = F.FleetDB(home)
    res = db2.ingest("cam-17", status=status, records=_batch(8))
    assert res.new["records"] == 3 and res.duplicates["records"] == 5 and len(res.acked["records"]) == 8
    # A crash between the commit and the lake write: the batch is acknowledged (it is durable)…
    real = F.FleetDB._write_part

    def crash(self, part_id):
        raise OSError("disk went away")

    monkeypatch.setattr(F.FleetDB, "_write_part", crash)
    res = db2.ingest("cam-17", status=status, records=_batch(4, start=8))
    assert res.new["records"] == 4 and db2.pending_parts() == 1
    monkeypatch.setattr(F.FleetDB, "_write_part", real)
    # …and written once after the restart, even if the device resends it meanwhile.
    db3 = F.FleetDB(home)
    assert db3.ingest("cam-17", records=_batch(4, start=8)).new["records"] == 0
    assert db3.pending_parts() == 0
    ids = _lake_ids(home)
    assert len(ids) == len(set(ids)) == 12
    dev = db3.devices()[0]
    assert dev["records"] == 12 and dev["duplicates"] == 9 and dev["backlog_records"] == 7
    bad = db3.ingest("cam-17", records=[{"id": "x", "ts": 1.0}])
    assert bad.rejected and bad.acked["records"] == ["x"]  # acknowledged so it never blocks the outbox
    with pytest.raises(ValueError, match="device_id"):
        db3.ingest("../etc", records=_batch(1))


def test_samples_reach_the_labeling_queue_once(tmp_path: Path) -> None:
    from visionfleet.fleet import FleetDB
    from visionfleet.labeling import LabelingQueue

    home = tmp_path / "home"
    db = FleetDB(home)
    samples = [{"id": f"rec{i:08d}", "ts": time.time(), "model": "toy", "version": 1, "predicted": "star",
                "confidence": 0.2, "image": b"\x89PNG fake bytes"} for i in range(3)]
    assert db.ingest("cam-9", samples=samples).new["samples"] == 3
    assert db.ingest("cam-9", samples=samples).new["samples"] == 0
    q = LabelingQueue(home)
    assert q.counts()["samples"] == 3
    assert {r["source"] for r in q.pending()} == {"edge:cam-9"}


def test_a_rollout_failing_on_too_many_devices_halts_by_itself(tmp_path: Path) -> None:
    from visionfleet.fleet import FleetDB, HaltPolicy, should_halt

    assert should_halt(10, 1) is None  # one flaky board is not a pattern
    assert should_halt(10, 2) is None  # 20% is tolerated
    assert "3 of 10" in should_halt(10, 3)
    assert should_halt(2, 2, HaltPolicy(max_failure_rate=0.5, min_failures=2))
    with pytest.raises(ValueError):
        HaltPolicy(max_failure_rate=1.5)
    db = FleetDB(tmp_path / "home")
    db.record_rollout("toy", "x86-cpu", "toy-v1", 1, 100)
    db.record_rollout("toy", "x86-cpu", "toy-v2", 2, 50)

    def report(device: str, outcome: str) -> list:
        return db.ingest(device, reports=[{"id": f"rep-{device}-{outcome}", "ts": time.time(), "outcome": outcome,
                                           "bundle_id": "toy-v2", "model": "toy", "version": 2,
                                           "target": "x86-cpu"}]).halts

    assert report("cam-1", "installed") == []
    assert report("cam-2", "health_failed") == []
    halts = report("cam-3", "health_failed")
    assert halts and halts[0]["bundle_id"] == "toy-v2" and halts[0]["failures"] == 2 and halts[0]["attempts"] == 3
    assert report("cam-4", "health_failed") == []  # already halted: reported once
    rows = {r["bundle_id"]: r for r in db.rollouts()}
    assert rows["toy-v2"]["status"] == "halted" and rows["toy-v1"]["status"] == "superseded"
    st = db.status()
    assert st["totals"]["devices"] == 4 and st["rollouts"][1]["failures"] == 3
