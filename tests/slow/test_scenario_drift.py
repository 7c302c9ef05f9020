"""The closed loop end to end (issue 7 targets): `visionfleet scenario drift --check`.

Pre-drift top-1 >= 90%, drift detected within 500 drifted requests, the retrained
candidate promoted by its canary, post-promotion top-1 on fresh drifted images within
3 points of pre-drift, under 15 minutes, no failed request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_drift_scenario_meets_its_targets(tmp_path: Path) -> None:
    env = {**os.environ, "VISIONFLEET_HOME": str(tmp_path / "home")}
    r = subprocess.run(
        [str(Path(sys.executable).parent / "visionfleet"), "scenario", "drift", "--home", str(tmp_path / "run"),
         "--check", "--json"],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    doc = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    print(json.dumps({k: v for k, v in doc.items() if k != "timeline"}, indent=2))
    for t in doc.get("timeline", []):
        print(f"+{t['t']:6.1f}s {t['event']}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert all(doc["targets"].values()), doc["targets"]
    assert (Path(doc["report"])).is_file()
