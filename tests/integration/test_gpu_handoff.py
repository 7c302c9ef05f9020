"""The GPU hand-off of issue 3, run on the CPU at toy size.

``bench/gpu_heavy.py`` trains, prunes and fine-tunes the heavy architecture where a GPU
is lent and writes FP16 checkpoint parts; ``bench/train_heavy.py --from-parts``
re-scores them here and registers them (the pruned one as a child of the first);
``bench/optimization.py --pruned`` then measures that pair. The same scripts run here
with a 32 px model, a few seconds of training and a 64-image dataset (no Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def handoff(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-handoff")
    parts = root / "parts"
    env = {**os.environ, "VISIONFLEET_HOME": str(root / "home"), "PYTHONUNBUFFERED": "1"}
    _run(["bench/gpu_heavy.py", "--out", str(parts), "--size", "32", "--n-train", "64", "--n-holdout", "32",
          "--extra", "32", "--train-seconds", "3", "--finetune-seconds", "2", "--batch", "16", "--workers", "1"], env)
    return root, parts, env


def test_gpu_run_writes_split_fp16_checkpoints_and_a_report(handoff):
    _root, parts, _env = handoff
    report = json.loads((parts / "gpu_heavy.json").read_text())
    assert report["device"] == "cpu"  # no GPU here: the same code ran on the CPU
    assert (report["data"]["train"], report["data"]["extra"], report["data"]["holdout"]) == (64, 32, 32)
    assert report["train"]["steps"] > 0 and report["finetune"]["steps"] > 0
    assert 0.5 <= report["prune"]["mac_reduction"] < 0.9
    for stem in ("heavy.pt", "pruned.pt"):
        entry = report["parts"][stem]
        assert entry["parts"] == [f"{stem}.part{i}" for i in range(len(entry["parts"]))]
        sizes = [(parts / n).stat().st_size for n in entry["parts"]]
        assert sum(sizes) == entry["bytes"] and max(sizes) <= 15_000_000  # under the device tool's per-file limit
    assert isinstance(report["tensorrt_detect"], dict)  # detect() ran and said what it found


@pytest.mark.slow  # 10-60 s; `make test` keeps the smaller sibling tests of this file
def test_parts_register_with_lineage_and_feed_the_optimization_bench(handoff):
    root, parts, env = handoff
    common = ["--dataset", "toy32", "--n-train", "64", "--n-holdout", "32", "--from-parts", str(parts)]
    out = _run(["bench/train_heavy.py", *common], env)
    heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy["registered"] == "heavy:1" and heavy["holdout_n"] == 32
    out = _run(["bench/train_heavy.py", *common, "--stem", "pruned.pt", "--name", "heavy-p50", "--parent", "heavy:1"], env)
    pruned = json.loads(out.stdout.strip().splitlines()[-1])
    assert pruned["registered"] == "heavy-p50:1"

    from visionfleet.registry import Registry

    reg = Registry(root / "home" / "registry")
    card = reg.card("heavy-p50", 1)
    assert card.lineage.parent == "heavy:1"
    ops = [st["op"] for st in card.lineage.steps]
    assert ops[:3] == ["train", "prune", "finetune"]
    assert card.metrics["holdout_n"] == 32 and tuple(card.input_size) == (32, 32)
    assert card.file("torch") is not None  # the pruned weights, loadable without pickled code

    # a missing or damaged part is a clear error, not a corrupt model
    last = sorted(parts.glob("heavy.pt.part*"))[-1]
    saved = last.read_bytes()
    for damage, message in ((lambda: last.unlink(), "incomplete or damaged"),
                            (lambda: last.write_bytes(saved[:-1] + b"x"), "incomplete or damaged"),
                            (lambda: (parts / "heavy.pt.part0").rename(parts / "heavy.pt.part9"), "expected 0..")):
        damage()
        try:
            p = subprocess.run([sys.executable, "bench/train_heavy.py", *common, "--name", "other"], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=300)
        finally:
            if (parts / "heavy.pt.part9").exists():
                (parts / "heavy.pt.part9").rename(parts / "heavy.pt.part0")
            last.write_bytes(saved)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]

    # --gemm-sizes 256,512: the machine-ceiling stage runs, without the 2048/4096 GEMMs that took
    # ~50 of the bench's ~150 s here (the default sizes are for real measurements)
    out = _run(["bench/optimization.py", "heavy:1", "--pruned", "heavy-p50:1", "--rounds", "5", "--queries", "4",
                "--calibration", "16", "--gemm-sizes", "256,512", "--out", str(root / "opt")], env)
    doc = json.loads((root / "opt.json").read_text())
    names = [r["name"] for r in doc["rows"]]
    assert names == ["torch-eager", "ort-fp32", "nncf-int8", "ort-int8", "pruned50-fp32", "pruned50-int8"]
    pruned_row = next(r for r in doc["rows"] if r["name"] == "pruned50-fp32")
    full_row = next(r for r in doc["rows"] if r["name"] == "ort-fp32")
    assert pruned_row["macs_per_image"] < 0.5 * full_row["macs_per_image"]
    assert [st["op"] for st in doc["build_steps"]["pruned50-int8"]][:3] == ["train", "prune", "finetune"]
    assert set(doc["gemm_ceiling"]["int8"]["before"]["by_size"]) == {"256", "512"}

    # a bad --gemm-sizes is refused before anything is built
    p = subprocess.run([sys.executable, "bench/optimization.py", "heavy:1", "--gemm-sizes", "big"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Got 'big' for --gemm-sizes; expected" in p.stderr and "Traceback" not in p.stderr

    # --pruned must name a pruned child of the measured model
    p = subprocess.run([sys.executable, "bench/optimization.py", "heavy-p50:1", "--pruned", "heavy:1"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "error:" in p.stderr and "Traceback" not in p.stderr
