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


# The server profile's two servers, started once per session on 127.0.0.1 and free ports,
# only when a test asks for them (cluster/services.py; stopped at the end of the session).
@pytest.fixture(scope="session")
def s3_server():
    from cluster.services import s3_server as _s3

    with _s3() as srv:
        yield srv


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):
    """The AWS variables for the session's S3 server, and a fresh bucket: returns ``s3://<bucket>``."""
    import uuid

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server.create_bucket(f"vf-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def pg_server():
    from cluster.services import postgres_server

    with postgres_server() as srv:
        yield srv


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh database on the session's PostgreSQL: returns its SQLAlchemy URL."""
    import uuid

    import sqlalchemy as sa

    name = f"vf_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return pg_server.url.rsplit("/", 1)[0] + f"/{name}"
