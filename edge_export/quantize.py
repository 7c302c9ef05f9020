"""Quantization of contract-obeying ONNX models: NNCF and ONNX Runtime INT8, and FP16.

Four modes (``--quantize``):

* ``int8-static`` with ``--engine nncf`` (default): NNCF post-training quantization
  (:func:`quantize_nncf`), or with a maximum top-1 drop, NNCF's
  ``quantize_with_accuracy_control`` that keeps the most sensitive layers in FP32
  until the drop fits (:func:`quantize_nncf_accuracy_control`);
* ``int8-static`` with ``--engine ort``: ONNX Runtime static QDQ quantization with
  per-channel weights and a selectable calibration method (MinMax, Entropy,
  Percentile) (:func:`quantize_ort_static`);
* ``int8-dynamic``: ONNX Runtime dynamic quantization, weights INT8 ahead of time and
  activations quantized at run time (:func:`quantize_ort_dynamic`); no calibration,
  best for MatMul-heavy models, slow for convolutions on CPU (see docs/optimization.md);
* ``fp16``: weights and compute in half precision, uint8 input and float32 output kept
  (:func:`convert_fp16`); for GPUs, Jetson and Apple hardware, not for x86 CPUs.

Static INT8 needs calibration images from the model's own data:
:func:`calibration_images` decodes them from a Parquet dataset with
``visionfleet.imaging`` (never random noise). The output keeps the source's
``metadata_props`` (labels, size, normalization…) and adds ``precision`` and
``quantization``, so the quantized file still describes itself.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = [
    "QuantizeMode",
    "Engine",
    "CalibrationMethod",
    "QuantizeConfig",
    "QuantizeReport",
    "CalibrationMissing",
    "calibration_images",
    "labeled_images",
    "detection_calibration_images",
    "DetectionValidation",
    "detection_validation",
    "describe",
    "fold_normalization",
    "quantize_nncf",
    "quantize_nncf_accuracy_control",
    "quantize_ort_static",
    "quantize_ort_dynamic",
    "convert_fp16",
    "quantize",
]

from visionfleet.names import INPUT_NAME  # noqa: E402
from visionfleet.targets import Precision  # noqa: E402


class QuantizeMode(str, enum.Enum):
    NONE = "none"
    FP16 = "fp16"
    INT8_DYNAMIC = "int8-dynamic"
    INT8_STATIC = "int8-static"


class Engine(str, enum.Enum):
    NNCF = "nncf"
    ORT = "ort"


class CalibrationMethod(str, enum.Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class CalibrationMissing(ValueError):
    """Static INT8 quantization was asked for without calibration images."""


# What each mode produces: precision written to the card and the file-name suffix.
_MODE_OUTPUT: Mapping[QuantizeMode, tuple[Precision, str]] = {
    QuantizeMode.NONE: (Precision.FP32, ""),
    QuantizeMode.FP16: (Precision.FP16, ".fp16"),
    QuantizeMode.INT8_DYNAMIC: (Precision.INT8, ".int8-dynamic"),
    QuantizeMode.INT8_STATIC: (Precision.INT8, ".int8"),
}


@dataclass(frozen=True)
class QuantizeConfig:
    """One quantization recipe; validated here so that nothing is silently ignored.

    Args:
        mode: none, fp16, int8-dynamic or int8-static.
        engine: nncf or ort, for int8-static only (default nncf there).
        calibration: number of calibration images (int8-static).
        method: calibration method of the ORT engine (default minmax).
        per_channel: per-channel weight scales (default True for int8).
        max_drop_pt: NNCF accuracy control: the largest top-1 drop allowed, in points.
        percentile: the percentile of the ``percentile`` method.
    """

    mode: QuantizeMode = QuantizeMode.NONE
    engine: Engine | None = None
    calibration: int = 300
    method: CalibrationMethod | None = None
    per_channel: bool | None = None
    max_drop_pt: float | None = None
    percentile: float = 99.999

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", QuantizeMode(self.mode))
        if self.engine is not None:
            object.__setattr__(self, "engine", Engine(self.engine))
        if self.method is not None:
            object.__setattr__(self, "method", CalibrationMethod(self.method))
        static = self.mode is QuantizeMode.INT8_STATIC
        if self.engine is not None and not static:
            raise ValueError(
                f"Got --engine {self.engine.value} with --quantize {self.mode.value}; "
                "expected --engine only with int8-static (fp16 and int8-dynamic always use ONNX Runtime tools)"
            )
        if static and self.calibration < 1:
            raise CalibrationMissing(
                f"Got {self.calibration} calibration images for int8-static; expected >= 1 (e.g. --calibration 300)"
            )
        if self.method is not None and not (static and self.resolved_engine is Engine.ORT):
            raise ValueError(
                f"Got --calibration-method {self.method.value} with {self.mode.value}/"
                f"{self.resolved_engine.value if self.resolved_engine else '-'}; "
                "expected it only with --quantize int8-static --engine ort (NNCF picks its own range estimators)"
            )
        if self.max_drop_pt is not None:
            if not (static and self.resolved_engine is Engine.NNCF):
                raise ValueError(
                    "Got --max-drop without --quantize int8-static --engine nncf; "
                    "expected it only there (it drives nncf.quantize_with_accuracy_control)"
                )
            if not 0 < self.max_drop_pt <= 100:
                raise ValueError(f"Got {self.max_drop_pt} for --max-drop; expected 0 < points <= 100")
        if self.per_channel is not None and self.mode in (QuantizeMode.NONE, QuantizeMode.FP16):
            raise ValueError(f"Got --per-channel/--no-per-channel with {self.mode.value}; expected it only with int8")
        if not 90.0 < self.percentile < 100.0:
            raise ValueError(f"Got {self.percentile} for percentile; expected 90 < p < 100")

    @property
    def resolved_engine(self) -> Engine | None:
        if self.mode is not QuantizeMode.INT8_STATIC:
            return None
        return self.engine or Engine.NNCF

    @property
    def precision(self) -> str:
        return _MODE_OUTPUT[self.mode][0].value

    @property
    def suffix(self) -> str:
        return _MODE_OUTPUT[self.mode][1]

    def to_dict(self) -> dict[str, Any]:
        """The settings that shape the output file, with defaults resolved (for cache keys and cards)."""
        d: dict[str, Any] = {"mode": self.mode.value}
        if self.mode is QuantizeMode.INT8_STATIC:
            engine = self.resolved_engine
            d.update(engine=engine.value, calibration=self.calibration, per_channel=self.per_channel is not False)
            if engine is Engine.ORT:
                d["method"] = (self.method or CalibrationMethod.MINMAX).value
                if d["method"] == CalibrationMethod.PERCENTILE.value:
                    d["percentile"] = self.percentile
            if self.max_drop_pt is not None:
                d["max_drop_pt"] = self.max_drop_pt
        elif self.mode is QuantizeMode.INT8_DYNAMIC:
            d["per_channel"] = self.per_channel is not False
        return d


@dataclass(frozen=True)
class QuantizeReport:
    mode: str
    precision: str
    settings: dict[str, Any]
    calibration_images: int
    seconds: float
    accuracy_control: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------- calibration


def calibration_images(
    dataset: str | os.PathLike[str],
    size: tuple[int, int],
    resize: str,
    n: int,
    *,
    split: str = "train",
    offset: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """``n`` real images from a dataset split, decoded and resized as the server does.

    A seeded random subset of the split (after skipping the first ``offset`` of the
    shuffled order), so calibration and accuracy-control validation can take disjoint
    slices of the same split.

    Raises:
        CalibrationMissing: the dataset is missing or has fewer than ``n`` images.
    """
    from visionfleet.datasets.store import read_split
    from visionfleet.imaging import load_for_model

    try:
        table = read_split(Path(dataset), split, columns=["image"])
    except FileNotFoundError as exc:
        raise CalibrationMissing(f"no calibration data: {exc}") from None
    if table.num_rows < offset + n:
        raise CalibrationMissing(
            f"Got {table.num_rows} images in {dataset} split {split!r}; expected at least {offset + n}"
        )
    order = np.random.default_rng(seed).permutation(table.num_rows)[offset : offset + n]
    col = table.column("image")
    out = np.empty((n, size[0], size[1], 3), np.uint8)
    for k, i in enumerate(order):
        out[k], _ = load_for_model(col[int(i)].as_py(), size, resize)
    return out


def labeled_images(
    dataset: str | os.PathLike[str], size: tuple[int, int], resize: str, n: int, *, split: str, offset: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`calibration_images` with labels (for accuracy-control validation)."""
    from visionfleet.datasets.store import read_split
    from visionfleet.imaging import load_for_model

    table = read_split(Path(dataset), split, columns=["image", "label"])
    if table.num_rows < offset + n:
        raise CalibrationMissing(
            f"Got {table.num_rows} images in {dataset} split {split!r}; expected at least {offset + n}"
        )
    order = np.random.default_rng(seed).permutation(table.num_rows)[offset : offset + n]
    col, lab = table.column("image"), table.column("label").to_numpy()
    out = np.empty((n, size[0], size[1], 3), np.uint8)
    for k, i in enumerate(order):
        out[k], _ = load_for_model(col[int(i)].as_py(), size, resize)
    return out, lab[order].astype(np.int64)


