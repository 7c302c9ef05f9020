"""Every detection head exporters write: YOLO11, end-to-end [N, K, 6], num_dets/boxes/scores/classes, boxes + scores.

The heads are ONNX graphs built here with ``onnx.helper``: known rows for exact answers,
and outputs that move with the image (the red channel's mean) for the parity check on
real images. Real ONNX Runtime throughout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_export import importer as imp
from edge_export.importer.spec import BoxFormat
from visionfleet.imaging import resize_image
from visionfleet.inference import RuntimeOptions, create_session, load_model_dir
from visionfleet.predict import predictions
from visionfleet.registry import Registry
from visionfleet.spec import Task

CPU = RuntimeOptions(threads=1, providers=("CPUExecutionProvider",))
SIZE = 100
LABELS = ("car", "person", "dog")
F32 = TensorProto.FLOAT

# cx, cy, w, h, then the scores of car, person, dog (model-input pixels).
ANCHORS = np.array(
    [
        [30, 30, 20, 20, 0.9, 0.1, 0.0],  # car, kept
        [32, 30, 20, 20, 0.8, 0.0, 0.0],  # car, IoU 0.82 with the first -> suppressed
        [31, 30, 20, 20, 0.1, 0.7, 0.0],  # person on top of the car -> kept (per-class NMS)
        [70, 70, 10, 30, 0.0, 0.0, 0.6],  # dog, kept
        [80, 20, 10, 10, 0.2, 0.1, 0.1],  # best 0.2 < 0.25 -> dropped
        [98, 98, 10, 10, 0.5, 0.0, 0.0],  # car, clipped to the input
    ],
    np.float32,
)
EXPECTED = [(20, 20, 40, 40, 0.9, 0), (21, 20, 41, 40, 0.7, 1), (65, 55, 75, 85, 0.6, 2), (93, 93, 100, 100, 0.5, 0)]


def graph(outputs: list[tuple[str, np.ndarray, np.ndarray | None, int]], *, meta: dict | None = None,
          extra_nodes=()) -> onnx.ModelProto:
    """Outputs ``base + direction * mean(red)`` (batch broadcast), cast to the given element type."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["gap"]),
        helper.make_node("Slice", ["gap", "zero", "one", "one"], ["m"]),  # [N, 1, 1, 1]
        *extra_nodes,
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    outs = []
    for name, base, direction, elem in outputs:
        base = base.astype(np.float32)
        d = np.zeros_like(base) if direction is None else direction.astype(np.float32)
        shape = np.array([-1] + [1] * (base.ndim - 1), np.int64)
        inits += [numpy_helper.from_array(base, f"{name}_base"), numpy_helper.from_array(d, f"{name}_dir"),
                  numpy_helper.from_array(shape, f"{name}_shape")]
        nodes += [
            helper.make_node("Reshape", ["m", f"{name}_shape"], [f"{name}_m"]),
            helper.make_node("Mul", [f"{name}_m", f"{name}_dir"], [f"{name}_moved"]),
            helper.make_node("Add", [f"{name}_moved", f"{name}_base"], [f"{name}_f" if elem != F32 else name]),
        ]
        if elem != F32:
            nodes.append(helper.make_node("Cast", [f"{name}_f"], [name], to=elem))
        outs.append(helper.make_tensor_value_info(name, elem, ["batch", *base.shape[1:]]))
    g = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", F32, ["batch", 3, SIZE, SIZE])], outs,
                          initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    return model


def spec(k: int = 6, labels=LABELS, **kw) -> imp.ImportSpec:
    return imp.ImportSpec(task=Task.DETECTION, labels=tuple(labels), input_size=(SIZE, SIZE),
                          resize=imp.ResizeMode.LETTERBOX,
                          detection=imp.DetectionOptions(score_threshold=0.25, max_detections=k, **kw))


def run(model: onnx.ModelProto, n: int = 2) -> list[np.ndarray]:
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    return create_session(model.SerializeToString(), CPU).run(["boxes", "scores", "classes"], {"images": images})


