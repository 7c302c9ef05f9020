"""The compression sweep as a real `ray job submit` job, and its bad-input paths.

A separate head is started with `ray start --head` (dashboard on: the job server lives
there) on free ports in its own temp dir and stopped with ``cluster.local.stop_head``,
which stops exactly its processes. The session's in-process Ray is left alone; the
impossible-budget sweep runs as a separate CLI driver attached to it through
``RAY_ADDRESS``, as a user's second terminal would.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BEST_KEYS = {"quantize", "engine", "calibration", "method", "per_channel", "prune", "input_size", "threads"}
# A tiny space for the tiny session model: quantization x resolution x pruning, fine-tunes of one batch or two.
TINY_SPACE = [
    "--prune", "0,0.5", "--prune-round-to", "1", "--quantize", "none,int8-static:ort:minmax,int8-dynamic",
    "--input-sizes", "32,24", "--calibration", "16", "--finetune-epochs", "1", "--finetune-limit", "64",
    "--holdout-limit", "64", "--no-peak-memory", "--latency-queries", "20", "--latency-repeats", "2",
    "--probe-queries", "10",
]


def _env(settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "VISIONFLEET_HOME": str(settings.home), "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


@pytest.fixture
def job_head(settings, tmp_path_factory: pytest.TempPathFactory):
    """A head with the dashboard (job server) on free ports; yields the dashboard URL."""
    from cluster.local import HeadInfo, free_port, stop_head
    from visionfleet.settings import Settings

    # head.json for this head lives in its own small state dir, so stop_head stops exactly it.
    head_settings = Settings.from_env(tmp_path_factory.mktemp("tunehead")).ensure()
    head_settings.ray_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="vft-", dir="/tmp"))  # short: Ray's AF_UNIX socket paths
    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "metrics-export-port",
                                            "runtime-env-agent-port", "ray-client-server-port")}
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "start", "--head", f"--temp-dir={temp_dir}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
           *(f"--{name}={port}" for name, port in ports.items())]
    info = HeadInfo(address=f"127.0.0.1:{ports['port']}", temp_dir=str(temp_dir), num_cpus=2,
                    started_at=_dt.datetime.now(_dt.timezone.utc).isoformat())
    (head_settings.ray_dir / "head.json").write_text(info.to_json())
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(settings, RAY_USAGE_STATS_ENABLED="0"),
                           timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        yield f"http://127.0.0.1:{ports['dashboard-port']}"
    finally:
        stop_head(head_settings, timeout=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait(client, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(0.5)
    client.stop_job(job_id)
    return "TIMEOUT"


def _wandb_groups(wandb_dir: Path) -> list[str]:
    from visionfleet.wandb_offline import find_runs, read_records

    groups = []
    for run in find_runs(wandb_dir):
        for f in run.glob("run-*.wandb"):
            for rec in read_records(f):
                if rec.WhichOneof("record_type") == "run":
                    groups.append(rec.run.run_group)
                    break
    return groups


def test_sweep_runs_as_a_ray_job_and_registers_a_candidate(job_head, trained, settings, monkeypatch) -> None:
    from ray.job_submission import JobSubmissionClient

    from visionfleet.registry import Registry

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # this Ray's clusters want the token from ~/.ray/auth_token
    sweep_id = "it-job-sweep"
    client = JobSubmissionClient(job_head)
    job_id = client.submit_job(
        # the job's python must be the environment where visionfleet is installed
        entrypoint=" ".join([sys.executable, "-m", "tune.sweep", "--model", "tiny:1", "--trials", "3",
                             "--latency-budget-ms", "1000", "--sweep-id", sweep_id, *TINY_SPACE]),
        runtime_env={"working_dir": str(REPO), "excludes": [".git"],
                     "env_vars": {"VISIONFLEET_HOME": str(settings.home), "WANDB_MODE": "offline",
                                  "WANDB_SILENT": "true"}},
    )
    status = _wait(client, job_id, timeout=420)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "register] tiny:" in logs  # the job's progress lines (stderr) are in its logs

    out = settings.home / "tune" / sweep_id
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["trials"], summary["unique_configs"], summary["ray_trials"]) == (3, 3, 3)
    # 1000 ms asked, but the x86-cpu profile's own p95 budget (50 ms) is tighter and wins
    assert summary["constraints"]["latency_ms"] == 50.0 and summary["feasible"] >= 1
    assert summary["space_points"] == 24 and summary["baseline"]["ref"] == "tiny:1"
    for name in ("front.json", "front.md", "trials.json", "config.json"):
        assert (out / name).is_file(), name
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "trials").glob("*.json"))) == 3

    # the best feasible config is a new version, @candidate, with its full lineage
    reg = Registry(settings.registry_dir)
    name, _, version = summary["registered"].partition(":")
    assert name == "tiny" and reg.aliases("tiny")["candidate"] == int(version)
    card = reg.card("tiny", int(version))
    best = summary["best"]
    assert card.lineage.parent == "tiny:1" and card.lineage.run == f"tune-{sweep_id}"
    assert card.metrics["tune"]["sweep"] == sweep_id and card.metrics["holdout_top1"] == best["top1"]
    assert list(card.input_size) == [best["config"]["input_size"]] * 2
    ops = [s["op"] for s in card.lineage.steps if s.get("by") == "visionfleet tune"]
    cfg = best["config"]
    assert ("resize" in ops) == (cfg["input_size"] != 32)
    assert ("prune" in ops) == (cfg["prune"] > 0) and ("quantize" in ops) == (cfg["quantize"] != "none")
    assert card.file("onnx") is not None and card.file("torch") is not None  # FP32 weights kept for retraining

    # the file the retraining pipeline reads, in its exact shape
    doc = json.loads((settings.home / "tune" / "best" / "tiny--x86-cpu.json").read_text())
    assert set(doc) == {"config", "ref", "sweep", "metrics", "at"} and set(doc["config"]) == BEST_KEYS
    assert (doc["ref"], doc["sweep"], doc["config"]) == (summary["registered"], sweep_id, cfg)
    assert set(doc["metrics"]) == {"top1", "p95_ms", "size_mb"}

    # every trial logged to W&B (offline), in one group named after the sweep
    assert _wandb_groups(settings.home / "wandb").count(sweep_id) == 3

    # the docs example reads the sweep back (no Ray)
    r = subprocess.run([sys.executable, str(REPO / "docs/examples/tune_front.py"), sweep_id], capture_output=True,
                       text=True, cwd=REPO, env=_env(settings), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"best feasible: {best['key']}" in r.stdout and "Pareto front" in r.stdout


def test_impossible_budget_is_a_clear_result_not_a_crash(ray_session, trained, settings) -> None:
    from visionfleet.registry import Registry

    reg = Registry(settings.registry_dir)
    before = (reg.versions("tiny"), reg.aliases("tiny"))
    best_file = settings.home / "tune" / "best" / "tiny--x86-cpu.json"
    best_before = best_file.read_text() if best_file.exists() else None
    env = _env(settings, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    r = subprocess.run(
        [str(Path(sys.executable).with_name("visionfleet")), "tune", "run", "--model", "tiny:1", "--trials", "2",
         "--latency-budget-ms", "0.000001", "--prune", "0", "--quantize", "none,int8-static:ort:minmax",
         "--input-sizes", "32", "--calibration", "16", "--holdout-limit", "64", "--no-wandb", "--no-peak-memory",
         "--latency-queries", "20", "--latency-repeats", "2", "--probe-queries", "10",
         "--trial-cpus", "0.25", "--sweep-id", "it-impossible", "--json"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert r.returncode == 3, r.stderr[-3000:]
    assert "no feasible config" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["best"] is None and summary["feasible"] == 0 and "registered" not in summary
    assert summary["no_feasible_reason"].startswith("the fastest trial")
    assert summary["stopped_early"] == 2  # both stopped on their probe: even the fastest query was over budget
    assert "No feasible config" in (settings.home / "tune" / "it-impossible" / "front.md").read_text()
    assert (reg.versions("tiny"), reg.aliases("tiny")) == before  # nothing registered, no alias moved
    assert (best_file.read_text() if best_file.exists() else None) == best_before


def test_unknown_version_is_refused_before_any_trial(trained, settings) -> None:
    tune_dir = settings.home / "tune"
    before = sorted(p.name for p in tune_dir.iterdir()) if tune_dir.exists() else []
    r = subprocess.run([sys.executable, "-m", "tune.sweep", "--model", "tiny:99", "--trials", "3"],
                       capture_output=True, text=True, cwd=REPO, env=_env(settings), timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert "error: model 'tiny' has no version 99" in r.stderr
    assert "Ray" not in r.stderr  # refused before Ray was started
    assert (sorted(p.name for p in tune_dir.iterdir()) if tune_dir.exists() else []) == before


def test_searcher_never_runs_a_config_twice_and_ends_when_the_space_is_exhausted() -> None:
    from optuna.samplers import TPESampler
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    from tune.space import SpaceConfig
    from tune.sweep import _param_space, _unique_configs

    space = SpaceConfig(prune=[0.0, 0.5], quantize=["none", "int8-dynamic"], input_sizes=[32, 24]).build(
        native_size=32, default_threads=2)
    searcher = _unique_configs(OptunaSearch(sampler=TPESampler(seed=0, n_startup_trials=1)), space, seed=0)
    searcher.set_search_properties("score", "max", _param_space(space))
    keys = []
    for i in range(len(space)):
        config = searcher.suggest(f"t{i}")
        keys.append(space.decode(config).key)
        # the same score everywhere: TPE keeps proposing what it has seen
        searcher.on_trial_complete(f"t{i}", {"score": 0.5, "training_iteration": 1})
    assert sorted(keys) == sorted(p.key for p in space.points())
    assert searcher.suggest("t-extra") == Searcher.FINISHED
