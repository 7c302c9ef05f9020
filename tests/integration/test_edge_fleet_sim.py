"""A small fleet simulation against the session's server: 3 agent processes, a network cut, a SIGKILL,
a broken update that halts by itself, a good update everyone converges on, nothing lost or
duplicated. ``tests/slow/test_edge_campaigns.py`` runs the full 20-device, 3-minute one."""

from __future__ import annotations

import json

from tests.integration.test_edge_ota_sync import register_copies

MODEL = "edgesim"


def test_small_fleet_simulation(settings, serve_url, trained, tmp_path) -> None:
    from bench.fleet_sim import SimConfig, run_simulation

    register_copies(settings, trained, MODEL)
    cfg = SimConfig(model=f"{MODEL}:1", update=f"{MODEL}:2", devices=3, duration_s=44, outages=1, outage_s=5,
                    crashes=1, fps=1.0, sync_interval_s=1.0, ota_interval_s=3.0, drain_timeout_s=90, seed=3)
    report = run_simulation(cfg, home=settings.home, server_url=serve_url, work=tmp_path / "sim", on_event=print)
    doc = report.to_dict()
    print(json.dumps({k: v for k, v in doc.items() if k != "timeline"}, indent=2))
    assert report.records_produced >= 3 * 30
    assert report.lost == 0 and report.duplicates == 0 and report.unexpected == 0
    assert report.records_received == report.records_produced
    assert report.bad_update_tried >= 2 and report.bad_rollout_halted is True
    assert report.rollbacks >= 2  # the devices that tried the broken bundle kept their model
    assert report.converged_devices == 3 and report.convergence_s is not None
    assert report.drained
