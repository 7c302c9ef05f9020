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
    bundles = [export_bundle(reg, "toy:1", t, out_dir=tmp_path / "b", golden=4, calibration=20)
               for t in ("jetson", "x86-cpu")]
    r = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "edge_footprint.py"), *map(str, bundles),
                        "--rounds", "1", "--frames", "3"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["precision"] for row in rows] == ["fp32", "int8"]
    for row in rows:
        assert row["frame_ms_median"] > 0 and row["model_ms_median"] > 0 and 20 < row["agent_peak_rss_mb"] < 2000
