"""The labeling queue on the database (SQLite and PostgreSQL) with images on the store (local and S3)."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visionfleet.labeling import LabelingQueue
from visionfleet.store import open_store


def _row(i: int, model: str = "m", **kw) -> dict:
    return {"sample_id": f"s{i}", "image": b"\x89PNG fake " + str(i).encode(), "model": model, "version": 1,
            "predicted": "a", "confidence": 0.4, "reason": "low_confidence", "source": "server", "ts": 1000.0 + i, **kw}


@pytest.fixture(params=["sqlite-local", "postgres-s3"])
def queue_args(request, tmp_path: Path) -> dict:
    if request.param == "sqlite-local":
        return {"home": tmp_path, "db_url": f"sqlite:///{tmp_path}/state.db", "samples_uri": str(tmp_path / "samples")}
    bucket = request.getfixturevalue("s3_env")
    return {"home": tmp_path, "db_url": request.getfixturevalue("pg_url"), "samples_uri": f"{bucket}/samples"}


def test_dedup_provenance_and_counts(queue_args: dict) -> None:
    q = LabelingQueue(**queue_args)
    assert q.append([_row(i) for i in range(4)] + [_row(9, model="other")]) == 5
    assert q.append([_row(1), _row(2), _row(4)]) == 1  # re-sent samples are stored once
    assert q.add_labels([("s1", "b"), ("s2", "a"), ("nope", "a")], labeler="feedback") == {"labeled": 2, "unknown": 1}
    assert q.add_labels([("s1", "b")], labeler="feedback")["labeled"] == 1  # re-sent label
    q.add_labels([("s1", "c")], labeler="alice")  # a correction by someone else
    assert [(r["label"], r["labeler"]) for r in q.labels_of("s1")] == [("b", "feedback"), ("c", "alice")]
    assert q.counts() == {"samples": 6, "labeled": 2, "pending": 4}
    assert q.count_labeled(model="m") == 2
    assert q.count_labeled(model="m", since=1002.0) == 1
    t = q.samples(labeled_only=True)
    assert sorted(zip(t.column("sample_id").to_pylist(), t.column("label").to_pylist())) == [("s1", "c"), ("s2", "a")]
    assert t.column("image").to_pylist()[0] == _row(1)["image"]
    keys = [k for k, _, is_dir in open_store(queue_args["samples_uri"]).list(recursive=True) if not is_dir]
    assert len(keys) == 6  # one object per image, by content hash
    if "://" in queue_args["samples_uri"]:
        assert not (queue_args["home"] / "samples").exists()  # nothing local for an s3:// area


def _worker(args: dict, start: int, n: int) -> None:
    q = LabelingQueue(**args)
    for i in range(start, start + n, 5):
        q.append([_row(j) for j in range(i, i + 5)] + [_row(0)])  # s0 re-sent by both
        q.add_labels([(f"s{j}", "x") for j in range(i, i + 5)], labeler=f"w{start}")


def test_two_processes_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """SQLite here; the PostgreSQL + S3 race is tests/slow/test_labeling_race.py."""
    race(tmp_path, {"home": tmp_path, "db_url": f"sqlite:///{tmp_path}/state.db",
                    "samples_uri": str(tmp_path / "samples")})


def race(tmp_path: Path, queue_args: dict) -> None:
    """Two processes append and label 20 samples each (plus a shared re-sent one)."""
    LabelingQueue(**queue_args)  # migrate once before the race
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(queue_args, start, 20)) for start in (1, 21)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    q = LabelingQueue(**queue_args)
    assert q.counts() == {"samples": 41, "labeled": 40, "pending": 1}
    assert q.count_labeled(model="m") == 40
    assert len(q.samples()) == 41


def test_controller_counts_without_reading_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train.controller import RetrainingController
    from visionfleet.settings import Settings
    from visionfleet.store import Store

    monkeypatch.delenv("VISIONFLEET_NODE_HOME", raising=False)
    monkeypatch.delenv("VISIONFLEET_DB", raising=False)
    monkeypatch.delenv("VISIONFLEET_STORE", raising=False)
    q = LabelingQueue.from_settings(Settings.from_env(tmp_path))
    q.append([_row(i, ts=None) for i in range(6)])
    q.add_labels([(f"s{i}", "b") for i in range(4)])
    c = RetrainingController(str(tmp_path), {"model": "m"})
    c._labels_since = 0.0
    q.store.delete("")  # every image gone
    monkeypatch.setattr(Store, "read_bytes", lambda *a, **k: pytest.fail("a look read an image"))
    assert c._labels_available() == 4


def test_legacy_home_is_imported_once(tmp_path: Path) -> None:
    lab = tmp_path / "labeling"
    (lab / "samples" / "date=2026-01-01").mkdir(parents=True)
    db = sqlite3.connect(lab / "index.sqlite")
    db.execute("CREATE TABLE samples (sample_id TEXT PRIMARY KEY, ts REAL, model TEXT, version INTEGER, "
               "predicted TEXT, source TEXT, label TEXT, labeler TEXT, labeled_ts REAL)")
    db.executemany("INSERT INTO samples VALUES (?, ?, 'm', 1, 'a', 'server', ?, ?, ?)",
                   [("s0", 1000.0, "b", "feedback", 2000.0), ("s1", 1001.0, None, None, None)])
    db.commit()
    db.close()
    from visionfleet.labeling import SAMPLE_FIELDS, _schema

    rows = [{k: r.get(k) for k in SAMPLE_FIELDS} for r in (_row(0), _row(1))]
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema(SAMPLE_FIELDS)), lab / "samples" / "date=2026-01-01" / "part-1.parquet")

    q = LabelingQueue(tmp_path)
    assert q.counts() == {"samples": 2, "labeled": 1, "pending": 1}
    assert q.labels_of("s0") == [{"label": "b", "labeler": "feedback", "ts": 2000.0}]
    q.add_labels([("s0", "c")], labeler="alice")
    q2 = LabelingQueue(tmp_path)  # second open: nothing imported again, the newer label kept
    assert q2.counts() == {"samples": 2, "labeled": 1, "pending": 1}
    t = q2.samples(labeled_only=True)
    assert t.column("label").to_pylist() == ["c"] and t.column("image").to_pylist() == [_row(0)["image"]]
