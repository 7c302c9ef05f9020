"""Training defaults that adapt to the data: what ``visionfleet train`` picks when told nothing.

:func:`plan_training` looks at the dataset (size, image size, colour, class balance and
whether flipping an image keeps its class) and returns a :class:`Plan`: every setting it
chose with the reason, so the CLI can print it and the card can keep it. A setting the
user gave is kept and marked ``given``.

The rules (measured on the generated shapes, sklearn's digits, LFW faces and ELPV solar
cells; docs/training.md, docs/performance.md):

* **input size**: the images' median side rounded up to a multiple of 8, within 16..64;
* **model**: ResNet; a CIFAR-style stem (stride 1) at 32 px and below, stride 2 above;
  width 16 (32 from 20,000 training images on);
* **batch, learning rate**: batch 128, smaller for small sets (about 8 steps an epoch at
  least, 16 at the smallest); peak LR 0.2 scaled with the batch (linear rule), warm-up
  then cosine to zero;
* **budget**: about 1,000 optimizer steps, at most 150 epochs and 100,000 image passes,
  and never fewer than 12 epochs (the 12,000-image generated set keeps its 12);
* **validation**: 15% of the training split (stratified) is held back for early stopping
  (patience: a quarter of the epochs, at least 8) and the best epoch's weights are kept;
  the holdout split stays untouched until the end;
* **flips**: a nearest-class-mean classifier is fit on half the training images and scored
  on the other half as they are and flipped: a flip that keeps 90% of its accuracy above
  chance keeps the class, so it is used as augmentation (left-right only, or all eight
  flips and turns when up-down and transposition keep it too); digits and text lose it;
* **grayscale**: images whose sampled pixels have R = G = B train a 1-channel model;
* **imbalance**: classes whose largest/smallest count ratio is 1.5 or more get a weighted
  loss (inverse square root of the class share, mean weight 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Plan", "plan_training", "flip_evidence", "FLIPS"]

FLIPS = ("auto", "off", "horizontal", "dihedral")
_PROBE = 24  # side of the images the probes look at


@dataclass
class Plan:
    """Chosen settings: ``values`` go into TrainConfig; ``why`` says why, per setting."""

    values: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # what was measured

    def set(self, key: str, value: Any, why: str) -> None:
        self.values[key] = value
        self.why[key] = why

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.values, "why": self.why, "data": self.data}


def flip_evidence(x: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0) -> dict[str, float]:
    """Share of a nearest-class-mean classifier's skill (above chance) that each flip keeps.

    ``x``: gray images [N, H, W]. Returns ``{"skill": acc - chance, "horizontal": r,
    "vertical": r, "transpose": r}`` with ``r = (acc_flipped - chance) / (acc - chance)``.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    fit, score = order[: len(x) // 2], order[len(x) // 2 :]

    def feats(a: np.ndarray) -> np.ndarray:
        f = a.reshape(len(a), -1).astype(np.float64)
        f -= f.mean(1, keepdims=True)
        return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-9)

    centroids = np.zeros((num_classes, x[0].size))
    for c in range(num_classes):
        m = y[fit] == c
        if m.any():
            centroids[c] = feats(x[fit][m]).mean(0)
    chance = float(np.bincount(y[score], minlength=num_classes).max() / max(1, len(score)))

    def acc(a: np.ndarray) -> float:
        return float(((feats(a) @ centroids.T).argmax(1) == y[score]).mean())

    base = acc(x[score])
    skill = base - chance
    out = {"skill": skill, "accuracy": base, "chance": chance}
    for name, f in (("horizontal", lambda a: a[:, :, ::-1]), ("vertical", lambda a: a[:, ::-1, :]),
                    ("transpose", lambda a: a.transpose(0, 2, 1))):
        out[name] = (acc(f(x[score])) - chance) / skill if skill > 1e-9 else 1.0
    return out


def _round8(v: float) -> int:
    return int(8 * math.ceil(v / 8))


