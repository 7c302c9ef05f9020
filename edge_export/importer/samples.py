"""Real images for parity checks: synthetic ones encoded and decoded like uploads, or a user's folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from visionfleet.imaging import ResizeMode, decode_image, encode_image, resize_image

__all__ = ["sample_images", "load_sample_images"]


def sample_images(size: tuple[int, int], resize: ResizeMode | str, n: int = 24, seed: int = 20240) -> np.ndarray:
    """Real encoded images (procedural, JPEG round trip) preprocessed like serving does.

    Used for parity checks when the user gives no images of their own; the originals
    have varied aspect ratios so letterbox and center-crop paths are exercised.
    """
    from visionfleet.datasets.synth import render_sample

    out = []
    for i in range(n):
        img, _ = render_sample(seed, i, size=96)
        crop = img[: 64 + (i % 3) * 16] if i % 2 else img[:, : 64 + (i % 3) * 16]
        decoded = decode_image(encode_image(np.ascontiguousarray(crop), "jpeg", quality=90))
        out.append(resize_image(decoded, size, resize)[0])
    return np.stack(out)


def load_sample_images(folder: str | os.PathLike[str], size: tuple[int, int], resize: ResizeMode | str,
                       limit: int = 32) -> np.ndarray:
    """Decode and resize up to ``limit`` images from ``folder`` (sorted by name)."""
    p = Path(folder)
    if not p.is_dir():
        raise NotADirectoryError(f"no such folder: {p}")
    images = []
    for f in sorted(p.iterdir()):
        if len(images) >= limit:
            break
        if f.is_file() and f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"):
            images.append(resize_image(decode_image(f.read_bytes()), size, resize)[0])
    if not images:
        raise ValueError(f"Got no images in {p}; expected JPEG, PNG, WebP, BMP or TIFF files")
    return np.stack(images)
