"""Architectures, the contract-obeying ONNX export and its parity check (torch, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edge_export.onnx_export import ExportParityError, check_parity, Deployable, export_onnx, read_metadata
from train.loop import evaluate_arrays
from train.models import ArchSpec, build_model, count_params
from visionfleet.inference import RuntimeOptions, create_session


@pytest.mark.parametrize("arch", ["resnet", "mobilenetv3"])
@pytest.mark.parametrize("size", [32, 48, 96])
def test_architectures_any_input_size(arch: str, size: int) -> None:
    m = build_model(ArchSpec(arch=arch, num_classes=7, width=8)).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 3, size, size))
    assert y.shape == (2, 7)


def test_resnet18_shape_and_width_scaling() -> None:
    r18 = build_model(ArchSpec(arch="resnet", width=64, depths=(2, 2, 2, 2), stem_stride=1, num_classes=10))
    assert 11_000_000 < count_params(r18) < 11_300_000  # ResNet-18 has 11.2 M parameters at 10 classes
    small = build_model(ArchSpec(arch="mobilenetv3", width=16))
    assert count_params(small) < count_params(build_model(ArchSpec(arch="mobilenetv3", width=32)))


def test_arch_spec_validation() -> None:
    for bad in ({"arch": "vgg"}, {"num_classes": 1}, {"width": 2}, {"stem_stride": 3}, {"depths": (0, 1)}):
        with pytest.raises(ValueError):
            ArchSpec(**bad)
    spec = ArchSpec(arch="mobilenetv3", depths=(1, 2, 1, 1))
    assert ArchSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("arch", ["resnet", "mobilenetv3"])
def test_export_obeys_the_contract(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    core = build_model(ArchSpec(arch=arch, num_classes=4, width=8)).eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    path = tmp_path / "m.onnx"
    report = export_onnx(
        core,
        path,
        input_size=(40, 40),
        mean=[120.0, 110.0, 100.0],
        std=[60.0, 55.0, 50.0],
        metadata={"task": "classification", "labels": ["a", "b", "c", "d"], "resize": "letterbox"},
        parity_images=images,
    )
    assert report is not None and report.n == 6 and report.top1_agreement == 1.0 and report.max_abs_diff < 1e-4
    sess = create_session(path, RuntimeOptions(threads=1))
    inp = sess.get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [40, 40, 3] and isinstance(inp.shape[0], str)
    for batch in (1, 5):  # dynamic batch
        probs = sess.run(None, {inp.name: images[:batch]})[0]
        assert probs.shape == (batch, 4) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    meta = read_metadata(path)
    assert meta["task"] == "classification" and meta["resize"] == "letterbox"
    assert meta["input_layout"] == "NHWC" and meta["input_dtype"] == "uint8" and "normalization" in meta
    assert meta["labels"] == '["a", "b", "c", "d"]'
    onnx.checker.check_model(str(path))


def test_parity_check_catches_a_disagreeing_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    core = build_model(ArchSpec(num_classes=3, width=8)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(core, path, input_size=(32, 32), mean=[0, 0, 0], std=[1, 1, 1], metadata={})
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    # Same graph, different normalization in the reference: outputs must disagree.
    wrong = Deployable(core, [128.0] * 3, [64.0] * 3).eval()
    with pytest.raises(ExportParityError):
        check_parity(wrong, path, images)
    with pytest.raises(ValueError):
        check_parity(wrong, path, images.astype(np.float32))


def test_evaluate_arrays_and_results() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    m = evaluate_arrays(probs, labels, 2)
    assert m["top1"] == 0.75 and m["per_class"][0] == 1.0 and abs(m["per_class"][1] - 2 / 3) < 1e-9
    assert 0 <= m["ece"] <= 1
    from visionfleet.predict import classification_stats, predictions
    from visionfleet.spec import ModelCard

    card = ModelCard(name="abc", labels=["a", "b", "c"], input_size=(8, 8))
    (p,) = predictions(card, [np.array([[0.1, 0.7, 0.2]])], [None], top_k=2)
    r = p.response()
    assert r["label"] == "b" and list(r["probs"]) == ["b", "c"] and r["class_id"] == 1
    assert p.margin == pytest.approx(0.5) and p.row()["probs"] == [{"label": "b", "prob": 0.7}, {"label": "c", "prob": 0.2}]
    s = classification_stats(np.array([0.5, 0.3, 0.2]))
    assert abs(s["margin"] - 0.2) < 1e-9 and 0 < s["entropy"] < 1
    with pytest.raises(ValueError):
        predictions(card, [np.array([[0.5, 0.5]])], [None])


def test_warmup_cosine_schedule_is_defined_for_any_length() -> None:
    from train.loop import warmup_cosine

    for total in (1, 2, 4, 100):
        f = warmup_cosine(total)
        vals = [f(i) for i in range(total + 1)]
        assert all(0.0 <= v <= 1.0 for v in vals)
    f = warmup_cosine(100)
    assert f(0) < 0.1 and abs(f(20) - 1.0) < 1e-9 and f(100) < 1e-9