def plan_training(
    dataset: str | Path,
    *,
    given: dict[str, Any] | None = None,
    flips: str = "auto",
    probe_images: int = 600,
) -> Plan:
    """Choose the training settings for ``dataset``; ``given`` holds the user's (kept as is).

    ``given`` may name input_size, arch, width, depths, stem_stride, epochs, batch_size,
    lr, grayscale (bool), balance (bool), val_fraction, patience. ``flips`` is one of
    :data:`FLIPS`; ``auto`` also reads a ``flips`` setting from the dataset's manifest params.
    """
    from visionfleet.datasets.store import load_arrays, read_info, read_split

    given = {k: v for k, v in (given or {}).items() if v is not None}
    if flips not in FLIPS:
        raise ValueError(f"Got {flips!r} for --flips; expected one of {', '.join(FLIPS)}")
    path = Path(dataset)
    info = read_info(path)
    meta = read_split(path, "train", columns=["label", "width", "height"])
    labels = meta.column("label").to_numpy()
    k = len(info.labels)
    counts = np.bincount(labels, minlength=k)
    n = int(len(labels))
    widths = np.asarray([w for w in meta.column("width").to_pylist() if w], dtype=float)
    heights = np.asarray([h for h in meta.column("height").to_pylist() if h], dtype=float)
    side = float(np.median(np.minimum(widths, heights))) if len(widths) else 64.0
    plan = Plan()
    plan.data = {"train_images": n, "classes": k, "class_counts": counts.tolist(), "median_side": side}

    def pick(key: str, value: Any, why: str) -> None:
        if key in given:
            plan.set(key, given[key], "given")
        else:
            plan.set(key, value, why)

    # --- input size and model
    size = min(64, max(16, _round8(side)))
    pick("input_size", size, f"median image side {side:.0f} px, rounded up to a multiple of 8 within 16..64")
    size = plan.values["input_size"]
    pick("arch", "resnet", "the built-in ResNet (basic blocks)")
    pick("stem_stride", 1 if size <= 32 else 2,
         f"{'no' if size <= 32 else 'a stride-2'} downsampling in the stem at {size} px")
    width = 32 if n >= 20_000 else 16
    pick("width", width, f"{n} training images: width {width} ({'>=' if width == 32 else '<'} 20,000 images)")
    pick("depths", [1, 1, 1, 1], "one basic block per stage")

    # --- validation split and early stopping
    pick("val_fraction", 0.15, "15% of the training split, stratified, for early stopping and best-epoch restore")
    n_fit = int(n * (1 - plan.values["val_fraction"]))

    # --- batch, budget, learning rate
    batch = 128
    while batch > 16 and n_fit / batch < 8:
        batch //= 2
    pick("batch_size", batch, f"{n_fit} images to fit: about {max(1, n_fit // batch)} steps an epoch")
    batch = plan.values["batch_size"]
    steps = max(1, n_fit // batch)
    epochs = max(12, min(150, math.ceil(1000 / steps), 100_000 // max(1, n_fit)))
    pick("epochs", epochs, f"about 1,000 steps at {steps} an epoch, within 12..150 epochs and 100,000 image passes "
                           "(12 epochs at least)")
    epochs = plan.values["epochs"]
    pick("lr", round(0.2 * batch / 128, 4), f"peak 0.2 at batch 128, scaled linearly to batch {batch}; warm-up then cosine")
    pick("patience", max(8, epochs // 4), "stop when the validation top-1 has not improved for this many epochs")

    # --- probes: colour and flips on a sample of decoded training images
    x, y = load_arrays(path, "train", (_PROBE, _PROBE), limit=None)
    if len(x) > probe_images:
        keep = np.random.default_rng(0).choice(len(x), probe_images, replace=False)
        x, y = x[keep], y[keep]
    xi = x.astype(np.int16)
    gray = bool(np.abs(xi[..., 0] - xi[..., 1]).max() <= 2 and np.abs(xi[..., 1] - xi[..., 2]).max() <= 2)
    plan.data["grayscale"] = gray
    pick("grayscale", gray, "sampled pixels have R = G = B: a 1-channel model" if gray else "colour images: 3 channels")

    if flips != "auto":
        plan.set("flips", flips, "given")
    elif info.params.get("flips") in FLIPS[1:]:
        plan.set("flips", info.params["flips"], f"the dataset's manifest says flips={info.params['flips']}")
    else:
        ev = flip_evidence(x.mean(-1), y, k)
        plan.data["flip_evidence"] = {kk: round(v, 3) for kk, v in ev.items()}
        keep = 0.9
        h = ev["horizontal"] >= keep
        v = ev["vertical"] >= keep and ev["transpose"] >= keep
        if ev["skill"] < 0.05:
            choice, why = "horizontal", "a nearest-class-mean probe has no skill here: left-right flips, the usual default"
        elif not h:
            choice, why = "off", f"a left-right flip keeps only {ev['horizontal']:.0%} of a nearest-class-mean probe's skill (orientation matters: digits, text)"
        elif not v:
            choice, why = "horizontal", (f"left-right keeps {ev['horizontal']:.0%} of the probe's skill, up-down/transpose "
                                         f"{min(ev['vertical'], ev['transpose']):.0%}: left-right flips only")
        else:
            choice, why = "dihedral", (f"every flip keeps >= {keep:.0%} of the probe's skill "
                                       f"(h {ev['horizontal']:.0%}, v {ev['vertical']:.0%}, t {ev['transpose']:.0%}): all 8 flips and turns")
        plan.set("flips", choice, why)

    # --- class imbalance
    ratio = float(counts.max() / max(1, counts.min()))
    plan.data["imbalance_ratio"] = round(ratio, 3)
    skewed = ratio >= 1.5
    pick("balance", skewed, f"largest/smallest class ratio {ratio:.2f} "
         + ("(>= 1.5): weighted loss" if skewed else "(< 1.5): plain loss"))
    if plan.values["balance"]:
        share = np.maximum(counts, 1) / counts.sum()
        w = 1 / np.sqrt(share)
        plan.data["class_weights"] = [round(float(v), 4) for v in w / w.mean()]
    return plan
