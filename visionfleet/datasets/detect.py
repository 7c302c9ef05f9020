"""Synthetic detection data: several shapes per image on cluttered backgrounds, COCO labels.

The same ten shape classes as the classification data (:data:`.synth.CLASSES`), drawn
the same way (textured backgrounds, distractors, shading, patterns), but one to
``max_objects`` of them per image at smaller scales, each with its box. Every image is
a pure function of ``(seed, index)``.

A detection dataset is a folder with one sub-folder per split, each holding its images
and a COCO-format ``annotations.json`` (what pycocotools, Ultralytics converters and
labeling tools read and write)::

    manifest.json                   name, labels, splits, params (task: detection)
    train/annotations.json          COCO: images, annotations (bbox x, y, w, h), categories
    train/images/000000.png
    holdout/annotations.json
    holdout/images/...

Category ids are 1-based in label order (the COCO convention); readers match a model's
labels to categories by *name*, so real COCO files (ids 1..90 with gaps) work too.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import cv2
import numpy as np

from visionfleet.datasets.synth import (
    CLASSES,
    _background,
    _distractors,
    _fill,
    _rand_color,
    paint_object,
)

__all__ = [
    "DETECTION_TASK",
    "ANNOTATIONS",
    "CocoSplit",
    "render_detection_sample",
    "synthesize_detection",
    "read_coco",
    "coco_split",
    "is_detection_dataset",
]

DETECTION_TASK = "detection"
ANNOTATIONS = "annotations.json"
_MANIFEST = "manifest.json"


def render_detection_sample(
    seed: int, index: int, size: int = 128, max_objects: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One RGB uint8 image, its boxes ``[k, 4]`` (x1, y1, x2, y2, pixels) and class ids ``[k]``.

    Objects overlap at most a little (box IoU < 0.25), so every box is mostly visible;
    the box is the extent of the object's visible pixels after everything is drawn.
    """
    rng = np.random.default_rng([seed, index, 0xDE7EC7])
    s = size
    img = _background(rng, s)
    _distractors(img, rng, s)
    k = int(rng.integers(1, max_objects + 1))
    placed: list[tuple[float, float, float]] = []
    masks: list[np.ndarray] = []
    classes: list[int] = []
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    for _ in range(k):
        for _try in range(12):
            r = s * rng.uniform(0.07, 0.17)
            cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
            if all(_box_iou((cx, cy, r), p) < 0.25 for p in placed):
                break
        else:
            continue  # no room left: fewer objects in this image
        cls_idx = int(rng.integers(0, len(CLASSES)))
        cls = CLASSES[cls_idx]
        img, mask = paint_object(img, rng, cls, cx, cy, r, xx, yy)
        for m in masks:  # what this object covers is no longer visible of the earlier ones
            m *= 1 - mask
        placed.append((cx, cy, r))
        masks.append(mask)
        classes.append(cls_idx)
    if rng.random() < 0.3:  # a small occluder somewhere
        ow, oh = s * rng.uniform(0.05, 0.12), s * rng.uniform(0.05, 0.12)
        ox, oy = rng.uniform(0, s - ow), rng.uniform(0, s - oh)
        pts = np.array([(ox, oy), (ox + ow, oy), (ox + ow, oy + oh), (ox, oy + oh)])
        _fill(img, pts, _rand_color(rng).tolist())
        occ = np.zeros((s, s), np.float32)
        _fill(occ, pts, 1.0)
        for m in masks:
            m *= 1 - occ
    img += rng.normal(0, rng.uniform(0, 6), size=img.shape).astype(np.float32)
    if rng.random() < 0.25:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.8) * s / 128)
    boxes, kept = [], []
    for m, c in zip(masks, classes):
        ys, xs = np.nonzero(m > 0.5)
        if len(xs) < 12:  # hidden behind an occluder: no label for an invisible object
            continue
        boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
        kept.append(c)
    return (
        np.clip(img, 0, 255).astype(np.uint8),
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(kept, np.int64),
    )


def _box_iou(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    (ax, ay, ar), (bx, by, br) = a, b
    iw = max(0.0, min(ax + ar, bx + br) - max(ax - ar, bx - br))
    ih = max(0.0, min(ay + ar, by + br) - max(ay - ar, by - br))
    inter = iw * ih
    return inter / (4 * ar * ar + 4 * br * br - inter)


def _categories(labels: Iterable[str]) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(labels)]


