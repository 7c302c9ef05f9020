"""Ray Train survives a worker that dies mid-fit: the run restarts (max_failures=1) and resumes
from its latest epoch checkpoint in storage_path, not from scratch (local storage; the same on
the S3 server is tests/slow/test_train_storage_s3.py). Both are in `make test-slow`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train writes it once a checkpoint is registered


def kill_rank0_after_checkpoint(run_dir: Path, checkpoint_registered: Callable[[], bool], box: dict) -> threading.Thread:
    """Watch the run's epochs log; once a checkpoint is registered, SIGKILL the rank-0 worker (once)."""

    def watch() -> None:
        log = run_dir / "epochs.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and "done" not in box:
            lines = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
            if any(x["checkpoint"] for x in lines) and checkpoint_registered():
                pid = lines[-1]["pid"]
                box["killed"] = {"pid": pid, "after_epoch": lines[-1]["epoch"]}
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def fit_with_a_kill(cfg, *, runs_dir: Path, storage: str | None, checkpoint_registered: Callable[[], bool]):
    from train.loop import fit

    box: dict = {}
    watcher = kill_rank0_after_checkpoint(runs_dir / cfg.run_name, checkpoint_registered, box)
    try:
        result = fit(cfg, runs_dir=runs_dir, wandb_dir=runs_dir / "wandb", storage=storage)
    finally:
        box["done"] = True
        watcher.join(5)
    return result, box


def check_resumed(result, box: dict, epochs: int) -> None:
    """The fit finished every epoch, and the attempt after the kill started at a checkpointed epoch."""
    assert "killed" in box, "the worker was never killed: the fit ended before a checkpoint was registered"
    lines = [json.loads(x) for x in (result.run_dir / "epochs.jsonl").read_text().splitlines()]
    first = [x for x in lines if x["pid"] == box["killed"]["pid"]]
    after = [x for x in lines if x["pid"] != box["killed"]["pid"]]
    assert first and after, lines
    assert all(x["resumed_from"] == 0 for x in first)  # the first attempt started from scratch
    resumed = after[0]["resumed_from"]
    checkpointed = [x["epoch"] for x in first if x["checkpoint"]]
    assert resumed >= 1 and resumed in checkpointed, (resumed, checkpointed)
    assert [x["epoch"] for x in after] == list(range(resumed + 1, epochs + 1))  # not from scratch, nothing skipped
    assert {x["resumed_from"] for x in after} == {resumed}
    m = result.metrics
    assert m["epoch"] == epochs and m["epochs_run"] == epochs and m["resumed_from_epoch"] == resumed
    assert m["use_gpu"] is False and m["device"] == "cpu"  # no GPU on this machine: CPU workers
    assert 0.0 <= m["top1"] <= 1.0 and result.checkpoint.is_file()


# 50-60 s on the 2-core machine (a fit, a restart, a second start of the worker group): above the
# default suite's budget, so `make test-slow` runs it (with this tier's shared Ray and fixtures).
@pytest.mark.slow
def test_fit_resumes_from_its_checkpoint_after_a_worker_dies(ray_session, settings, tiny_dataset) -> None:
    from train.loop import TrainConfig

    epochs = 8  # one worker and 256 images keep it short; the two-worker run on S3 is in tests/slow
    cfg = TrainConfig(dataset=str(tiny_dataset), arch={"arch": "resnet", "width": 8, "stem_stride": 2}, input_size=32,
                      epochs=epochs, batch_size=64, num_workers=1, limit_train=256, wandb=False, run_name="it-resume",
                      max_failures=1)
    storage = settings.runs_dir / "_ray"  # the embedded default: under the home, as before
    result, box = fit_with_a_kill(cfg, runs_dir=settings.runs_dir, storage=None,
                                  checkpoint_registered=lambda: (storage / "it-resume" / SNAPSHOT).is_file())
    check_resumed(result, box, epochs)
    assert (storage / "it-resume").is_dir()