def _coco_subset(dataset: str | os.PathLike[str], split: str, n: int, offset: int, seed: int):
    """A seeded random subset of a detection split's COCO images (disjoint slices for calibration and validation)."""
    from dataclasses import replace

    from visionfleet.datasets.detect import coco_split

    try:
        full = coco_split(Path(dataset), split)
    except FileNotFoundError as exc:
        raise CalibrationMissing(f"no calibration data: {exc}") from None
    if len(full) < offset + n:
        raise CalibrationMissing(f"Got {len(full)} images in {dataset} split {split!r}; expected at least {offset + n}")
    order = np.random.default_rng(seed).permutation(len(full))[offset : offset + n]
    images = [full.doc["images"][int(i)] for i in order]
    ids = {int(im["id"]) for im in images}
    doc = {**full.doc, "images": images, "annotations": [a for a in full.doc["annotations"] if int(a["image_id"]) in ids]}
    return replace(full, doc=doc)


def detection_calibration_images(
    dataset: str | os.PathLike[str], size: tuple[int, int], resize: str, n: int, *, split: str = "train",
    offset: int = 0, seed: int = 0,
) -> np.ndarray:
    """Like :func:`calibration_images` for a detection dataset (COCO-labeled image files)."""
    from visionfleet.imaging import load_for_model

    sub = _coco_subset(dataset, split, n, offset, seed)
    return np.stack([load_for_model(sub.image_path(im).read_bytes(), size, resize)[0] for im in sub.doc["images"]])


