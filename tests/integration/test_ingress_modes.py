"""The `haproxy` ingress mode (Serve direct ingress behind HAProxy, Ray's throughput-optimized settings)
serves every kind of route, with the models in replicas and then in the ingress."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def test_haproxy_mode_serves_rest_v2_stream_and_admin(tmp_path: Path, settings, trained) -> None:
    home = tmp_path / "home"
    shutil.copytree(settings.registry_dir, home / "registry")
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("haproxy_check.py")), str(home), "tiny"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["healthy"] is True
    assert out["predict"][0] == 200 and out["predict"][1] in trained.card.labels
    assert out["bad_input"][0] == 415 and "error" in out["bad_input"][1]
    assert out["v2"] == [200, [1, len(trained.card.labels)]]
    assert out["same_version_refused"] == 400  # admin route reached the coordinator and answered
    assert out["stats"] == 16
    assert out["stream"] == ["ready", "prediction", 1]
    # redeployed with the models in the ingress: same answers, no ModelReplica deployment left
    assert out["in_ingress"]["predict"][0] == 200 and out["in_ingress"]["predict"][1] in trained.card.labels
    assert out["in_ingress"]["v2"] == 200 and out["in_ingress"]["inference_in"] == "ingress"
    assert out["in_ingress"]["loaded"] == [f"tiny:{trained.card.version}"] and out["in_ingress"]["deployments"] == ["Ingress"]
    # this Ray runs HAProxy, started and managed by Serve, in front of the ingress replicas
    assert out["ray_processes"] > 3 and out["haproxy"] is True and out["haproxy_manager"] is True
