"""Procedural synthetic image dataset: shapes and patterns on textured backgrounds.

Ten classes, several of which differ subtly (circle vs hexagon, pentagon vs hexagon,
circle vs ring, stripes vs checker), drawn at random position, scale, rotation,
aspect and color over textured backgrounds, with distractors and occlusion. A linear
model on raw pixels does poorly on it; a small CNN does well. Every image is a pure
function of ``(seed, index)`` so any sample can be regenerated exactly.

Drift knobs (:class:`Drift`) change the input distribution the way a camera in the
field does: brightness, contrast, blur, noise, color cast, JPEG quality, resolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

__all__ = ["CLASSES", "Drift", "SynthConfig", "render_sample", "apply_drift", "generate"]

CLASSES: tuple[str, ...] = (
    "circle",
    "ring",
    "triangle",
    "square",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "stripes",
    "checker",
)


@dataclass(frozen=True)
class Drift:
    """Field-like distortions applied after rendering; the identity by default."""

    brightness: float = 0.0  # added to every channel, in 0..255 units
    contrast: float = 1.0  # multiplies the deviation from the image mean
    blur: float = 0.0  # Gaussian sigma in pixels at 64 px (scaled with resolution)
    noise: float = 0.0  # Gaussian noise std in 0..255 units
    color_cast: tuple[float, float, float] = (0.0, 0.0, 0.0)  # RGB offsets
    jpeg_quality: int | None = None  # re-encode as JPEG at this quality

    def __post_init__(self) -> None:
        if self.contrast <= 0:
            raise ValueError(f"Got {self.contrast} for contrast; expected > 0")
        if self.blur < 0 or self.noise < 0:
            raise ValueError("Got a negative blur or noise; expected >= 0")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"Got {self.jpeg_quality} for jpeg_quality; expected 1..100")
        if len(self.color_cast) != 3:
            raise ValueError(f"Got {self.color_cast} for color_cast; expected 3 values")

    @property
    def is_identity(self) -> bool:
        return self == Drift()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: count, resolution, seed and drift."""

    n: int
    size: int = 64
    seed: int = 0
    drift: Drift = field(default_factory=Drift)
    image_format: str = "png"

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"Got {self.n} for n; expected > 0")
        if not 16 <= self.size <= 1024:
            raise ValueError(f"Got {self.size} for size; expected 16..1024")


# --------------------------------------------------------------------------- drawing


