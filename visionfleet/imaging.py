"""Image decoding and resizing shared by training, serving, batch jobs and the edge agent.

Every path that turns bytes into model input goes through :func:`decode_image` and
:func:`resize_image`, so train, serve and edge cannot skew.

Decoding rules:
  * formats: JPEG, PNG, WebP, BMP, TIFF (sniffed from magic bytes, never trusted
    from a file name or content type);
  * output: RGB ``uint8`` HxWx3; grayscale is replicated, alpha is dropped (like
    ``PIL.Image.convert("RGB")``), 16-bit and float images are scaled to 8 bits;
  * EXIF orientation is applied;
  * the pixel count is read from the header and checked *before* decoding, so a
    decompression bomb is refused without allocating it;
  * truncated, corrupt, empty and unsupported input raise a typed
    :class:`ImageError` subclass.
"""

from __future__ import annotations

import enum
import io
import math
import struct
import warnings
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

__all__ = [
    "ImageError",
    "EmptyImage",
    "UnsupportedImageFormat",
    "CorruptImage",
    "TruncatedImage",
    "ImageTooLarge",
    "ImageFormat",
    "ResizeMode",
    "ResizeInfo",
    "sniff_format",
    "image_size",
    "decode_image",
    "resize_image",
    "encode_image",
    "load_for_model",
    "SizeNotServed",
    "parse_size",
    "format_size",
    "choose_size",
    "preprocess",
]


class ImageError(ValueError):
    """Base class of every input-image error; the message is safe to show a client."""


class EmptyImage(ImageError):
    pass


class UnsupportedImageFormat(ImageError):
    pass


class CorruptImage(ImageError):
    pass


class TruncatedImage(CorruptImage):
    pass


class ImageTooLarge(ImageError):
    pass


class SizeNotServed(ValueError):
    """A requested input size the model does not serve at (HTTP 400); the message lists the sizes it does."""


class ImageFormat(str, enum.Enum):
    JPEG = "jpeg"
    PNG = "png"
    WEBP = "webp"
    BMP = "bmp"
    TIFF = "tiff"


class ResizeMode(str, enum.Enum):
    STRETCH = "stretch"
    LETTERBOX = "letterbox"
    CENTER_CROP = "center-crop"


def sniff_format(data: bytes) -> ImageFormat | None:
    """The format from the magic bytes, or None when it is not one we decode."""
    if data[:3] == b"\xff\xd8\xff":
        return ImageFormat.JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ImageFormat.PNG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageFormat.WEBP
    if data[:2] == b"BM":
        return ImageFormat.BMP
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ImageFormat.TIFF
    return None


