"""Quantization round trips on a tiny trained model: export -> quantize -> run -> close to FP32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_export.quantize import (
    CalibrationMissing,
    QuantizeConfig,
    QuantizeMode,
    calibration_images,
    quantize,
)

SIZE = (32, 32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A dataset, a tiny ResNet trained in-process for a few epochs, its FP32 ONNX file."""
    from edge_export.onnx_export import export_onnx
    from train.finetune import FinetuneConfig, train_in_process
    from visionfleet.datasets.store import load_arrays, synthesize

    root = tmp_path_factory.mktemp("quant")
    ds = root / "ds"
    synthesize(ds, n_train=400, n_holdout=120, size=32, seed=5)
    model, meta = train_in_process(
        {"arch": "resnet", "width": 8, "stem_stride": 2}, ds, input_size=32,
        config=FinetuneConfig(epochs=2, lr=0.05, batch_size=32, threads=1),
    )
    hx, hy = load_arrays(ds, "holdout", SIZE)
    path = root / "model.onnx"
    export_onnx(
        model, path, input_size=SIZE, mean=meta["mean"], std=meta["std"],
        metadata={"task": "classification", "labels": meta["labels"], "resize": "stretch"}, parity_images=hx[:16],
    )
    return {"ds": ds, "onnx": path, "hx": hx, "hy": hy, "root": root}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    from visionfleet.inference import RuntimeOptions, create_session

    s = create_session(path, RuntimeOptions(threads=1))
    return s.run(None, {"images": x})[0]


def _assert_close(ref: np.ndarray, got: np.ndarray, *, mean_abs: float, min_agreement: float) -> None:
    """Quantized probabilities stay close to FP32 on real holdout images.

    The tiny model is barely trained (seconds of CPU), so its probabilities are flat
    and a single top-1 can flip on a small error; a broken quantization (wrong scale,
    wrong zero point, swapped layout) gives errors of the size of the probabilities
    themselves and an agreement near chance (10 classes).
    """
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-3)  # still probabilities
    diff = float(np.abs(ref - got).mean())
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    print(f"mean |dp| {diff:.4f}, top-1 agreement {agree:.3f}")
    assert diff < mean_abs
    assert agree >= min_agreement


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_normalization_folds_into_an_exact_depthwise_conv(tiny, tmp_path: Path) -> None:
    from edge_export.quantize import fold_normalization

    proto = onnx.load(str(tiny["onnx"]))
    before = {n.op_type for n in proto.graph.node}
    assert {"Sub", "Div"} <= before
    assert fold_normalization(proto) is True
    after = [n for n in proto.graph.node]
    assert not {"Sub", "Div"} & {n.op_type for n in after}
    norm = next(n for n in after if n.name == "normalize")
    assert norm.op_type == "Conv" and next(a.i for a in norm.attribute if a.name == "group") == 3
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp_path / "folded.onnx"))
    np.testing.assert_allclose(_run(tmp_path / "folded.onnx", tiny["hx"]), _run(tiny["onnx"], tiny["hx"]), atol=1e-5)
    assert fold_normalization(proto) is False  # nothing left to fold


def test_calibration_images_are_real_dataset_images(tiny) -> None:
    from visionfleet.datasets.store import load_arrays

    calib = calibration_images(tiny["ds"], SIZE, "stretch", 50, seed=1)
    train_x, _ = load_arrays(tiny["ds"], "train", SIZE)
    flat = {x.tobytes() for x in train_x}
    assert calib.shape == (50, 32, 32, 3) and calib.dtype == np.uint8
    assert all(c.tobytes() in flat for c in calib)  # decoded from the dataset, not noise
    again = calibration_images(tiny["ds"], SIZE, "stretch", 50, seed=1)
    assert np.array_equal(calib, again)  # seeded: the same subset every time
    with pytest.raises(CalibrationMissing, match="expected at least 10000"):
        calibration_images(tiny["ds"], SIZE, "stretch", 10000)
    with pytest.raises(CalibrationMissing, match="no calibration data"):
        calibration_images(tiny["root"] / "nowhere", SIZE, "stretch", 10)


