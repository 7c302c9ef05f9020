"""Fixtures of the slow tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trained_slow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir with a registered demo model (``visionfleet demo --quick``)."""
    home = tmp_path_factory.mktemp("slowhome")
    env = {**os.environ, "VISIONFLEET_HOME": str(home)}
    r = subprocess.run([str(Path(sys.executable).parent / "visionfleet"), "demo", "--quick", "--requests", "20"],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return home