def assert_rows(boxes, scores, classes, expected, k) -> None:
    n = len(expected)
    want = np.array(expected, np.float64).reshape(-1, 6)
    np.testing.assert_allclose(boxes[:n], want[:, :4], atol=1e-4)
    np.testing.assert_allclose(scores[:n], want[:, 4], atol=1e-6)
    assert classes[:n].tolist() == want[:, 5].astype(int).tolist()
    assert scores.shape == (k,) and (scores[n:] == 0).all() and (classes[n:] == -1).all() and (boxes[n:] == 0).all()


def corners(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[:, :2] - a[:, 2:4] / 2, a[:, :2] + a[:, 2:4] / 2], axis=1)


def test_yolo11_head_is_the_channels_first_layout_and_the_card_says_so(tmp_path: Path) -> None:
    # YOLO11 exports [N, 4 + C, A] with no objectness, like YOLOv8 (Ultralytics writes the same head).
    model = graph([("output0", ANCHORS.T[None], None, F32)],
                  meta={"description": "Ultralytics YOLO11n model", "task": "detect"})
    wrapped, info = imp.wrap_onnx(model, spec())
    assert info.head_layout is imp.HeadLayout.CHANNELS_FIRST and info.objectness is False and info.num_anchors == 6
    b, s, c = run(wrapped)
    assert_rows(b[1], s[1], c[1], EXPECTED, 6)
    src = tmp_path / "yolo11n.onnx"
    onnx.save(model, str(src))
    card = imp.import_onnx(src, Registry(tmp_path / "reg"), "y11", spec())
    head = card.lineage.steps[0]["head"]
    assert head["kind"] == "channels-first" and "YOLO11" in head["family"] and head["objectness"] is False
    assert "NonMaxSuppression" in head["import_added"]
    assert card.preprocessing["postprocessing"]["head"] == "channels-first"


def e2e_rows() -> np.ndarray:
    """[1, 10, 6] rows x1, y1, x2, y2, score, class as a model with NMS inside writes them (padding rows 0)."""
    rows = np.zeros((1, 10, 6), np.float32)
    rows[0, 0] = [20, 20, 40, 40, 0.5, 1]
    rows[0, 1] = [21, 20, 41, 40, 0.9, 1]  # overlaps row 0 at IoU 0.9, same class: kept (no second NMS)
    rows[0, 2] = [65, 55, 75, 85, 0.6, 2]
    rows[0, 3] = [90, 95, 110, 120, 0.7, 0]  # reaches past the input: clipped
    rows[0, 4] = [5, 5, 9, 9, 0.2, 0]  # below the threshold
    return rows


E2E_EXPECTED = [(21, 20, 41, 40, 0.9, 1), (90, 95, 100, 100, 0.7, 0), (65, 55, 75, 85, 0.6, 2),
                (20, 20, 40, 40, 0.5, 1)]


@pytest.mark.parametrize("k", [3, 6, 12], ids=["k-below-rows", "k-between", "k-above-rows"])
def test_end_to_end_head_keeps_the_models_nms_threshold_and_top_k_only(k: int) -> None:
    wrapped, info = imp.wrap_onnx(graph([("output0", e2e_rows(), None, F32)]), spec(k=k))
    assert info.head_layout is imp.HeadLayout.END_TO_END and info.num_anchors == 10
    assert info.head is not None and info.head.box_format is BoxFormat.XYXY and info.head.nms_in_model
    b, s, c = run(wrapped, 3)
    assert b.shape == (3, k, 4) and s.shape == (3, k) and c.dtype == np.int64
    for i in range(3):
        assert_rows(b[i], s[i], c[i], E2E_EXPECTED[:k], k)


