"""Import what exporters really write: Paddle, tf2onnx and other conventions, end to end.

Each model is a small graph built with ``onnx.helper`` in one exporter's convention. It
is imported through the real importer (its parity check included) into a temporary
registry, loaded with ``load_model_dir``, run through ``visionfleet.predict`` on real
(JPEG round-tripped) images, and compared with running the original graph by hand:
ONNX Runtime and numpy preprocessing written out here, independently of the importer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_export import importer as imp
from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import decode_image, encode_image, resize_image
from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.predict import predictions
from visionfleet.registry import Registry
from visionfleet.spec import Task

CPU = RuntimeOptions(threads=1, providers=("CPUExecutionProvider",))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABELS = ("cat", "dog", "bird", "fish")


def classifier(
    in_name: str,
    in_shape: list,
    *,
    elem: int = TensorProto.FLOAT,
    layout: str = "NCHW",
    channels: int = 3,
    outputs: dict[str, str] | None = None,
    classes: int = len(LABELS),
    seed: int = 0,
    opset: int = 13,
) -> onnx.ModelProto:
    """Conv -> ReLU -> GAP -> Gemm, as an exporter would write it.

    ``outputs`` maps output names to what they hold: ``logits``, ``probs`` (a Softmax in
    the graph), ``features`` (the pooled [N, 8]) or ``sigmoid``. A uint8 input is scaled
    by 1/255 inside the graph (as TF exports with a Rescaling layer do); a float16 one
    runs in float16 throughout.
    """
    outputs = outputs or {"out": "logits"}
    rng = np.random.default_rng(seed)
    wdt = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    out_elem = TensorProto.FLOAT16 if elem == TensorProto.FLOAT16 else TensorProto.FLOAT
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.6, (8, channels, 3, 3)).astype(wdt), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 2.0, (classes, 8)).astype(wdt), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.2, (classes,)).astype(wdt), "fc_b"),
    ]
    nodes, x = [], in_name
    if elem == TensorProto.UINT8:
        inits.append(numpy_helper.from_array(np.array(1 / 255, np.float32), "inv255"))
        nodes += [
            helper.make_node("Cast", [x], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["xf", "inv255"], ["xs"]),
        ]
        x = "xs"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [
        helper.make_node("Conv", [x, "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["features_t"], axis=1),
        helper.make_node("Gemm", ["features_t", "fc_w", "fc_b"], ["logits_t"], transB=1),
        helper.make_node("Softmax", ["logits_t"], ["probs_t"], axis=1),
        helper.make_node("Sigmoid", ["logits_t"], ["sigmoid_t"]),
    ]
    batch = in_shape[0]
    vis = []
    for name, what in outputs.items():
        nodes.append(helper.make_node("Identity", [f"{what}_t"], [name]))
        vis.append(helper.make_tensor_value_info(name, out_elem, [batch, 8 if what == "features" else classes]))
    graph = helper.make_graph(nodes, "exported", [helper.make_tensor_value_info(in_name, elem, in_shape)], vis,
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="exporter")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Real encoded pictures of varied aspect ratios (procedural scenes, JPEG)."""
    out = []
    for i in range(12):
        img, _ = render_sample(11, i, size=120)
        crop = img[: 70 + (i % 4) * 12] if i % 2 else img[:, : 60 + (i % 4) * 15]
        out.append(encode_image(np.ascontiguousarray(crop), "jpeg", quality=88))
    return out


