"""`visionfleet optimize` and `visionfleet bench` end to end on the session's tiny model.

The registry is copied into a temporary state dir, so the versions registered here do
not leak into other tests. Real NNCF, torch-pruning, torch and ONNX Runtime throughout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from visionfleet.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, trained, settings) -> Path:
    """A state dir holding tiny:1 (trained with Ray Train) and `foreign`, an ONNX-only model."""
    from visionfleet.registry import Registry

    h = tmp_path_factory.mktemp("opthome")
    shutil.copytree(settings.registry_dir / "tiny", h / "registry" / "tiny")
    reg = Registry(h / "registry")
    card = reg.card("tiny", 1)
    onnx_only = h / "model.onnx"
    shutil.copy(reg.local_dir("tiny", 1) / "model.onnx", onnx_only)
    foreign = card.model_copy(update={"name": "foreign", "framework": "tensorflow", "arch": None})
    reg.register(foreign, {"onnx": onnx_only})  # no torch weights, as an imported model
    return h


def cli(home: Path, *args: str):
    r = runner.invoke(app, list(args), env={"VISIONFLEET_HOME": str(home)}, catch_exceptions=False)
    return r


def run_json(home: Path, *args: str) -> dict:
    r = cli(home, *args, "--json")
    assert r.exit_code == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _probs(home: Path, ref: str, x: np.ndarray) -> np.ndarray:
    from visionfleet.inference import RuntimeOptions, load_model_dir
    from visionfleet.registry import Registry

    reg = Registry(home / "registry")
    r = reg.resolve(ref)
    return load_model_dir(reg.local_dir(r.name, r.version), RuntimeOptions(threads=1)).run(x)[0]


def test_int8_static_registers_a_measured_version_and_reuses_it(home: Path, trained) -> None:
    from visionfleet.datasets.store import load_arrays
    from visionfleet.registry import Registry

    doc = run_json(
        home, "optimize", "tiny:1", "--quantize", "int8-static", "--calibration", "64",
        "--threads", "1", "--rounds", "2", "--target", "x86-cpu",
    )
    card = doc["card"]
    assert card["name"] == "tiny" and card["version"] == 2 and card["precision"] == "int8"
    assert card["model_file"] == "model.int8.onnx" and doc["reused"] is False
    lin = card["lineage"]
    assert lin["parent"] == "tiny:1" and lin["dataset"] == str(trained.dataset)
    q = lin["steps"][-1]
    assert q["op"] == "quantize" and q["engine"] == "nncf" and q["calibration"] == 64 and q["per_channel"] is True
    assert lin["steps"][0]["op"] == "train"  # the parent's history comes along
    m = card["metrics"]
    for key in ("holdout_top1", "parent_holdout_top1", "top1_drop_pt", "size_mb", "macs_per_image",
                "latency_b1_p95_ms", "offline_b8_images_per_s", "speedup_offline_b8", "peak_memory_mb", "variant_key"):
        assert key in m, key
    assert m["holdout_n"] == 160 and m["threads"] == 1 and m["speedup_offline_b8"]["rounds"] == 2
    assert m["size_mb"] < m["parent_size_mb"] / 2
    # same network; the input normalization (Sub/Div) is now a depthwise 1x1 conv: 3 MACs per input pixel
    assert m["macs_per_image"] == m["parent_macs_per_image"] + 3 * 32 * 32
    assert {b["name"].split(" (")[0] for b in doc["budgets"]} == {
        "model size", "peak memory", "p95 latency", "input size", "precision"}
    # outputs close to FP32 on the holdout
    x, _ = load_arrays(trained.dataset, "holdout", (32, 32))
    ref, got = _probs(home, "tiny:1", x), _probs(home, "tiny:2", x)
    assert float(np.abs(ref - got).mean()) < 0.03
    assert float((ref.argmax(1) == got.argmax(1)).mean()) >= 0.8
    assert Registry(home / "registry").aliases("tiny")["production"] == 1  # optimize never promotes

    again = run_json(home, "optimize", "tiny:1", "--quantize", "int8-static", "--calibration", "64",
                     "--threads", "1", "--rounds", "2")
    assert again["reused"] is True and again["cached_build"] is True and again["card"]["version"] == 2
    assert Registry(home / "registry").versions("tiny") == [1, 2]


def test_prune_finetune_int8_and_the_table(home: Path) -> None:
    # width 8: channel counts rounded to multiples of 8 (the default) cannot lose half the MACs
    r = cli(home, "optimize", "tiny:1", "--prune", "0.5", "--finetune-epochs", "1", "--quantize", "int8-static",
            "--calibration", "32", "--threads", "1", "--rounds", "1", "--target", "android", "--round-to", "1")
    assert r.exit_code == 0, r.stderr[-3000:]
    assert "registered tiny:" in r.stdout and "speed-up" in r.stdout and "budgets checked" in r.stdout
    from visionfleet.registry import Registry

    reg = Registry(home / "registry")
    v = max(reg.versions("tiny"))
    card = reg.card("tiny", v)
    ops = [s["op"] for s in card.lineage.steps if s.get("by") == "visionfleet optimize"]
    assert ops == ["prune", "finetune", "export", "quantize", "convert"]
    prune = card.lineage.steps[-5]
    assert prune["mac_reduction"] >= 0.5 and prune["mac_reduction_requested"] == 0.5
    assert card.metrics["macs_per_image"] <= card.metrics["parent_macs_per_image"] / 2
    # pruned weights kept (rebuildable), and the ORT mobile format the android profile asks for
    assert {f.role for f in card.files} == {"onnx", "torch", "ort"}
    assert card.lineage.steps[-1]["op"] == "convert" and card.lineage.steps[-1]["format"] == "ort"
    ort_file = reg.local_dir("tiny", v) / card.file("ort").name
    assert ort_file.suffix == ".ort" and ort_file.read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier
    assert card.metrics["threads"] == 1  # --threads wins over the target's 4
    # the pruned version's weights load without pickled code and prune again
    from train.checkpoint import load_checkpoint

    model, meta = load_checkpoint(reg.local_dir("tiny", v) / "model.pt")
    assert meta["pruned"]["mac_reduction"] >= 0.5
    # an INT8 parent is not quantized twice
    bad = cli(home, "optimize", f"tiny:{v}", "--quantize", "int8-static", "--threads", "1")
    assert bad.exit_code == 2 and "expected an FP32 model to quantize" in " ".join(bad.stderr.split())


@pytest.mark.parametrize(
    "args,needle",
    [
        (("optimize", "tiny:99", "--quantize", "int8-static"), "no version 99"),
        (("optimize", "nope:1", "--quantize", "fp16"), "unknown model 'nope'"),
        (("optimize", "tiny:1", "--quantize", "int8-static", "--calibration", "0"), "calibration images for int8-static"),
        (("optimize", "foreign:1", "--prune", "0.5"), "no PyTorch weights"),
        (("optimize", "tiny:1", "--prune", "0.5", "--threads", "1"), "a smaller --round-to may"),
        (("optimize", "tiny:1", "--quantize", "fp16", "--engine", "nncf"), "--engine only with int8-static"),
        (("optimize", "tiny:1"), "at least one optimization"),
        (("optimize", "tiny:1", "--quantize", "int4"), "--quantize"),
        (("optimize", "tiny:1", "--quantize", "int8-static", "--engine", "ort", "--max-drop", "1"), "--max-drop"),
        (("optimize", "tiny:1", "--quantize", "fp16", "--finetune-epochs", "2"), "without --prune"),
        (("optimize", "tiny:1", "--quantize", "fp16", "--target", "mars"), "expected one of"),
        (("optimize", "tiny:1", "--quantize", "fp16", "--data", "/no/such/data"), "no dataset"),
        (("bench", "tiny:1", "--scenario", "batch"), "--scenario"),
        (("bench", "tiny:7"), "no version 7"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(home: Path, args: tuple[str, ...], needle: str) -> None:
    r = cli(home, *args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    # progress bars may come first on stderr; the error is one line starting with "error:"
    error = r.stderr[r.stderr.find("error:"):] if "error:" in r.stderr else ""
    assert error and (r.stderr.startswith("error:") or r.stderr[r.stderr.find("error:") - 1] == "\n")
    message = " ".join(error.split())  # rich wraps long lines
    assert needle in message and "Traceback" not in r.stderr


def test_bench_scenarios_side_by_side(home: Path, tmp_path: Path) -> None:
    png = tmp_path / "offline.png"
    doc = run_json(home, "bench", "tiny:1", "tiny:2", "--scenario", "offline", "--rounds", "2", "--threads", "1",
                   "--gemm-sizes", "64,128", "--plot", str(png), "--target", "x86-cpu")
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"tiny:1", "tiny:2"} and doc["rounds"] == 2 and doc["threads"] == 1
    assert rows["tiny:1"]["speedup"] is None and rows["tiny:2"]["speedup"]["rounds"] == 2
    assert rows["tiny:2"]["precision"] == "int8" and 0 < rows["tiny:2"]["efficiency"]
    assert set(doc["gemm_ceiling"]) == {"fp32", "int8"}
    assert rows["tiny:1"]["top1"] == pytest.approx(json.loads(
        (home / "registry" / "tiny" / "2" / "card.json").read_text())["metrics"]["parent_holdout_top1"])
    precision = {r["name"]: next(b for b in r["budgets"] if b["name"] == "precision") for r in doc["rows"]}
    assert precision["tiny:1"]["ok"] is False and precision["tiny:2"]["ok"] is True  # x86-cpu wants int8
    assert png.read_bytes()[:4] == b"\x89PNG"
    ss = run_json(home, "bench", "tiny:1", "tiny:2", "--scenario", "single-stream", "--rounds", "2",
                  "--queries", "10", "--threads", "1")
    assert all(r["p90_ms"] >= r["median"] > 0 for r in ss["rows"]) and ss["rows"][0]["unit"] == "ms"
    sv = run_json(home, "bench", "tiny:2", "--scenario", "server", "--rounds", "1", "--trial-seconds", "0.1",
                  "--p99-bound", "1000", "--threads", "1")
    assert sv["rows"][0]["median"] > 0 and sv["rows"][0]["unit"] == "QPS"
    text = cli(home, "bench", "tiny:1", "tiny:2", "--rounds", "1", "--threads", "1", "--no-ceiling", "--target", "x86-cpu")
    assert text.exit_code == 0 and "baseline" in text.stdout and "budget exceeded" in text.stderr


def test_docs_example_runs(tmp_path: Path) -> None:
    """docs/examples/optimize.py (included verbatim in docs/optimization.md) runs as written."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "VISIONFLEET_HOME": str(tmp_path / "home"), "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, str(repo / "docs" / "examples" / "optimize.py")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "example:2: top-1" in r.stdout and "['train', 'prune', 'finetune', 'export', 'quantize', 'convert']" in r.stdout
    assert "p95 latency (batch 1, 1 threads; the profile runs 4)" in r.stdout and "x the parent" in r.stdout
