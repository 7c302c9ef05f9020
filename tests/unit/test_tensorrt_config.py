"""TensorRT configuration logic (runs everywhere) and GPU execution (skips without TensorRT/CUDA)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_export import tensorrt as trt
from edge_export.tensorrt import TensorRTUnavailable
from visionfleet.targets import TARGETS, ModelFormat, Precision, Target

REPO = Path(__file__).resolve().parents[2]
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
MISSING = trt.Availability(tensorrt=None, torch_tensorrt=None, cuda_devices=(), ort_providers=("CPUExecutionProvider",),
                           jetson=False)
GPU_BOX = trt.Availability(tensorrt="10.9.0", torch_tensorrt="2.7.0", cuda_devices=("NVIDIA H100",),
                           ort_providers=tuple(ALL), jetson=False)
HERE = trt.detect()


def test_provider_options_fp16_with_cache_and_batch_profile(tmp_path: Path) -> None:
    opts = trt.ort_tensorrt_provider_options(
        "fp16", tmp_path / "cache", input_size=(224, 160), min_batch=1, opt_batch=8, max_batch=32,
        workspace_bytes=1 << 30,
    )
    assert opts["trt_fp16_enable"] is True and opts["trt_int8_enable"] is False
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert opts["trt_timing_cache_enable"] is True and opts["trt_timing_cache_path"] == str(tmp_path / "cache")
    assert opts["trt_max_workspace_size"] == 1 << 30
    # The contract input is uint8 NHWC: [batch, height, width, 3].
    assert opts["trt_profile_min_shapes"] == "images:1x224x160x3"
    assert opts["trt_profile_opt_shapes"] == "images:8x224x160x3"
    assert opts["trt_profile_max_shapes"] == "images:32x224x160x3"
    assert "trt_int8_calibration_table_name" not in opts


def test_provider_options_fp32_and_int8() -> None:
    fp32 = trt.ort_tensorrt_provider_options(Precision.FP32, "/c")
    assert fp32["trt_fp16_enable"] is False and fp32["trt_int8_enable"] is False
    assert "trt_profile_min_shapes" not in fp32  # no size: ORT derives profiles from the inputs it sees
    qdq = trt.ort_tensorrt_provider_options("int8", "/c", qdq=True)
    assert qdq["trt_int8_enable"] is True and qdq["trt_fp16_enable"] is True
    table = trt.ort_tensorrt_provider_options("int8", "/c", calibration_table="calib.flatbuffers")
    assert table["trt_int8_calibration_table_name"] == "calib.flatbuffers"
    assert table["trt_int8_use_native_calibration_table"] is False


@pytest.mark.parametrize(
    "args,kw,needle",
    [
        (("int8", "/c"), {}, "without INT8 scales"),
        (("int8", "/c"), {"qdq": True, "calibration_table": "t"}, "one or the other"),
        (("fp16", "/c"), {"qdq": True}, "expected int8"),
        (("fp16", "/c"), {"min_batch": 4, "opt_batch": 2}, "1 <= min <= opt <= max"),
        (("fp16", "/c"), {"workspace_bytes": 1024}, "at least 16 MiB"),
        (("fp16", "/c"), {"builder_optimization_level": 9}, "0..5"),
        (("bf16", "/c"), {}, "bf16"),
    ],
)
def test_provider_options_refuse_impossible_combinations(args: tuple, kw: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        trt.ort_tensorrt_provider_options(*args, **kw)


def test_provider_order_prefers_tensorrt_then_cuda_then_cpu(tmp_path: Path) -> None:
    opts = trt.gpu_runtime_options("fp16", tmp_path, threads=2, available=list(reversed(ALL)), input_size=(64, 64))
    assert opts.providers == tuple(ALL) and opts.threads == 2
    assert opts.provider_options["TensorrtExecutionProvider"]["trt_fp16_enable"] is True
    assert opts.provider_options["CUDAExecutionProvider"]["device_id"] == 0
    cuda_only = trt.gpu_runtime_options("fp16", tmp_path, available=["CPUExecutionProvider", "CUDAExecutionProvider"])
    assert cuda_only.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert "TensorrtExecutionProvider" not in cuda_only.provider_options
    cpu = trt.gpu_runtime_options("fp16", tmp_path, available=["AzureExecutionProvider", "CPUExecutionProvider"])
    assert cpu.providers == ("CPUExecutionProvider",) and cpu.provider_options == {}


def test_runtime_options_from_gpu_config_still_open_a_session_on_this_machine(tmp_path: Path) -> None:
    """On a CPU box the same call yields a working CPU session (the serve-time fallback)."""
    from visionfleet.inference import create_session

    model = _tiny_contract_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    sess = create_session(path, trt.gpu_runtime_options("fp16", tmp_path, available=HERE.ort_providers))
    out = sess.run(None, {"images": np.zeros((2, 8, 8, 3), np.uint8)})[0]
    assert out.shape == (2, 2)


@pytest.mark.parametrize(
    "major,precision,qdq,fp16w,calib,strongly,flags,calibrate",
    [
        (10, "fp32", False, False, False, False, (), False),
        (10, "fp16", False, False, False, False, ("FP16",), False),
        (10, "fp16", False, True, False, True, (), False),  # FP16 ONNX: strongly typed
        (8, "fp16", False, True, False, False, ("FP16",), False),  # TensorRT 8 has no strong typing
        (10, "int8", True, False, False, False, ("INT8", "FP16"), False),  # explicit quantization
        (10, "int8", False, False, True, False, ("INT8", "FP16"), True),  # calibrator on real images
        (11, "fp16", False, True, False, True, (), False),
        (11, "int8", True, False, False, True, (), False),
        (11, "fp32", False, False, False, True, (), False),
    ],
)
def test_engine_build_plan_per_tensorrt_version(
    major, precision, qdq, fp16w, calib, strongly, flags, calibrate
) -> None:
    plan = trt.engine_build_plan(major, precision, qdq=qdq, fp16_weights=fp16w, calibration=calib)
    assert (plan.strongly_typed, plan.flags, plan.calibrate) == (strongly, flags, calibrate)
    assert plan.explicit_batch_flag == (major < 10)


@pytest.mark.parametrize(
    "major,precision,qdq,fp16w,calib,needle",
    [
        (11, "fp16", False, False, False, "no FP16 builder flag"),
        (11, "int8", False, False, True, "no calibrator"),  # calibration images cannot help on 11+
        (11, "int8", False, False, False, "no calibrator"),
        (10, "int8", False, False, False, "--calibration N"),
        (10, "int8", True, False, True, "its scales are in the graph"),
        (10, "fp16", False, False, True, "calibration images for precision fp16"),
        (10, "fp32", True, False, False, "expected --precision int8"),
        (7, "fp16", False, False, False, "8.6 or newer"),
    ],
)
def test_engine_build_plan_refuses_with_what_to_do(major, precision, qdq, fp16w, calib, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        trt.engine_build_plan(major, precision, qdq=qdq, fp16_weights=fp16w, calibration=calib)


def test_engine_targets_are_the_plan_profiles_of_the_one_target_table() -> None:
    plan = {t for t, p in TARGETS.items() if p.format is ModelFormat.PLAN}
    assert set(trt.ENGINE_TARGETS) == plan == {Target.X86_GPU, Target.JETSON}
    for target in trt.ENGINE_TARGETS:
        spec = trt.engine_profile(target)
        assert spec is TARGETS[target].engine
        assert 1 <= spec.min_batch <= spec.opt_batch <= spec.max_batch and spec.workspace_bytes >= 1 << 24
    assert trt.engine_profile("jetson").on_jetson and not trt.engine_profile("x86-gpu").on_jetson
    for bad in ("x86-cpu", "mars"):
        with pytest.raises(ValueError, match=f"Got '{bad}' for --target; expected one of jetson, x86-gpu"):
            trt.engine_profile(bad)


def test_the_tensorrt_package_has_no_precision_or_target_table_of_its_own() -> None:
    assert not {"Precision", "EngineTarget", "TargetSpec", "TARGETS"} & set(vars(trt))


def test_availability_names_what_is_missing() -> None:
    msg = MISSING.problem()
    assert "TensorRT is not installed" in msg and "no CUDA device" in msg and "docs/gpu.md" in msg
    assert "torch-tensorrt is not installed" in MISSING.problem(need="torch-tensorrt")
    assert "TensorrtExecutionProvider" in MISSING.problem(need="ort-tensorrt")
    assert GPU_BOX.problem() is None and GPU_BOX.problem(need="ort-tensorrt") is None
    no_gpu = trt.Availability("10.9.0", None, (), tuple(ALL), False)
    assert no_gpu.problem() == f"no CUDA device (no NVIDIA driver or GPU visible); {trt.INSTALL_HINT}"
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        trt.require_tensorrt(availability=MISSING)
    assert trt.require_tensorrt(availability=GPU_BOX) is GPU_BOX
    assert json.loads(json.dumps(MISSING.to_dict()))["tensorrt_builder_ready"] is False


def test_detection_does_not_import_heavy_modules() -> None:
    code = (
        "import sys, edge_export.tensorrt as t; a = t.detect(); "
        "print(sorted(m for m in ('tensorrt', 'torch', 'torch_tensorrt') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


needs_trt = pytest.mark.skipif(HERE.problem() is not None, reason=f"needs TensorRT and CUDA: {HERE.problem()}")
needs_no_trt = pytest.mark.skipif(HERE.problem() is None, reason="TensorRT and CUDA are present here")


@needs_no_trt
def test_gpu_entry_points_raise_a_clear_error_without_tensorrt(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_tiny_contract_model(), str(path))
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed|no CUDA device"):
        trt.build_engine(path, tmp_path / "m.plan", "fp16", input_size=(8, 8))
    assert not (tmp_path / "m.plan").exists()
    with pytest.raises(TensorRTUnavailable):
        trt.run_engine(b"not an engine", np.zeros((1, 8, 8, 3), np.uint8))
    if "TensorrtExecutionProvider" not in HERE.ort_providers or not HERE.cuda_devices:
        with pytest.raises(TensorRTUnavailable, match="TensorrtExecutionProvider|no CUDA device"):
            trt.create_gpu_session(path, "fp16", tmp_path / "cache")
    torch = pytest.importorskip("torch")
    with pytest.raises(TensorRTUnavailable):
        trt.compile_torch(torch.nn.Identity(), torch.zeros(1, 3, 8, 8), "fp16")


def test_compile_torch_refuses_int8_before_anything_else() -> None:
    with pytest.raises(ValueError, match="ModelOpt"):
        trt.compile_torch(object(), np.zeros((1, 3, 8, 8)), "int8", availability=MISSING)


def test_build_validates_options_before_looking_for_tensorrt(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_tiny_contract_model(), str(path))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        trt.build_engine(path, tmp_path / "m.plan", "fp16", input_size=(8, 8), min_batch=8, opt_batch=1)
    with pytest.raises(ValueError, match="calibration images"):
        trt.build_engine(path, tmp_path / "m.plan", "int8", input_size=(8, 8),
                         calibration_images=np.zeros((4, 9, 9, 3), np.uint8))
    assert trt.onnx_traits(path) == {"qdq": False, "fp16_weights": False, "input_name": "images"}


def test_engine_parity_compares_like_for_like() -> None:
    p = np.array([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
    q = np.array([[0.69, 0.31], [0.55, 0.45], [0.5, 0.5]])
    r = trt.engine_parity("classification", {"probs": p}, {"probs": q})
    assert r["n"] == 3 and r["agreement"] == pytest.approx(2 / 3) and r["max_abs_diff"] == pytest.approx(0.15)
    s = np.array([[0.9, 0.5, 0.0], [0.0, 0.0, 0.0]])
    c = np.array([[1, 0, -1], [-1, -1, -1]])
    d = trt.engine_parity("detection", {"scores": s, "classes": c}, {"scores": s * 0.99, "classes": c})
    assert d["agreement"] == 1.0 and d["max_abs_diff"] == pytest.approx(0.009)
    c2 = c.copy()
    c2[0, 0] = 0
    assert trt.engine_parity("detection", {"scores": s, "classes": c2}, {"scores": s, "classes": c})["agreement"] == 0.5


def test_a_plan_version_loads_its_source_onnx_in_onnx_runtime(tmp_path: Path) -> None:
    """ONNX Runtime cannot read an engine; a plan version's card points at its source ONNX."""
    from visionfleet.inference import load_model_dir
    from visionfleet.spec import FileEntry, ModelCard

    folder = tmp_path / "v"
    folder.mkdir()
    onnx.save(_tiny_contract_model(), str(folder / "model.onnx"))
    (folder / "model.plan").write_bytes(b"engine bytes are only ever produced by build_engine")
    files = [FileEntry(name="model.plan", role="plan", bytes=0, sha256="0" * 64),
             FileEntry(name="model.onnx", role="onnx", bytes=0, sha256="0" * 64)]
    card = ModelCard(name="m", version=2, labels=["a", "b"], input_size=(8, 8), model_file="model.plan",
                     format="plan", precision="fp16", files=files)
    (folder / "card.json").write_text(card.model_dump_json())
    loaded = load_model_dir(folder)
    assert loaded.run(np.zeros((1, 8, 8, 3), np.uint8))[0].shape == (1, 2)
    card2 = card.model_copy(update={"files": files[:1]})
    (folder / "card.json").write_text(card2.model_dump_json())
    with pytest.raises(FileNotFoundError, match="without its source ONNX"):
        load_model_dir(folder)


