"""Real image datasets that ship inside PyPI wheels, imported into the Parquet schema.

Nobody here generated them; each comes from a package of the ``datasets`` extra (or a
core dependency) and needs no download at run time:

* ``lfw-faces``: ``skimage.data.lfw_subset()`` (scikit-image): 200 grayscale 25x25 crops
  from Labeled Faces in the Wild, 100 faces and 100 non-faces;
* ``elpv``: the ELPV benchmark (``elpv-dataset``): 2,624 grayscale 300x300
  electroluminescence images of solar cells from 44 modules, each with a defect
  probability (0, 1/3, 2/3, 1) that experts gave; here ``defective`` means >= 0.5, so
  1,803 functional and 821 defective cells (a skewed task). Licence CC BY-NC-SA 4.0;
* ``digits``: ``sklearn.datasets.load_digits()`` (scikit-learn): 1,797 handwritten digits
  8x8 (16 gray levels), the issue's regression check.

The held-out split is a stable hash of each image's id (as ``import-folder`` does), so
the same package version always gives the same split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["BUILTIN", "BuiltinDataset", "import_builtin"]


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    package: str  # the pip package that ships it
    summary: str
    licence: str
    load: Callable[[], tuple[list[np.ndarray], list[int], list[str], list[str]]]  # images, labels, names, ids


def _lfw():
    from skimage.data import lfw_subset

    x = lfw_subset()  # (200, 25, 25) float in 0..1; the first 100 are faces
    images = [np.round(im * 255).astype(np.uint8) for im in x]
    labels = [0 if i < 100 else 1 for i in range(len(images))]
    return images, labels, ["face", "non-face"], [f"lfw-subset-{i:03d}" for i in range(len(images))]


def _elpv():
    import elpv_dataset
    from PIL import Image

    # the package's labels.csv, read as its own elpv_dataset.utils.load_dataset does; the
    # images one at a time (that loader stacks all 2,624 at once)
    root = Path(elpv_dataset.__file__).parent / "data"
    data = np.genfromtxt(root / "labels.csv", dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    images, labels, ids = [], [], []
    for path, prob in zip(np.char.decode(data["path"]), data["probability"]):
        with Image.open(root / path) as im:
            images.append(np.asarray(im.convert("L")))
        labels.append(1 if prob >= 0.5 else 0)
        ids.append(f"elpv-{Path(path).stem}")
    return images, labels, ["functional", "defective"], ids


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [np.round(im * (255 / 16)).astype(np.uint8) for im in d.images]
    return images, [int(t) for t in d.target], [str(c) for c in range(10)], [f"digits-{i:04d}" for i in range(len(images))]


BUILTIN: dict[str, BuiltinDataset] = {
    "lfw-faces": BuiltinDataset("lfw-faces", "scikit-image", "200 grayscale 25x25 crops: faces vs non-faces (LFW)",
                                "LFW: public research data", _lfw),
    "elpv": BuiltinDataset("elpv", "elpv-dataset", "2,624 grayscale 300x300 solar cells: functional vs defective",
                           "CC BY-NC-SA 4.0", _elpv),
    "digits": BuiltinDataset("digits", "scikit-learn", "1,797 handwritten digits 8x8 (16 gray levels)",
                             "BSD-3 (scikit-learn)", _digits),
}


def _split_of(key: str, holdout_fraction: float, seed: int) -> str:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "holdout" if int.from_bytes(h[:8], "big") / 2**64 < holdout_fraction else "train"


def import_builtin(
    name: str,
    out: Path,
    *,
    holdout_fraction: float = 0.25,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
):
    """Write the built-in dataset ``name`` to ``out`` (train and holdout splits, PNG images).

    Raises:
        ValueError: an unknown name or a bad fraction; ImportError: its package is missing.
    """
    from visionfleet.datasets.store import _MANIFEST, DatasetInfo, DatasetWriter, _write_manifest
    from visionfleet.imaging import ImageFormat, encode_image

    if name not in BUILTIN:
        raise ValueError(f"Got {name!r} for the built-in dataset; expected one of {', '.join(sorted(BUILTIN))}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"Got {holdout_fraction} for holdout_fraction; expected 0 < f < 1")
    spec = BUILTIN[name]
    out = Path(out)
    if (out / _MANIFEST).exists():
        raise FileExistsError(f"a dataset already exists at {out}; choose another --out or delete it")
    try:
        images, labels, names, ids = spec.load()
    except ImportError as exc:
        raise ImportError(
            f"Got no package {spec.package!r} ({exc}); expected it installed for the {name!r} dataset: "
            f"pip install 'visionfleet[datasets]'"
        ) from exc
    out.mkdir(parents=True, exist_ok=True)
    writers = {s: DatasetWriter(out, s) for s in ("train", "holdout")}
    try:
        for img, label, id_ in zip(images, labels, ids):
            writers[_split_of(id_, holdout_fraction, seed)].write(
                {
                    "id": id_,
                    "image": encode_image(img, ImageFormat.PNG),  # gray stays 1-channel PNG
                    "label": int(label),
                    "label_name": names[label],
                    "source": f"builtin:{name}",
                    "width": int(img.shape[1]),
                    "height": int(img.shape[0]),
                    "format": "png",
                    "meta": json.dumps({"package": spec.package}),
                }
            )
            if progress:
                progress(1)
    finally:
        for w in writers.values():
            w.close()
    info = DatasetInfo(
        name=out.name,
        labels=names,
        splits={s: w.rows for s, w in writers.items() if w.rows},
        source=f"builtin:{name}",
        params={"package": spec.package, "licence": spec.licence, "holdout_fraction": holdout_fraction, "seed": seed},
    )
    _write_manifest(out, info)
    return info
