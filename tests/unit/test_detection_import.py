"""YOLO-style detection import: decode + NMS inside the graph, padding, response mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_export import importer as imp
from visionfleet.predict import detection_stats, predictions
from visionfleet.imaging import resize_image
from visionfleet.inference import RuntimeOptions, create_session, load_model_dir
from visionfleet.registry import Registry
from visionfleet.spec import Task

CPU = RuntimeOptions(threads=1, providers=("CPUExecutionProvider",))
SIZE = 100  # model input 100x100

# Known anchors: cx, cy, w, h and three class scores, in model-input pixels.
ANCHORS = np.array(
    [
        [30, 30, 20, 20, 0.9, 0.1, 0.0],  # a0: class 0, kept
        [32, 30, 20, 20, 0.8, 0.0, 0.0],  # a1: class 0, IoU 0.82 with a0 -> suppressed
        [31, 30, 20, 20, 0.1, 0.7, 0.0],  # a2: class 1 on top of a0 -> kept (per-class NMS)
        [70, 70, 10, 30, 0.0, 0.0, 0.6],  # a3: class 2, kept
        [80, 20, 10, 10, 0.2, 0.1, 0.1],  # a4: best score 0.2 < 0.25 -> dropped
        [98, 98, 10, 10, 0.5, 0.0, 0.0],  # a5: class 0, clipped to the input
    ],
    np.float32,
)
# (x1, y1, x2, y2, score, class) expected after decode + per-class NMS, by score.
EXPECTED = [
    (20, 20, 40, 40, 0.9, 0),
    (21, 20, 41, 40, 0.7, 1),
    (65, 55, 75, 85, 0.6, 2),
    (93, 93, 100, 100, 0.5, 0),
]
EXPECTED_AGNOSTIC = [EXPECTED[0], EXPECTED[2], EXPECTED[3]]  # a2 overlaps a0 at IoU 0.90


def head_model(features: np.ndarray, *, anchors_first: bool, opset: int = 13, direction: np.ndarray | None = None):
    """A head whose output is ``features`` [1, F, A] (or [1, A, F]) for every image.

    With ``direction``, the output moves with the mean of the first input channel, so different images
    give different boxes and scores (for parity checks on real images).
    """
    out = features.T[None] if anchors_first else features[None]
    d = np.zeros_like(out) if direction is None else (direction.T[None] if anchors_first else direction[None])
    nodes = [  # ops whose signature is the same from opset 11 to 21
        helper.make_node("GlobalAveragePool", ["x"], ["gap"]),  # [N, 3, 1, 1]
        helper.make_node("Slice", ["gap", "zero", "one", "one"], ["m"]),  # the red channel's mean
        helper.make_node("Reshape", ["m", "shape3"], ["m3"]),
        helper.make_node("Mul", ["m3", "direction"], ["moved"]),
        helper.make_node("Add", ["moved", "base"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "yolo_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", *out.shape[1:]])],
        initializer=[
            numpy_helper.from_array(np.array([0, 1, 1], np.int64), "shape3"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(d.astype(np.float32), "direction"),
            numpy_helper.from_array(out.astype(np.float32), "base"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def spec(k: int = 6, **kw) -> imp.ImportSpec:
    return imp.ImportSpec(
        task=Task.DETECTION,
        labels=("car", "person", "dog"),
        input_size=(SIZE, SIZE),
        resize=imp.ResizeMode.LETTERBOX,
        detection=imp.DetectionOptions(score_threshold=0.25, iou_threshold=0.45, max_detections=k, **kw),
    )


def run(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    return create_session(model.SerializeToString(), CPU).run(["boxes", "scores", "classes"], {"images": images})


def features(objectness: bool) -> np.ndarray:
    """[F, A] features; with objectness, obj * class score reproduces the same scores."""
    f = ANCHORS.T.copy()  # [4 + 3, 6]
    if not objectness:
        return f
    obj = np.array([1.0, 1.0, 1.0, 0.75, 0.4, 1.0], np.float32)
    cls = f[4:] / obj  # a3: 0.6 / 0.75 = 0.8; a4: 0.2 / 0.4 = 0.5 (still dropped)
    return np.concatenate([f[:4], obj[None], cls], axis=0)


def assert_rows(boxes, scores, classes, expected, k) -> None:
    n = len(expected)
    want = np.array(expected, np.float64)
    np.testing.assert_allclose(boxes[:n], want[:, :4], atol=1e-4)
    np.testing.assert_allclose(scores[:n], want[:, 4], atol=1e-6)
    assert classes[:n].tolist() == want[:, 5].astype(int).tolist()
    # Padding up to K: score 0, class -1, box 0.
    assert scores.shape == (k,) and (scores[n:] == 0).all() and (classes[n:] == -1).all() and (boxes[n:] == 0).all()


@pytest.mark.parametrize(
    "anchors_first,objectness,opset",
    [(False, False, 13), (True, False, 11), (True, True, 13), (False, True, 17), (False, False, 21)],
    ids=["channels-first", "anchors-first-opset11", "yolov5-objectness", "channels-first-objectness-opset17",
         "channels-first-opset21"],
)
def test_known_anchors_decode_to_the_right_boxes_after_nms(anchors_first: bool, objectness: bool, opset: int) -> None:
    model = head_model(features(objectness), anchors_first=anchors_first, opset=opset)
    wrapped, info = imp.wrap_onnx(model, spec(k=6))
    assert info.objectness is objectness and info.num_anchors == 6
    assert info.head_layout is (imp.HeadLayout.ANCHORS_FIRST if anchors_first else imp.HeadLayout.CHANNELS_FIRST)
    images = np.zeros((3, SIZE, SIZE, 3), np.uint8)
    boxes, scores, classes = run(wrapped, images)
    assert boxes.shape == (3, 6, 4) and boxes.dtype == np.float32
    assert scores.shape == (3, 6) and scores.dtype == np.float32
    assert classes.shape == (3, 6) and classes.dtype == np.int64
    for i in range(3):  # every image of the batch gets its own rows
        assert_rows(boxes[i], scores[i], classes[i], EXPECTED, 6)


def test_class_agnostic_nms_and_a_small_k() -> None:
    model = head_model(features(False), anchors_first=False)
    wrapped, _ = imp.wrap_onnx(model, spec(k=5, class_agnostic=True))
    b, s, c = run(wrapped, np.zeros((1, SIZE, SIZE, 3), np.uint8))
    assert_rows(b[0], s[0], c[0], EXPECTED_AGNOSTIC, 5)
    wrapped, _ = imp.wrap_onnx(model, spec(k=2))
    b, s, c = run(wrapped, np.zeros((2, SIZE, SIZE, 3), np.uint8))
    assert_rows(b[1], s[1], c[1], EXPECTED[:2], 2)  # the best two, nothing padded


def test_nothing_above_the_threshold_gives_all_padding() -> None:
    f = features(False)
    f[4:] *= 0.2  # every score below 0.25
    wrapped, _ = imp.wrap_onnx(head_model(f, anchors_first=False), spec(k=4))
    b, s, c = run(wrapped, np.zeros((2, SIZE, SIZE, 3), np.uint8))
    assert (s == 0).all() and (c == -1).all() and (b == 0).all() and s.shape == (2, 4)
    b, s, c = run(wrapped, np.zeros((0, SIZE, SIZE, 3), np.uint8))  # an empty batch runs too
    assert b.shape == (0, 4, 4)


def test_ambiguous_or_wrong_head_shapes_are_refused() -> None:
    # 7 anchors and 3 classes: both axes are 4 + 3 wide, so the layout must be named.
    square = np.concatenate([ANCHORS, ANCHORS[:1]]).T  # [7, 7]
    model = head_model(square, anchors_first=False)
    with pytest.raises(ValueError, match="--head-layout channels-first"):
        imp.wrap_onnx(model, spec())
    wrapped, info = imp.wrap_onnx(model, spec(head_layout=imp.HeadLayout.CHANNELS_FIRST))
    assert info.num_anchors == 7
    with pytest.raises(ValueError, match=r"expected one axis of width 7 \(4 \+ 3\) or 8 \(5 \+ 3\)"):
        imp.wrap_onnx(head_model(features(False)[:6], anchors_first=False), spec())
    with pytest.raises(ValueError, match="--head-layout anchors-first"):
        imp.wrap_onnx(head_model(features(False), anchors_first=False), spec(head_layout=imp.HeadLayout.ANCHORS_FIRST))
    with pytest.raises(ValueError, match="5 \\+ 3"):  # objectness declared, but the head has none
        imp.wrap_onnx(head_model(features(False), anchors_first=False), spec(objectness=True))


def test_detection_import_matches_decoding_by_hand_on_real_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    anchors = 40
    base = np.concatenate(
        [
            rng.uniform(15, 85, (2, anchors)),  # cx, cy
            rng.uniform(8, 40, (2, anchors)),  # w, h
            rng.uniform(0, 0.9, (3, anchors)),  # class scores
        ]
    ).astype(np.float32)
    direction = rng.normal(0, 0.15, base.shape).astype(np.float32) * np.array([60, 60, 20, 20, 1, 1, 1])[:, None]
    src = tmp_path / "yolo.onnx"
    onnx.save(head_model(base, anchors_first=False, direction=direction), str(src))
    reg = Registry(tmp_path / "registry")
    card = imp.import_onnx(src, reg, "det", spec(k=8))
    parity = card.metrics["import_parity"]
    assert parity["agreement"] == 1.0 and parity["detections"] > 3 * parity["n"]  # real NMS work was checked
    assert card.task is Task.DETECTION and card.preprocessing["postprocessing"]["max_detections"] == 8
    assert card.lineage.steps[0]["detection"]["iou_threshold"] == 0.45
    meta = {p.key: p.value for p in onnx.load(str(reg.local_dir("det", 1) / "model.onnx")).metadata_props}
    assert meta["task"] == "detection" and meta["max_detections"] == "8"
    assert meta["output_names"] == '["boxes", "scores", "classes"]'


def test_registered_detector_maps_letterboxed_boxes_back_to_original_pixels(tmp_path: Path) -> None:
    src = tmp_path / "yolo.onnx"
    onnx.save(head_model(features(False), anchors_first=False), str(src))
    reg = Registry(tmp_path / "registry")
    card = imp.import_onnx(src, reg, "det", spec(k=6))
    loaded = load_model_dir(reg.local_dir("det", 1), CPU)
    original = np.zeros((100, 200, 3), np.uint8)  # 200 wide, 100 high: letterbox adds 25 px bars
    x, info = resize_image(original, card.input_size, card.resize)
    boxes, scores, classes = loaded.run(x[None])
    (pred,) = predictions(card, [boxes, scores, classes], [info])
    result = pred.response()
    assert result["count"] == 4 and result["score"] == pytest.approx(0.9)
    # Model pixels -> original: x / 0.5, (y - 25) / 0.5, clipped to the 200x100 image.
    want = [[40, 0, 80, 30], [42, 0, 82, 30], [130, 60, 150, 100], [186, 136, 200, 150]]
    want = [[min(max(v, 0), lim) for v, lim in zip(b, (200, 100, 200, 100))] for b in want]
    got = [d["box"] for d in result["detections"]]
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert [d["label"] for d in result["detections"]] == ["car", "person", "dog", "car"]


def test_detection_predictions_shape_and_padding_rules() -> None:
    from visionfleet.spec import ModelCard

    card = ModelCard(name="d", task=Task.DETECTION, labels=["a", "b"], input_size=(16, 16))
    boxes = np.array([[0, 0, 10, 10], [5, 5, 8, 8], [0, 0, 0, 0]], np.float32)
    scores = np.array([0.4, 0.8, 0.0], np.float32)
    classes = np.array([1, 0, -1])

    def one(b, s, c, labels=("a", "b")):
        return predictions(card.model_copy(update={"labels": list(labels)}), [b[None], s[None], c[None]], [None])[0]

    p = one(boxes, scores, classes)
    r = p.response()
    assert r["count"] == 2 and r["score"] == pytest.approx(0.8) and p.margin == pytest.approx(0.4)
    assert (p.label, p.class_id) == ("a", 0)  # the top box's class
    assert [d["label"] for d in r["detections"]] == ["a", "b"]  # sorted by score, padding dropped
    assert r["detections"][0] == {"label": "a", "class_id": 0, "score": pytest.approx(0.8), "box": [5, 5, 8, 8]}
    empty = one(np.zeros((4, 4), np.float32), np.zeros(4, np.float32), -np.ones(4), ["a"])
    assert empty.response() == {"detections": [], "score": 0.0, "count": 0} and empty.label is None
    with pytest.raises(ValueError, match="class id 5"):
        one(boxes, scores, np.array([5, 0, -1]))
    with pytest.raises(ValueError, match=r"expected \[K, 4\]"):
        one(np.zeros((3, 5), np.float32), scores, classes)
    with pytest.raises(ValueError, match="same count"):
        one(boxes, scores[:2], classes)


def test_detection_stats() -> None:
    stats = detection_stats(np.array([0.3, 0.9, 0.0, 0.6]))
    assert stats == pytest.approx({"confidence": 0.9, "margin": 0.3, "count": 3, "mean_score": 0.6})
    assert detection_stats(np.zeros(5)) == {"confidence": 0.0, "margin": 0.0, "count": 0, "mean_score": 0.0}
    assert detection_stats(np.array([0.7]))["margin"] == pytest.approx(0.7)


def test_the_prediction_path_stays_light() -> None:
    import subprocess
    import sys

    code = (
        "import visionfleet.predict, sys; "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
