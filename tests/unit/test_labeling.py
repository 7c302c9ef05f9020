"""The labeling queue: idempotent appends, labels from pairs and CSV, joined reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionfleet.labeling import LabelingQueue


def _row(i: int, **kw) -> dict:
    return {"sample_id": f"s{i}", "image": b"\x89PNG fake " + bytes([i]), "model": "m", "version": 1,
            "predicted": "a", "confidence": 0.4, "reason": "low_confidence", "source": "server", **kw}


def test_append_is_idempotent_and_labels_join(tmp_path: Path) -> None:
    q = LabelingQueue(tmp_path)
    assert q.append([_row(i) for i in range(5)]) == 5
    assert q.append([_row(3), _row(5)]) == 1  # s3 already queued
    assert q.counts() == {"samples": 6, "labeled": 0, "pending": 6}
    assert q.add_labels([("s1", "b"), ("s9", "c")], labeler="feedback") == {"labeled": 1, "unknown": 1}
    csv = tmp_path / "labels.csv"
    csv.write_text("sample_id,label\ns2,a\ns4,b\n")
    assert q.import_csv(csv) == {"labeled": 2, "unknown": 0}
    assert q.counts()["labeled"] == 3
    assert [p["sample_id"] for p in q.pending()] == ["s0", "s3", "s5"]
    t = q.samples(labeled_only=True)
    assert sorted(zip(t.column("sample_id").to_pylist(), t.column("label").to_pylist())) == [("s1", "b"), ("s2", "a"), ("s4", "b")]
    assert q.samples().num_rows == 6
    assert LabelingQueue(tmp_path).counts()["samples"] == 6  # durable, another process sees it


def test_bad_input(tmp_path: Path) -> None:
    q = LabelingQueue(tmp_path)
    with pytest.raises(ValueError):
        q.append([{"sample_id": "x"}])
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\nx,y\n")
    with pytest.raises(ValueError):
        q.import_csv(bad)
    q.append([_row(1)])
    with pytest.raises(ValueError):
        q.add_labels([("s1", "")])
    assert q.counts()["labeled"] == 0