def _runnable(model: onnx.ModelProto) -> bytes:
    """The original graph as a user would run it by hand: its 0/-1 batch made a named axis."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in (*m.graph.input, *m.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.dim_param = "n"
    return m.SerializeToString()


def by_hand(model: onnx.ModelProto, images: np.ndarray, *, in_name: str, out_name: str, layout: str = "NCHW",
            dtype: Any = np.float32, gray: bool = False, mean=(0.0,) * 3, std=(1.0,) * 3, divide: bool = True,
            softmax: bool = True) -> np.ndarray:
    """Preprocess with numpy, run the original in ONNX Runtime, softmax the logits."""
    if gray:  # BT.601 luma in float32, rounded to whole levels
        f = images.astype(np.float32)
        x = np.round(f[..., :1] * np.float32(0.299) + f[..., 1:2] * np.float32(0.587) + f[..., 2:] * np.float32(0.114))
        x = x.astype(np.uint8)
    else:
        x = images
    if dtype is not np.uint8:
        x = x.astype(np.float32) / (255.0 if divide else 1.0)
        x = ((x - np.float32(mean)) / np.float32(std)).astype(dtype)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    sess = ort.InferenceSession(_runnable(model), providers=["CPUExecutionProvider"])
    y = sess.run([out_name], {in_name: np.ascontiguousarray(x)})[0].astype(np.float64)
    if not softmax:
        return y
    e = np.exp(y - y.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def import_and_compare(tmp_path: Path, photos: list[bytes], model: onnx.ModelProto, request: dict, hand: dict,
                       *, name: str = "m", prob_tol: float = 1e-4):
    """Import through the real importer, serve through the one loader and prediction path, compare with by hand."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, str(src))
    reg = Registry(tmp_path / "registry")
    spec = imp.ImportRequest.parse(task="classification", labels=list(LABELS), **request).to_spec()
    card = imp.import_onnx(src, reg, name, spec)
    assert card.metrics["import_parity"]["agreement"] == 1.0
    loaded = load_model_dir(reg.local_dir(name, card.version), CPU)
    resized = [resize_image(decode_image(b), card.input_size, card.resize) for b in photos]
    x = np.stack([r[0] for r in resized])
    got = predictions(card, loaded.run(x), [r[1] for r in resized], top_k=len(LABELS))
    want = by_hand(model, x, **hand)
    for pred, row, (_, info) in zip(got, want, resized):
        assert pred.label == LABELS[int(row.argmax())]
        probs = dict(pred.probs or ())
        np.testing.assert_allclose([probs[lb] for lb in LABELS], row, atol=prob_tol)
        assert (pred.width, pred.height) == (info.original_width, info.original_height)
    return card


# -- each exporter's convention, end to end ---------------------------------------------------------------------

AUTO = {"layout": "auto", "input_dtype": "auto"}  # what the CLI sends by default


def test_paddle_export_with_a_minus_one_batch_and_fixed_3x48x192(tmp_path: Path, photos: list[bytes]) -> None:
    out = "save_infer_model/scale_0.tmp_0"
    model = classifier("x", [-1, 3, 48, 192], outputs={out: "probs"})
    card = import_and_compare(
        tmp_path, photos, model, {**AUTO, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "framework": "paddle"},
        {"in_name": "x", "out_name": out, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "softmax": False},
    )
    # Size, layout and dtype came from the graph; the softmax already in it was measured and kept.
    assert card.input_size == (48, 192)
    pre = card.preprocessing
    assert (pre["layout"], pre["dtype"], pre["channels"]) == ("NCHW", "float32", 3)
    assert set(pre["read_from_model"]) == {"input_size", "layout", "input_dtype", "channels"}
    assert (pre["output"], pre["output_kind_from"], pre["softmax_added"]) == ("probs", "measured", False)
    (step,) = card.lineage.steps
    assert step["original_input_shape"] == "[?, 3, 48, 192]" and step["batch_relaxed"] is False
    assert step["dynamic_dims"][0] == "input 'x' axis 0: dim_value -1 read as dynamic"
    assert step["output_values"]["max_row_sum_error"] < 1e-5 and step["framework"] == "paddle"


def test_tf2onnx_export_nhwc_float_with_an_unk_symbolic_batch(tmp_path: Path, photos: list[bytes]) -> None:
    model = classifier("input_1", ["unk__123", 32, 32, 3], layout="NHWC", outputs={"predictions": "probs"})
    card = import_and_compare(
        tmp_path, photos, model,
        {**AUTO, "scale": "0-255", "mean": (127.5,), "std": (127.5,), "resize": "center-crop",
         "framework": "tensorflow"},
        {"in_name": "input_1", "out_name": "predictions", "layout": "NHWC", "divide": False, "mean": (127.5,) * 3,
         "std": (127.5,) * 3, "softmax": False},
    )
    assert card.input_size == (32, 32) and card.preprocessing["layout"] == "NHWC"
    assert card.preprocessing["mean"] == [127.5] * 3  # one value applies to every channel
    assert card.lineage.steps[0]["original_input_shape"] == "[?, 32, 32, 3]"