def test_ultralytics_300_row_end_to_end_matches_by_hand_on_real_images_and_maps_through_the_letterbox(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = np.zeros((1, 300, 6), np.float32)
    xy = rng.uniform(5, 70, (40, 2))
    rows[0, :40, :2], rows[0, :40, 2:4] = xy, xy + rng.uniform(5, 30, (40, 2))
    rows[0, :40, 4] = np.sort(rng.uniform(0.05, 0.95, 40))[::-1]
    rows[0, :40, 5] = rng.integers(0, 3, 40)
    direction = np.zeros_like(rows)
    direction[0, :40, :4] = rng.normal(0, 30, (40, 4))
    direction[0, :40, 4] = rng.normal(0, 0.3, 40)  # scores cross the threshold from image to image
    src = tmp_path / "yolov10n.onnx"
    onnx.save(graph([("output0", rows, direction, F32)]), str(src))
    reg = Registry(tmp_path / "reg")
    card = imp.import_onnx(src, reg, "v10", spec(k=20))
    parity = card.metrics["import_parity"]
    assert parity["agreement"] == 1.0 and parity["detections"] > 2 * parity["n"]
    step = card.lineage.steps[0]
    assert step["head_layout"] == "end-to-end" and step["head"]["rows"] == 300
    assert "no second" in step["head"]["import_added"] and "in the model" in card.preprocessing["postprocessing"]["nms"]
    # Served: the boxes come back in the original image's pixels through the letterbox.
    onnx.save(graph([("output0", e2e_rows(), None, F32)]), str(src))
    card = imp.import_onnx(src, reg, "v10", spec(k=6))
    assert card.resize is imp.ResizeMode.LETTERBOX
    loaded = load_model_dir(reg.local_dir("v10", 2), CPU)
    x, info = resize_image(np.zeros((100, 200, 3), np.uint8), card.input_size, card.resize)  # 25 px bars
    (pred,) = predictions(card, list(loaded.run(x[None])), [info])
    got = [d["box"] for d in pred.response()["detections"]]
    # (x / 0.5, (y - 25) / 0.5), clipped to the 200x100 original.
    want = [[42, 0, 82, 30], [180, 100, 200, 100], [130, 60, 150, 100], [40, 0, 80, 30]]
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_an_end_to_end_shape_that_also_reads_as_a_yolo_head_is_refused_until_named() -> None:
    # Two labels: [N, 10, 6] is end-to-end rows, or an anchors-first head 4 + 2 wide.
    model = graph([("output0", e2e_rows(), None, F32)])
    with pytest.raises(ValueError) as err:
        imp.wrap_onnx(model, spec(labels=("a", "b")))
    msg = str(err.value)
    assert msg.startswith("Got a detection output 'output0' of shape [?, 10, 6] for 2 labels") and "expected one" in msg
    assert "--head-layout end-to-end" in msg and "--head-layout anchors-first" in msg
    _, info = imp.wrap_onnx(model, spec(labels=("a", "b"), head_layout=imp.HeadLayout.END_TO_END))
    assert info.head_layout is imp.HeadLayout.END_TO_END
    with pytest.raises(ValueError, match=r"Got --head-layout end-to-end and an output 'output0' of shape \[\?, 6, 7\]"):
        imp.wrap_onnx(graph([("output0", ANCHORS[None], None, F32)]), spec(head_layout=imp.HeadLayout.END_TO_END))
    # A head of 4 + C rows of 6 stays what it read as before end-to-end heads were known: 6 anchors.
    _, info = imp.wrap_onnx(graph([("output0", ANCHORS.T[None], None, F32)]), spec())
    assert info.head_layout is imp.HeadLayout.CHANNELS_FIRST


def test_ultralytics_end2end_metadata_settles_the_shape_and_class_agnostic_is_refused(tmp_path: Path) -> None:
    # Ultralytics writes str(end2end) into the file's metadata: it says which of the two readings is meant.
    for said, kind in (("True", imp.HeadLayout.END_TO_END), ("False", imp.HeadLayout.ANCHORS_FIRST)):
        model = graph([("output0", e2e_rows(), None, F32)],
                      meta={"description": "Ultralytics YOLO26n model", "end2end": said, "task": "detect"})
        _, info = imp.wrap_onnx(model, spec(labels=("a", "b")))
        assert info.head_layout is kind and info.head is not None
        assert info.head.to_dict()["from_metadata"] == {"description": "Ultralytics YOLO26n model", "end2end": said}
    with pytest.raises(ValueError) as err:
        imp.wrap_onnx(graph([("output0", e2e_rows(), None, F32)]), spec(class_agnostic=True))
    assert str(err.value).startswith("Got --class-agnostic for an end-to-end head, whose NMS is already inside the "
                                     "model; expected it only for heads the import runs NMS on")
    src = tmp_path / "e2e.onnx"
    onnx.save(graph([("output0", e2e_rows(), None, F32)]), str(src))
    post = imp.import_onnx(src, Registry(tmp_path / "reg"), "e2e", spec()).preprocessing["postprocessing"]
    assert "iou_threshold" not in post and "class_agnostic" not in post and post["score_threshold"] == 0.25


def nms_outputs(num: int, names=("num_dets", "det_boxes", "det_scores", "det_classes")) -> onnx.ModelProto:
    rows = e2e_rows()[0]
    rows[5] = [50, 50, 60, 60, 0.95, 2]  # past num_dets: not a detection, however high its score
    return graph([
        (names[0], np.array([[num]], np.float32), None, TensorProto.INT32),
        (names[1], rows[None, :, :4], None, F32),
        (names[2], rows[None, :, 4], None, F32),
        (names[3], rows[None, :, 5], None, TensorProto.INT32),
    ])


def test_num_dets_boxes_scores_classes_head_ignores_rows_past_num_dets(tmp_path: Path) -> None:
    wrapped, info = imp.wrap_onnx(nms_outputs(5), spec(k=6))
    assert info.head_layout is imp.HeadLayout.NMS_OUTPUTS
    assert info.original_outputs == ("num_dets", "det_boxes", "det_scores", "det_classes")
    b, s, c = run(wrapped)
    assert_rows(b[0], s[0], c[0], E2E_EXPECTED, 6)
    wrapped, _ = imp.wrap_onnx(nms_outputs(2), spec(k=6))
    b, s, c = run(wrapped)
    assert_rows(b[1], s[1], c[1], [E2E_EXPECTED[0], E2E_EXPECTED[3]], 6)
    src = tmp_path / "trt_style.onnx"
    onnx.save(nms_outputs(6), str(src))
    card = imp.import_onnx(src, Registry(tmp_path / "reg"), "nmsout", spec(k=4))
    assert card.metrics["import_parity"]["agreement"] == 1.0 and card.lineage.steps[0]["head"]["kind"] == "nms-outputs"


def test_a_tensorrt_nms_plugin_is_refused_with_what_to_export_instead() -> None:
    plugin = helper.make_node("EfficientNMS_TRT", ["gap"], ["unused"], domain="trt")
    model = graph([("output0", e2e_rows(), None, F32)])
    model.graph.node.append(plugin)
    with pytest.raises(ValueError) as err:
        imp.resolve_spec(model, spec())
    msg = str(err.value)
    assert msg.startswith("Got a graph with the TensorRT plugin op(s) ['EfficientNMS_TRT']; expected standard ONNX ops")
    assert "ONNX NonMaxSuppression" in msg


def boxes_scores(fmt: str, names=("boxes", "scores"), direction: bool = False) -> onnx.ModelProto:
    xywh, scores = ANCHORS[:, :4], ANCHORS[:, 4:]
    boxes = corners(xywh) if fmt == "xyxy" else xywh
    d = None
    if direction:
        rng = np.random.default_rng(1)
        d = (rng.normal(0, 20, (1, *boxes.shape)), rng.normal(0, 0.4, (1, *scores.shape)))
    return graph([(names[0], boxes[None], None if d is None else d[0], F32),
                  (names[1], scores[None], None if d is None else d[1], F32)])


@pytest.mark.parametrize("fmt", ["xyxy", "cxcywh"])
def test_separate_boxes_and_scores_are_decoded_and_get_nms(fmt: str) -> None:
    wrapped, info = imp.wrap_onnx(boxes_scores(fmt), spec(box_format=BoxFormat(fmt)))
    assert info.head_layout is imp.HeadLayout.BOXES_SCORES and info.original_outputs == ("boxes", "scores")
    b, s, c = run(wrapped)
    assert_rows(b[0], s[0], c[0], EXPECTED, 6)
    # The format from an output name that says it, only then.
    _, info = imp.wrap_onnx(boxes_scores(fmt, names=(f"boxes_{fmt}", "scores")), spec())
    assert info.head is not None and info.head.box_format is BoxFormat(fmt)


def test_boxes_scores_box_format_must_be_said_when_the_graph_cannot_tell_and_parity_holds(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        imp.wrap_onnx(boxes_scores("xyxy"), spec())
    msg = str(err.value)
    assert msg.startswith("Got a boxes output 'boxes' [?, 6, 4] with --box-format auto; expected --box-format xyxy or")
    with pytest.raises(ValueError, match="Got --box-format xyxy for a channels-first YOLO head; expected cxcywh"):
        imp.wrap_onnx(graph([("output0", ANCHORS.T[None], None, F32)]), spec(box_format=BoxFormat.XYXY))
    src = tmp_path / "ssd.onnx"
    onnx.save(boxes_scores("xyxy", direction=True), str(src))
    card = imp.import_onnx(src, Registry(tmp_path / "reg"), "ssd", spec(k=6, box_format=BoxFormat.XYXY))
    assert card.metrics["import_parity"]["agreement"] == 1.0 and card.metrics["import_parity"]["detections"] > 0
    assert card.lineage.steps[0]["head"]["box_format"] == "xyxy"
    assert card.preprocessing["postprocessing"]["box_format"] == "xyxy"


def test_outputs_that_are_no_head_are_refused_with_the_forms_accepted() -> None:
    zeros = np.zeros
    model = graph([("a", zeros((1, 6, 5), np.float32), None, F32), ("b", zeros((1, 6, 9), np.float32), None, F32)])
    with pytest.raises(ValueError) as err:
        imp.wrap_onnx(model, spec())
    msg = str(err.value)
    assert msg.startswith("Got a model with 2 outputs ('a' [?, 6, 5], 'b' [?, 6, 9]), none of them shaped like a "
                          "detection head for 3 labels; expected one YOLO-style or end-to-end output")
    with pytest.raises(ValueError, match=r"Got --head-layout boxes-scores and outputs 'a' \[\?, 6, 5\]"):
        imp.wrap_onnx(model, spec(head_layout=imp.HeadLayout.BOXES_SCORES))
    with pytest.raises(ValueError, match=r"Got \['nope'\] for --output; expected names among the model's outputs"):
        imp.wrap_onnx(model, imp.ImportSpec(**{**spec().__dict__, "output_name": "a,nope"}))
    # --output A,B names the pair when other outputs are around.
    pair = graph([("boxes", corners(ANCHORS[:, :4])[None], None, F32), ("scores", ANCHORS[None, :, 4:], None, F32),
                  ("feat", np.zeros((1, 6, 4), np.float32), None, F32)])
    _, info = imp.wrap_onnx(pair, imp.ImportSpec(**{**spec(box_format=BoxFormat.XYXY).__dict__,
                                                    "output_name": "boxes,scores"}))
    assert info.original_outputs == ("boxes", "scores") and info.head is not None and info.head.picked_by == "--output"


def test_cli_detection_defaults_to_letterbox_and_takes_box_format(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from visionfleet.cli import app

    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path / "home"))
    src = tmp_path / "ssd.onnx"
    onnx.save(boxes_scores("cxcywh"), str(src))
    base = ["models", "import", str(src), "--name", "ssd", "--labels", ",".join(LABELS), "--task", "detection",
            "--json"]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 2 and "--box-format xyxy or cxcywh" in " ".join(r.output.split())
    r = CliRunner().invoke(app, [*base, "--box-format", "diagonal"])
    assert r.exit_code == 2 and "Got 'diagonal' for --box-format; expected 'xyxy' or 'cxcywh'" in " ".join(
        r.output.split())
    r = CliRunner().invoke(app, [*base, "--box-format", "cxcywh"])
    assert r.exit_code == 0, r.output
    import json

    card = json.loads(r.stdout)
    assert card["resize"] == "letterbox" and card["lineage"]["steps"][0]["head"]["kind"] == "boxes-scores"