@dataclass(frozen=True)
class DetectionValidation:
    """Labeled detection images for accuracy control: mAP@0.5 is the metric NNCF keeps within the drop."""

    card: Any  # visionfleet.spec.ModelCard: labels, input size, resize
    split: Any  # visionfleet.datasets.detect.CocoSplit (the subset)

    def map50(self, run, images: list[dict] | None = None) -> float:
        """mAP@0.5 of ``run`` (images -> boxes, scores, classes) on the split (or on some of its images)."""
        from dataclasses import replace

        from visionfleet.evaluation import evaluate_detector

        split = self.split
        if images is not None:
            ids = {int(im["id"]) for im in images}
            split = replace(split, doc={**split.doc, "images": list(images),
                                        "annotations": [a for a in split.doc["annotations"] if int(a["image_id"]) in ids]})
        return evaluate_detector(run, self.card, split).map50


def detection_validation(
    dataset: str | os.PathLike[str], card: Any, n: int, *, split: str = "train", offset: int = 0, seed: int = 0
) -> DetectionValidation:
    """``n`` labeled images of a detection split (after the first ``offset`` of the shuffled order)."""
    return DetectionValidation(card, _coco_subset(dataset, split, n, offset, seed))


def _detection_tail(proto: Any) -> list[str]:
    """A detector's decode + NMS tail (nodes named ``vf_*`` by the exporter and the importer), kept in FP32.

    Quantized, box coordinates and scores would come in 8-bit steps and NMS would
    compare rounded boxes; the tail is cheap, the convolutions are what INT8 speeds up.
    """
    meta = _meta(proto)
    if meta.get("task") != "detection":
        return []
    return [n.name for n in proto.graph.node if n.name.startswith("vf_")]