def _rand_color(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(40, 256), rng.integers(40, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    kind = rng.integers(0, 4)
    if kind == 0:  # linear gradient between two colors
        c1, c2 = _rand_color(rng), _rand_color(rng)
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        t = (np.cos(ang) * xx + np.sin(ang) * yy)
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == 1:  # low-frequency color noise
        g = int(rng.integers(3, 7))
        small = rng.uniform(0, 255, size=(g, g, 3)).astype(np.float32)
        img = cv2.resize(small, (s, s), interpolation=cv2.INTER_CUBIC)
    elif kind == 2:  # random lines
        img = np.empty((s, s, 3), np.float32)
        img[:] = _rand_color(rng)
        for _ in range(int(rng.integers(6, 16))):
            p1 = tuple(int(v) for v in rng.integers(-s // 4, s + s // 4, 2))
            p2 = tuple(int(v) for v in rng.integers(-s // 4, s + s // 4, 2))
            th = max(1, int(rng.integers(1, max(2, s // 20))))
            cv2.line(img, p1, p2, _rand_color(rng).tolist(), th, cv2.LINE_AA)
    else:  # soft blobs
        img = np.empty((s, s, 3), np.float32)
        img[:] = _rand_color(rng)
        for _ in range(int(rng.integers(4, 10))):
            c = tuple(int(v) for v in rng.integers(0, s, 2))
            ax = tuple(int(v) for v in rng.integers(s // 10, s // 3, 2))
            cv2.ellipse(img, c, ax, float(rng.uniform(0, 180)), 0, 360, _rand_color(rng).tolist(), -1, cv2.LINE_AA)
        img = cv2.GaussianBlur(img, (0, 0), s / 24)
    img += rng.normal(0, rng.uniform(2, 10), size=img.shape).astype(np.float32)
    return img


def _polygon(n: int, cx: float, cy: float, r: float, rot: float, aspect: float) -> np.ndarray:
    ang = rot + np.arange(n) * 2 * math.pi / n
    return np.stack([cx + r * np.cos(ang) * aspect, cy + r * np.sin(ang) / aspect], 1)


def _star(cx: float, cy: float, r: float, rot: float, inner: float, aspect: float, points: int = 5) -> np.ndarray:
    ang = rot + np.arange(2 * points) * math.pi / points
    rr = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    return np.stack([cx + rr * np.cos(ang) * aspect, cy + rr * np.sin(ang) / aspect], 1)


def _cross(cx: float, cy: float, r: float, rot: float, arm: float) -> np.ndarray:
    w = r * arm
    pts = np.array(
        [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)],
        np.float64,
    )
    c, s_ = math.cos(rot), math.sin(rot)
    rotm = np.array([[c, -s_], [s_, c]])
    return pts @ rotm.T + (cx, cy)


_SHIFT = 4  # sub-pixel precision for cv2 drawing (coordinates * 16)


def _fill(img: np.ndarray, pts: np.ndarray, color) -> None:
    cv2.fillPoly(img, [np.round(pts * (1 << _SHIFT)).astype(np.int32)], color, cv2.LINE_AA, _SHIFT)


def _mask_for(cls: str, rng: np.random.Generator, s: int, cx: float, cy: float, r: float) -> np.ndarray:
    """A float mask in [0, 1] of the object's silhouette."""
    m = np.zeros((s, s), np.float32)
    rot = rng.uniform(0, 2 * math.pi)
    aspect = rng.uniform(0.85, 1.18)
    if cls == "circle":
        _fill(m, _polygon(64, cx, cy, r, rot, aspect), 1.0)
    elif cls == "ring":
        _fill(m, _polygon(64, cx, cy, r, rot, aspect), 1.0)
        _fill(m, _polygon(64, cx, cy, r * rng.uniform(0.35, 0.6), rot, aspect), 0.0)
    elif cls == "triangle":
        _fill(m, _polygon(3, cx, cy, r, rot, aspect), 1.0)
    elif cls == "square":
        _fill(m, _polygon(4, cx, cy, r, rot, aspect), 1.0)
    elif cls == "pentagon":
        _fill(m, _polygon(5, cx, cy, r, rot, aspect), 1.0)
    elif cls == "hexagon":
        _fill(m, _polygon(6, cx, cy, r, rot, aspect), 1.0)
    elif cls == "star":
        _fill(m, _star(cx, cy, r, rot, rng.uniform(0.42, 0.6), aspect), 1.0)
    elif cls == "cross":
        _fill(m, _cross(cx, cy, r, rot, rng.uniform(0.28, 0.42)), 1.0)
    elif cls in ("stripes", "checker"):
        # a patterned disc or square; the pattern, not the outline, is the class
        if rng.random() < 0.5:
            _fill(m, _polygon(64, cx, cy, r, rot, aspect), 1.0)
        else:
            _fill(m, _polygon(4, cx, cy, r * 1.1, rot, aspect), 1.0)
    return m


def _pattern(cls: str, rng: np.random.Generator, s: int, r: float) -> np.ndarray | None:
    """Two-tone pattern selector in [0,1] for stripes / checker, else None."""
    if cls not in ("stripes", "checker"):
        return None
    period = r * rng.uniform(0.45, 0.75)
    ang = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    v = -xx * math.sin(ang) + yy * math.cos(ang)
    phase = rng.uniform(0, period)
    a = np.floor((u + phase) / period)
    if cls == "stripes":
        sel = a % 2
    else:
        b = np.floor((v + phase) / period)
        sel = (a + b) % 2
    # soften edges a little so the pattern is not a perfect binary texture
    return cv2.GaussianBlur(sel.astype(np.float32), (0, 0), max(0.4, s / 128))


def _distractors(img: np.ndarray, rng: np.random.Generator, s: int) -> None:
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.integers(0, 3)
        color = _rand_color(rng).tolist()
        if kind == 0:  # small polygon of a random other kind
            n = int(rng.choice([3, 4, 5, 6, 32]))
            pts = _polygon(n, rng.uniform(0, s), rng.uniform(0, s), s * rng.uniform(0.04, 0.09), rng.uniform(0, 6.3), 1.0)
            _fill(img, pts, color)
        elif kind == 1:  # line segment
            p1 = tuple(int(v) for v in rng.integers(0, s, 2))
            p2 = tuple(int(v) for v in (np.array(p1) + rng.integers(-s // 3, s // 3, 2)))
            cv2.line(img, p1, p2, color, max(1, s // 40), cv2.LINE_AA)
        else:  # dot cluster
            for _ in range(int(rng.integers(2, 6))):
                c = tuple(int(v) for v in rng.integers(0, s, 2))
                cv2.circle(img, c, max(1, int(s * rng.uniform(0.01, 0.03))), color, -1, cv2.LINE_AA)


def _contrasting_color(rng: np.random.Generator, ref: np.ndarray, min_dist: float = 70.0) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(8):
        c = _rand_color(rng)
        d = float(np.linalg.norm(c - ref))
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best  # type: ignore[return-value]


def paint_object(
    img: np.ndarray, rng: np.random.Generator, cls: str, cx: float, cy: float, r: float,
    xx: np.ndarray, yy: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one shape of class ``cls`` (centre ``cx, cy``, radius ``r``) onto float ``img``.

    A colour that stands out from what it covers, the class's pattern if it has one, and
    directional shading; returns the new image and the shape's soft mask. The classifier
    data (:func:`render_sample`) and the detection data (``datasets.detect``) share it.
    ``xx, yy`` are the pixel grids (``np.mgrid``), made once per image.
    """
    s = img.shape[0]
    mask = _mask_for(cls, rng, s, cx, cy, r)
    region = img[mask > 0.5]
    ref = region.mean(0) if len(region) else img.reshape(-1, 3).mean(0)
    color = _contrasting_color(rng, ref)
    fg = np.empty_like(img)
    fg[:] = color
    pattern = _pattern(cls, rng, s, r)
    if pattern is not None:
        color2 = _contrasting_color(rng, color, 60.0)
        fg = fg * (1 - pattern[..., None]) + color2 * pattern[..., None]
    # directional shading so the object is not one flat color
    ang = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + rng.uniform(0.0, 0.35) * ((xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)) / max(r, 1.0)
    fg = fg * np.clip(shade, 0.55, 1.45)[..., None]
    return img * (1 - mask[..., None]) + fg * mask[..., None], mask


def render_sample(seed: int, index: int, size: int = 64, label: int | None = None) -> tuple[np.ndarray, int]:
    """Render one RGB uint8 image and its label; a pure function of its arguments."""
    rng = np.random.default_rng([seed, index, 0x5EED])
    cls_idx = int(rng.integers(0, len(CLASSES))) if label is None else int(label)
    cls = CLASSES[cls_idx]
    s = size
    img = _background(rng, s)
    _distractors(img, rng, s)
    r = s * rng.uniform(0.2, 0.36)
    cx = rng.uniform(r * 0.8, s - r * 0.8)
    cy = rng.uniform(r * 0.8, s - r * 0.8)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img, mask = paint_object(img, rng, cls, cx, cy, r, xx, yy)
    if rng.random() < 0.35:  # occluder over part of the object
        ow, oh = r * rng.uniform(0.4, 0.9), r * rng.uniform(0.3, 0.7)
        ox = cx + rng.choice([-1, 1]) * r * rng.uniform(0.5, 1.0) - ow / 2
        oy = cy + rng.uniform(-r, r) - oh / 2
        pts = np.array([(ox, oy), (ox + ow, oy), (ox + ow, oy + oh), (ox, oy + oh)])
        _fill(img, pts, _rand_color(rng).tolist())
    img += rng.normal(0, rng.uniform(0, 6), size=img.shape).astype(np.float32)
    if rng.random() < 0.25:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.8) * s / 64)
    return np.clip(img, 0, 255).astype(np.uint8), cls_idx


def apply_drift(img: np.ndarray, drift: Drift, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply the drift knobs (except JPEG quality, which is an encoding choice)."""
    if drift.is_identity or (drift.jpeg_quality is not None and drift == Drift(jpeg_quality=drift.jpeg_quality)):
        return img
    rng = rng or np.random.default_rng(0)
    out = img.astype(np.float32)
    if drift.blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), drift.blur * img.shape[0] / 64)
    if drift.contrast != 1.0:
        mean = out.mean(axis=(0, 1), keepdims=True)
        out = (out - mean) * drift.contrast + mean
    out += drift.brightness
    out += np.asarray(drift.color_cast, np.float32)
    if drift.noise > 0:
        out += rng.normal(0, drift.noise, size=out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def generate(cfg: SynthConfig, start: int = 0, labels: list[int] | None = None):
    """Yield ``(index, rgb_image, label)`` for ``cfg.n`` samples starting at ``start``.

    Labels are drawn uniformly at random unless ``labels`` fixes them; drift, when set,
    is applied with its own per-sample random stream.
    """
    for k in range(cfg.n):
        idx = start + k
        img, label = render_sample(cfg.seed, idx, cfg.size, None if labels is None else labels[k])
        if not cfg.drift.is_identity:
            img = apply_drift(img, cfg.drift, np.random.default_rng([cfg.seed, idx, 0xD21F7]))
        yield idx, img, label
