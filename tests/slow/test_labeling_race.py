"""Two processes fill the labeling queue / sync one device into the fleet on PostgreSQL + S3: nothing lost, nothing twice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_fleet_db import fleet_race  # noqa: E402
from test_labeling_db import race  # noqa: E402

pytestmark = pytest.mark.slow


def test_two_processes_on_postgres_and_s3(tmp_path: Path, pg_url: str, s3_env: str) -> None:
    race(tmp_path, {"home": tmp_path, "db_url": pg_url, "samples_uri": f"{s3_env}/samples"})


def test_two_server_processes_sync_once_on_postgres_and_s3(tmp_path: Path, pg_url: str, s3_env: str) -> None:
    fleet_race({"home": tmp_path, "db_url": pg_url, "telemetry_uri": f"{s3_env}/telemetry",
                "samples_uri": f"{s3_env}/samples"})
