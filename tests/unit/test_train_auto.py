"""Adaptive training defaults (train.auto), built-in real datasets, --init-from weights: no Ray here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from train.auto import flip_evidence, plan_training
from train.models import ArchSpec, build_model, infer_arch, load_init_weights
from visionfleet.datasets.builtin import import_builtin
from visionfleet.datasets.store import DatasetInfo, DatasetWriter, _write_manifest, load_arrays
from visionfleet.imaging import encode_image


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builtin")
    return {n: (import_builtin(n, root / n), root / n)[1] for n in ("lfw-faces", "digits")}


def _skewed(path: Path, counts=(60, 15), size=20, rgb=True) -> Path:
    """A dataset of random colour (or gray) images with skewed class counts."""
    rng = np.random.default_rng(0)
    with DatasetWriter(path, "train") as w:
        for c, n in enumerate(counts):
            for i in range(n):
                img = rng.integers(0, 255, (size, size, 3) if rgb else (size, size), dtype=np.uint8)
                w.write({"id": f"{c}-{i}", "image": encode_image(img), "label": c, "label_name": f"c{c}", "source": "t",
                         "width": size, "height": size, "format": "png", "meta": "{}"})
    _write_manifest(path, DatasetInfo(name=path.name, labels=[f"c{c}" for c in range(len(counts))],
                                      splits={"train": sum(counts)}, source="test"))
    return path


def test_builtin_datasets_are_real_and_split_stably(real, tmp_path) -> None:
    info = json.loads((real["lfw-faces"] / "manifest.json").read_text())
    assert info["labels"] == ["face", "non-face"] and sum(info["splits"].values()) == 200
    assert info["source"] == "builtin:lfw-faces" and info["params"]["package"] == "scikit-image"
    again = import_builtin("lfw-faces", tmp_path / "again")
    assert again.splits == info["splits"]  # the holdout split is a stable hash of the ids
    x, _ = load_arrays(real["lfw-faces"], "holdout", (25, 25))
    assert x.std() > 10 and (x[..., 0] == x[..., 2]).all()  # real grayscale pixels, not blank


def test_builtin_refusals(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Got 'mnist' for the built-in dataset; expected one of digits, elpv, lfw-faces"):
        import_builtin("mnist", tmp_path / "x")
    with pytest.raises(ValueError, match=r"Got 1.5 for holdout_fraction; expected 0 < f < 1"):
        import_builtin("digits", tmp_path / "y", holdout_fraction=1.5)


def test_plan_adapts_to_small_gray_faces(real) -> None:
    plan = plan_training(real["lfw-faces"])
    v = plan.values
    assert v["input_size"] == 32 and v["stem_stride"] == 1  # 25 px crops: no downsampling stem
    assert v["grayscale"] is True and v["balance"] is False
    assert v["flips"] == "horizontal"  # a mirrored face is a face; an upside-down one is not the same image
    assert v["batch_size"] < 128 and v["epochs"] > 12 and v["lr"] < 0.2  # small data: more, smaller steps
    assert v["val_fraction"] > 0 and v["patience"] >= 8
    assert set(plan.why) == set(v) and all(plan.why.values())


def test_plan_turns_flips_off_for_digits_and_keeps_given_settings(real) -> None:
    plan = plan_training(real["digits"], given={"epochs": 3, "width": 8})
    assert plan.values["flips"] == "off" and "left-right flip keeps only" in plan.why["flips"]
    assert plan.values["input_size"] == 16
    assert plan.values["epochs"] == 3 and plan.why["epochs"] == "given"
    assert plan.values["width"] == 8 and plan.why["width"] == "given"
    x, y = load_arrays(real["digits"], "train", (16, 16))
    ev = flip_evidence(x.mean(-1), y, 10)
    assert ev["skill"] > 0.5 and ev["horizontal"] < 0.6  # a mirrored 3 is not a 3


def test_plan_weights_skewed_classes_and_keeps_colour(tmp_path) -> None:
    plan = plan_training(_skewed(tmp_path / "skewed"))
    assert plan.values["balance"] is True and plan.data["imbalance_ratio"] == 4.0
    w = plan.data["class_weights"]
    assert w[1] > w[0] and abs(np.mean(w) - 1) < 1e-3
    assert plan.values["grayscale"] is False
    plan = plan_training(tmp_path / "skewed", given={"balance": False}, flips="off")
    assert plan.values["balance"] is False and plan.why["flips"] == "given"


def test_plan_refuses_an_unknown_flips_value(real) -> None:
    with pytest.raises(ValueError, match=r"Got 'sideways' for --flips; expected one of auto, off, horizontal, dihedral"):
        plan_training(real["digits"], flips="sideways")


def test_gray_model_takes_rgb_input_as_luma() -> None:
    model = build_model(ArchSpec(num_classes=3, width=8, in_channels=1)).eval()
    gray = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(gray), model(gray.repeat(1, 3, 1, 1)), atol=1e-5)
    assert model.stem[0].weight.shape[1] == 1
    with pytest.raises(ValueError, match=r"Got 2 for in_channels; expected 1 \(grayscale\) or 3 \(RGB\)"):
        ArchSpec(in_channels=2)


def test_init_weights_load_infer_and_refuse(tmp_path) -> None:
    src = build_model(ArchSpec(num_classes=7, width=8, depths=(1, 2, 1, 1), in_channels=1))
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    assert infer_arch(path) == {"arch": "resnet", "width": 8, "in_channels": 1, "depths": [1, 2, 1, 1]}

    # another class count: the body loads, the head stays new (and is named)
    dst = build_model(ArchSpec(num_classes=2, width=8, depths=(1, 2, 1, 1), in_channels=1))
    note = load_init_weights(dst, path)
    assert note["head_reinitialized"] == ["fc.weight", "fc.bias"]
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)

    wrong = build_model(ArchSpec(num_classes=7, width=16))
    with pytest.raises(ValueError) as exc:
        load_init_weights(wrong, path)
    msg = str(exc.value)
    assert msg.startswith(f"Got a state dict in {path} that does not fit the model (shape mismatches stem.0.weight: "
                          "got (8, 1, 3, 3), expected (16, 3, 3, 3)")
    assert "unexpected keys stages.4.conv1.weight" in msg and "; expected the state dict of the same architecture" in msg

    bad = tmp_path / "bad.pt"
    torch.save({"lr": torch.tensor(0.1), "note": "x"}, bad)
    with pytest.raises(ValueError, match=r"Got dict in .*bad.pt; expected a state dict \(a dict of tensors\)"):
        load_init_weights(wrong, bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"cannot read .*; expected a state dict saved with torch.save"):
        infer_arch(junk)


def test_train_config_refusals() -> None:
    from train.loop import TrainConfig

    with pytest.raises(ValueError, match=r"Got 'mirror' for flips; expected off, horizontal or dihedral"):
        TrainConfig(dataset="/x", flips="mirror")
    with pytest.raises(ValueError, match=r"Got 0.6 for val_fraction; expected 0 <= f < 0.5"):
        TrainConfig(dataset="/x", val_fraction=0.6)
    with pytest.raises(ValueError, match=r"Got 0 for patience; expected >= 1 or unset"):
        TrainConfig(dataset="/x", patience=0)


def test_import_folder_records_a_flips_setting_that_the_plan_follows(tmp_path) -> None:
    from typer.testing import CliRunner

    from visionfleet.cli import app

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "imgs" / c / f"{i}.png").write_bytes(encode_image(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)))
    runner = CliRunner()
    r = runner.invoke(app, ["data", "import-folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "ds"),
                            "--holdout-fraction", "0.0", "--flips", "off"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["params"]["flips"] == "off"
    plan = plan_training(tmp_path / "ds")
    assert plan.values["flips"] == "off" and plan.why["flips"] == "the dataset's manifest says flips=off"
    r = runner.invoke(app, ["data", "import-folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "ds2"), "--flips", "up"])
    assert r.exit_code != 0
    assert "Got 'up' for --flips; expected off, horizontal or dihedral" in " ".join(r.output.split())
