"""The COCO evaluator on hand-made predictions with known mAP, and the synthetic detection data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from visionfleet.datasets.detect import (
    coco_split,
    is_detection_dataset,
    read_coco,
    render_detection_sample,
    synthesize_detection,
)
from visionfleet.evaluation import coco_map, evaluate_detector
from visionfleet.spec import ModelCard, Task

CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]


def gt_doc() -> dict:
    """Two 100x100 images, three boxes (x, y, w, h)."""
    return {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"},
                   {"id": 2, "width": 100, "height": 100, "file_name": "b.png"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 20], "area": 800, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [20, 30, 50, 50], "area": 2500, "iscrowd": 0},
        ],
        "categories": CATS,
    }


def dets_from_gt(gt: dict, *, dx: float = 0.0, category=None, score: float = 0.9) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": category or a["category_id"],
             "bbox": [a["bbox"][0] + dx, a["bbox"][1], a["bbox"][2], a["bbox"][3]], "score": score}
            for a in gt["annotations"]]


def test_perfect_predictions_score_one() -> None:
    m = coco_map(gt_doc(), dets_from_gt(gt_doc()))
    assert m.map50 == pytest.approx(1.0) and m.map50_95 == pytest.approx(1.0)
    assert m.gt_boxes == 3 and m.detections == 3 and m.images == 2
    assert m.per_class_ap50 == {"circle": pytest.approx(1.0), "square": pytest.approx(1.0)}
    assert m.evaluator.startswith("pycocotools ")


def test_shifted_boxes_keep_map50_but_lose_the_strict_thresholds() -> None:
    # A 30 px box moved 6 px: IoU 24*30 / (2*900 - 720) = 0.667 -> a hit at 0.5 and 0.65, a miss from 0.70 up.
    gt = gt_doc()
    gt["annotations"] = gt["annotations"][:1]
    m = coco_map(gt, dets_from_gt(gt, dx=6.0))
    assert m.map50 == pytest.approx(1.0)
    assert m.map50_95 == pytest.approx(4 / 10, abs=1e-6)  # thresholds 0.50, 0.55, 0.60, 0.65 of ten
    assert m.map75 == pytest.approx(0.0)


def test_far_shifted_boxes_score_zero() -> None:
    m = coco_map(gt_doc(), dets_from_gt(gt_doc(), dx=45.0))  # IoU < 0.5 for every box
    assert m.map50 < 0.01 and m.map50_95 < 0.01


def test_wrong_class_scores_zero() -> None:
    gt = gt_doc()
    swapped = [{**d, "category_id": 3 - d["category_id"]} for d in dets_from_gt(gt)]
    m = coco_map(gt, swapped)
    assert m.map50 == 0.0 and m.map50_95 == 0.0


def test_half_the_boxes_found_gives_the_recall_curve_mean() -> None:
    gt = gt_doc()
    found = [d for d in dets_from_gt(gt) if d["category_id"] == 1][:1]  # one of two circles, no square
    m = coco_map(gt, found)
    # circle: recall reaches 0.5 at precision 1 -> AP = 51/101 on COCO's 101 recall points; square: 0
    assert m.map50 == pytest.approx((51 / 101 + 0.0) / 2, abs=1e-6)


def test_no_detections_is_zero_and_unknown_image_is_refused() -> None:
    assert coco_map(gt_doc(), []).map50 == 0.0
    with pytest.raises(ValueError, match=r"Got detections for image ids \[7\]; expected ids of the ground truth"):
        coco_map(gt_doc(), [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])


def test_synthetic_detection_sample_is_deterministic_and_boxed() -> None:
    a = render_detection_sample(3, 11, 128)
    b = render_detection_sample(3, 11, 128)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    img, boxes, classes = a
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert 1 <= len(boxes) <= 4 and len(boxes) == len(classes)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes <= 128).all() and ((classes >= 0) & (classes < 10)).all()


def _card(labels, size=(64, 64)) -> ModelCard:
    return ModelCard(name="det", task=Task.DETECTION, labels=list(labels), input_size=size, resize="letterbox")


def test_dataset_round_trip_and_a_perfect_detector_through_the_prediction_path(tmp_path: Path) -> None:
    """Ground truth fed back as model outputs (in letterboxed model pixels) scores 1.0 end to end."""
    manifest = synthesize_detection(tmp_path / "det", n_train=4, n_holdout=6, size=96, seed=1)
    assert manifest["splits"] == {"train": 4, "holdout": 6} and manifest["params"]["task"] == "detection"
    assert is_detection_dataset(tmp_path / "det")
    split = coco_split(tmp_path / "det", "holdout")
    assert len(split) == 6 and all(split.image_path(im).is_file() for im in split.doc["images"])
    card = _card(manifest["labels"], (64, 64))
    by_image = split.boxes_by_image()
    order = [int(im["id"]) for im in split.doc["images"]]
    cursor = {"i": 0}

    def oracle(x: np.ndarray):
        k = 8
        boxes, scores, classes = np.zeros((len(x), k, 4), np.float32), np.zeros((len(x), k), np.float32), \
            np.full((len(x), k), -1, np.int64)
        for row in range(len(x)):
            b, c = by_image[order[cursor["i"]]]
            cursor["i"] += 1
            s = 64 / 96  # letterbox of a square 96 px image to 64 px: scale only
            boxes[row, : len(b)] = b * s
            scores[row, : len(b)] = 0.9
            classes[row, : len(b)] = c - 1  # category ids are 1-based in label order
        return boxes, scores, classes

    m = evaluate_detector(oracle, card, split, batch=4)
    assert m.images == 6 and m.map50 == pytest.approx(1.0) and m.map50_95 > 0.95


def test_bad_annotation_files_say_what_was_found(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"Got a.json without the list\(s\) \['categories'\]; expected COCO"):
        read_coco(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="Got a.json that is not JSON"):
        read_coco(p)
    with pytest.raises(FileNotFoundError, match="no annotation file"):
        read_coco(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="Got annotation categories .* expected shared names"):
        evaluate_detector(lambda x: (), _card(["dog"]), read_coco(_write(tmp_path / "g.json", gt_doc())))


def test_a_classification_dataset_is_not_a_detection_holdout(tmp_path: Path) -> None:
    from visionfleet.datasets.store import synthesize

    synthesize(tmp_path / "cls", n_train=4, n_holdout=2, size=32, seed=0)
    with pytest.raises(ValueError, match="Got the classification dataset .*; expected a detection dataset"):
        coco_split(tmp_path / "cls")


def _write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path
