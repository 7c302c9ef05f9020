"""Edge bundles: one per target, loaded back in ONNX Runtime (the .ort one too), golden outputs reproduced.

The model is a small real ONNX graph obeying the artifact contract (uint8 NHWC in,
normalization in the graph, probabilities out), built with ``onnx.helper`` so these
tests need no torch; the registry, dataset, quantizer, ORT-format converter and
ONNX Runtime are the real ones. Other edge unit tests import ``toy_registry`` from here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

SIZE = 16
LABELS = ["circle", "ring", "triangle", "square", "pentagon", "hexagon", "star", "cross", "stripes", "checker"]


def toy_onnx(path: Path, size: int = SIZE, seed: int = 0, classes: int = 10) -> Path:
    """Cast -> NHWC->NCHW -> normalize -> Conv -> Relu -> GlobalAveragePool -> Gemm -> Softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, (8,)).astype(np.float32)
    fc = rng.normal(0, 3.0, (classes, 8)).astype(np.float32)  # decisive logits: a stable top-1
    fcb = np.zeros((classes,), np.float32)
    inits = [
        numpy_helper.from_array(np.full((1, 3, 1, 1), 127.5, np.float32), "mean"),
        numpy_helper.from_array(np.full((1, 3, 1, 1), 1 / 64.0, np.float32), "inv_std"),
        numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(fcb, "fcb"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["nchw", "mean"], ["c"]),
        helper.make_node("Mul", ["c", "inv_std"], ["x"]),
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["h"]),
        helper.make_node("Gemm", ["h", "fc", "fcb"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    for i, n in enumerate(nodes):
        n.name = f"{n.op_type.lower()}_{i}"  # named, like exporters do (quantizers select nodes by name)
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    from edge_export.onnx_export import write_metadata

    write_metadata(model, {"task": "classification", "labels": LABELS[:classes], "resize": "stretch",
                           "input_size": [size, size], "input_layout": "NHWC", "input_dtype": "uint8"})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def toy_registry(root: Path, *, versions: int = 1, size: int = SIZE, n_train: int = 60):
    """A registry with ``toy:1..versions`` (different weights), its card pointing at a real dataset."""
    from visionfleet.datasets.store import synthesize
    from visionfleet.registry import Registry
    from visionfleet.spec import Lineage, ModelCard

    ds = root / "datasets" / "toyds"
    if not ds.exists():
        synthesize(ds, n_train=n_train, n_holdout=24, size=24, seed=1)
    reg = Registry(root / "registry")
    have = len(reg.versions("toy")) if "toy" in reg.list_models() else 0
    for v in range(have, versions):
        src = root / f"toy-src-{v}"
        src.mkdir(parents=True, exist_ok=True)
        card = ModelCard(name="toy", labels=LABELS, input_size=(size, size), lineage=Lineage(dataset=str(ds)),
                         framework="onnx")
        reg.register(card, {"onnx": toy_onnx(src / "model.onnx", size=size, seed=v)})
    return reg, ds


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("edgebundle")
    registry, ds = toy_registry(root)
    return registry, root


def _ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("target", ["x86-cpu", "arm64-cpu", "android", "ios", "jetson"])
def test_every_target_exports_a_bundle_that_reproduces_its_golden_outputs(reg, target: str) -> None:
    from edge_agent.bundle import health_check, read_manifest, verify_files
    from edge_export.bundle import export_bundle
    from visionfleet.targets import profile

    registry, root = reg
    path = export_bundle(registry, "toy:1", target, out_dir=root / "bundles", golden=8, calibration=40)
    m = verify_files(path, read_manifest(path))
    prof = profile(target)
    assert m.target == target and m.model == "toy" and m.version == 1 and m.bundle_id == path.name
    assert m.golden.samples == 8 and len(list((path / "golden").iterdir())) == 8
    assert m.checks["export_golden"]["ok"] and m.checks["export_golden"]["max_abs_diff"] <= 1e-3
    assert m.runtime.threads == prof.threads
    assert {"card.json", "golden.json", "preprocessing.json", m.model_file} <= set(m.files)
    card = json.loads((path / "card.json").read_text())
    assert card["model_file"] == m.model_file and card["precision"] == m.precision and card["version"] == 1
    if target in ("x86-cpu", "arm64-cpu"):
        assert m.model_file == "model.int8.onnx" and m.precision == "int8"
        assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(path / m.model_file)
    elif target in ("android", "ios"):
        assert m.model_file == "model.ort" and m.format == "ort"
        assert (path / m.model_file).read_bytes()[4:8] == b"ORTM"  # ORT flatbuffer, not an ONNX protobuf
        config = (path / "required_operators.config").read_text()
        assert "ai.onnx;" in config and "Conv" in config and "/tmp" not in config  # the reduced-operator build config
        assert m.precision == ("int8" if target == "android" else "fp16")
    else:
        assert m.model_file == "model.onnx" and m.runtime.tensorrt is not None
        trt = json.loads((path / "tensorrt.json").read_text())
        assert trt["trt_engine_cache_enable"] is True and trt["trt_fp16_enable"] is True
        assert trt["trt_profile_min_shapes"] == f"images:1x{SIZE}x{SIZE}x3"
    # The device's own check, with the device tolerance, on a fresh load.
    report = health_check(path, threads=1)
    assert report.ok, report.error
    assert report.golden.top1_agreement == 1.0


def test_a_refused_bundle_leaves_nothing_behind(reg, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_export.bundle as B
    from visionfleet.targets import TargetProfile, profile

    registry, root = reg
    out = root / "refused"
    real = B._run_onnx

    def off_by_a_lot(path, images):  # the expected outputs no longer match what the file computes
        outs, names = real(path, images)
        return [[o + 0.3 for o in per] for per in outs], names

    monkeypatch.setattr(B, "_run_onnx", off_by_a_lot)
    with pytest.raises(B.GoldenMismatch, match="golden outputs not reproduced"):
        B.export_bundle(registry, "toy:1", "x86-cpu", out_dir=out, golden=4, calibration=20)
    monkeypatch.setattr(B, "_run_onnx", real)
    small = TargetProfile(**{**profile("x86-cpu").__dict__, "max_model_mb": 0.0001})
    monkeypatch.setattr(B, "profile", lambda t: small)
    with pytest.raises(B.BudgetExceeded, match="exceeds the x86-cpu budget"):
        B.export_bundle(registry, "toy:1", "x86-cpu", out_dir=out, golden=4, calibration=20)
    assert [p for p in out.iterdir() if not p.name.startswith(".")] == [] and not any(out.iterdir())


def test_bad_requests_are_refused_clearly(reg) -> None:
    from edge_export.bundle import export_bundle
    from visionfleet.registry import NotFound

    registry, root = reg
    with pytest.raises(ValueError, match="target"):
        export_bundle(registry, "toy:1", "z80", out_dir=root / "b")
    with pytest.raises(NotFound):
        export_bundle(registry, "toy:9", "x86-cpu", out_dir=root / "b")
    with pytest.raises(ValueError, match="golden"):
        export_bundle(registry, "toy:1", "x86-cpu", out_dir=root / "b", golden=0)


def test_tampering_with_a_bundle_is_caught_by_the_device_check(reg, tmp_path: Path) -> None:
    from edge_agent.bundle import health_check
    from edge_export.bundle import export_bundle, pack_bundle

    registry, root = reg
    src = export_bundle(registry, "toy:1", "x86-cpu", out_dir=root / "bundles", golden=4, calibration=20)
    # Same folder, same archive bytes: republishing an unchanged bundle changes nothing.
    a, b = pack_bundle(src, tmp_path / "a.tar"), pack_bundle(src, tmp_path / "b.tar")
    assert a.read_bytes() == b.read_bytes()
    altered = tmp_path / "altered"
    shutil.copytree(src, altered)
    data = bytearray((altered / "model.int8.onnx").read_bytes())
    data[-10] ^= 0xFF
    (altered / "model.int8.onnx").write_bytes(bytes(data))
    report = health_check(altered)
    assert not report.ok and "does not match its manifest" in report.error
    wrong = tmp_path / "wrong-golden"
    shutil.copytree(src, wrong)
    doc = json.loads((wrong / "golden.json").read_text())
    doc["samples"][0]["outputs"]["probs"] = list(reversed(doc["samples"][0]["outputs"]["probs"]))
    (wrong / "golden.json").write_text(json.dumps(doc))
    from edge_agent.bundle import BundleFile, file_digest, read_manifest

    m = read_manifest(wrong)
    files = dict(m.files)
    d, n = file_digest(wrong / "golden.json")
    files["golden.json"] = BundleFile(sha256=d, bytes=n)
    (wrong / "bundle.json").write_text(m.model_copy(update={"files": files}).model_dump_json())
    report = health_check(wrong)
    assert not report.ok and "golden outputs not reproduced" in report.error
