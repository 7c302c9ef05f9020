"""Decoding every format and mode, typed errors, bombs, resize modes."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest

from visionfleet.datasets.variants import VARIANTS, encode_variant
from visionfleet.imaging import (
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    ResizeMode,
    TruncatedImage,
    UnsupportedImageFormat,
    decode_image,
    encode_image,
    image_size,
    resize_image,
    sniff_format,
)

LOSSLESS = {"png", "bmp", "tiff", "png-rgba", "png-16bit", "tiff-16bit"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_decodes_to_the_original_picture(variant: str, sample_rgb: np.ndarray) -> None:
    data, media = encode_variant(sample_rgb, variant)
    assert media.startswith("image/")
    out = decode_image(data)
    assert out.dtype == np.uint8 and out.shape == sample_rgb.shape
    if variant in LOSSLESS:
        assert np.array_equal(out, sample_rgb), variant
    elif variant == "png-gray":
        gray = cv2.cvtColor(sample_rgb, cv2.COLOR_RGB2GRAY)
        assert np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    else:  # lossy: close on average
        assert np.abs(out.astype(int) - sample_rgb.astype(int)).mean() < 6.0, variant


def test_exif_orientation_is_applied(sample_rgb: np.ndarray) -> None:
    data, _ = encode_variant(sample_rgb, "jpeg-exif-rotated")
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    assert raw.shape[:2] == sample_rgb.shape[1::-1] or raw.shape[:2] == sample_rgb.shape[:2]
    out = decode_image(data)
    # Decoded upright equals the original far better than the stored (rotated) pixels do.
    upright = np.abs(out.astype(int) - sample_rgb.astype(int)).mean()
    stored = np.abs(cv2.cvtColor(raw, cv2.COLOR_BGR2RGB).astype(int) - sample_rgb.astype(int)).mean()
    assert upright < 6.0 < stored


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_exif_orientations_match_pillow(orientation: int, sample_rgb: np.ndarray) -> None:
    from PIL import Image, ImageOps

    img = sample_rgb[:, :80]  # non-square, so transposes are visible
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, "PNG", exif=exif.tobytes())
    ours = decode_image(buf.getvalue())
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
    assert np.array_equal(ours, ref)


def test_empty_and_unsupported() -> None:
    with pytest.raises(EmptyImage):
        decode_image(b"")
    with pytest.raises(UnsupportedImageFormat):
        decode_image(b"GIF89a" + b"\x00" * 100)
    with pytest.raises(UnsupportedImageFormat):
        decode_image(b"hello, this is text")


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "bmp", "tiff"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_files_are_refused(fmt: str, keep: float, sample_rgb: np.ndarray) -> None:
    data = encode_image(sample_rgb, fmt)
    cut = data[: max(16, int(len(data) * keep))]
    with pytest.raises((TruncatedImage, CorruptImage)):
        decode_image(cut)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "bmp", "tiff"])
def test_corrupt_headers_are_refused(fmt: str, sample_rgb: np.ndarray) -> None:
    data = bytearray(encode_image(sample_rgb, fmt))
    magic = {"jpeg": 3, "png": 8, "webp": 12, "bmp": 2, "tiff": 4}[fmt]
    for i in range(magic, min(len(data), magic + 40)):
        data[i] = 0xFF ^ data[i]
    with pytest.raises((CorruptImage, UnsupportedImageFormat, ImageTooLarge)):
        decode_image(bytes(data))


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height: a few KB on the wire."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_without_allocating_it() -> None:
    bomb = _png_bomb(12000, 12000)  # 144 MP, 432 MB as RGB
    assert len(bomb) < 200_000
    assert image_size(bomb) == (12000, 12000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge):
            decode_image(bomb, max_pixels=40_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024  # nowhere near the 432 MB a decode would take


def test_pixel_limit_is_configurable(sample_rgb: np.ndarray) -> None:
    data = encode_image(sample_rgb, "png")
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_pixels=96 * 96 - 1)
    assert decode_image(data, max_pixels=96 * 96).shape == (96, 96, 3)


def test_sniff_format() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    for fmt in ("jpeg", "png", "webp", "bmp", "tiff"):
        assert sniff_format(encode_image(img, fmt)).value == fmt
    assert sniff_format(b"nope") is None


@pytest.mark.parametrize("src", [(48, 96), (96, 48), (64, 64), (30, 200)])
@pytest.mark.parametrize("mode", list(ResizeMode))
def test_resize_modes_shapes(src: tuple[int, int], mode: ResizeMode) -> None:
    img = np.random.default_rng(0).integers(0, 255, (*src, 3), dtype=np.uint8)
    for dst in ((64, 64), (32, 48), (100, 60)):
        out, info = resize_image(img, dst, mode)
        assert out.shape == (*dst, 3) and out.dtype == np.uint8
        assert info.original_width == src[1] and info.original_height == src[0]


def test_letterbox_keeps_aspect_and_maps_boxes_back() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    img[40:60, 90:110] = 255  # a white square in the middle
    out, info = resize_image(img, (64, 64), ResizeMode.LETTERBOX)
    assert out[0, 0, 0] == 114 and out[-1, -1, 0] == 114  # padding above and below
    ys, xs = np.nonzero(out[:, :, 0] > 200)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    back = info.to_original(box)[0]
    assert np.allclose(back, [90, 40, 110, 60], atol=2.0)


def test_center_crop_takes_the_middle() -> None:
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # only the middle third is white
    out, info = resize_image(img, (50, 50), ResizeMode.CENTER_CROP)
    assert out.mean() > 250
    back = info.to_original(np.array([[0, 0, 50, 50]], np.float32))[0]
    assert np.allclose(back, [100, 0, 200, 100], atol=1.0)


def test_stretch_box_mapping() -> None:
    img = np.zeros((50, 100, 3), np.uint8)
    _, info = resize_image(img, (25, 25), ResizeMode.STRETCH)
    assert np.allclose(info.to_original(np.array([[0, 0, 25, 25]]))[0], [0, 0, 100, 50])


def test_bad_resize_arguments() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError):
        resize_image(img, (0, 8))
    with pytest.raises(ValueError):
        resize_image(img, (8, 8), "squash")


def test_pillow_cap_bombs_are_refused_too() -> None:
    with pytest.raises(ImageTooLarge):
        decode_image(_png_bomb(20000, 20000))  # 400 MP: PIL's own header check refuses it