def test_a_zero_batch_is_dynamic_and_runs_on_any_batch(tmp_path: Path, photos: list[bytes]) -> None:
    # "input" named like so many exports; dim_value 0 batch, which ONNX Runtime takes literally.
    model = classifier("input", [0, 3, 40, 40], outputs={"output": "logits"})
    card = import_and_compare(
        tmp_path, photos, model, {**AUTO, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resize": "letterbox"},
        {"in_name": "input", "out_name": "output", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    )
    assert card.input_size == (40, 40)
    assert (card.preprocessing["output"], card.preprocessing["softmax_added"]) == ("logits", True)
    assert "dim_value 0 read as dynamic" in card.lineage.steps[0]["dynamic_dims"][0]


def test_a_grayscale_one_channel_nchw_model_gets_bt601_gray(tmp_path: Path, photos: list[bytes]) -> None:
    model = classifier("x", ["N", 1, 28, 28], channels=1)
    card = import_and_compare(
        tmp_path, photos, model, {**AUTO, "mean": (0.5,), "std": (0.5,)},
        {"in_name": "x", "out_name": "out", "gray": True, "mean": (0.5,), "std": (0.5,)},
    )
    pre = card.preprocessing
    assert pre["channels"] == 1 and pre["mean"] == [0.5] and pre["gray"].startswith("round(0.299 R")
    # The same gray as OpenCV's RGB2GRAY (whose 14-bit fixed point rounds a rare pixel the other way).
    x = np.stack([resize_image(decode_image(b), (28, 28), "stretch")[0] for b in photos])
    ours = imp.rgb_to_gray(x)[..., 0]
    theirs = np.stack([cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) for img in x]).astype(np.float32)
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 1e-3
    folder = Registry(tmp_path / "registry").local_dir("m", 1)
    meta = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(meta["normalization"])["channels"] == 1


def test_a_float16_input_model(tmp_path: Path, photos: list[bytes]) -> None:
    model = classifier("input", ["batch", 3, 32, 32], elem=TensorProto.FLOAT16)
    # ONNX Runtime's CPU kernels run this graph in float32, and its optimizer drops the
    # wrapper's Cast to float16 with the Cast back that it inserts: the served model skips
    # the input's float16 rounding that the by-hand run has, so probabilities agree to
    # float16 precision (the importer's own float16 tolerance), not to 1e-4.
    card = import_and_compare(
        tmp_path, photos, model, {**AUTO, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        {"in_name": "input", "out_name": "out", "dtype": np.float16, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        prob_tol=2e-3,
    )
    assert card.preprocessing["dtype"] == "float16" and card.precision == "fp16"
    assert card.preprocessing["output"] == "logits"


def test_a_uint8_input_model_takes_raw_pixels(tmp_path: Path, photos: list[bytes]) -> None:
    # An unset (unnamed) batch dim, NHWC uint8 as TF serving exports write it; no --scale needed.
    model = classifier("image", [None, 32, 32, 3], elem=TensorProto.UINT8, layout="NHWC")
    card = import_and_compare(
        tmp_path, photos, model, dict(AUTO),
        {"in_name": "image", "out_name": "out", "layout": "NHWC", "dtype": np.uint8},
    )
    assert (card.preprocessing["dtype"], card.preprocessing["scale"]) == ("uint8", "0-255")


def test_a_grayscale_uint8_model(tmp_path: Path, photos: list[bytes]) -> None:
    model = classifier("x", ["n", 28, 28, 1], elem=TensorProto.UINT8, layout="NHWC", channels=1)
    card = import_and_compare(tmp_path, photos, model, dict(AUTO),
                              {"in_name": "x", "out_name": "out", "layout": "NHWC", "dtype": np.uint8, "gray": True})
    assert (card.preprocessing["layout"], card.preprocessing["channels"]) == ("NHWC", 1)


@pytest.mark.parametrize("pick", ["logits", "probs"])
def test_a_model_with_several_outputs_is_read_through_the_one_named(tmp_path: Path, photos: list[bytes],
                                                                    pick: str) -> None:
    model = classifier("x", ["n", 3, 32, 32], outputs={"logits": "logits", "probs": "probs", "features": "features"})
    card = import_and_compare(
        tmp_path, photos, model, {**AUTO, "output_name": pick},
        {"in_name": "x", "out_name": pick, "softmax": pick == "logits"},
    )
    step = card.lineage.steps[0]
    assert (step["original_output"], step["output_picked_by"], step["output_kind"]) == (pick, "--output", pick)
    assert step["softmax_added"] is (pick == "logits")


def test_the_one_output_shaped_like_the_labels_is_picked(tmp_path: Path, photos: list[bytes]) -> None:
    model = classifier("x", ["n", 3, 32, 32], outputs={"features": "features", "scores": "logits"})
    card = import_and_compare(tmp_path, photos, model, dict(AUTO), {"in_name": "x", "out_name": "scores"})
    assert card.lineage.steps[0]["output_picked_by"] == "shape"


def test_logits_and_softmax_exports_of_one_network_serve_the_same_probabilities(tmp_path: Path,
                                                                              photos: list[bytes]) -> None:
    cards = {}
    for kind in ("logits", "probs"):
        model = classifier("x", ["n", 3, 32, 32], outputs={"y": kind})
        cards[kind] = import_and_compare(tmp_path / kind, photos, model, dict(AUTO),
                                         {"in_name": "x", "out_name": "y", "softmax": kind == "logits"})
    assert cards["logits"].preprocessing["softmax_added"] and not cards["probs"].preprocessing["softmax_added"]
    assert {c.preprocessing["output_kind_from"] for c in cards.values()} == {"measured"}
    images = imp.sample_images((32, 32), "stretch", n=8)
    runs = [load_model_dir(tmp_path / k / "registry" / "m" / "1", CPU).run(images)[0] for k in cards]
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-6)


def test_declared_output_kinds_are_checked_not_trusted(tmp_path: Path, photos: list[bytes]) -> None:
    model = classifier("x", ["n", 3, 32, 32], outputs={"y": "logits"})
    card = import_and_compare(tmp_path, photos, model, {**AUTO, "output": "LOGITS"}, {"in_name": "x", "out_name": "y"})
    assert card.preprocessing["output_kind_from"] == "declared" and card.preprocessing["softmax_added"]


def test_a_dynamic_height_and_width_take_the_declared_input_size(tmp_path: Path, photos: list[bytes]) -> None:
    # Paddle OCR-style: fixed height, dynamic width (and batch).
    model = classifier("x", [-1, 3, 48, -1])
    card = import_and_compare(tmp_path, photos, model, {**AUTO, "input_size": (48, 160)},
                              {"in_name": "x", "out_name": "out"})
    assert card.input_size == (48, 160) and "input_size" not in card.preprocessing["read_from_model"]


@pytest.mark.parametrize("layout", ["nchw", "NHWC"])
def test_the_layout_can_be_named_when_no_axis_tells(tmp_path: Path, photos: list[bytes], layout: str) -> None:
    model = classifier("x", ["a", "b", "c", "d"], layout=layout.upper())
    request = {"layout": layout, "input_dtype": "auto", "input_size": (32, 32)}
    hand = {"in_name": "x", "out_name": "out", "layout": layout.upper()}
    card = import_and_compare(tmp_path, photos, model, request, hand)
    assert card.preprocessing["layout"] == layout.upper() and card.preprocessing["channels"] == 3


def test_the_older_output_spelling_still_says_what_the_output_holds(tmp_path: Path, photos: list[bytes]) -> None:
    # `--output probs` on a model with no output of that name is `--outputs-are probs`.
    model = classifier("input_1", ["unk__1", 32, 32, 3], layout="NHWC", outputs={"predictions": "probs"})
    card = import_and_compare(tmp_path, photos, model, {**AUTO, "output_name": "probs"},
                              {"in_name": "input_1", "out_name": "predictions", "layout": "NHWC", "softmax": False})
    assert card.preprocessing["output_kind_from"] == "declared" and card.preprocessing["output"] == "probs"


@pytest.mark.parametrize("dim,dynamic", [(-1, True), (0, True), ("unk__123", True), ("N", True), (None, True),
                                         (1, False), (48, False)])
def test_read_dim_is_the_one_reading_of_a_dimension(dim, dynamic: bool) -> None:
    (d,) = helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim]).type.tensor_type.shape.dim
    assert (imp.read_dim(d) is None) is dynamic