def test_gpu_docs_example_runs() -> None:
    r = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "gpu_providers.py")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trt_fp16_enable" in r.stdout and "providers in order:" in r.stdout


# ----------------------------------------------------------------------------- GPU execution


@pytest.mark.gpu
@needs_trt
def test_build_engine_fp16_and_run_it_against_onnx_runtime(tmp_path: Path) -> None:
    from visionfleet.inference import RuntimeOptions, create_session

    path = tmp_path / "m.onnx"
    onnx.save(_tiny_contract_model(), str(path))
    report = trt.build_engine(path, tmp_path / "m.plan", "fp16", input_size=(8, 8), min_batch=1, opt_batch=4,
                              max_batch=8)
    assert report.bytes > 0 and Path(report.plan_path).exists()
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    got = trt.run_engine(tmp_path / "m.plan", images)["probs"]
    ref = create_session(path, RuntimeOptions(providers=("CPUExecutionProvider",))).run(None, {"images": images})[0]
    np.testing.assert_allclose(got, ref, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(HERE.problem(need="ort-tensorrt") is not None,
                    reason=f"needs the ORT TensorRT EP and CUDA: {HERE.problem(need='ort-tensorrt')}")
def test_ort_tensorrt_session_matches_cpu(tmp_path: Path) -> None:
    from visionfleet.inference import RuntimeOptions, create_session

    path = tmp_path / "m.onnx"
    onnx.save(_tiny_contract_model(), str(path))
    sess = trt.create_gpu_session(path, "fp16", tmp_path / "cache", input_size=(8, 8), max_batch=8)
    assert sess.get_providers()[0] == "TensorrtExecutionProvider"
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    ref = create_session(path, RuntimeOptions(providers=("CPUExecutionProvider",))).run(None, {"images": images})[0]
    np.testing.assert_allclose(sess.run(None, {"images": images})[0], ref, atol=2e-2)
    assert any((tmp_path / "cache").iterdir())  # the engine cache was written


@pytest.mark.gpu
@pytest.mark.skipif(HERE.problem(need="torch-tensorrt") is not None,
                    reason=f"needs torch-tensorrt and CUDA: {HERE.problem(need='torch-tensorrt')}")
def test_compile_torch_fp16_matches_eager() -> None:
    torch = pytest.importorskip("torch")
    from train.models import ArchSpec, build_model

    model = build_model(ArchSpec(arch="resnet", num_classes=3, width=8)).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).softmax(1)
    compiled = trt.compile_torch(model, x, "fp16", max_batch=8)
    with torch.no_grad():
        got = compiled(x.cuda()).float().softmax(1).cpu()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.75
    assert torch.allclose(got, ref, atol=5e-2)


def _tiny_contract_model() -> onnx.ModelProto:
    """uint8 NHWC images [N, 8, 8, 3] -> probs [N, 2], written by hand."""
    w = np.array([[0.02, -0.01], [0.0, 0.01], [-0.01, 0.02]], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model
