"""docs/edge.md's example runs: footprint of two bundles (agent RSS, per-frame latency)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_edge_bundle import toy_registry

REPO = Path(__file__).resolve().parents[2]


def test_edge_footprint_example_runs(tmp_path: Path) -> None:
    from edge_export.bundle import export_bundle

    reg, _ = toy_registry(tmp_path)
    bundle = export_bundle(reg, "toy:1", "x86-cpu", out_dir=tmp_path / "b", golden=4, calibration=20)
    r = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "edge_footprint.py"), str(bundle),
                        "--rounds", "1", "--frames", "2"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["precision"] for row in rows] == ["int8"]
    for row in rows:
        assert row["frame_ms_median"] > 0 and row["model_ms_median"] > 0 and 20 < row["agent_peak_rss_mb"] < 2000