# -- refusals: what was found, what is accepted, the fix ------------------------------------------------------------


def _spec(**kw) -> imp.ImportSpec:
    return imp.ImportRequest.parse(task="classification", labels=list(LABELS), **{**AUTO, **kw}).to_spec()


@pytest.mark.parametrize(
    "model,kw,needle",
    [
        (lambda: classifier("x", [-1, 3, -1, -1]), {},
         "Got a model input 'x' of shape [?, 3, ?, ?] (NCHW) with a dynamic height or width; expected --input-size "
         "HEIGHTxWIDTH"),
        (lambda: classifier("x", ["a", "b", "c", "d"]), {"input_size": (32, 32)},
         "Got a model input 'x' of shape [?, ?, ?, ?]: neither axis 1 nor axis 3 holds 1 or 3 channels; expected "
         "exactly one (NCHW: axis 1, NHWC: axis 3), or name the layout with --layout nchw|nhwc"),
        (lambda: classifier("x", ["n", 3, 8, 3], classes=4), {},
         "both axis 1 and axis 3 hold 1 or 3 channels; expected exactly one"),
        (lambda: classifier("x", ["n", 4, 32, 32], channels=4), {},
         "neither axis 1 nor axis 3 holds 1 or 3 channels"),
        (lambda: classifier("x", ["n", 4, 32, 32], channels=4), {"layout": "nchw"},
         "Got --layout NCHW, but the model's input 'x' is [?, 4, 32, 32]; expected 1 or 3 channels where the layout "
         "puts them"),
        (lambda: classifier("x", ["n", 32, 32, 3], layout="NHWC"), {"layout": "NCHW"}, "(it looks NHWC)"),
        (lambda: classifier("x", ["n", 3, 32, 32]), {"input_dtype": "uint8"},
         "Got --input-dtype uint8, but the model's input 'x' is float; expected them to match (or --input-dtype auto)"),
        (lambda: classifier("x", ["n", 3, 32, 32]), {"input_size": (64, 64)},
         "Got --input-size 64x64, but the model's input 'x' is [?, 3, 32, 32] (NCHW); expected them to match (or "
         "leave --input-size out"),
        (lambda: classifier("x", [8, 3, 32, 32]), {}, "with a fixed batch of 8; expected a dynamic batch (or 1)"),
        (lambda: classifier("x", ["n", 3, 32, 32], outputs={"logits": "logits", "probs": "probs",
                                                            "features": "features"}),
         {}, "Got a model with 3 outputs ('logits' [?, 4], 'probs' [?, 4], 'features' [?, 8]), 2 of them shaped like "
             "[N, 4]; expected one, or name it with --output NAME (one of ['logits', 'probs', 'features'])"),
        (lambda: classifier("x", ["n", 3, 32, 32], outputs={"a": "features", "b": "features"}), {},
         "none of them shaped like [N, 4]"),
        (lambda: classifier("x", ["n", 3, 32, 32]), {"output_name": "nope"},
         "Got 'nope' for --output; expected one of the model's outputs ['out'] (what the output holds is "
         "--outputs-are logits|probs|auto)"),
        (lambda: classifier("x", ["n", 3, 32, 32]), {"output_name": "probs", "output": "logits"},
         "Got --output probs (no output of the model has that name) and --outputs-are logits; expected an output "
         "name among ['out']"),
        (lambda: classifier("x", ["n", 1, 28, 28], channels=1), {"channel_order": "BGR"},
         "Got --channel-order BGR for a 1-channel (grayscale) input; expected RGB"),
        (lambda: classifier("x", ["n", 1, 28, 28], channels=1), {"mean": IMAGENET_MEAN},
         "Got [0.485, 0.456, 0.406] for mean of a 1-channel (grayscale) input; expected one value"),
        (lambda: classifier("x", ["n", 32, 32, 3], elem=TensorProto.UINT8, layout="NHWC"), {"mean": (0.5,)},
         "for a uint8 input; expected mean 0,0,0, std 1,1,1 and scale 0-255 (a uint8 input takes raw pixels)"),
    ],
    ids=["dynamic-hw", "no-layout-axis", "two-layout-axes", "four-channels-auto", "four-channels-nchw",
         "looks-nhwc", "dtype-mismatch", "size-mismatch", "fixed-batch", "ambiguous-outputs", "no-fitting-output",
         "unknown-output", "legacy-conflict", "gray-bgr", "gray-three-means", "uint8-mean"],
)
def test_what_the_graph_leaves_open_or_contradicts_is_refused(model, kw: dict, needle: str) -> None:
    with pytest.raises(ValueError) as exc:
        imp.resolve_spec(model(), _spec(**kw))
    assert needle in str(exc.value)


