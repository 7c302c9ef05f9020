"""Detection end to end on a tiny scale: Ray Train fit, export with NMS inside, mAP, import, bench, INT8.

A few dozen generated images and a tiny detector for a few epochs (the full-size run is
``bench/detection.py``, figures in docs/performance.md). The mAP floor is checked on the
training images (memorization: a pipeline that trains, exports and decodes correctly
gets there in seconds) against the same evaluator scoring random boxes, which stays near
zero; the holdout mAP is recorded on the card as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

SIZE = 64
# mAP@0.5 on the training images after the tiny fit; random boxes score < 0.01 on the same images.
TRAIN_MAP50_FLOOR = 0.30


@dataclass
class Detector:
    card: object
    result: object
    dataset: Path


@pytest.fixture(scope="module")
def detector(ray_session, settings) -> Detector:
    from train.detect import DetectTrainConfig, fit_detector, register_detector
    from visionfleet.datasets.detect import synthesize_detection
    from visionfleet.registry import Registry

    ds = settings.datasets_dir / "det-tiny"
    synthesize_detection(ds, n_train=48, n_holdout=12, size=SIZE, seed=5, max_objects=2)
    cfg = DetectTrainConfig(
        dataset=str(ds), input_size=SIZE, epochs=30, batch_size=16, lr=1e-2, augment=False, num_workers=1,
        arch={"arch": "anchorfree", "width": 8, "depths": [1, 1, 1, 1]},
    )
    result = fit_detector(cfg, runs_dir=settings.runs_dir)
    card = register_detector(result.checkpoint, Registry(settings.registry_dir), "det-tiny", run_id=result.run_id)
    return Detector(card, result, ds)


def test_ray_train_detector_is_registered_with_its_map(detector, settings) -> None:
    from train.detect import holdout_map
    from visionfleet.datasets.detect import coco_split
    from visionfleet.evaluation import coco_map
    from visionfleet.registry import Registry

    card = detector.card
    assert card.task.value == "detection" and card.arch["arch"] == "anchorfree"
    assert {f.role for f in card.files} == {"onnx", "torch"}
    m = card.metrics
    assert m["holdout_n"] == 12 and 0.0 <= m["holdout_map50_95"] <= m["holdout_map50"] <= 1.0
    assert m["evaluator"].startswith("pycocotools") and m["export_parity"]["agreement"] == 1.0
    assert detector.result.metrics["epoch"] == 30 and detector.result.metrics["train_loss"] > 0

    onnx_path = Registry(settings.registry_dir).local_dir("det-tiny", card.version) / "model.onnx"
    trained = holdout_map(onnx_path, card, detector.dataset, split="train", threads=1)
    # The same evaluator on random boxes: what a broken model gets.
    split = coco_split(detector.dataset, "train")
    rng = np.random.default_rng(0)
    random_dets = []
    for im in split.doc["images"]:
        for _ in range(10):
            x, y = rng.uniform(0, SIZE - 8, 2)
            w, h = rng.uniform(6, 30, 2)
            random_dets.append({"image_id": im["id"], "category_id": int(rng.integers(1, 11)),
                                "bbox": [x, y, w, h], "score": float(rng.uniform())})
    baseline = coco_map(split.doc, random_dets).map50
    assert baseline < 0.02
    assert trained["map50"] > TRAIN_MAP50_FLOOR, trained


def test_a_trained_detector_answers_through_visionfleet_predict(detector, settings, tmp_path) -> None:
    from visionfleet.cli import app
    from visionfleet.datasets.detect import coco_split

    split = coco_split(detector.dataset, "train")
    image = split.image_path(split.doc["images"][0])
    res = CliRunner().invoke(app, ["predict", str(image), "--model", detector.card.ref, "--local", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["count"] == len(doc["detections"]) >= 1
    top = doc["detections"][0]
    assert top["label"] in detector.card.labels and 0 < top["score"] <= 1
    x1, y1, x2, y2 = top["box"]
    assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE  # original-image pixels


def test_an_ultralytics_style_export_imported_benches_to_the_same_map(detector, settings, tmp_path) -> None:
    """The importer's YOLO decode + NMS (not the exporter's tail) gives the native export's mAP."""
    from train.checkpoint import load_checkpoint
    from train.detect_export import export_ultralytics_style
    from visionfleet.cli import app
    from visionfleet.registry import Registry

    reg = Registry(settings.registry_dir)
    model, meta = load_checkpoint(reg.local_dir("det-tiny", detector.card.version) / "model.pt")
    ul = export_ultralytics_style(model, tmp_path / "yolo-style.onnx", input_size=(SIZE, SIZE), mean=meta["mean"],
                                  std=meta["std"])
    runner = CliRunner()
    res = runner.invoke(app, ["models", "import", str(ul), "--name", "det-tiny-imported", "--task", "detection",
                              "--labels", ",".join(detector.card.labels), "--json"])
    assert res.exit_code == 0, res.output
    imported = json.loads(res.stdout)
    ref = f"{imported['name']}:{imported['version']}"
    holdout = detector.dataset / "holdout" / "annotations.json"
    res = runner.invoke(app, ["bench", detector.card.ref, ref, "--annotations", str(holdout), "--rounds", "1",
                              "--no-ceiling", "--batch", "4", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)["rows"]}
    native, other = rows[detector.card.ref], rows[ref]
    assert native["holdout_n"] == other["holdout_n"] == 12
    assert native["map50"] == pytest.approx(detector.card.metrics["holdout_map50"], abs=1e-9)
    assert other["map50"] == pytest.approx(native["map50"], abs=0.02)
    assert other["map50_95"] == pytest.approx(native["map50_95"], abs=0.02)
    stored = reg.card_for(ref).metrics["map"]  # bench records the mAP in the card
    assert stored["map50"] == other["map50"] and stored["annotations"] == str(holdout)


