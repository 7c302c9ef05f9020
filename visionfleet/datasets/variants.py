"""Encode one RGB image the many ways clients send images: formats, modes, depths, EXIF.

Used by the demo's request mix and by the tests of every format and mode. Each variant
decodes (with :func:`visionfleet.imaging.decode_image`) back to the same picture, up to
compression loss and the color-to-gray conversion of the gray variant.
"""

from __future__ import annotations

import io

import cv2
import numpy as np

from visionfleet.imaging import encode_image

__all__ = ["VARIANTS", "encode_variant"]

VARIANTS = (
    "jpeg",
    "png",
    "webp",
    "bmp",
    "tiff",
    "png-gray",
    "png-rgba",
    "png-16bit",
    "tiff-16bit",
    "jpeg-exif-rotated",
)

_MEDIA = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "bmp": "image/bmp", "tiff": "image/tiff"}


def encode_variant(img: np.ndarray, variant: str, quality: int = 92) -> tuple[bytes, str]:
    """Return ``(encoded bytes, media type)`` for an RGB uint8 image."""
    if variant in ("jpeg", "png", "webp", "bmp", "tiff"):
        return encode_image(img, variant, quality), _MEDIA[variant]
    if variant == "png-gray":
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        return encode_image(gray, "png"), "image/png"
    if variant == "png-rgba":
        alpha = np.full(img.shape[:2], 255, np.uint8)
        alpha[: img.shape[0] // 8] = 128  # a semi-transparent band; alpha is dropped on decode
        bgra = cv2.cvtColor(img, cv2.COLOR_RGB2BGRA)
        bgra[:, :, 3] = alpha
        ok, buf = cv2.imencode(".png", bgra)
        assert ok
        return buf.tobytes(), "image/png"
    if variant in ("png-16bit", "tiff-16bit"):
        wide = cv2.cvtColor(img, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
        ok, buf = cv2.imencode(".png" if variant == "png-16bit" else ".tiff", wide)
        assert ok
        return buf.tobytes(), "image/png" if variant == "png-16bit" else "image/tiff"
    if variant == "jpeg-exif-rotated":
        from PIL import Image

        # Store the pixels turned 90 degrees counter-clockwise with EXIF orientation 6
        # ("rotate 90 CW to display"), as phone cameras do; a correct decoder shows the original.
        stored = np.ascontiguousarray(np.rot90(img, 1))
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        Image.fromarray(stored).save(buf, "JPEG", quality=quality, exif=exif.tobytes())
        return buf.getvalue(), "image/jpeg"
    raise ValueError(f"Got {variant!r} for variant; expected one of {', '.join(VARIANTS)}")