def test_an_input_type_the_wrapper_cannot_feed_is_refused() -> None:
    model = classifier("x", ["n", 3, 32, 32])
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    with pytest.raises(ValueError, match=r"Got a model input 'x' of type double; expected float32, float16 or uint8"):
        imp.resolve_spec(model, _spec())


def test_declared_channels_are_checked_and_only_one_or_three_exist() -> None:
    gray = classifier("x", ["n", 1, 28, 28], channels=1)
    spec = imp.ImportSpec(task=Task.CLASSIFICATION, labels=LABELS, input_size=None,
                          preprocessing=imp.Preprocessing(layout=imp.Layout.AUTO, channels=3))
    with pytest.raises(ValueError, match=r"Got 3 channels, but the model's input 'x' is \[\?, 1, 28, 28\] \(NCHW\)"):
        imp.resolve_spec(gray, spec)
    with pytest.raises(ValueError, match=r"Got 2 input channels; expected 1 \(grayscale\) or 3 \(color\)"):
        imp.Preprocessing(channels=2)


def test_preprocessing_needs_the_model_read_first() -> None:
    pre = imp.Preprocessing(layout=imp.Layout.AUTO)
    with pytest.raises(ValueError, match="Got layout auto, dtype float32; expected them read from the model first"):
        pre.apply(np.zeros((1, 8, 8, 3), np.uint8))


