"""Faults under load (short CI versions; `make test-slow` runs the full-length ones).

Each runs tests/integration/fault_driver.py in a subprocess with its own Ray, on a copy
of the session's registered model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).with_name("fault_driver.py")


def _run(tmp_path: Path, settings, scenarios: str, seconds: float, rate: float, timeout: float = 900) -> dict:
    home = tmp_path / "home"
    shutil.copytree(settings.registry_dir, home / "registry")
    r = subprocess.run(
        [sys.executable, str(DRIVER), "--home", str(home), "--model", "tiny", "--scenarios", scenarios,
         "--seconds", str(seconds), "--rate", str(rate)],
        capture_output=True, text=True, timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_replica_kill_unhealthy_replica_and_overload(tmp_path: Path, settings, trained) -> None:
    res = _run(tmp_path, settings, "kill-replica,unhealthy,overload", seconds=10, rate=8)
    kill = res["kill-replica"]
    assert kill["all"]["sent"] >= 60
    assert kill["all"]["failed"] == 0, kill  # the ingress retried on the surviving replica
    unhealthy = res["unhealthy"]
    assert unhealthy["replaced"] is True and unhealthy["all"]["failed"] == 0, unhealthy
    ov = res["overload"]
    for key in ("x2", "x5"):
        counts = ov[key]["status_counts"]
        statuses = {k for k in counts if not k.startswith("client:")}
        # "0" is a request with no HTTP answer at all (client:NAME counts the exceptions): a failure
        assert "0" not in statuses, {k: v for k, v in counts.items() if k == "0" or k.startswith("client:")}
        # overload is answered with 503 (+ Retry-After) or 408, never another 5xx; our own answers are
        # JSON, the Serve proxy's own queue-full 503 / timeout 408 are text (negative codes here)
        assert statuses <= {"200", "503", "408", "-503", "-408"}, ov[key]["status_counts"]
    assert ov["recovery_x0.5"]["errors"] == 0, ov["recovery_x0.5"]  # no restart needed afterwards


def test_node_removal(tmp_path: Path, settings, trained) -> None:
    res = _run(tmp_path, settings, "remove-node", seconds=15, rate=6)["remove-node"]
    total = res["all"]
    assert total["sent"] >= 40
    assert total["failed"] <= max(1, 0.01 * total["sent"]), res
    assert res["after"]["failed"] == 0