def _write_json(path: Path, doc: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def synthesize_detection(
    dest: str | os.PathLike[str],
    *,
    n_train: int,
    n_holdout: int,
    size: int = 128,
    seed: int = 0,
    max_objects: int = 4,
    name: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write a detection dataset (train and holdout splits, PNG images, COCO labels); returns the manifest.

    The holdout uses sample indices after the training ones, so the splits never share an image.

    Raises:
        ValueError: a split size below 1 (holdout may be 0), a size outside 32..1024 or
            ``max_objects`` outside 1..16.
    """
    if n_train < 1 or n_holdout < 0:
        raise ValueError(f"Got n_train {n_train}, n_holdout {n_holdout}; expected n_train >= 1 and n_holdout >= 0")
    if not 32 <= size <= 1024:
        raise ValueError(f"Got {size} for size; expected 32..1024")
    if not 1 <= max_objects <= 16:
        raise ValueError(f"Got {max_objects} for max_objects; expected 1..16")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / _MANIFEST).exists():
        raise FileExistsError(f"a dataset already exists at {dest}; expected a new folder (or delete it first)")
    labels = list(CLASSES)
    splits: dict[str, int] = {}
    boxes_total = 0
    start = 0
    for split, n in (("train", n_train), ("holdout", n_holdout)):
        if n == 0:
            continue
        img_dir = dest / split / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for k in range(n):
            idx = start + k
            img, boxes, classes = render_detection_sample(seed, idx, size, max_objects)
            file_name = f"{idx:06d}.png"
            ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            if not ok:
                raise RuntimeError(f"PNG encoding failed for sample {idx}")
            (img_dir / file_name).write_bytes(buf.tobytes())
            images.append({"id": idx + 1, "file_name": f"images/{file_name}", "width": size, "height": size})
            for b, c in zip(boxes, classes):
                w, h = float(b[2] - b[0]), float(b[3] - b[1])
                anns.append({
                    "id": len(anns) + 1, "image_id": idx + 1, "category_id": int(c) + 1,
                    "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": 0,
                })
            if progress:
                progress(1)
        _write_json(dest / split / ANNOTATIONS, {
            "info": {"description": f"visionfleet synthetic shapes detection, seed {seed}", "version": "1"},
            "images": images, "annotations": anns, "categories": _categories(labels),
        })
        splits[split] = n
        boxes_total += len(anns)
        start += n
    import datetime as _dt

    manifest = {
        "name": name or dest.name,
        "labels": labels,
        "splits": splits,
        "source": "synthetic-detection",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "params": {"task": DETECTION_TASK, "size": size, "seed": seed, "max_objects": max_objects,
                   "boxes": boxes_total, "format": "coco"},
    }
    _write_json(dest / _MANIFEST, manifest)
    return manifest


@dataclass(frozen=True)
class CocoSplit:
    """A COCO annotation file and the folder its ``file_name`` entries are relative to."""

    path: Path  # the annotations.json
    root: Path  # where images are looked up
    doc: dict[str, Any]

    @property
    def categories(self) -> dict[str, int]:
        """Category name -> id."""
        return {c["name"]: int(c["id"]) for c in self.doc["categories"]}

    def image_path(self, image: dict[str, Any]) -> Path:
        p = self.root / image["file_name"]
        if not p.is_file() and (self.root / "images" / image["file_name"]).is_file():
            p = self.root / "images" / image["file_name"]
        return p

    def __len__(self) -> int:
        return len(self.doc["images"])

    def boxes_by_image(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image id -> (boxes [k, 4] x1, y1, x2, y2, category ids [k]); crowd boxes left out."""
        out: dict[int, tuple[list, list]] = {int(im["id"]): ([], []) for im in self.doc["images"]}
        for a in self.doc["annotations"]:
            if a.get("iscrowd", 0):
                continue
            x, y, w, h = a["bbox"]
            b, c = out.setdefault(int(a["image_id"]), ([], []))
            b.append((x, y, x + w, y + h))
            c.append(int(a["category_id"]))
        return {k: (np.asarray(b, np.float32).reshape(-1, 4), np.asarray(c, np.int64)) for k, (b, c) in out.items()}


def read_coco(path: str | os.PathLike[str], images_dir: str | os.PathLike[str] | None = None) -> CocoSplit:
    """Read a COCO ``annotations.json``; images are found under ``images_dir`` (default: its folder).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a COCO detection file (no images, annotations or categories list).
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"no annotation file at {p}")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"Got {p.name} that is not JSON ({exc.msg} at line {exc.lineno}); expected COCO annotations") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc, dict) or not isinstance(doc.get(k), list)]
    if missing:
        raise ValueError(
            f"Got {p.name} without the list(s) {missing}; expected COCO detection annotations "
            "({'images': [...], 'annotations': [...], 'categories': [...]})"
        )
    if not doc["images"]:
        raise ValueError(f"Got {p.name} with no images; expected at least one labeled image")
    return CocoSplit(p, Path(images_dir).expanduser().resolve() if images_dir else p.parent, doc)


def is_detection_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether a dataset folder holds detection data (its manifest says so)."""
    mf = Path(path) / _MANIFEST
    if not mf.is_file():
        return False
    return json.loads(mf.read_text()).get("params", {}).get("task") == DETECTION_TASK


def coco_split(dataset: str | os.PathLike[str], split: str = "holdout") -> CocoSplit:
    """The COCO annotations of one split of a detection dataset folder.

    Raises:
        FileNotFoundError: no dataset there, or it has no such split.
        ValueError: a classification dataset.
    """
    d = Path(dataset)
    if not (d / _MANIFEST).is_file():
        raise FileNotFoundError(f"no dataset at {d} (missing {_MANIFEST})")
    if not is_detection_dataset(d):
        raise ValueError(
            f"Got the classification dataset {d}; expected a detection dataset "
            "(visionfleet data synth --task detection, or --labels annotations.json)"
        )
    ann = d / split / ANNOTATIONS
    if not ann.is_file():
        have = sorted(p.parent.name for p in d.glob(f"*/{ANNOTATIONS}"))
        raise FileNotFoundError(f"Got no split {split!r} in {d}; expected one of {have}")
    return read_coco(ann)