def test_wrap_onnx_needs_a_known_output_kind() -> None:
    with pytest.raises(ValueError, match="Got --outputs-are auto for wrap_onnx; expected logits or probs"):
        imp.wrap_onnx(classifier("x", ["n", 3, 32, 32]), _spec())


@pytest.mark.parametrize(
    "raw,declared,needle",
    [
        (np.full((3, 4), 0.4), "auto", "Got values in [0.4, 0.4], rows summing to 1.6..1.6 on 3 sample images "
         "(independent scores, e.g. a sigmoid?); expected probabilities summing to 1 or raw logits: say --outputs-are "
         "probs to keep them as they are, or --outputs-are logits to add a softmax"),
        (np.full((3, 4), 0.25), "logits", "Got --outputs-are logits, but the output has values in [0.25, 0.25], rows "
         "summing to 1..1 on 3 sample images (the model already ends in a softmax); expected raw logits"),
        (np.array([[2.0, -1.0, 0.5, 3.0]]), "probs", "Got --outputs-are probs, but the output has values in [-1, 3]"),
        (np.array([[np.nan, 0, 0, 1.0]]), "auto", "Got non-finite values (NaN or inf) in the model's output on 1 "
         "sample images; expected finite scores"),
        (np.zeros((0, 4)), "auto", "Got no sample images to look at the model's output; expected at least one"),
    ],
    ids=["sigmoid-auto", "logits-on-probs", "probs-on-logits", "non-finite", "no-images"],
)
def test_output_kind_refusals(raw: np.ndarray, declared: str, needle: str) -> None:
    with pytest.raises(ValueError) as exc:
        imp.output_kind(raw, imp.OutputKind(declared))
    assert needle in str(exc.value)


