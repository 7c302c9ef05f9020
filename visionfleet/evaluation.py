"""Detection accuracy: COCO mAP@0.5 and mAP@0.5:0.95 with pycocotools, the reference evaluator.

:func:`coco_map` scores detections against COCO ground truth (both as plain dicts);
:func:`evaluate_detector` runs any detector obeying the artifact contract on a labeled
split through the one prediction path (:mod:`visionfleet.imaging` resize,
:func:`visionfleet.predict.predictions` back to original pixels), so the mAP a card
records is the mAP of the answers the server and the edge agent give.

A model's labels are matched to the annotation file's categories by *name*; labels
the file does not have are left out of the evaluation (a COCO-80 detector scored on a
file with a few of its classes), and categories the model does not know count as
misses (they stay in the ground truth).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from visionfleet.datasets.detect import CocoSplit
    from visionfleet.spec import ModelCard

__all__ = ["DetectionMetrics", "coco_map", "evaluate_detector", "Detector"]

# images uint8 [N, H, W, 3] -> (boxes [N, K, 4], scores [N, K], classes [N, K])
Detector = Callable[[np.ndarray], Sequence[np.ndarray]]


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO box metrics of one detector on one labeled split."""

    map50: float  # AP at IoU 0.5, averaged over categories
    map50_95: float  # AP averaged over IoU 0.50:0.05:0.95 and categories (the COCO headline)
    map75: float
    images: int
    gt_boxes: int
    detections: int
    per_class_ap50: dict[str, float] = field(default_factory=dict)
    evaluator: str = "pycocotools"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _evaluator_version() -> str:
    import importlib.metadata as md

    return f"pycocotools {md.version('pycocotools')}"


def coco_map(gt: dict[str, Any], detections: Sequence[dict[str, Any]]) -> DetectionMetrics:
    """mAP of ``detections`` (COCO results: image_id, category_id, bbox x,y,w,h, score) against ``gt``.

    No detections at all scores 0 (pycocotools refuses an empty result list).

    Raises:
        ValueError: a detection names an image the ground truth does not have.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_ids = {int(im["id"]) for im in gt["images"]}
    unknown = {int(d["image_id"]) for d in detections} - image_ids
    if unknown:
        raise ValueError(f"Got detections for image ids {sorted(unknown)[:5]}; expected ids of the ground truth")
    n_gt = sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0))
    if not detections or n_gt == 0:
        return DetectionMetrics(0.0, 0.0, 0.0, len(image_ids), n_gt, len(detections), evaluator=_evaluator_version())
    doc = {"images": gt["images"], "categories": gt["categories"],
           "annotations": [{**a, "iscrowd": a.get("iscrowd", 0), "area": a.get("area", a["bbox"][2] * a["bbox"][3])}
                           for a in gt["annotations"]]}
    # pycocotools prints its progress and summary on stdout, which is for results (--json).
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = doc
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats  # [0] AP@[.5:.95], [1] AP@.5, [2] AP@.75 (-1 where nothing to score)
    # precision[T, R, K, A, M]: IoU thresholds x recall points x categories x areas x max dets
    prec = ev.eval["precision"]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = prec[0, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            per_class[coco_gt.cats[cat_id]["name"]] = float(p.mean())
    return DetectionMetrics(
        map50=max(0.0, float(stats[1])),
        map50_95=max(0.0, float(stats[0])),
        map75=max(0.0, float(stats[2])),
        images=len(image_ids),
        gt_boxes=n_gt,
        detections=len(detections),
        per_class_ap50=per_class,
        evaluator=_evaluator_version(),
    )


def evaluate_detector(
    detect: Detector,
    card: "ModelCard",
    split: "CocoSplit",
    *,
    batch: int = 16,
    limit: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> DetectionMetrics:
    """Run a contract-obeying detector on a labeled COCO split and score it with :func:`coco_map`.

    ``detect`` takes uint8 NHWC images at ``card.input_size`` and returns the contract's
    outputs (``boxes``, ``scores``, ``classes``); images are resized with the card's
    mode and boxes mapped back to original pixels exactly as when serving.

    Raises:
        ValueError: none of the model's labels is a category of the file.
    """
    from visionfleet.imaging import load_for_model
    from visionfleet.predict import predictions

    cats = split.categories
    label_to_cat = {i: cats[name] for i, name in enumerate(card.labels) if name in cats}
    if not label_to_cat:
        raise ValueError(
            f"Got annotation categories {sorted(cats)[:10]} and model labels {card.labels[:10]}; expected shared "
            "names (detections are matched to categories by label name)"
        )
    images = split.doc["images"][:limit] if limit else split.doc["images"]
    evaluated = {int(im["id"]) for im in images}
    gt = {
        "images": images,
        "categories": [c for c in split.doc["categories"]],
        "annotations": [a for a in split.doc["annotations"] if int(a["image_id"]) in evaluated],
    }
    size = tuple(card.input_size)
    results: list[dict[str, Any]] = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        xs, infos = [], []
        for im in chunk:
            x, info = load_for_model(split.image_path(im).read_bytes(), size, card.resize)  # type: ignore[arg-type]
            xs.append(x)
            infos.append(info)
        outputs = detect(np.stack(xs))
        for im, pred in zip(chunk, predictions(card, outputs, infos)):
            for d in pred.detections or ():
                if d.class_id not in label_to_cat:
                    continue
                x1, y1, x2, y2 = d.box
                results.append({
                    "image_id": int(im["id"]), "category_id": label_to_cat[d.class_id],
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d.score,
                })
        if on_batch:
            on_batch(min(start + batch, len(images)), len(images))
    return coco_map(gt, results)