def test_bench_refuses_a_detector_without_labeled_boxes(detector, settings, tmp_path) -> None:
    from visionfleet.cli import app
    from visionfleet.datasets.store import synthesize

    synthesize(tmp_path / "cls", n_train=4, n_holdout=2, size=32, seed=0)  # one label per image, no boxes
    res = CliRunner().invoke(app, ["bench", detector.card.ref, "--data", str(tmp_path / "cls"), "--rounds", "1",
                                   "--no-ceiling"])
    assert res.exit_code != 0
    text = " ".join(res.output.split())  # rich wraps long messages
    assert "Got no labeled boxes for the detector det-tiny" in text
    assert "expected --annotations annotations.json (COCO) or --data DETECTION_DATASET" in text


def test_int8_optimize_of_a_detector_reports_the_map_drop(detector, settings) -> None:
    from edge_export.optimize import OptimizeSettings, optimize
    from edge_export.quantize import QuantizeConfig
    from visionfleet.registry import Registry

    cfg = OptimizeSettings(
        quantize=QuantizeConfig(mode="int8-static", calibration=16), compare_rounds=1, latency_queries=5,
        peak_memory=False,
    )
    result = optimize(detector.card.ref, cfg, registry=Registry(settings.registry_dir),
                      cache_dir=settings.home / "cache" / "variants", datasets_dir=settings.datasets_dir)
    card = result.card
    m = card.metrics
    assert card.precision == "int8" and card.task.value == "detection"
    assert m["parent_holdout_map50"] == pytest.approx(detector.card.metrics["holdout_map50"], abs=1e-9)
    assert m["map50_drop_pt"] == pytest.approx((m["parent_holdout_map50"] - m["holdout_map50"]) * 100)
    assert np.isfinite(m["map50_95_drop_pt"]) and m["speedup_offline_b8"]["rounds"] == 1
    step = next(s for s in card.lineage.steps if s["op"] == "quantize")
    assert step["fp32_tail_nodes"] > 20  # decode + NMS kept in float


def test_optimize_refuses_to_prune_a_detector(detector, settings) -> None:
    from edge_export.optimize import OptimizeSettings, optimize
    from visionfleet.registry import Registry

    with pytest.raises(ValueError, match="Got --prune for the detector det-tiny:1; expected --quantize only"):
        optimize(detector.card.ref, OptimizeSettings(prune=0.3), registry=Registry(settings.registry_dir),
                 cache_dir=settings.home / "cache" / "variants", datasets_dir=settings.datasets_dir)
