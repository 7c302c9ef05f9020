"""Shared fixtures for every tier."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Keep W&B and Ray quiet and offline in tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
# Each tier's folder marks its tests, so `-m integration` / `-m "not slow"` select by tier
# (a `pytestmark` in a conftest.py applies to no test).
_TIER_MARKERS = {"integration": REPO / "tests" / "integration", "slow": REPO / "tests" / "slow"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(item.path).resolve()
        for marker, folder in _TIER_MARKERS.items():
            if path.is_relative_to(folder) and item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state dir, exported as $VISIONFLEET_HOME."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("VISIONFLEET_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def sample_rgb() -> np.ndarray:
    from visionfleet.datasets.synth import render_sample

    img, _ = render_sample(7, 3, 96)
    return img
