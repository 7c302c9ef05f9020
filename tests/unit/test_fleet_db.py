"""FleetDB on the shared database (SQLite and PostgreSQL), lake parts through the store (local and S3)."""

from __future__ import annotations

import io
import multiprocessing as mp
import sqlite3
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from visionfleet.fleet import FleetDB
from visionfleet.store import open_store


def _batch(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"rec{i:08d}", "ts": time.time(), "model": "toy", "version": 1, "label": "star",
             "confidence": 0.9, "latency_ms": 3.0} for i in range(start, start + n)]


@pytest.fixture(params=["sqlite-local", "postgres-s3"])
def fleet_args(request, tmp_path: Path) -> dict:
    if request.param == "sqlite-local":
        return {"home": tmp_path, "db_url": f"sqlite:///{tmp_path}/state.db",
                "telemetry_uri": str(tmp_path / "telemetry"), "samples_uri": str(tmp_path / "samples")}
    bucket = request.getfixturevalue("s3_env")
    return {"home": tmp_path, "db_url": request.getfixturevalue("pg_url"), "telemetry_uri": f"{bucket}/telemetry",
            "samples_uri": f"{bucket}/samples"}


def _lake_ids(uri: str) -> list[str]:
    store = open_store(uri)
    ids: list[str] = []
    for key, _, is_dir in store.list("events", recursive=True):
        if not is_dir and key.endswith(".parquet"):
            ids += pq.read_table(io.BytesIO(store.read_bytes(key))).column("request_id").to_pylist()
    return ids


def _sync(args: dict, device: str, n: int) -> None:
    db = FleetDB(**args)
    for i in range(0, n, 5):  # every batch re-sends the previous one, as an outbox that missed the ack does
        db.ingest(device, status={"model": "toy", "version": 1}, records=_batch(10, start=max(0, i - 5))[:10])


def test_two_server_processes_count_a_resent_batch_once(tmp_path: Path) -> None:
    """SQLite here; the PostgreSQL + S3 race is tests/slow/test_labeling_race.py."""
    fleet_race({"home": tmp_path, "db_url": f"sqlite:///{tmp_path}/state.db",
                "telemetry_uri": str(tmp_path / "telemetry"), "samples_uri": str(tmp_path / "samples")})


def fleet_race(fleet_args: dict) -> None:
    """Two server processes get the same device's batches, each re-sending the previous one."""
    FleetDB(**fleet_args)  # migrate once before the race
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_sync, args=(fleet_args, "cam-1", 20)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    db = FleetDB(**fleet_args)
    ids = _lake_ids(fleet_args["telemetry_uri"])
    assert len(ids) == len(set(ids)) == 20  # 0..19, each once
    dev = db.devices()[0]
    assert dev["records"] == 20 and dev["syncs"] == 8 and db.pending_parts() == 0
    if "://" in fleet_args["telemetry_uri"]:
        assert not (fleet_args["home"] / "telemetry").exists()


def test_samples_and_rollouts(fleet_args: dict) -> None:
    from visionfleet.labeling import LabelingQueue

    db = FleetDB(**fleet_args)
    samples = [{"id": f"smp{i:08d}", "ts": time.time(), "model": "toy", "image": b"\x89PNG " + bytes([i])}
               for i in range(3)]
    assert db.ingest("cam-2", samples=samples).new["samples"] == 3
    assert db.ingest("cam-2", samples=samples).duplicates["samples"] == 3
    q = LabelingQueue(fleet_args["home"], db_url=fleet_args["db_url"], samples_uri=fleet_args["samples_uri"])
    assert q.counts()["samples"] == 3
    db.record_rollout("toy", "x86-cpu", "toy-v2", 2, 50)
    for dev in ("cam-3", "cam-4"):
        db.ingest(dev, reports=[{"id": f"rep-{dev}-1", "outcome": "health_failed", "bundle_id": "toy-v2"}])
    assert db.rollouts()[0]["status"] == "halted"
    db.set_rollout_status("toy", "x86-cpu", "toy-v2", "rolling", rollout=10)
    assert db.rollouts()[0]["rollout"] == 10 and len(db.updates()) == 2


def test_legacy_fleet_sqlite_is_imported_once(tmp_path: Path) -> None:
    (tmp_path / "edge").mkdir()
    old = sqlite3.connect(tmp_path / "edge" / "fleet.sqlite")
    old.executescript(
        "CREATE TABLE devices (device_id TEXT PRIMARY KEY, first_seen REAL, last_seen REAL, model TEXT, version INTEGER, "
        "bundle_id TEXT, target TEXT, health TEXT, backlog_records INTEGER, backlog_samples INTEGER, dropped_samples "
        "INTEGER, agent TEXT, status TEXT, records INTEGER NOT NULL DEFAULT 0, samples INTEGER NOT NULL DEFAULT 0, "
        "duplicates INTEGER NOT NULL DEFAULT 0, syncs INTEGER NOT NULL DEFAULT 0);"
        "CREATE TABLE seen (device_id TEXT NOT NULL, kind TEXT NOT NULL, id TEXT NOT NULL, ts REAL NOT NULL, "
        "PRIMARY KEY (device_id, kind, id));"
        "CREATE TABLE parts (part_id INTEGER PRIMARY KEY AUTOINCREMENT, created_ms INTEGER NOT NULL, device_id TEXT "
        "NOT NULL, n INTEGER NOT NULL, payload TEXT, written INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO devices (device_id, first_seen, last_seen, model, version, records, syncs) "
        "VALUES ('cam-7', 1, 2, 'toy', 1, 5, 1);"
    )
    old.executemany("INSERT INTO seen VALUES ('cam-7', 'record', ?, 1.0)", [(f"rec{i:08d}",) for i in range(5)])
    old.commit()
    old.close()
    db = FleetDB(tmp_path)
    assert db.devices()[0]["records"] == 5
    res = db.ingest("cam-7", records=_batch(7))  # the five it had plus two new
    assert res.new["records"] == 2 and res.duplicates["records"] == 5
    db2 = FleetDB(tmp_path)  # opened again: not imported twice
    assert db2.devices()[0]["records"] == 7 and db2.devices()[0]["syncs"] == 2
