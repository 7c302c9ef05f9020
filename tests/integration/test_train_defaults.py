"""`visionfleet train` with the adaptive defaults on a real dataset (LFW faces), from a state dict.

One real Ray Train run through the CLI: the settings are chosen from the data (32 px,
stride-1 stem, gray 1-channel model, left-right flips, batch 16, validation split with
early stopping), the run starts from a user's state dict (its head, for another class
count, is re-initialized), and the card and the HTML report carry the per-class accuracy
and the confusion matrix. The epoch budget is capped (--epochs 12, one worker) to keep
the test short; the full-budget proof against a Ray Tune search is tests/slow/test_train_defaults_real.py.
"""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch
from typer.testing import CliRunner

from visionfleet.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def lfw(settings) -> str:
    from visionfleet.datasets.builtin import import_builtin

    import_builtin("lfw-faces", settings.datasets_dir / "lfw-faces")
    return "lfw-faces"


def test_defaults_train_a_gray_face_model_from_a_state_dict(ray_session, settings, vf_home, lfw, tmp_path) -> None:
    from train.models import ArchSpec, build_model
    from visionfleet.datasets.store import load_arrays
    from visionfleet.inference import RuntimeOptions, load_model_dir
    from visionfleet.registry import Registry

    # a "pretrained" gray ResNet of the width the defaults pick, with a 5-class head
    weights = tmp_path / "pretrained.pt"
    torch.manual_seed(1)
    torch.save(build_model(ArchSpec(num_classes=5, width=16, stem_stride=1, in_channels=1)).state_dict(), weights)

    report = tmp_path / "model.html"
    r = runner.invoke(app, ["train", "--data", lfw, "--name", "faces", "--epochs", "12", "--workers", "1",
                            "--init-from", str(weights), "--no-wandb", "--report", str(report), "--json",
                            "--input-sizes", "48x48"],
                      env={"VISIONFLEET_HOME": str(vf_home), "COLUMNS": "200"}, catch_exceptions=False)
    assert r.exit_code == 0, r.output[-3000:]
    card = json.loads(r.stdout[r.stdout.index("{"):])
    m = card["metrics"]
    # the floor: old fixed defaults (batch 128 = one step an epoch, 64 px, all flips) stay near chance here
    assert m["holdout_top1"] >= 0.9, m
    assert set(m["per_class_top1"]) == {"face", "non-face"}
    cm = m["confusion_matrix"]
    assert cm["labels"] == ["face", "non-face"] and sum(map(sum, cm["matrix"])) == m["holdout_n"]
    assert sum(cm["matrix"][i][i] for i in range(2)) / m["holdout_n"] == pytest.approx(m["holdout_top1"])
    assert card["arch"]["in_channels"] == 1 and card["arch"]["stem_stride"] == 1
    step = card["lineage"]["steps"][0]
    chosen, why = step["training"]["chosen"], step["training"]["why"]
    assert chosen["flips"] == "horizontal" and chosen["grayscale"] is True and chosen["input_size"] == 32
    assert chosen["epochs"] == 12 and why["epochs"] == "given"
    assert why["width"] == "from pretrained.pt" and chosen["val_fraction"] == 0.15
    assert m["export_parity"]["top1_agreement"] == 1.0  # the gray model takes RGB input as luma in ONNX too

    # the registered ONNX model reproduces the held-out top-1 on plain RGB uint8 input
    x, y = load_arrays(settings.datasets_dir / lfw, "holdout", (32, 32))
    onnx = load_model_dir(Registry(settings.registry_dir).local_dir("faces", card["version"]), RuntimeOptions(threads=1))
    assert float((onnx.run(x)[0].argmax(1) == y).mean()) == pytest.approx(m["holdout_top1"])
    # --input-sizes: the trained size stays the default, the ONNX graph also runs at 48x48
    assert card["input_sizes"] == [[32, 32], [48, 48]]
    x48, _ = load_arrays(settings.datasets_dir / lfw, "holdout", (48, 48))
    assert onnx.run(x48)[0].shape == (len(x48), 2)

    page = report.read_text()
    assert 'alt="confusion matrix of faces:' in page and "from pretrained.pt" in page and "<td>non-face</td>" in page
    png = re.search(r'src="data:image/png;base64,([^"]+)" alt="confusion matrix', page).group(1)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"


def test_init_from_a_mismatched_state_dict_is_refused_before_training(ray_session, vf_home, lfw, tmp_path) -> None:
    weights = tmp_path / "other.pt"
    from train.models import ArchSpec, build_model

    torch.save(build_model(ArchSpec(num_classes=2, width=8)).state_dict(), weights)
    r = runner.invoke(app, ["train", "--data", lfw, "--width", "16", "--init-from", str(weights), "--no-wandb"],
                      env={"VISIONFLEET_HOME": str(vf_home), "COLUMNS": "300"})
    assert r.exit_code != 0
    text = " ".join(r.output.split())
    assert "Got a state dict in" in text and "shape mismatches stem.0.weight: got (8, 3, 3, 3), expected (16, 1, 3, 3)" in text
    assert "expected the state dict of the same architecture" in text


def test_bad_input_sizes_are_refused_before_training(ray_session, vf_home, lfw, tmp_path) -> None:
    env = {"VISIONFLEET_HOME": str(vf_home), "COLUMNS": "200"}
    r = runner.invoke(app, ["train", "--data", lfw, "--input-sizes", "48x48,48x48", "--no-wandb"], env=env)
    assert r.exit_code != 0 and "Got '48x48,48x48' for --input-sizes; expected distinct sizes" in r.output
    det = runner.invoke(app, ["data", "synth", "--task", "detection", "--name", "det-sizes", "--n-train", "4",
                              "--n-holdout", "2", "--size", "64"], env=env)
    assert det.exit_code == 0, det.output[-2000:]
    r = runner.invoke(app, ["train", "--data", "det-sizes", "--input-sizes", "64x64,96x96", "--no-wandb"], env=env)
    assert r.exit_code != 0 and "Got --input-sizes 64x64,96x96 for a detector; expected one size" in r.output
