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
        assert ob.backlog() == {"records": 4, "samples": 2, "reports": 1, "dropped_samples": 1,
                                "dropped_records": 0}  # the oldest image went
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


def _disk(path: Path) -> int:
    """The outbox on disk: the database file and its WAL."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def test_a_long_offline_period_stays_under_the_byte_cap(tmp_path: Path) -> None:
    """Weeks offline in miniature: acked rows go first, then the oldest images, then the oldest records."""
    import os

    from edge_agent.outbox import Outbox

    cap = 4 * 1024 * 1024
    path = tmp_path / "outbox.sqlite"
    sizes = []
    with Outbox(path, max_bytes=cap, max_unsent_samples=100_000) as ob:
        for i in range(100):  # synced while online: acknowledged, waiting for the retention
            ob.add(_rec(i), frame_key=f"f{i}")
        assert ob.ack(records=[_rec(i)["id"] for i in range(100)]) == 100
        # Offline: a record per frame and a 20 KB image every other frame, ~8 MB in all.
        images = 0
        for i in range(100, 900):
            sample = (os.urandom(20_000), {"id": f"rec{i:08d}", "ts": 1.0}) if i % 2 == 0 else None
            images += sample is not None
            ob.add(_rec(i), frame_key=f"f{i}", sample=sample)
            sizes.append(_disk(path))
        b = ob.backlog()
        assert ob.record_ids(sent=True) == [] and ob.stats()["pruned"] == 100  # the acknowledged rows went first
        assert b["dropped_samples"] > 0 and b["dropped_records"] == 0  # then images; records are all there
        assert b["samples"] + b["dropped_samples"] == images  # every image kept or counted
        assert b["records"] == 800
        kept = [r for (r,) in ob._db.execute("SELECT id FROM samples ORDER BY seq")]
        assert kept[-1] == "rec00000898" and kept[0] > "rec00000100"  # the oldest went, the newest stayed
        # Still offline, records only (large ones): now the oldest records go, counted.
        for i in range(900, 1300):
            ob.add(_rec(i, error="x" * 10_000), frame_key=f"f{i}")
            sizes.append(_disk(path))
        b = ob.backlog()
        assert b["samples"] == 0 and b["dropped_samples"] == images
        assert b["dropped_records"] > 0 and b["records"] + b["dropped_records"] == 1200
        ids = ob.record_ids(sent=False)
        assert ids[-1] == "rec00001299" and ids == sorted(ids) and len(ids) == b["records"]
        assert ob.stats()["bytes"] <= cap
    assert max(sizes) <= cap, f"peak {max(sizes)} bytes on disk for a {cap}-byte cap"
    assert _disk(path) <= cap


def test_acknowledged_rows_leave_after_the_retention_and_the_file_shrinks(tmp_path: Path) -> None:
    import os

    from edge_agent.outbox import Outbox

    path = tmp_path / "outbox.sqlite"
    with Outbox(path, retention_s=3600) as ob:
        assert ob._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        for i in range(200):
            ob.add(_rec(i), sample=(os.urandom(8000), {"id": f"rec{i:08d}", "ts": 1.0}))
        ob.ack(records=[_rec(i)["id"] for i in range(150)], samples=[f"rec{i:08d}" for i in range(150)])
        assert ob.prune() == 0  # younger than the retention
        ob.retention_s = 0.0
        full = _disk(path)
        assert ob.prune() == 300 and ob.stats()["pruned"] == 300
        assert ob.totals()["records"] == 50 and ob.backlog()["records"] == 50
        assert _disk(path) < full / 2, (full, _disk(path))  # the pages went back to the file system


def test_an_outbox_from_before_the_cap_is_converted_in_place(tmp_path: Path) -> None:
    """A file without auto_vacuum (made by the previous agent) gets INCREMENTAL at open, data intact."""
    import sqlite3

    from edge_agent.outbox import _SCHEMA, Outbox

    path = tmp_path / "outbox.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for stmt in _SCHEMA:
        db.execute(stmt)
    db.execute("INSERT INTO records (id, ts, body) VALUES ('old1', 1.0, '{\"id\": \"old1\"}')")
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    db.close()
    with Outbox(path) as ob:
        assert ob._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert ob.record_ids(sent=False) == ["old1"] and ob.pending().records == [{"id": "old1"}]


def test_drops_reach_the_status_the_server_accepts(tmp_path: Path) -> None:
    """The agent's status carries the drop counters and the outbox size, and the sync body validates."""
    import os

    from edge_agent.agent import Agent, AgentConfig
    from serve_apps.routes_edge import SyncBody

    with pytest.raises(ValueError, match="Got 1 MiB for --outbox-max-mb; expected >= 4 MiB"):
        AgentConfig(device_id="cam-1", home=tmp_path / "dev", outbox_max_bytes=1024 * 1024)
    with pytest.raises(ValueError, match="--outbox-retention"):
        AgentConfig(device_id="cam-1", home=tmp_path / "dev", outbox_retention_s=-1)
    agent = Agent(AgentConfig(device_id="cam-1", home=tmp_path / "dev", outbox_max_bytes=4 * 1024 * 1024,
                              max_unsent_samples=10))
    with agent._outbox() as ob:
        for i in range(20):
            ob.add(_rec(i), sample=(os.urandom(1000), {"id": f"rec{i:08d}", "ts": 1.0}))
        st = agent.status(ob)
    assert st["backlog"]["dropped_samples"] == 10 and st["backlog"]["dropped_records"] == 0
    assert st["outbox"]["max_bytes"] == 4 * 1024 * 1024 and 0 < st["outbox"]["bytes"] <= 4 * 1024 * 1024
    body = SyncBody.model_validate({"device_id": "cam-1", "status": st, "records": []})
    assert body.status.backlog.dropped_samples == 10 and body.status.outbox.bytes == st["outbox"]["bytes"]


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
