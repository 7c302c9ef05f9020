"""Synthetic generator determinism and drift; Parquet storage; ImageFolder import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from visionfleet.datasets.store import import_image_folder, load_arrays, read_info, read_split, synthesize
from visionfleet.datasets.synth import CLASSES, Drift, apply_drift, render_sample
from visionfleet.imaging import decode_image, encode_image


def test_generator_is_deterministic() -> None:
    a, la = render_sample(3, 17, 64)
    b, lb = render_sample(3, 17, 64)
    c, _ = render_sample(4, 17, 64)
    assert la == lb and np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_generator_any_resolution_and_forced_label() -> None:
    for size in (16, 40, 64, 257):
        img, label = render_sample(0, 1, size, label=5)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8 and label == 5


def test_all_classes_appear_roughly_uniformly() -> None:
    labels = [render_sample(0, i, 32)[1] for i in range(1000)]
    counts = np.bincount(labels, minlength=len(CLASSES))
    assert len(CLASSES) >= 8
    assert counts.min() > 60 and counts.max() < 140


def test_drift_knobs_change_the_pixels_as_documented() -> None:
    img, _ = render_sample(0, 5, 64)
    darker = apply_drift(img, Drift(brightness=-60))
    assert darker.mean() < img.mean() - 40
    blurred = apply_drift(img, Drift(blur=2.0))
    lap = lambda x: np.abs(np.diff(x.astype(float), axis=0)).mean()  # noqa: E731
    assert lap(blurred) < lap(img) * 0.7
    cast = apply_drift(img, Drift(color_cast=(40, 0, -40)))
    assert cast[..., 0].mean() > img[..., 0].mean() + 20 and cast[..., 2].mean() < img[..., 2].mean() - 20
    assert np.array_equal(apply_drift(img, Drift()), img)
    with pytest.raises(ValueError):
        Drift(contrast=0)
    with pytest.raises(ValueError):
        Drift(jpeg_quality=0)


def test_synthesize_writes_parquet_splits(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    info = synthesize(out, n_train=50, n_holdout=20, size=32, seed=1)
    assert info.splits == {"train": 50, "holdout": 20} and info.labels == list(CLASSES)
    assert read_info(out).splits == info.splits
    table = read_split(out, "train")
    assert table.num_rows == 50 and set(table.column_names) >= {"id", "image", "label", "label_name", "source", "meta"}
    ids_train = set(table.column("id").to_pylist())
    ids_hold = set(read_split(out, "holdout").column("id").to_pylist())
    assert not ids_train & ids_hold  # disjoint samples
    # stored bytes decode to exactly the generated image (PNG is lossless)
    row = table.slice(0, 1).to_pylist()[0]
    img = decode_image(row["image"])
    assert np.array_equal(img, render_sample(1, 0, 32)[0]) and row["label"] == render_sample(1, 0, 32)[1]
    x, y = load_arrays(out, "train", (24, 24))
    assert x.shape == (50, 24, 24, 3) and y.shape == (50,)
    xs, _ = load_arrays(out, "train", (24, 24), shard=(1, 2))
    assert len(xs) == 25
    with pytest.raises(FileExistsError):
        synthesize(out, n_train=1, n_holdout=1)


def test_synthesize_a_subset_of_classes(tmp_path: Path) -> None:
    subset = ["stripes", "circle", "cross"]
    info = synthesize(tmp_path / "s", n_train=30, n_holdout=9, size=32, seed=4, classes=subset)
    assert info.labels == subset and info.params["classes"] == subset
    rows = read_split(tmp_path / "s", "train").to_pylist()
    assert [r["label"] for r in rows] == [0, 1, 2] * 10  # balanced, label i is subset[i]
    assert all(r["label_name"] == subset[r["label"]] for r in rows)
    # the pixels are the generator's own sample of that class
    first = decode_image(rows[1]["image"])
    assert np.array_equal(first, render_sample(4, 1, 32, label=CLASSES.index("circle"))[0])
    for bad in (["circle"], ["circle", "circle"], ["circle", "dragon"]):
        with pytest.raises(ValueError, match="distinct names"):
            synthesize(tmp_path / "bad", n_train=3, n_holdout=0, classes=bad)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_synthesize_with_jpeg_drift(tmp_path: Path) -> None:
    info = synthesize(tmp_path / "d", n_train=5, n_holdout=0, size=32, drift=Drift(jpeg_quality=30, brightness=-20))
    assert info.params["format"] == "jpeg"
    assert read_split(tmp_path / "d", "train").column("format").to_pylist() == ["jpeg"] * 5


def test_import_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for cls in ("cats", "dogs", "owls"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            img, _ = render_sample(hash(cls) % 1000, i, 40)
            fmt = ("jpeg", "png", "webp")[i % 3]
            (root / cls / f"{i}.{ 'jpg' if fmt == 'jpeg' else fmt}").write_bytes(encode_image(img, fmt))
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "dogs" / "notes.txt").write_text("ignored: not an image suffix")
    info, skipped = import_image_folder(root, tmp_path / "ds", holdout_fraction=0.25)
    assert info.labels == ["cats", "dogs", "owls"]
    assert sum(info.splits.values()) == 36
    assert [s[0] for s in skipped] == ["dogs/broken.jpg"]
    # the split is a stable function of the path: a second import agrees
    info2, _ = import_image_folder(root, tmp_path / "ds2", holdout_fraction=0.25)
    ids = lambda p, s: sorted(read_split(p, s).column("id").to_pylist())  # noqa: E731
    assert ids(tmp_path / "ds", "holdout") == ids(tmp_path / "ds2", "holdout")
    labels = read_split(tmp_path / "ds", "train").column("label_name").to_pylist()
    assert set(labels) <= {"cats", "dogs", "owls"}


def test_import_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        import_image_folder(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(ValueError):
        import_image_folder(tmp_path / "one", tmp_path / "o")
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir(parents=True)
    with pytest.raises(ValueError):
        import_image_folder(tmp_path / "two", tmp_path / "o")
