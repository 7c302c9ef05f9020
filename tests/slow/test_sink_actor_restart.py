"""The real ``TelemetrySink`` Ray actor killed mid-experiment (``ray.kill(no_restart=False)``):
Ray restarts it, it restores from PostgreSQL + S3, and the decision, drift alarm and pending
joins equal an uninterrupted run's. The fast, Ray-free version is tests/unit/test_sink_restart.py."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_sink_restart import MONITORING, N, _lake, _outcome, _play, _traffic  # noqa: E402

from serve_apps.telemetry import TelemetrySinkImpl, get_or_create_sink  # noqa: E402
from visionfleet.settings import Settings  # noqa: E402

pytestmark = pytest.mark.slow


class _Remote:
    """The actor behind the calls ``_play`` and ``_outcome`` make."""

    def __init__(self, actor) -> None:  # noqa: ANN001
        self.actor = actor

    def __getattr__(self, name: str):
        import ray

        return lambda *a: ray.get(getattr(self.actor, name).remote(*a), timeout=120)


def test_sink_actor_killed_by_ray_restores_from_postgres_and_s3(
        tmp_path: Path, s3_env: str, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    ops = _traffic(t0=time.time() - N)  # recent: the sink's lake maintenance deletes days past the retention
    base = Settings(home=tmp_path / "base")
    a = TelemetrySinkImpl(str(base.home), settings=base)
    a.configure(monitoring=MONITORING)
    _play(a, ops)
    a.flush()
    want = _outcome(a)

    home = tmp_path / "cluster"
    monkeypatch.setenv("VISIONFLEET_STORE", f"{s3_env}/vf")
    monkeypatch.setenv("VISIONFLEET_DB", pg_url)
    settings = Settings.from_env(home)
    ray.init(num_cpus=2, include_dashboard=False, namespace=f"t{uuid.uuid4().hex[:6]}")
    try:
        actor = get_or_create_sink(str(home))
        sink = _Remote(actor)
        sink.configure(MONITORING)
        half = next(i for i, op in enumerate(ops) if op[0] == "events" and op[1][0]["request_id"] == f"r{N // 2}")
        _play(sink, ops[:half], flush_every=10**9)  # the actor's own loop flushes every 2 s
        ray.kill(actor, no_restart=False)
        deadline = time.time() + 120
        restored: dict = {}
        while not restored.get("remembered"):  # ray.kill is asynchronous: wait for the restored one
            assert time.time() < deadline, "the sink did not come back"
            try:
                restored = sink.stats()["restored"]
            except ray.exceptions.RayError:  # dead, then restarting
                time.sleep(0.5)
        assert restored["remembered"] == len([op for op in ops[:half] for _ in op[1] if op[0] == "events"])
        _play(sink, ops[half:], flush_every=10**9)
        sink.flush()
        got = _outcome(sink)
        assert want["decision"]["action"] == "promote" and want["monitors"]["m:1"]["drift"]["drifted"]
        assert got["decision"] == want["decision"] and got["monitors"] == want["monitors"]
        assert got["arms"] == want["arms"] and got["pending"] == 0
        events = _lake(settings, "events")  # compaction may have run: read parts and compacted files
        assert len({e["request_id"] for e in events}) == N
        assert not (home / "telemetry").exists()
    finally:
        try:
            ray.kill(actor, no_restart=True)
        finally:
            ray.shutdown()