def _pil_header(data: bytes):  # -> PIL.Image.Image (lazy: header parsed, pixels not)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # declared size beyond PIL's own cap
        raise ImageTooLarge(f"image declares too many pixels ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any header parse failure is corrupt input
        raise CorruptImage(f"cannot read image header: {type(exc).__name__}") from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) read from the header only."""
    if not data:
        raise EmptyImage("empty image")
    if sniff_format(data) is None:
        raise UnsupportedImageFormat("unsupported image format; expected JPEG, PNG, WebP, BMP or TIFF")
    return _pil_header(data).size


def _check_complete(data: bytes, fmt: ImageFormat) -> None:
    """Refuse truncated files that decoders would silently pad with gray."""
    if fmt is ImageFormat.JPEG:
        if not _jpeg_has_eoi(data):
            raise TruncatedImage("truncated JPEG (no end-of-image marker)")
    elif fmt is ImageFormat.PNG:
        if b"IEND" not in data[-64:]:
            raise TruncatedImage("truncated PNG (no IEND chunk)")
    elif fmt is ImageFormat.WEBP:
        (riff_size,) = struct.unpack("<I", data[4:8])
        if len(data) < riff_size + 8:
            raise TruncatedImage("truncated WebP")
    elif fmt is ImageFormat.BMP:
        if len(data) >= 6:
            (file_size,) = struct.unpack("<I", data[2:6])
            if file_size and len(data) < file_size:
                raise TruncatedImage("truncated BMP")


def _jpeg_has_eoi(data: bytes) -> bool:
    """Walk the JPEG marker segments; True when an EOI follows the scan data.

    A plain search for FFD9 is wrong both ways: an EXIF thumbnail carries its own EOI,
    and some cameras append trailers after the real one.
    """
    n = len(data)
    i = 2
    while i + 2 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:
            return True
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            i += 2
            continue
        if i + 4 > n:
            return False
        (seg_len,) = struct.unpack(">H", data[i + 2 : i + 4])
        i += 2 + seg_len
        if marker == 0xDA:  # start of scan: skip entropy-coded data to the next marker
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    return False
                nxt = data[j + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    i = j + 1 if nxt == 0xFF else j + 2
                    continue
                i = j
                break
    return False


_EXIF_ORIENTATION_TAG = 0x0112


def _exif_orientation(header, fmt: ImageFormat) -> int:
    """EXIF orientation from an opened (lazy) PIL header; 1 when absent or broken."""
    if fmt is ImageFormat.BMP:
        return 1
    if fmt is ImageFormat.PNG and "exif" not in header.info:
        # PIL's PNG getexif() would decode the whole image to look for a late eXIf
        # chunk; only an eXIf chunk before the pixel data is honored.
        return 1
    try:
        value = header.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth refusing the image
        return 1


def _apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    # https://www.exif.org/Exif2-2.PDF p.18; same transforms as PIL.ImageOps.exif_transpose
    if orientation == 2:
        return img[:, ::-1]
    if orientation == 3:
        return img[::-1, ::-1]
    if orientation == 4:
        return img[::-1]
    if orientation == 5:
        return np.swapaxes(img, 0, 1)
    if orientation == 6:
        return np.swapaxes(img, 0, 1)[:, ::-1]
    if orientation == 7:
        return np.swapaxes(img, 0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.swapaxes(img, 0, 1)[::-1]
    return img


def _to_rgb8(arr: np.ndarray) -> np.ndarray:
    """OpenCV's BGR(A)/gray of any depth -> RGB uint8."""
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype in (np.float32, np.float64):
        scale = 255.0 if float(np.nanmax(arr)) <= 1.0 else 1.0
        arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
    elif arr.dtype == np.int8 or arr.dtype == np.int16 or arr.dtype == np.int32:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise UnsupportedImageFormat(f"unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    channels = arr.shape[2]
    if channels == 1:
        return cv2.cvtColor(arr[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    if channels == 2:  # gray + alpha
        return cv2.cvtColor(arr[:, :, 0], cv2.COLOR_GRAY2RGB)
    raise UnsupportedImageFormat(f"unsupported channel count {channels}")


def decode_image(data: bytes, *, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode encoded image bytes to an RGB uint8 array (H, W, 3).

    Raises:
        EmptyImage, UnsupportedImageFormat, CorruptImage, TruncatedImage, ImageTooLarge.
    """
    if not data:
        raise EmptyImage("empty image")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageFormat("unsupported image format; expected JPEG, PNG, WebP, BMP or TIFF")
    header = _pil_header(data)
    width, height = header.size
    if width <= 0 or height <= 0:
        raise CorruptImage(f"image declares size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    _check_complete(data, fmt)
    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_UNCHANGED keeps 16-bit depth and alpha; orientation is applied below.
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise CorruptImage(f"corrupt {fmt.value.upper()} data")
    if arr.shape[0] != height or arr.shape[1] != width:
        # OpenCV and the header disagree: a crafted or damaged file.
        raise CorruptImage(f"corrupt {fmt.value.upper()} data (size mismatch)")
    rgb = _to_rgb8(arr)
    orientation = _exif_orientation(header, fmt)
    if orientation != 1:
        rgb = np.ascontiguousarray(_apply_orientation(rgb, orientation))
    return rgb


@dataclass(frozen=True)
class ResizeInfo:
    """How an original image maps onto the model input; used to map boxes back.

    model_xy = original_xy * scale - offset  (per axis)

    ``input_width``/``input_height`` are the model-input size the image was resized to
    (one of the card's ``input_sizes``; 0 when unknown, e.g. rebuilt from old rows).
    """

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    original_width: int
    original_height: int
    input_width: int = 0
    input_height: int = 0

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(height, width) of the model input, or None when unknown."""
        return (self.input_height, self.input_width) if self.input_width and self.input_height else None

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map [N, 4] x1,y1,x2,y2 boxes from model pixels to original pixels (clipped)."""
        b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] + self.offset_x) / self.scale_x
        b[:, [1, 3]] = (b[:, [1, 3]] + self.offset_y) / self.scale_y
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, self.original_width)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, self.original_height)
        return b


LETTERBOX_FILL = 114  # the gray YOLO-family models are trained with


def _interp(src_w: int, src_h: int, dst_w: int, dst_h: int) -> int:
    # INTER_AREA for shrinking avoids aliasing; linear for enlarging.
    return cv2.INTER_AREA if dst_w * dst_h < src_w * src_h else cv2.INTER_LINEAR


def resize_image(
    img: np.ndarray, size: tuple[int, int], mode: ResizeMode | str = ResizeMode.STRETCH
) -> tuple[np.ndarray, ResizeInfo]:
    """Resize an RGB image to ``size = (height, width)`` with the given mode.

    Returns the resized image and the :class:`ResizeInfo` that maps model pixels back.
    """
    mode = ResizeMode(mode)
    dst_h, dst_w = int(size[0]), int(size[1])
    if dst_h <= 0 or dst_w <= 0:
        raise ValueError(f"Got {size} for size; expected positive (height, width)")
    src_h, src_w = img.shape[:2]
    if mode is ResizeMode.STRETCH:
        if (src_h, src_w) == (dst_h, dst_w):
            out = img
        else:
            out = cv2.resize(img, (dst_w, dst_h), interpolation=_interp(src_w, src_h, dst_w, dst_h))
        return out, ResizeInfo(dst_w / src_w, dst_h / src_h, 0.0, 0.0, src_w, src_h, dst_w, dst_h)
    if mode is ResizeMode.LETTERBOX:
        scale = min(dst_w / src_w, dst_h / src_h)
        new_w, new_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
        resized = (
            img
            if (new_w, new_h) == (src_w, src_h)
            else cv2.resize(img, (new_w, new_h), interpolation=_interp(src_w, src_h, new_w, new_h))
        )
        out = np.full((dst_h, dst_w, 3), LETTERBOX_FILL, dtype=np.uint8)
        top, left = (dst_h - new_h) // 2, (dst_w - new_w) // 2
        out[top : top + new_h, left : left + new_w] = resized
        return out, ResizeInfo(new_w / src_w, new_h / src_h, -left, -top, src_w, src_h, dst_w, dst_h)
    # center-crop: scale the shorter side to fit, crop the middle
    scale = max(dst_w / src_w, dst_h / src_h)
    new_w, new_h = max(dst_w, round(src_w * scale)), max(dst_h, round(src_h * scale))
    resized = (
        img
        if (new_w, new_h) == (src_w, src_h)
        else cv2.resize(img, (new_w, new_h), interpolation=_interp(src_w, src_h, new_w, new_h))
    )
    top, left = (new_h - dst_h) // 2, (new_w - dst_w) // 2
    out = np.ascontiguousarray(resized[top : top + dst_h, left : left + dst_w])
    return out, ResizeInfo(new_w / src_w, new_h / src_h, float(left), float(top), src_w, src_h, dst_w, dst_h)


def encode_image(img: np.ndarray, fmt: ImageFormat | str = ImageFormat.PNG, quality: int = 95) -> bytes:
    """Encode an RGB uint8 (or gray) image; quality applies to JPEG and WebP."""
    fmt = ImageFormat(fmt)
    arr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params: list[int] = []
    if fmt is ImageFormat.JPEG:
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt is ImageFormat.WEBP:
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    ext = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "bmp": ".bmp", "tiff": ".tiff"}[fmt.value]
    ok, buf = cv2.imencode(ext, arr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode {fmt.value}")
    return buf.tobytes()


def load_for_model(
    data: bytes,
    size: tuple[int, int],
    mode: ResizeMode | str,
    *,
    max_pixels: int = 40_000_000,
) -> tuple[np.ndarray, ResizeInfo]:
    """Decode and resize in one call: the exact preprocessing every model input gets."""
    return resize_image(decode_image(data, max_pixels=max_pixels), size, mode)


# --------------------------------------------------------------------------- several input sizes
Size = tuple[int, int]  # (height, width)


def format_size(size: Sequence[int]) -> str:
    """``(320, 240)`` -> ``"320x240"`` (HEIGHTxWIDTH, as requests and cards spell it)."""
    return f"{int(size[0])}x{int(size[1])}"


def parse_size(text: str | int, what: str = "size") -> Size:
    """``"320"`` or ``320`` (a square) or ``"320x240"`` (HEIGHTxWIDTH) -> ``(320, 240)``.

    Raises:
        ValueError: not a size (the message names ``what``).
    """
    raw = str(text).strip().lower().replace(" ", "")
    parts = raw.split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) <= 0 or not all(p.isdigit() for p in parts):
        raise ValueError(f"Got {str(text)!r} for {what}; expected HEIGHTxWIDTH such as 320x320 (or one number)")
    return vals[0], vals[1]


def _listed(sizes: Sequence[Size]) -> str:
    return ", ".join(format_size(s) for s in sizes)


def choose_size(sizes: Sequence[Size], image_hw: tuple[int, int] | None = None,
                requested: str | int | Size | None = None) -> Size:
    """The model-input size an image is served at: the one asked for, else the nearest listed one.

    ``sizes`` are the card's ``input_sizes`` (first = default). With ``requested`` set it
    must be one of them. Otherwise the size whose pixel count is nearest the image's,
    compared as a ratio (smallest ``|log(H*W / (h*w))|``: a 100x100 image is nearer 64x64
    than 224x224), ties going to the size listed first; a model with one size always
    gets it, and without an ``image_hw`` the default is used.

    Raises:
        SizeNotServed: ``requested`` is not one of ``sizes``.
        ValueError: ``requested`` is not a size.
    """
    listed = [(int(h), int(w)) for h, w in sizes]
    if not listed:
        raise ValueError("Got no input sizes; expected at least one (the card's input_size)")
    if requested is not None:
        want = parse_size(requested) if isinstance(requested, (str, int)) else (int(requested[0]), int(requested[1]))
        if want not in listed:
            fixed = " (this model's input size is fixed)" if len(listed) == 1 else ""
            raise SizeNotServed(f"Got size {format_size(want)}; expected one of {_listed(listed)}{fixed}")
        return want
    if len(listed) == 1 or image_hw is None:
        return listed[0]
    area = max(1, int(image_hw[0]) * int(image_hw[1]))
    return min(listed, key=lambda s: abs(math.log(s[0] * s[1] / area)))  # min keeps the first of ties


def preprocess(image: bytes | np.ndarray, sizes: Sequence[Size], mode: ResizeMode | str, *,
               size: str | int | Size | None = None, max_pixels: int = 40_000_000) -> tuple[np.ndarray, ResizeInfo]:
    """The one preprocessing of every model input: decode, pick the size (:func:`choose_size`), resize.

    ``image`` is encoded bytes or RGB uint8 ``[H, W, 3]`` pixels; ``sizes`` the card's
    ``input_sizes``; ``size`` the size a request asked for. The returned
    :class:`ResizeInfo` records the size used (``info.input_size``).

    Raises:
        ImageError: the bytes are not a usable image.
        SizeNotServed: ``size`` is not one of ``sizes``.
    """
    rgb = image if isinstance(image, np.ndarray) else decode_image(bytes(image), max_pixels=max_pixels)
    chosen = choose_size(sizes, rgb.shape[:2], size)
    return resize_image(rgb, chosen, mode)
