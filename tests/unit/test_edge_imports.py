"""The device side stays light: importing any of edge_agent leaves torch, ray, pyarrow and httpx out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_MODULES = ("edge_agent", "edge_agent.cli", "edge_agent.agent", "edge_agent.ota", "edge_agent.store",
            "edge_agent.outbox", "edge_agent.bundle", "edge_agent.net", "edge_agent.predict", "edge_agent.sources",
            "edge_agent.rollout", "edge_agent.durable")


def test_edge_agent_imports_leave_heavy_packages_out() -> None:
    code = f"import {', '.join(_MODULES)}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    mods = set(out.stdout.split())
    assert not {"torch", "ray", "pyarrow", "httpx", "onnx", "nncf"} & mods, sorted({"torch", "ray", "pyarrow", "httpx"} & mods)


def test_the_server_cli_stays_light() -> None:
    code = ("import sys; from visionfleet.cli import app; sys.argv=['visionfleet','edge','--help']\n"
            "try:\n  app()\nexcept SystemExit: pass\nprint('torch' in sys.modules, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "publish" in r.stdout and r.stdout.strip().endswith("False False")


def test_agent_cli_refuses_bad_options(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edge_agent.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["run", "--home", str(tmp_path / "h"), *args])

    assert "--device-id" in runner.invoke(app, ["run", "--help"]).output
    r = run("--device-id", "bad id!", "--source", str(tmp_path))
    assert r.exit_code == 2 and "error: Got 'bad id!' for --device-id" in r.output
    r = run("--device-id", "cam-1")
    assert r.exit_code == 2 and "error: nothing to do" in r.output
    r = run("--device-id", "cam-1", "--source", str(tmp_path / "missing"))
    assert r.exit_code == 2 and "error: Got" in r.output and "--source" in r.output
    r = run("--device-id", "cam-1", "--server", "ftp://x", "--source", str(tmp_path))
    assert r.exit_code == 2 and "http:// or https://" in r.output
    r = runner.invoke(app, ["status", "--home", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no agent home" in r.output
