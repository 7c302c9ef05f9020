"""The base install is the light device set: `visionfleet-edge --help` works without torch or ray."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_base_install_has_no_torch_or_ray(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # Build from a copy of the source so no build output lands in the checkout.
    src = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(src)], check=False)
    if not (src / "pyproject.toml").exists():  # not a git checkout: copy the tree
        import shutil

        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", ".visionfleet"))
    else:  # include uncommitted work too
        import shutil

        for pkg in ("visionfleet", "edge_agent", "cluster", "serve_apps", "tune", "train", "edge_export"):
            shutil.rmtree(src / pkg, ignore_errors=True)
            shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "pyproject.toml", src / "pyproject.toml")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    help_ = subprocess.run([str(env_dir / "bin" / "visionfleet-edge"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "visionfleet-edge" in help_.stdout and "predict" in help_.stdout
    probe = subprocess.run(
        [str(py), "-c", "import importlib.util as u; print([m for m in ('torch','ray','pyarrow') if u.find_spec(m)])"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "[]", probe.stdout