def test_nncf_int8_static_round_trip(tiny, tmp_path: Path) -> None:
    calib = calibration_images(tiny["ds"], SIZE, "stretch", 64)
    dst = tmp_path / "model.int8.onnx"
    report = quantize(tiny["onnx"], dst, QuantizeConfig(mode="int8-static", calibration=64), calib=calib)
    assert report.precision == "int8" and report.settings["engine"] == "nncf" and report.calibration_images == 64
    assert report.settings["normalization_as_conv"] is True
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(dst)
    meta = {p.key: p.value for p in onnx.load(str(dst)).metadata_props}
    assert json.loads(meta["labels"]) == json.loads(
        {p.key: p.value for p in onnx.load(str(tiny["onnx"])).metadata_props}["labels"]
    )
    assert meta["precision"] == "int8" and json.loads(meta["quantization"])["engine"] == "nncf"
    x = tiny["hx"]
    _assert_close(_run(tiny["onnx"], x), _run(dst, x), mean_abs=0.02, min_agreement=0.8)
    assert dst.stat().st_size < tiny["onnx"].stat().st_size / 2  # int8 weights


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_ort_static_qdq_per_channel_each_calibration_method(tiny, tmp_path: Path, method: str) -> None:
    calib = calibration_images(tiny["ds"], SIZE, "stretch", 32)
    dst = tmp_path / "q.onnx"
    cfg = QuantizeConfig(mode="int8-static", engine="ort", calibration=32, method=method, per_channel=True)
    report = quantize(tiny["onnx"], dst, cfg, calib=calib)
    assert report.settings == cfg.to_dict() | {"calibration": 32, "normalization_as_conv": True}
    assert "QuantizeLinear" in _ops(dst)
    # per-channel: a weight DequantizeLinear carries one scale per output channel
    m = onnx.load(str(dst))
    inits = {i.name: i for i in m.graph.initializer}
    scales = [inits[n.input[1]] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)
    _assert_close(_run(tiny["onnx"], tiny["hx"]), _run(dst, tiny["hx"]), mean_abs=0.02, min_agreement=0.8)


def test_ort_dynamic_and_fp16(tiny, tmp_path: Path) -> None:
    x = tiny["hx"]
    ref = _run(tiny["onnx"], x)
    dyn = tmp_path / "dyn.onnx"
    quantize(tiny["onnx"], dyn, QuantizeConfig(mode="int8-dynamic"))
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= _ops(dyn)
    _assert_close(ref, _run(dyn, x), mean_abs=0.02, min_agreement=0.8)
    half = tmp_path / "half.onnx"
    quantize(tiny["onnx"], half, QuantizeConfig(mode="fp16"))
    m = onnx.load(str(half))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8  # the contract's input kept
    _assert_close(ref, _run(half, x), mean_abs=0.002, min_agreement=0.95)


def test_nncf_accuracy_control_respects_max_drop(tiny, tmp_path: Path) -> None:
    from edge_export.quantize import labeled_images

    calib = calibration_images(tiny["ds"], SIZE, "stretch", 32)
    vx, vy = labeled_images(tiny["ds"], SIZE, "stretch", 96, split="train", offset=32)
    dst = tmp_path / "ac.onnx"
    cfg = QuantizeConfig(mode="int8-static", calibration=32, max_drop_pt=1.0)
    report = quantize(tiny["onnx"], dst, cfg, calib=calib, validation=(vx, vy))
    assert report.settings["max_drop_pt"] == 1.0 and report.accuracy_control is not None
    fp32 = float((_run(tiny["onnx"], vx).argmax(1) == vy).mean())
    int8 = float((_run(dst, vx).argmax(1) == vy).mean())
    ac = report.accuracy_control
    assert ac["validation_top1_fp32"] == pytest.approx(fp32) and ac["validation_top1_int8"] == pytest.approx(int8)
    assert (fp32 - int8) * 100 <= 1.0 + 1e-9
    assert ac["convs_left_fp32"] >= 0


def test_bad_quantization_arguments_are_clear_errors(tiny, tmp_path: Path) -> None:
    with pytest.raises(CalibrationMissing, match="calibration images for int8-static"):
        QuantizeConfig(mode="int8-static", calibration=0)
    with pytest.raises(CalibrationMissing, match="Got no calibration images"):
        quantize(tiny["onnx"], tmp_path / "x.onnx", QuantizeConfig(mode="int8-static"), calib=None)
    with pytest.raises(ValueError, match="--engine only with int8-static"):
        QuantizeConfig(mode="fp16", engine="nncf")
    with pytest.raises(ValueError, match="--calibration-method"):
        QuantizeConfig(mode="int8-static", engine="nncf", method="entropy")
    with pytest.raises(ValueError, match="--max-drop"):
        QuantizeConfig(mode="int8-static", engine="ort", max_drop_pt=1.0)
    with pytest.raises(ValueError, match="--per-channel"):
        QuantizeConfig(mode="fp16", per_channel=False)
    with pytest.raises(ValueError):
        QuantizeConfig(mode="int4")
    with pytest.raises(ValueError, match="expected a quantization mode"):
        quantize(tiny["onnx"], tmp_path / "x.onnx", QuantizeConfig(mode=QuantizeMode.NONE))


def test_config_dict_resolves_defaults_for_cache_keys() -> None:
    assert QuantizeConfig(mode="int8-static").to_dict() == {
        "mode": "int8-static", "engine": "nncf", "calibration": 300, "per_channel": True,
    }
    assert QuantizeConfig(mode="int8-static", engine="ort").to_dict()["method"] == "minmax"
    assert QuantizeConfig(mode="fp16").to_dict() == {"mode": "fp16"}
    # calibration count does not matter where there is no calibration
    assert QuantizeConfig(mode="int8-dynamic", calibration=5).to_dict() == QuantizeConfig(mode="int8-dynamic").to_dict()
