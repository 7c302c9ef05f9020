"""The telemetry lake: compaction and retention keep files and bytes flat; reads never double count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def test_week_in_minutes_stays_flat(tmp_path: Path) -> None:
    from bench.storage_week import WeekConfig, simulate
    from visionfleet.store import open_store

    cfg = WeekConfig(days=3, rate=0.5, feedback_rate=0.01, flush_s=600, compact_every_s=1800, grace_s=300,
                     target_mb=1, retention="1d", window_s=3600, baseline_days=1)
    res = simulate(cfg, open_store(tmp_path / "lake"))
    d1, d3 = res["days"][0], res["days"][-1]
    assert d3["uncompacted"]["files"] >= 3 * d1["uncompacted"]["files"] - 3  # the sink's files grow
    assert d3["files"] <= d1["files"] + 2  # the compacted lake does not
    assert d3["bytes"] <= 1.5 * d1["bytes"]
    assert d3["files"] < d3["uncompacted"]["files"] / 10
    assert d1["look"]["events"] > 0 and d3["look"]["events"] > 0


def test_reads_dedupe_and_compaction_is_idempotent(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visionfleet.lake import CompactionPolicy, compact, read_events
    from visionfleet.store import open_store

    store = open_store(tmp_path / "t")
    now = 1_790_000_000.0
    for i in range(5):
        t = pa.table({"request_id": [f"r{i}", "dup"], "role": ["primary", "primary"], "ts": [now - 900 + i, now - 900]})
        buf = pa.BufferOutputStream()
        pq.write_table(t, buf)
        store.write_bytes(f"events/date=2026-09-21/source=server/part-{int((now - 800 + i) * 1000)}-ab{i}.parquet",
                          buf.getvalue().to_pybytes())
    before = read_events(store)
    assert before.num_rows == 6  # "dup" once
    rep = compact(store, "events", now=now, policy=CompactionPolicy(grace_s=60))
    assert rep.inputs == 5 and rep.outputs == 1
    assert read_events(store).num_rows == 6
    assert compact(store, "events", now=now, policy=CompactionPolicy(grace_s=60)).inputs == 0


def test_retention_settings_refused_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from visionfleet.settings import Settings

    monkeypatch.setenv("VISIONFLEET_RETENTION_TELEMETRY", "soon")
    with pytest.raises(ValueError, match="Got 'soon' for VISIONFLEET_RETENTION_TELEMETRY"):
        Settings.from_env(tmp_path)
    monkeypatch.setenv("VISIONFLEET_RETENTION_TELEMETRY", "3d")
    assert Settings.from_env(tmp_path).retention_seconds()["telemetry"] == 3 * 86400
