"""Faults under load (short CI versions; `make test-slow` runs the full-length ones).

One run of tests/integration/fault_driver.py in a subprocess with its own Ray (a 3-node
``ray.cluster_utils.Cluster``), on a copy of the session's registered model, feeds both tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("fault_driver.py")


def _run(tmp_path: Path, settings, scenarios: str, seconds: float, rate: float, *extra: str, timeout: float = 900) -> dict:
    home = tmp_path / "home"
    shutil.copytree(settings.registry_dir, home / "registry")
    r = subprocess.run(
        [sys.executable, str(DRIVER), "--home", str(home), "--model", "tiny", "--scenarios", scenarios,
         "--seconds", str(seconds), "--rate", str(rate), *extra],
        capture_output=True, text=True, timeout=timeout,
    )
    sys.stderr.write("".join(line + "\n" for line in r.stderr.splitlines() if line.startswith("[fault_driver")))
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, settings, trained) -> dict:
    """Every scenario in one driver run: one 3-node cluster (a head, two workers with one
    replica each) and one deploy; kill-replica, unhealthy and overload first, remove-node last.
    A 0.5 s health-check period gets the unhealthy replica noticed in ~1.5 s (3 failed checks).
    The overload phases last 2.5 s (`make test-slow`: 15 s): 5x capacity for 2.5 s is ~600
    requests against 128 client connections and a 64-request ingress limit, so the server
    stays saturated while the backlog drains (~20 s); a 5 s phase only doubled the drain."""
    return _run(tmp_path_factory.mktemp("faults"), settings, "kill-replica,unhealthy,overload,remove-node", 10, 8,
                "--one-cluster", "--health-check-period", "0.5", "--overload-seconds", "2.5")


def test_replica_kill_unhealthy_replica_and_overload(faults: dict) -> None:
    res = faults
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


def test_node_removal(faults: dict) -> None:
    res = faults["remove-node"]
    total = res["all"]
    assert total["sent"] >= 40
    assert total["failed"] <= max(1, 0.01 * total["sent"]), res
    assert res["after"]["failed"] == 0
