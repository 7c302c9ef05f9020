"""Import of foreign ONNX models and PyTorch checkpoints: wrapping, parity, cards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_export import importer as imp
from train.checkpoint_import import import_checkpoint, import_model
from visionfleet.imaging import resize_image
from visionfleet.inference import RuntimeOptions, create_session, load_model_dir
from visionfleet.predict import predictions
from visionfleet.registry import Registry
from visionfleet.spec import Task

REPO = Path(__file__).resolve().parents[2]
CPU = RuntimeOptions(threads=1, providers=("CPUExecutionProvider",))
# A Caffe/OpenCV-style model: BGR, NCHW float, ImageNet statistics in B, G, R order.
MEAN_BGR = (0.406, 0.456, 0.485)
STD_BGR = (0.225, 0.224, 0.229)


def foreign_classifier(
    *,
    in_name: str = "input.1",
    out_name: str = "logits",
    batch: int | str = "n",
    dtype: int = TensorProto.FLOAT,
    layout: str = "NCHW",
    classes: int = 5,
    size: tuple[int, int] = (24, 32),
    opset: int = 13,
    seed: int = 1,
) -> onnx.ModelProto:
    """Conv -> ReLU -> GAP -> Gemm: a tiny classifier returning logits, written by hand."""
    rng = np.random.default_rng(seed)
    h, w = size
    npdt = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    conv = rng.normal(0, 0.6, (8, 3, 3, 3)).astype(npdt)
    fc = rng.normal(0, 0.8, (classes, 8)).astype(npdt)
    bias = rng.normal(0, 0.1, (classes,)).astype(npdt)
    nodes, x = [], in_name
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [
        helper.make_node("Conv", [x, "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], [out_name], transB=1),
    ]
    shape = [batch, 3, h, w] if layout == "NCHW" else [batch, h, w, 3]
    graph = helper.make_graph(
        nodes,
        "foreign",
        [helper.make_tensor_value_info(in_name, dtype, shape)],
        [helper.make_tensor_value_info(out_name, dtype, [batch, classes])],
        initializer=[
            numpy_helper.from_array(conv, "conv_w"),
            numpy_helper.from_array(fc, "fc_w"),
            numpy_helper.from_array(bias, "fc_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="hand")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def bgr_spec(**kw) -> imp.ImportSpec:
    pre = imp.Preprocessing(
        layout=kw.pop("layout", imp.Layout.NCHW),
        dtype=kw.pop("dtype", imp.InputDType.FLOAT32),
        channel_order=kw.pop("channel_order", imp.ChannelOrder.BGR),
        mean=MEAN_BGR,
        std=STD_BGR,
        scale=imp.PixelScale.UNIT,
    )
    return imp.ImportSpec(
        task=Task.CLASSIFICATION,
        labels=tuple("abcde"),
        input_size=(24, 32),
        preprocessing=pre,
        output=imp.OutputKind.LOGITS,
        framework="caffe",
        **kw,
    )


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return imp.sample_images((24, 32), "letterbox", n=12)


def by_hand(model: onnx.ModelProto, images: np.ndarray, in_name: str = "input.1", batch1: bool = False) -> np.ndarray:
    """The declared preprocessing written out independently of the importer, then softmax."""
    x = images[..., ::-1].astype(np.float32) / 255.0  # RGB -> BGR, 0..1
    x = (x - np.array(MEAN_BGR, np.float32)) / np.array(STD_BGR, np.float32)
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16:
        x = x.astype(np.float16)
    sess = create_session(model.SerializeToString(), CPU)
    if batch1:
        logits = np.concatenate([sess.run(None, {in_name: x[i : i + 1]})[0] for i in range(len(x))])
    else:
        logits = sess.run(None, {in_name: x})[0]
    logits = logits.astype(np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def run_wrapped(wrapped: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    return create_session(wrapped.SerializeToString(), CPU).run(["probs"], {"images": images})[0]


def test_contract_names_match_the_exporter() -> None:
    from edge_export import onnx_export

    assert (imp.INPUT_NAME, imp.OUTPUT_NAME) == (onnx_export.INPUT_NAME, onnx_export.OUTPUT_NAME)


def test_foreign_bgr_nchw_logits_model_gives_the_same_predictions_as_by_hand(images: np.ndarray) -> None:
    model = foreign_classifier()
    wrapped, info = imp.wrap_onnx(model, bgr_spec())
    got = run_wrapped(wrapped, images)
    want = by_hand(model, images)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert info.original_input == "input.1" and info.original_output == "logits" and not info.renamed
    # The declared channel order matters: the same model imported as RGB predicts differently.
    rgb, _ = imp.wrap_onnx(model, bgr_spec(channel_order=imp.ChannelOrder.RGB))
    assert np.abs(run_wrapped(rgb, images) - want).max() > 1e-3


def test_wrapped_model_obeys_the_uint8_nhwc_contract_with_a_dynamic_batch(images: np.ndarray) -> None:
    wrapped, _ = imp.wrap_onnx(foreign_classifier(), bgr_spec())
    sess = create_session(wrapped.SerializeToString(), CPU)
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [24, 32, 3]
    assert out.name == "probs" and out.type == "tensor(float)" and out.shape[1] == 5
    singles = np.concatenate([sess.run(None, {"images": images[i : i + 1]})[0] for i in range(len(images))])
    for n in (1, 5, len(images)):
        np.testing.assert_allclose(sess.run(None, {"images": images[:n]})[0], singles[:n], atol=1e-6)
    with pytest.raises(Exception):
        sess.run(None, {"images": images.astype(np.float32)})  # float input refused: uint8 only


def test_the_original_graph_is_kept_node_for_node() -> None:
    model = foreign_classifier()
    wrapped, _ = imp.wrap_onnx(model, bgr_spec())
    kept = [n for n in wrapped.graph.node if not n.name.startswith("vf_")]
    assert [n.SerializeToString() for n in kept] == [n.SerializeToString() for n in model.graph.node]
    inits = {t.name: t.SerializeToString() for t in wrapped.graph.initializer}
    for t in model.graph.initializer:
        assert inits[t.name] == t.SerializeToString()
    assert wrapped.opset_import == model.opset_import


@pytest.mark.parametrize(
    "variant",
    [
        {"layout": "NHWC"},
        {"dtype": TensorProto.FLOAT16},
        {"opset": 11},
        {"opset": 18},
        {"in_name": "images", "out_name": "probs"},  # collides with the contract names
    ],
    ids=["nhwc", "fp16", "opset11", "opset18", "name-collision"],
)
def test_variants_match_their_declared_preprocessing(variant: dict, images: np.ndarray) -> None:
    model = foreign_classifier(**variant)
    kw = {}
    if variant.get("layout") == "NHWC":
        kw["layout"] = imp.Layout.NHWC
    if variant.get("dtype") == TensorProto.FLOAT16:
        kw["dtype"] = imp.InputDType.FLOAT16
    spec = bgr_spec(**kw)
    wrapped, info = imp.wrap_onnx(model, spec)
    original = create_session(model.SerializeToString(), CPU)
    report = imp.check_import_parity(original, create_session(wrapped.SerializeToString(), CPU), spec, info, images)
    assert report.agreement == 1.0 and report.n == len(images)
    assert info.renamed == ("in_name" in variant)
    if "in_name" not in variant and variant.get("layout") != "NHWC":
        tol = 3e-3 if "dtype" in variant else 1e-5
        np.testing.assert_allclose(run_wrapped(wrapped, images), by_hand(model, images), atol=tol)


def test_a_batch_of_one_is_made_dynamic_and_proven_by_parity(images: np.ndarray) -> None:
    model = foreign_classifier(batch=1)
    spec = bgr_spec()
    wrapped, info = imp.wrap_onnx(model, spec)
    assert info.batch_relaxed
    np.testing.assert_allclose(run_wrapped(wrapped, images), by_hand(model, images, batch1=True), atol=1e-5)
    original = create_session(model.SerializeToString(), CPU)
    report = imp.check_import_parity(original, create_session(wrapped.SerializeToString(), CPU), spec, info, images)
    assert report.agreement == 1.0


def test_a_batch_of_one_that_cannot_grow_is_refused_clearly(images: np.ndarray) -> None:
    model = foreign_classifier(batch=1)
    # Replace Flatten by a Reshape hard-coded to batch 1, as some exporters write it.
    flat = next(n for n in model.graph.node if n.op_type == "Flatten")
    flat.CopyFrom(helper.make_node("Reshape", ["p", "fixed_shape"], ["f"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 8], np.int64), "fixed_shape"))
    spec = bgr_spec()
    wrapped, info = imp.wrap_onnx(model, spec)
    original = create_session(model.SerializeToString(), CPU)
    with pytest.raises(ValueError, match="fixed batch of 1"):
        imp.check_import_parity(original, create_session(wrapped.SerializeToString(), CPU), spec, info, images)


def _two_inputs() -> onnx.ModelProto:
    m = foreign_classifier()
    m.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["n", 1]))
    return m


@pytest.mark.parametrize(
    "model,spec_kw,needle",
    [
        (lambda: foreign_classifier(), {"dtype": imp.InputDType.FLOAT16}, "--input-dtype float16"),
        (lambda: foreign_classifier(), {"layout": imp.Layout.NHWC}, "it looks NCHW"),
        (lambda: foreign_classifier(size=(32, 32)), {}, "--input-size 24x32"),
        (lambda: foreign_classifier(classes=3), {}, "expected [N, 5] for 5 labels"),
        (lambda: foreign_classifier(batch=4), {}, "fixed batch of 4"),
        (lambda: foreign_classifier(opset=9), {}, "opset 9; expected >= 11"),
        (_two_inputs, {}, "expected one, or name it with --input-name"),
        (_two_inputs, {"input_name": "nope"}, "Got 'nope' for --input-name"),
        (_two_inputs, {"input_name": "input.1"}, "further inputs ['extra']"),
    ],
)
def test_declarations_that_do_not_fit_the_graph_are_refused(model, spec_kw: dict, needle: str) -> None:
    with pytest.raises(ValueError) as exc:
        imp.wrap_onnx(model(), bgr_spec(**spec_kw))
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"dtype": imp.InputDType.UINT8, "mean": (0.5, 0.5, 0.5)}, "a uint8 input takes raw pixels"),
        ({"mean": (123.7, 116.3, 103.5)}, "pass --scale 0-255"),
        ({"std": (0.2, 0.0, 0.2)}, "expected 3 positive numbers"),
        ({"mean": (0.1, 0.2)}, "expected 3 finite numbers"),
    ],
)
def test_preprocessing_validation(kw: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        imp.Preprocessing(**kw)
    # The 0-255 scale is accepted when said so, and applies without dividing by 255.
    pre = imp.Preprocessing(mean=(100.0, 100.0, 100.0), std=(50.0, 50.0, 50.0), scale=imp.PixelScale.BYTE)
    x = pre.apply(np.full((1, 2, 2, 3), 150, np.uint8))
    assert x.shape == (1, 3, 2, 2) and np.allclose(x, 1.0)


def test_import_request_errors_are_one_clear_line() -> None:
    base = {"task": "classification", "labels": ["a", "b"], "input_size": (24, 32)}
    with pytest.raises(ValueError, match=r"Got 'NCWH' for --layout; expected 'NCHW' or 'NHWC'"):
        imp.ImportRequest.parse(**base, layout="NCWH")
    with pytest.raises(ValueError, match=r"--extra"):
        imp.ImportRequest.parse(**base, extra=1)
    with pytest.raises(ValueError, match="max detections"):
        imp.ImportRequest.parse(**{**base, "task": "detection"}, max_detections=0).to_spec()
    with pytest.raises(ValueError, match="--outputs-are logits for a detection model"):
        imp.ImportRequest.parse(**{**base, "task": "detection"}, output="logits").to_spec()
    spec = imp.ImportRequest.parse(**base, channel_order="BGR", scale="0-255", mean=(1, 2, 3)).to_spec()
    assert spec.preprocessing.channel_order is imp.ChannelOrder.BGR and spec.preprocessing.mean == (1.0, 2.0, 3.0)


def test_parse_labels(tmp_path: Path) -> None:
    f = tmp_path / "labels.txt"
    f.write_text("cat\ndog\n\nbird\n")
    assert imp.parse_labels(str(f)) == ["cat", "dog", "bird"]
    assert imp.parse_labels("a, b,c") == ["a", "b", "c"]
    with pytest.raises(FileNotFoundError):
        imp.parse_labels(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unique"):
        imp.parse_labels("a,a")
    with pytest.raises(ValueError, match="unique"):
        imp.parse_labels("a,,b")


def test_import_onnx_registers_a_self_describing_version(tmp_path: Path) -> None:
    src = tmp_path / "src" / "foreign.onnx"
    src.parent.mkdir()
    onnx.save(foreign_classifier(), str(src))
    reg = Registry(tmp_path / "registry")
    card = imp.import_onnx(src, reg, "foreign", bgr_spec(resize=imp.ResizeMode.LETTERBOX))
    assert card.ref == "foreign:1" and card.task is Task.CLASSIFICATION
    assert card.framework == "caffe" and card.format == "onnx" and card.precision == "fp32"
    assert card.preprocessing["channel_order"] == "BGR" and card.preprocessing["mean"] == list(MEAN_BGR)
    assert card.preprocessing["scale"] == "0-1" and card.preprocessing["input_name"] == "input.1"
    (step,) = card.lineage.steps
    assert step["op"] == "import" and step["source"] == "foreign.onnx" and len(step["sha256"]) == 64
    assert card.metrics["import_parity"]["agreement"] == 1.0 and card.metrics["import_parity"]["n"] >= 10
    folder = reg.local_dir("foreign", 1)
    meta = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert meta["task"] == "classification" and json.loads(meta["labels"]) == list("abcde")
    assert json.loads(meta["input_size"]) == [24, 32] and meta["resize"] == "letterbox"
    assert meta["input_dtype"] == "uint8" and meta["version"] == "1" and meta["framework"] == "caffe"
    # The registered version serves like any other: load, resize, run, decode.
    loaded = load_model_dir(folder, CPU)
    picture = imp.sample_images((60, 90), "stretch", n=1)[0]
    x, _ = resize_image(picture, card.input_size, card.resize)
    (probs,) = loaded.run(x[None])
    (result,) = predictions(card, [probs], [None])
    want = by_hand(onnx.load(str(src)), x[None])[0]
    assert result.label == "abcde"[int(want.argmax())] and abs(result.score - want.max()) < 1e-5


def test_checkpoint_import_exports_the_same_function_as_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from train.models import ArchSpec, build_model

    torch.manual_seed(0)
    arch = {"arch": "resnet", "width": 8, "stem_stride": 2}
    model = build_model(ArchSpec.from_dict({**arch, "num_classes": 3})).eval()
    ckpt = tmp_path / "weights.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 7}, ckpt)
    spec = imp.ImportRequest.parse(
        task="classification", labels=["x", "y", "z"], input_size=(32, 32), mean=(0.5, 0.4, 0.3),
        std=(0.25, 0.25, 0.25), framework="pytorch",
    ).to_spec()
    reg = Registry(tmp_path / "registry")
    card = import_model(ckpt, reg, "pt", spec, arch=arch)
    assert card.arch == {**arch, "num_classes": 3, "depths": [1, 1, 1, 1], "dropout": 0.0}
    assert card.lineage.steps[0]["format"] == "pytorch-state-dict" and card.metrics["export_parity"]["n"] > 0
    assert {f.role for f in card.files} == {"onnx", "torch"}
    images = imp.sample_images((32, 32), "stretch", n=6)
    got = load_model_dir(reg.local_dir("pt", 1), CPU).run(images)[0]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.25
    with torch.no_grad():
        want = torch.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    # The stored checkpoint reloads with the one checkpoint loader (fine-tune/prune can start from it).
    from train.checkpoint import load_checkpoint

    again, meta = load_checkpoint(reg.local_dir("pt", 1) / "model.pt")
    assert meta["labels"] == ["x", "y", "z"] and meta["mean"] == pytest.approx([127.5, 102.0, 76.5])


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"channel_order": "BGR"}, "--channel-order BGR for a PyTorch checkpoint"),
        ({"layout": "NHWC"}, "--layout NHWC for a PyTorch checkpoint"),
        ({"output": "probs"}, "--outputs-are probs for a PyTorch checkpoint"),
        ({"input_name": "x"}, "--input-name for a PyTorch checkpoint"),
    ],
)
def test_checkpoint_import_refuses_options_that_do_not_apply(tmp_path: Path, kw: dict, needle: str) -> None:
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"never read")
    spec = imp.ImportRequest.parse(task="classification", labels=["x", "y"], input_size=(32, 32), **kw).to_spec()
    with pytest.raises(ValueError, match=needle):
        import_checkpoint(ckpt, Registry(tmp_path / "r"), "pt", spec, {"arch": "resnet"})


def test_model_import_docs_example_runs() -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "docs" / "examples" / "model_import.py")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "registered shapes-bgr:1" in r.stdout and "same top-1 as by hand: True" in r.stdout