def test_output_kind_reads_logits_probs_and_float16_rounding() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert imp.output_kind(p, None).kind is imp.OutputKind.PROBS
    assert imp.output_kind(np.log(p), None).kind is imp.OutputKind.LOGITS  # log-probabilities: softmax undoes them
    rounded = p.astype(np.float16).astype(np.float64) + 2e-3
    assert imp.output_kind(rounded, imp.OutputKind.AUTO, float16=True).kind is imp.OutputKind.PROBS
    check = imp.output_kind(p, imp.OutputKind.PROBS)
    assert check.to_dict()["output_kind_from"] == "declared" and not check.to_dict()["softmax_added"]


def _import(tmp_path: Path, model: onnx.ModelProto, **kw) -> Any:
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    return imp.import_onnx(src, Registry(tmp_path / "registry"), "m", _spec(**kw))


def test_a_sigmoid_classifier_must_say_what_its_scores_are(tmp_path: Path) -> None:
    model = classifier("x", ["n", 3, 32, 32], outputs={"y": "sigmoid"})
    with pytest.raises(ValueError, match="e.g. a sigmoid"):
        _import(tmp_path, model)
    card = _import(tmp_path, model, output="probs")  # declared: kept as they are
    assert card.preprocessing["output"] == "probs" and not card.preprocessing["softmax_added"]


def test_a_softmax_model_declared_as_logits_is_refused_before_a_second_softmax(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a softmax would be applied twice"):
        _import(tmp_path, classifier("x", ["n", 3, 32, 32], outputs={"y": "probs"}), output="logits")
    assert Registry(tmp_path / "registry").list_models() == []


def test_a_wrong_label_count_behind_a_dynamic_output_shape_is_refused(tmp_path: Path) -> None:
    model = classifier("x", ["n", 3, 32, 32], classes=3)
    model.graph.output[0].type.tensor_type.shape.dim[1].Clear()  # [n, ?]: only running it tells
    with pytest.raises(ValueError, match=r"Got a model output 'out' of shape \[\?, \?\] giving 3 scores per image; "
                                         r"expected \[N, 4\] for 4 labels"):
        _import(tmp_path, model)


def test_a_non_float_output_is_refused() -> None:
    model = classifier("x", ["n", 3, 32, 32])
    model.graph.node[-1].CopyFrom(helper.make_node("ArgMax", ["logits_t"], ["out"], axis=1, keepdims=1))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
    spec = _spec(output="logits")
    with pytest.raises(ValueError, match=r"Got a model output 'out' of type int64; expected float32 or float16 scores"):
        imp.wrap_onnx(model, spec)


def test_a_reference_that_does_not_fit_the_images_is_refused() -> None:
    model = classifier("x", ["n", 3, 32, 32])
    spec, _ = imp.resolve_spec(model, _spec(output="logits"))
    wrapped, info = imp.wrap_onnx(model, spec)
    images = imp.sample_images((32, 32), "stretch", n=3)
    with pytest.raises(ValueError, match="Got a reference of 2 rows for 3 images; expected one per image"):
        imp.check_import_parity(None, None, spec, info, images, reference=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"Got images uint8 \(3, 32, 32, 3\); expected uint8 \[N, 48, 48, 3\]"):
        imp.run_original(None, spec.__class__(**{**spec.__dict__, "input_size": (48, 48)}), images,
                         input_name="x", output_name="out", batch_of_one=False)


def test_import_request_reads_any_case_and_names_the_cli_flags() -> None:
    req = imp.ImportRequest.parse(task="classification", labels=["a", "b"], layout="nhwc", input_dtype="Auto",
                                  output="LOGITS")
    assert (req.layout, req.input_dtype, req.output) == (imp.Layout.NHWC, imp.InputDType.AUTO, imp.OutputKind.LOGITS)
    with pytest.raises(ValueError, match=r"Got 'NCWH' for --layout; expected 'NCHW' or 'NHWC' \(or 'auto': read from"):
        imp.ImportRequest.parse(task="classification", labels=["a", "b"], layout="NCWH")
    with pytest.raises(ValueError, match=r"Got 'maybe' for --outputs-are; expected 'probs' or 'logits' \(or 'auto'"):
        imp.ImportRequest.parse(task="classification", labels=["a", "b"], output="maybe")
    with pytest.raises(ValueError, match=r"Got 'fp32' for --input-dtype; expected 'float32', 'float16' or 'uint8'"):
        imp.ImportRequest.parse(task="classification", labels=["a", "b"], input_dtype="fp32")


# -- the command ---------------------------------------------------------------------------------------------------


def _cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    from typer.testing import CliRunner

    from visionfleet.cli import app

    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path / "home"))
    return CliRunner().invoke(app, ["models", "import", *args])


