"""Settings and the import rules (no torch or ray in the core or on the device)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from visionfleet.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_settings_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path / "h"))
    s = Settings.from_env()
    assert s.home == (tmp_path / "h").resolve() and s.home.is_absolute()
    assert s.registry_dir == s.home / "registry"
    monkeypatch.delenv("VISIONFLEET_HOME")
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env().home == (tmp_path / ".visionfleet").resolve()
    env = s.runtime_env_vars()
    assert env["VISIONFLEET_HOME"] == str(s.home)
    with pytest.raises(ValueError):
        Settings(home=Path("relative"))


def test_node_home_wins_over_a_home_handed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On nodes that share no disk, a home from a deployment's config or a job's env is the
    driver's path: the node's own $VISIONFLEET_NODE_HOME is used instead; the shared store and
    database still come from the environment."""
    driver = Settings(home=tmp_path / "driver", store="s3://bucket/vf", db_url="postgresql+psycopg://u@h/db")
    for k, v in driver.runtime_env_vars().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VISIONFLEET_NODE_HOME", str(tmp_path / "node-a"))
    s = Settings.from_env(str(driver.home))
    assert s.home == (tmp_path / "node-a").resolve()
    assert s.store_uri("registry") == "s3://bucket/vf/registry" and s.db_url == driver.db_url
    assert s.cache_dir == (tmp_path / "node-a" / "cache").resolve()
    monkeypatch.delenv("VISIONFLEET_NODE_HOME")
    assert Settings.from_env(str(driver.home)).home == driver.home


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import visionfleet",
        "import visionfleet.imaging, visionfleet.spec, visionfleet.inference, visionfleet.settings",
        "import visionfleet.cli",
        "import edge_agent, edge_agent.cli",
    ],
)
def test_core_and_device_imports_leave_torch_and_ray_out(code: str) -> None:
    mods = _modules_after(code)
    assert "torch" not in mods and "ray" not in mods, code


def test_device_side_does_not_need_pyarrow() -> None:
    mods = _modules_after("import visionfleet, edge_agent.cli, visionfleet.inference")
    assert "pyarrow" not in mods


def test_cli_help_is_light() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from visionfleet.cli import app; sys.argv=['visionfleet','--help']\ntry:\n  app()\nexcept SystemExit: pass\nprint('torch' in sys.modules, 'ray' in sys.modules)"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    assert out.stdout.strip().endswith("False False")