def _check_images(images: np.ndarray | None, what: str) -> np.ndarray:
    if images is None or len(images) == 0:
        raise CalibrationMissing(
            f"Got no {what} images; expected real images from the model's dataset "
            "(the card's lineage.dataset, or pass one explicitly)"
        )
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"Got {what} images {images.dtype} {images.shape}; expected uint8 [N, H, W, 3]")
    return images


# ---------------------------------------------------------------------- file helpers


def _load(path: str | os.PathLike[str]):
    import onnx

    return onnx.load(os.fspath(path))


def _finish(proto: Any, src_meta: Mapping[str, str], dst: Path, extra: Mapping[str, object]) -> None:
    """Carry the source's metadata over, add ours, check and save atomically."""
    import onnx

    from edge_export.onnx_metadata import write_metadata

    del proto.metadata_props[:]
    write_metadata(proto, {**src_meta, **extra})
    onnx.checker.check_model(proto)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save_model(proto, os.fspath(tmp))
    tmp.replace(dst)


def fold_normalization(proto: Any) -> bool:
    """Rewrite the input normalization ``Sub(mean)`` -> ``Div(std)`` as one depthwise 1x1 Conv.

    Exact in FP32 ((x - m) / s == x * (1/s) + (-m/s)). Why: ONNX Runtime runs INT8
    convolutions in NHWC and moves the input Transpose past the normalization, so Sub
    and Div end up broadcasting a [1, 1, 1, 3] constant over the innermost axis, an
    element-by-element slow path: on the demo model (64 px) they took 36% of an INT8
    batch (profiled, docs/performance.md). A Conv runs in whatever layout is fastest.
    Returns True when the pattern was found and rewritten (in place).
    """
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in g.output}
    for sub in list(g.node):
        if sub.op_type != "Sub" or len(sub.input) != 2 or sub.input[1] not in inits:
            continue
        nxt = consumers.get(sub.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Div" or nxt[0].input[1] not in inits or sub.output[0] in graph_outputs:
            continue
        div = nxt[0]
        mean = numpy_helper.to_array(inits[sub.input[1]]).astype(np.float64)
        std = numpy_helper.to_array(inits[div.input[1]]).astype(np.float64)
        if mean.ndim != 4 or mean.shape[0] != 1 or mean.shape[2:] != (1, 1) or std.shape != mean.shape:
            continue
        ch = mean.shape[1]
        w_name, b_name = f"{div.output[0]}_normalize_w", f"{div.output[0]}_normalize_b"
        g.initializer.extend([
            numpy_helper.from_array((1.0 / std).reshape(ch, 1, 1, 1).astype(np.float32), w_name),
            numpy_helper.from_array((-mean / std).reshape(ch).astype(np.float32), b_name),
        ])
        conv = helper.make_node(
            "Conv", [sub.input[0], w_name, b_name], [div.output[0]], name="normalize", group=ch, kernel_shape=[1, 1]
        )
        at = list(g.node).index(sub)
        g.node.remove(sub)
        g.node.remove(div)
        g.node.insert(at, conv)
        for name in (sub.input[1], div.input[1]):
            if not any(name in n.input for n in g.node):
                g.initializer.remove(inits[name])
        return True
    return False


def _meta(proto: Any) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """NNCF draws its progress bars and ORT's calibrators print on stdout; stdout is for
    results (``--json``), so their chatter goes to stderr with our own progress."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _quiet_nncf() -> None:
    # NNCF logs every step and draws its own progress bars; ours are on stderr already.
    logging.getLogger("nncf").setLevel(logging.ERROR)
    os.environ.setdefault("NNCF_TELEMETRY_DISABLED", "1")


def _nncf_dataset(images: np.ndarray, batch: int = 1):
    import nncf

    items = [images[i : i + batch] for i in range(0, len(images), batch)]
    return nncf.Dataset(items, lambda x: {INPUT_NAME: x})


def _nncf_advanced(per_channel: bool):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    params = AdvancedQuantizationParameters()
    if not per_channel:
        params.weights_quantization_params = QuantizationParameters(per_channel=False)
    return params


# ------------------------------------------------------------------------------ NNCF


def quantize_nncf(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], calib: np.ndarray, *, per_channel: bool = True
) -> QuantizeReport:
    """NNCF post-training INT8 quantization (QDQ) of an ONNX file.

    Raises:
        CalibrationMissing: no calibration images.
    """
    import time

    import nncf

    calib = _check_images(calib, "calibration")
    _quiet_nncf()
    t0 = time.perf_counter()
    model = _load(src)
    meta = _meta(model)
    folded = fold_normalization(model)
    tail = _detection_tail(model)
    with _stdout_to_stderr():
        quantized = nncf.quantize(
            model,
            _nncf_dataset(calib),
            subset_size=len(calib),
            target_device=nncf.TargetDevice.CPU,
            advanced_parameters=_nncf_advanced(per_channel),
            ignored_scope=nncf.IgnoredScope(names=tail) if tail else None,
        )
    settings = {
        "mode": "int8-static", "engine": "nncf", "calibration": len(calib), "per_channel": per_channel,
        "normalization_as_conv": folded,
    }
    if tail:
        settings["fp32_tail_nodes"] = len(tail)
    _finish(quantized, meta, Path(dst), {"precision": Precision.INT8.value, "quantization": settings})
    return QuantizeReport("int8-static", Precision.INT8.value, settings, len(calib), time.perf_counter() - t0)


class _SessionCache:
    """One ONNX Runtime session per ModelProto object: NNCF validates the same model many times."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._entries: list[tuple[Any, Any]] = []  # (model, session); holding model keeps id() stable

    def get(self, model: Any):
        from visionfleet.inference import RuntimeOptions, create_session

        for m, s in self._entries:
            if m is model:
                return s
        sess = create_session(model.SerializeToString(), RuntimeOptions(threads=self.threads))
        self._entries = (self._entries + [(model, sess)])[-3:]
        return sess


def quantize_nncf_accuracy_control(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calib: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    *,
    max_drop_pt: float,
    per_channel: bool = True,
    threads: int = 2,
) -> QuantizeReport:
    """NNCF INT8 with accuracy control: layers go back to FP32 until the top-1 drop fits.

    The drop is measured on ``val_images`` (keep them apart from the holdout you report).

    Raises:
        CalibrationMissing: no calibration or validation images.
    """
    import time

    import nncf

    calib = _check_images(calib, "calibration")
    val_images = _check_images(val_images, "validation")
    if len(val_images) != len(val_labels):
        raise ValueError(f"Got {len(val_images)} validation images and {len(val_labels)} labels; expected the same")
    _quiet_nncf()
    t0 = time.perf_counter()
    model = _load(src)
    meta = _meta(model)
    folded = fold_normalization(model)
    sessions = _SessionCache(threads)
    batch = 32
    val_items = [(val_images[i : i + batch], val_labels[i : i + batch]) for i in range(0, len(val_images), batch)]

    def validate(m: Any, items) -> tuple[float, list[float]]:
        sess = sessions.get(m)
        correct: list[float] = []
        for x, y in items:
            pred = sess.run(None, {INPUT_NAME: x})[0].argmax(1)
            correct.extend((pred == y).astype(np.float64).tolist())
        return (float(np.mean(correct)) if correct else 0.0), correct

    with _stdout_to_stderr():
        quantized = nncf.quantize_with_accuracy_control(
            model,
            _nncf_dataset(calib),
            nncf.Dataset(val_items, lambda item: {INPUT_NAME: item[0]}),
            validate,
            max_drop=max_drop_pt / 100.0,
            drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(calib),
            target_device=nncf.TargetDevice.CPU,
            advanced_quantization_parameters=_nncf_advanced(per_channel),
        )
    kept_fp32 = _count_unquantized_convs(quantized)
    top1_fp32 = validate(model, val_items)[0]
    top1_int8 = validate(quantized, val_items)[0]
    settings = {
        "mode": "int8-static",
        "engine": "nncf",
        "calibration": len(calib),
        "per_channel": per_channel,
        "max_drop_pt": max_drop_pt,
        "validation_images": len(val_images),
        "normalization_as_conv": folded,
    }
    _finish(quantized, meta, Path(dst), {"precision": Precision.INT8.value, "quantization": settings})
    return QuantizeReport(
        "int8-static",
        Precision.INT8.value,
        settings,
        len(calib),
        time.perf_counter() - t0,
        accuracy_control={
            "validation_top1_fp32": top1_fp32,
            "validation_top1_int8": top1_int8,
            "drop_pt": (top1_fp32 - top1_int8) * 100.0,
            "convs_left_fp32": kept_fp32,
        },
    )


def quantize_nncf_accuracy_control_detection(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calib: np.ndarray,
    validation: DetectionValidation,
    *,
    max_drop_pt: float,
    per_channel: bool = True,
    threads: int = 2,
) -> QuantizeReport:
    """NNCF INT8 with accuracy control for a detector: mAP@0.5 on ``validation`` is the metric.

    Layers go back to FP32 until the mAP@0.5 drop (points) fits; the decode + NMS tail is
    never quantized. Keep the validation images apart from the holdout you report.
    """
    import time

    import nncf

    from visionfleet.names import DETECTION_OUTPUTS

    calib = _check_images(calib, "calibration")
    _quiet_nncf()
    t0 = time.perf_counter()
    model = _load(src)
    meta = _meta(model)
    folded = fold_normalization(model)
    tail = _detection_tail(model)
    sessions = _SessionCache(threads)
    items = list(validation.split.doc["images"])

    def validate(m: Any, subset) -> float:
        sess = sessions.get(m)
        return validation.map50(lambda x: sess.run(list(DETECTION_OUTPUTS), {INPUT_NAME: x}), list(subset))

    def to_input(item: dict) -> dict:  # NNCF runs the validation items through the model for its ranking
        from visionfleet.imaging import load_for_model

        x, _ = load_for_model(validation.split.image_path(item).read_bytes(), validation.card.input_size,
                              validation.card.resize)
        return {INPUT_NAME: x[None]}

    with _stdout_to_stderr():
        quantized = nncf.quantize_with_accuracy_control(
            model,
            _nncf_dataset(calib),
            nncf.Dataset(items, to_input),
            validate,
            max_drop=max_drop_pt / 100.0,
            drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(calib),
            target_device=nncf.TargetDevice.CPU,
            ignored_scope=nncf.IgnoredScope(names=tail) if tail else None,
            advanced_quantization_parameters=_nncf_advanced(per_channel),
        )
    map_fp32, map_int8 = validate(model, items), validate(quantized, items)
    settings = {
        "mode": "int8-static", "engine": "nncf", "calibration": len(calib), "per_channel": per_channel,
        "max_drop_pt": max_drop_pt, "validation_images": len(items), "validation_metric": "mAP@0.5",
        "normalization_as_conv": folded, "fp32_tail_nodes": len(tail),
    }
    _finish(quantized, meta, Path(dst), {"precision": Precision.INT8.value, "quantization": settings})
    return QuantizeReport(
        "int8-static", Precision.INT8.value, settings, len(calib), time.perf_counter() - t0,
        accuracy_control={
            "validation_map50_fp32": map_fp32, "validation_map50_int8": map_int8,
            "drop_pt": (map_fp32 - map_int8) * 100.0, "convs_left_fp32": _count_unquantized_convs(quantized),
        },
    )


def _count_unquantized_convs(proto: Any) -> int:
    """Convs whose weight does not come from a DequantizeLinear (kept in FP32)."""
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    return sum(
        1 for n in proto.graph.node if n.op_type == "Conv" and producers.get(n.input[1]) != "DequantizeLinear"
    )


# ----------------------------------------------------------------------- ONNX Runtime


def _ort_method(method: CalibrationMethod):
    from onnxruntime.quantization import CalibrationMethod as OrtMethod

    return {
        CalibrationMethod.MINMAX: OrtMethod.MinMax,
        CalibrationMethod.ENTROPY: OrtMethod.Entropy,
        CalibrationMethod.PERCENTILE: OrtMethod.Percentile,
    }[method]


def _preprocessed(src: Path, tmp: Path) -> Path:
    """ORT's recommended pre-pass (shape inference, graph optimization) before quantizing."""
    from onnxruntime.quantization.preprocess import quant_pre_process

    out = tmp / "pre.onnx"
    quant_pre_process(os.fspath(src), os.fspath(out), skip_symbolic_shape=True)
    return out


def quantize_ort_static(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calib: np.ndarray,
    *,
    per_channel: bool = True,
    method: CalibrationMethod = CalibrationMethod.MINMAX,
    percentile: float = 99.999,
) -> QuantizeReport:
    """ONNX Runtime static INT8 in QDQ format: uint8 activations, int8 weights.

    Raises:
        CalibrationMissing: no calibration images.
    """
    import time

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib = _check_images(calib, "calibration")
    method = CalibrationMethod(method)
    t0 = time.perf_counter()
    meta = _meta(_load(src))

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{INPUT_NAME: calib[i : i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self._it, None)

    extra: dict[str, Any] = {}
    if method is CalibrationMethod.PERCENTILE:
        extra["CalibPercentile"] = percentile
    with tempfile.TemporaryDirectory(prefix="vf-ortq-") as tmp:
        model = _load(src)
        folded = fold_normalization(model)
        import onnx

        onnx.save(model, str(Path(tmp) / "folded.onnx"))
        pre = _preprocessed(Path(tmp) / "folded.onnx", Path(tmp))
        out = Path(tmp) / "q.onnx"
        # Keep the output Softmax in float: quantized to 8 bits the probabilities come
        # in steps of 1/255 and no longer sum to 1, which spoils confidence monitoring.
        softmax = [n.name for n in _load(pre).graph.node if n.op_type == "Softmax"]
        pre_model = _load(pre)
        del pre_model.metadata_props[:]
        pre_model.metadata_props.extend(_load(src).metadata_props)
        tail = _detection_tail(pre_model)  # the detection decode + NMS stays in float too
        with _quiet_ort_quantization():
            quantize_static(
                os.fspath(pre),
                os.fspath(out),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                # uint8 activations x int8 weights: the combination with VNNI kernels on x86
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=_ort_method(method),
                nodes_to_exclude=softmax + tail,
                extra_options=extra,
            )
        settings: dict[str, Any] = {
            "mode": "int8-static",
            "engine": "ort",
            "calibration": len(calib),
            "per_channel": per_channel,
            "method": method.value,
            "normalization_as_conv": folded,
        }
        if method is CalibrationMethod.PERCENTILE:
            settings["percentile"] = percentile
        if tail:
            settings["fp32_tail_nodes"] = len(tail)
        _finish(_load(out), meta, Path(dst), {"precision": Precision.INT8.value, "quantization": settings})
    return QuantizeReport("int8-static", Precision.INT8.value, settings, len(calib), time.perf_counter() - t0)


def quantize_ort_dynamic(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, per_channel: bool = True
) -> QuantizeReport:
    """ONNX Runtime dynamic INT8: weights quantized now, activations at run time."""
    import time

    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    meta = _meta(_load(src))
    with tempfile.TemporaryDirectory(prefix="vf-ortd-") as tmp:
        pre = _preprocessed(Path(src), Path(tmp))
        out = Path(tmp) / "q.onnx"
        with _quiet_ort_quantization():
            quantize_dynamic(os.fspath(pre), os.fspath(out), per_channel=per_channel, weight_type=QuantType.QInt8)
        settings = {"mode": "int8-dynamic", "per_channel": per_channel}
        _finish(_load(out), meta, Path(dst), {"precision": Precision.INT8.value, "quantization": settings})
    return QuantizeReport("int8-dynamic", Precision.INT8.value, settings, 0, time.perf_counter() - t0)


@contextlib.contextmanager
def _quiet_ort_quantization() -> Iterator[None]:
    """The ORT quantizer logs on the root logger, e.g. a warning for our uint8 input
    ("unsupported type to quantize"): expected, a uint8 image needs no quantizer."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with _stdout_to_stderr():
            yield
    finally:
        root.setLevel(level)


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> QuantizeReport:
    """FP16 weights and compute; the uint8 input and float32 probabilities stay as they are."""
    import time

    from onnxruntime.transformers.float16 import convert_float_to_float16

    t0 = time.perf_counter()
    model = _load(src)
    meta = _meta(model)
    half = convert_float_to_float16(model, keep_io_types=True)
    settings = {"mode": "fp16"}
    _finish(half, meta, Path(dst), {"precision": Precision.FP16.value, "quantization": settings})
    return QuantizeReport("fp16", Precision.FP16.value, settings, 0, time.perf_counter() - t0)


# ------------------------------------------------------------------------ dispatcher


def quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    config: QuantizeConfig,
    *,
    calib: np.ndarray | None = None,
    validation: "tuple[np.ndarray, np.ndarray] | DetectionValidation | None" = None,
    threads: int = 2,
) -> QuantizeReport:
    """Apply one :class:`QuantizeConfig` to ``src``, writing ``dst``.

    ``validation`` drives ``--max-drop``: labeled images (top-1) or, for a detector,
    a :class:`DetectionValidation` (mAP@0.5).

    Raises:
        CalibrationMissing: int8-static without calibration images, or accuracy control
            without validation images.
        ValueError: ``mode`` is none (nothing to write).
    """
    mode = config.mode
    per_channel = config.per_channel is not False
    if mode is QuantizeMode.NONE:
        raise ValueError("Got --quantize none; expected a quantization mode to apply")
    if mode is QuantizeMode.FP16:
        return convert_fp16(src, dst)
    if mode is QuantizeMode.INT8_DYNAMIC:
        return quantize_ort_dynamic(src, dst, per_channel=per_channel)
    calib = _check_images(calib, "calibration")
    if config.resolved_engine is Engine.ORT:
        return quantize_ort_static(
            src, dst, calib, per_channel=per_channel,
            method=config.method or CalibrationMethod.MINMAX, percentile=config.percentile,
        )
    if config.max_drop_pt is not None:
        if validation is None:
            raise CalibrationMissing("Got --max-drop without validation images; expected labeled images to measure the drop")
        if isinstance(validation, DetectionValidation):
            return quantize_nncf_accuracy_control_detection(
                src, dst, calib, validation, max_drop_pt=config.max_drop_pt, per_channel=per_channel, threads=threads,
            )
        return quantize_nncf_accuracy_control(
            src, dst, calib, validation[0], validation[1],
            max_drop_pt=config.max_drop_pt, per_channel=per_channel, threads=threads,
        )
    return quantize_nncf(src, dst, calib, per_channel=per_channel)


def describe(config: QuantizeConfig) -> str:
    """A short human description, e.g. ``int8-static (nncf, 300 images, per-channel)``."""
    d = config.to_dict()
    rest = [f"{k}={v}" for k, v in d.items() if k != "mode"]
    return f"{d['mode']}" + (f" ({', '.join(rest)})" if rest else "")