def test_the_cli_imports_a_paddle_export_with_no_shape_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "inference.onnx"
    onnx.save(classifier("x", [-1, 3, 48, 192], outputs={"softmax_0.tmp_0": "probs"}), str(src))
    r = _cli(tmp_path, monkeypatch, str(src), "--name", "paddle-cls", "--labels", ",".join(LABELS),
             "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--framework", "paddle", "--json")
    assert r.exit_code == 0, r.output
    card = json.loads(r.stdout)
    assert card["input_size"] == [48, 192] and card["preprocessing"]["output"] == "probs"
    r = _cli(tmp_path, monkeypatch, str(src), "--name", "paddle-cls", "--labels", ",".join(LABELS),
             "--layout", "NCHW", "--input-size", "48x192", "--outputs-are", "probs", "--output", "softmax_0.tmp_0")
    assert r.exit_code == 0, r.output
    assert "registered paddle-cls:2" in r.stdout and "outputs are probs (declared)" in " ".join(r.stdout.split())


@pytest.mark.parametrize(
    "extra,needle",
    [
        ([], "with a dynamic height or width; expected --input-size HEIGHTxWIDTH"),
        (["--input-size", "48x160", "--mean", "0.5,0.5"],
         "Got '0.5,0.5' for --mean; expected 3 comma-separated numbers (one per channel), or one for all channels"),
        (["--input-size", "48x160", "--layout", "nchwc"], "Got 'nchwc' for --layout; expected 'NCHW' or 'NHWC'"),
        (["--input-size", "48x160", "--outputs-are", "scores"], "Got 'scores' for --outputs-are"),
        (["--input-size", "48x160", "--output", "nope"],
         "Got 'nope' for --output; expected one of the model's outputs"),
    ],
)
def test_cli_refusals_exit_2_with_the_flag_to_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str],
                                                  needle: str) -> None:
    src = tmp_path / "ocr.onnx"
    onnx.save(classifier("x", [-1, 3, -1, -1]), str(src))
    r = _cli(tmp_path, monkeypatch, str(src), "--name", "ocr", "--labels", ",".join(LABELS), *extra)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "error:" in text and needle in text, text


def test_cli_checkpoint_needs_its_input_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"never read")
    r = _cli(tmp_path, monkeypatch, str(ckpt), "--name", "pt", "--labels", "a,b", "--arch", "resnet")
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "Got no --input-size for the PyTorch checkpoint weights.pt; expected HEIGHTxWIDTH" in text


def test_a_folder_of_sample_images_is_read_at_the_size_found_in_the_model(tmp_path: Path, photos: list[bytes],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, b in enumerate(photos[:5]):
        (folder / f"{i}.jpg").write_bytes(b)
    src = tmp_path / "m.onnx"
    onnx.save(classifier("x", [-1, 3, 40, 56]), str(src))
    card = imp.import_onnx(src, Registry(tmp_path / "registry"), "m", _spec(), images=folder)
    assert card.input_size == (40, 56) and card.metrics["import_parity"]["n"] == 5
    assert card.lineage.steps[0]["output_values"]["n"] == 5
    r = _cli(tmp_path, monkeypatch, str(src), "--name", "cli", "--labels", ",".join(LABELS), "--sample-images",
             str(folder), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["import_parity"]["n"] == 5
