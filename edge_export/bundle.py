"""Edge bundles: a registered version made ready for one device target, checked before it ships.

``export_bundle(registry, ref, target)`` reads top to bottom:

1. resolve the version and the target profile (``visionfleet.targets``): format,
   precision, threads, input size and size budget;
2. make the model file for the target: INT8 ONNX (``x86-cpu``, ``arm64-cpu``: ONNX
   Runtime static QDQ quantization calibrated on the model's own training images),
   ONNX Runtime's mobile ``.ort`` format plus the reduced-operator config a minimal
   ORT build needs (``android`` INT8, ``ios`` FP16), or the ONNX file with TensorRT EP
   options (``jetson``: the engine is built on the device, once, into a persisted
   engine cache — engines are specific to one GPU and TensorRT version);
3. take golden samples (real holdout images, encoded as stored) and record the
   expected outputs of the ONNX file the bundle model was made from;
4. write card, preprocessing, golden files and the manifest (sha256 of every file);
5. load the written bundle back the way the device does (``edge_agent.bundle``,
   ``.ort`` included) and refuse to finish unless it reproduces the golden outputs,
   agrees with the FP32 reference often enough and fits the target's size budget.

A refused bundle is deleted; nothing half-checked is left where a publisher could
pick it up.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from edge_agent.bundle import (
    GOLDEN,
    MANIFEST,
    BundleFile,
    BundleManifest,
    GoldenSpec,
    RuntimeSpec,
    file_digest,
    health_check,
    read_manifest,
)
from visionfleet.registry import Registry
from visionfleet.spec import FileEntry, Lineage, ModelCard, Task
from visionfleet.targets import ModelFormat, Precision, Target, TargetProfile, profile

__all__ = [
    "BundleRefused",
    "GoldenMismatch",
    "BudgetExceeded",
    "DeviceTolerance",
    "DEVICE_TOLERANCE",
    "export_bundle",
    "pack_bundle",
    "bundle_id",
]

# on_event(stage, info): progress for the caller (the CLI draws a status line)
Event = Callable[[str, str], None]
_GOLDEN_DEFAULT = 16
_CALIBRATION_DEFAULT = 200
# The exporter checks its own output on the machine that made it: same kernels, so
# any difference beyond float noise means the written file is not the computed one.
_EXPORT_ATOL = 1e-3


def _no_event(stage: str, info: str) -> None:
    return None


class BundleRefused(ValueError):
    """The bundle failed a check and was not written."""


class GoldenMismatch(BundleRefused):
    """The written bundle did not reproduce its golden outputs (or drifted too far from FP32)."""


class BudgetExceeded(BundleRefused):
    """The model file is larger than the target allows, or its input larger than the device feeds."""


@dataclass(frozen=True)
class DeviceTolerance:
    """How closely a *device* must reproduce the golden outputs of a precision.

    A device's kernels differ from the build machine's (ARM NEON vs x86 VNNI INT8
    requantization, TensorRT FP16 vs CPU FP32), so the device tolerance is looser than
    the exporter's own check; a corrupted or wrong model misses it by orders of
    magnitude (probabilities off by ~0.1-1, top-1 at chance).
    """

    atol: float
    min_top1_agreement: float


DEVICE_TOLERANCE: Mapping[str, DeviceTolerance] = {
    "fp32": DeviceTolerance(1e-3, 1.0),
    "fp16": DeviceTolerance(0.02, 0.9),
    "int8": DeviceTolerance(0.05, 0.9),
    "tensorrt": DeviceTolerance(0.05, 0.9),  # jetson: TensorRT FP16/INT8 engine vs the CPU reference
}


def bundle_id(model: str, version: int, target: str, model_sha256: str) -> str:
    return f"{model}-v{version}-{target}-{model_sha256[:12]}"


# ------------------------------------------------------------------------------ model file


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """ORT's converter prints progress on stdout; our stdout carries results only."""
    logger = logging.getLogger("ort_format_model.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _precision_file(src: Path, card: ModelCard, prof: TargetProfile, work: Path, dataset: Path | None,
                    calibration: int, on_event: Event) -> tuple[Path, str, list[dict[str, Any]]]:
    """The ONNX file in the precision the target runs (before any format conversion)."""
    from edge_export.quantize import QuantizeConfig, QuantizeMode, calibration_images, quantize

    want = prof.precision
    have = card.precision
    if prof.format is ModelFormat.PLAN:
        # TensorRT takes the precision from its builder flags (FP16) or the graph's Q/DQ
        # nodes (INT8): the shipped ONNX stays as registered.
        return src, have, []
    if want.value == have:
        return src, have, []
    if have != Precision.FP32.value:
        raise ValueError(
            f"Got {card.ref} in {have} for target {prof.target.value} ({want.value}); expected an FP32 version "
            f"to convert, or a {want.value} one (visionfleet optimize {card.ref} --quantize ...)"
        )
    if card.task is not Task.CLASSIFICATION:
        raise ValueError(
            f"Got a {card.task.value} model {card.ref} for target {prof.target.value} ({want.value}); expected a "
            f"classification model, or a {want.value} version made with visionfleet optimize"
        )
    if want is Precision.FP16:
        on_event("convert", "FP16 weights and compute")
        dst = work / "model.fp16.onnx"
        report = quantize(src, dst, QuantizeConfig(mode=QuantizeMode.FP16))
        return dst, "fp16", [{"op": "quantize", **report.settings}]
    if dataset is None:
        raise ValueError(
            f"Got no dataset for {card.ref} (its card has no lineage.dataset); expected --data DATASET "
            "for INT8 calibration and golden samples"
        )
    q = QuantizeConfig(mode=QuantizeMode.INT8_STATIC, engine="ort", calibration=calibration)
    on_event("calibration", f"{calibration} images from {dataset.name}:train")
    calib = calibration_images(dataset, tuple(card.input_size), card.resize.value, calibration, seed=0)  # type: ignore[arg-type]
    on_event("quantize", "ONNX Runtime static INT8 (QDQ, per-channel)")
    dst = work / "model.int8.onnx"
    report = quantize(src, dst, q, calib=calib)
    return dst, "int8", [{"op": "quantize", **report.settings, "calibration_source": f"{dataset}:train"}]


def _to_ort_format(onnx_path: Path, work: Path, on_event: Event) -> tuple[Path, Path]:
    """Convert to ORT format (fixed optimizations, no platform-specific layout) + reduced-op config."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    on_event("convert", "ONNX Runtime mobile format (.ort) with a reduced-operator config")
    conv = work / "ort-conv"
    conv.mkdir()
    shutil.copy(onnx_path, conv / "model.onnx")
    with _quiet_stdout():
        # target_platform "arm": phones are ARM; it keeps NCHWc (x86-only) layouts out of
        # the saved graph and lets INT8 QDQ fuse into ARM's int8 kernels.
        convert_onnx_models_to_ort(
            conv / "model.onnx", output_dir=conv, optimization_styles=[OptimizationStyle.Fixed],
            target_platform="arm", enable_type_reduction=True,
        )
    ort_file = conv / "model.ort"
    configs = sorted(conv.glob("*.config"))
    if not ort_file.is_file() or not configs:
        raise RuntimeError(f"ORT format conversion produced {sorted(p.name for p in conv.iterdir())}")
    return ort_file, configs[0]


# ------------------------------------------------------------------------------ golden samples


def _golden_images(dataset: Path, n: int) -> list[tuple[bytes, int]]:
    """The first ``n`` holdout images as stored (encoded bytes) with their labels."""
    from visionfleet.datasets.store import read_split

    table = read_split(dataset, "holdout", columns=["image", "label"])
    if table.num_rows < n:
        raise ValueError(f"Got {table.num_rows} holdout images in {dataset}; expected at least {n} golden samples")
    images = table.column("image").to_pylist()[:n]
    labels = table.column("label").to_pylist()[:n]
    return [(bytes(b), int(y)) for b, y in zip(images, labels)]


def _run_onnx(path: Path, images: list[np.ndarray]) -> tuple[list[list[np.ndarray]], list[str]]:
    """Outputs per image (batch of one each, like the device) of an ONNX file, and the output names."""
    from visionfleet.inference import RuntimeOptions, create_session

    sess = create_session(path, RuntimeOptions(threads=1, providers=("CPUExecutionProvider",)))
    names = [o.name for o in sess.get_outputs()]
    inp = sess.get_inputs()[0].name
    return [[o[0] for o in sess.run(names, {inp: img[None]})] for img in images], names


# ------------------------------------------------------------------------------ export


def _dataset_path(card: ModelCard, dataset: str | os.PathLike[str] | None, datasets_dir: Path | None) -> Path | None:
    from visionfleet.datasets.store import read_info, resolve_dataset

    ref = dataset if dataset is not None else card.lineage.dataset
    if not ref:
        return None
    if "://" in str(ref):  # a dataset on the store: this node's checked copy
        from visionfleet.datasets.store import local_dataset
        from visionfleet.settings import Settings

        path = local_dataset(str(ref), Settings.from_env().cache_dir)
    else:
        path = resolve_dataset(ref, datasets_dir) if datasets_dir else Path(ref).expanduser().resolve()
    info = read_info(path)
    if info.labels != list(card.labels):
        raise ValueError(f"Got dataset {path} with labels {info.labels}; expected the model's labels {card.labels}")
    return path


def export_bundle(
    registry: Registry,
    ref: str,
    target: Target | str,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    dataset: str | os.PathLike[str] | None = None,
    datasets_dir: str | os.PathLike[str] | None = None,
    golden: int = _GOLDEN_DEFAULT,
    calibration: int = _CALIBRATION_DEFAULT,
    min_reference_agreement: float = 0.75,
    on_event: Event = _no_event,
) -> Path:
    """Build, verify and write the bundle of ``ref`` for ``target``; returns its folder.

    Args:
        registry: where ``ref`` is registered.
        ref: ``NAME[:VERSION|@ALIAS]``.
        target: a target name (``x86-cpu``, ``arm64-cpu``, ``android``, ``ios``, ``jetson``).
        out_dir: parent folder of the bundle (default ``<state>/edge/bundles``).
        dataset: golden samples and INT8 calibration images (default: the card's
            ``lineage.dataset``).
        golden: number of golden samples.
        calibration: INT8 calibration images.
        min_reference_agreement: the bundle's top-1 must match the FP32 model's on at
            least this share of the golden samples (a broken quantization lands near chance).
    Returns:
        The bundle folder ``<out_dir>/<bundle_id>``.
    Raises:
        LookupError: unknown model, version or alias.
        ValueError: unknown target, unusable model for the target, missing dataset.
        GoldenMismatch: the written bundle does not reproduce its golden outputs.
        BudgetExceeded: the model file is over the target's size budget.
    """
    prof = profile(target)
    if golden < 1:
        raise ValueError(f"Got {golden} for golden samples; expected >= 1")
    if not 0.0 <= min_reference_agreement <= 1.0:
        raise ValueError(f"Got {min_reference_agreement} for min_reference_agreement; expected 0..1")
    resolved = registry.resolve(ref)
    card = registry.card(resolved.name, resolved.version)
    src_dir = registry.local_dir(resolved.name, resolved.version)
    if card.format == "plan":
        entry = card.file("onnx")
        if entry is None:
            raise ValueError(f"Got {card.ref}, a TensorRT engine without its ONNX; expected a version with an ONNX file")
        src = src_dir / entry.name
    elif card.format == "onnx":
        src = src_dir / card.model_file
    else:
        raise ValueError(f"Got {card.ref} in {card.format} format; expected an ONNX version to export")
    lh, lw = prof.input_size
    for h, w in card.sizes:  # every size the card serves at (input_size first)
        if h > lh or w > lw:
            raise BudgetExceeded(f"Got input {h}x{w} for {prof.target.value}; the target feeds at most {lh}x{lw}")
    ds = _dataset_path(card, dataset, Path(datasets_dir) if datasets_dir else None)
    if ds is None:
        raise ValueError(
            f"Got no dataset for {card.ref} (its card has no lineage.dataset); expected --data DATASET for golden samples"
        )
    parent = Path(out_dir) if out_dir is not None else Path(registry.uri).expanduser().resolve().parent / "edge" / "bundles"
    parent.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix=".bundle-", dir=parent))
    try:
        return _build(card, src, prof, ds, parent, work, golden, calibration, min_reference_agreement, on_event)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(card: ModelCard, src: Path, prof: TargetProfile, ds: Path, parent: Path, work: Path, golden: int,
           calibration: int, min_reference_agreement: float, on_event: Event) -> Path:
    from visionfleet.imaging import load_for_model, sniff_format

    tmp = work / "tmp"
    tmp.mkdir()
    onnx_file, precision, steps = _precision_file(src, card, prof, tmp, ds, calibration, on_event)
    out = work / "bundle"
    out.mkdir()
    extra: list[Path] = []
    if prof.format is ModelFormat.ORT:
        ort_file, config = _to_ort_format(onnx_file, tmp, on_event)
        model_file = "model.ort"
        shutil.copy(ort_file, out / model_file)
        # The config's header names the temp file it was made from; keep only the operator lines.
        lines = [ln for ln in config.read_text().splitlines() if not ln.startswith("# - ")]
        (out / "required_operators.config").write_text("\n".join(lines) + "\n")
        extra.append(out / "required_operators.config")
        steps.append({"op": "ort-format", "optimization": "fixed", "target_platform": "arm", "type_reduction": True})
    else:
        model_file = "model.int8.onnx" if precision == "int8" else ("model.fp16.onnx" if precision == "fp16" else "model.onnx")
        shutil.copy(onnx_file, out / model_file)
    if len(card.sizes) > 1 and prof.format is not ModelFormat.ORT:
        from edge_export.input_sizes import check_runs_at_sizes

        check_runs_at_sizes(out / model_file, card.sizes)  # the device serves at every listed size
    model_sha, model_bytes = file_digest(out / model_file)
    bid = bundle_id(card.name, card.version or 0, prof.target.value, model_sha)

    # Golden samples: stored encoded, so a device's check exercises its own decoding.
    on_event("golden", f"{golden} holdout images from {ds.name}")
    samples = _golden_images(ds, golden)
    (out / "golden").mkdir()
    decoded = []
    names = []
    for i, (data, _label) in enumerate(samples):
        ext = {"jpeg": "jpg"}.get(sniff_format(data).value, sniff_format(data).value)
        name = f"golden/{i:03d}.{ext}"
        (out / name).write_bytes(data)
        names.append(name)
        decoded.append(load_for_model(data, tuple(card.input_size), card.resize)[0])
    expected, out_names = _run_onnx(onnx_file, decoded)
    reference, _ = _run_onnx(src, decoded) if onnx_file != src else (expected, out_names)
    agreement = None
    if card.task is Task.CLASSIFICATION:
        agreement = float(np.mean([int(np.argmax(e[0]) == np.argmax(r[0])) for e, r in zip(expected, reference)]))
    golden_doc = {
        "outputs": out_names,
        "samples": [
            {"file": n, "label": card.labels[y] if card.task is Task.CLASSIFICATION else None,
             "outputs": {k: v.tolist() for k, v in zip(out_names, outs)}}
            for n, (_, y), outs in zip(names, samples, expected)
        ],
    }
    (out / GOLDEN).write_text(json.dumps(golden_doc))

    tensorrt = None
    tol_key = precision
    if prof.format is ModelFormat.PLAN:
        tensorrt = _tensorrt_options(onnx_file, card, prof)
        (out / "tensorrt.json").write_text(json.dumps(tensorrt, indent=2))
        extra.append(out / "tensorrt.json")
        tol_key = "tensorrt"
        steps.append({"op": "tensorrt-on-device", "precision": "int8" if tensorrt["trt_int8_enable"] else "fp16"})
    tol = DEVICE_TOLERANCE[tol_key]

    stored_card = card.model_copy(update={
        "model_file": model_file,
        "format": "ort" if prof.format is ModelFormat.ORT else "onnx",
        "precision": precision,
        "files": [],
        "lineage": Lineage(
            parent=card.ref, dataset=str(ds), run=bid,
            steps=[*card.lineage.steps, *({**s, "by": "visionfleet edge export"} for s in steps)],
        ),
        "description": f"edge bundle of {card.ref} for {prof.target.value}",
    })
    stored_card.files = [FileEntry(name=model_file, role=stored_card.format, bytes=model_bytes, sha256=model_sha)]
    (out / "card.json").write_text(stored_card.model_dump_json(indent=2))
    (out / "preprocessing.json").write_text(json.dumps({
        "input_size": list(card.input_size), "resize": card.resize.value, "layout": "NHWC", "dtype": "uint8",
        "channel_order": "RGB", "normalization_in_graph": card.preprocessing,
        "decode": "visionfleet.imaging.load_for_model (EXIF orientation applied, alpha dropped)",
    }, indent=2))

    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            digest, size = file_digest(p)
            files[p.relative_to(out).as_posix()] = BundleFile(sha256=digest, bytes=size)
    size_mb = model_bytes / 1e6
    manifest = BundleManifest(
        bundle_id=bid, model=card.name, version=card.version or 0, target=prof.target.value, task=card.task.value,
        format=stored_card.format, precision=precision, model_file=model_file,
        input_size=tuple(card.input_size), resize=card.resize.value, files=files,  # type: ignore[arg-type]
        golden=GoldenSpec(samples=len(samples), atol=tol.atol, min_top1_agreement=tol.min_top1_agreement),
        runtime=RuntimeSpec(threads=prof.threads, providers=None, tensorrt=tensorrt),
        source={"ref": card.ref, "model_file": card.model_file, "precision": card.precision,
                "sha256": file_digest(src)[0]},
        checks={"model_mb": round(size_mb, 4), "max_model_mb": prof.max_model_mb,
                "reference_top1_agreement": agreement, "profile": prof.to_dict()},
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(),
    )
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=2))

    # Refuse what does not fit or does not reproduce; check the folder as a device would.
    if size_mb > prof.max_model_mb:
        raise BudgetExceeded(f"{bid}: model file {size_mb:.2f} MB exceeds the {prof.target.value} budget "
                             f"of {prof.max_model_mb} MB")
    if agreement is not None and agreement < min_reference_agreement:
        raise GoldenMismatch(f"{bid}: top-1 agrees with the FP32 model on {agreement:.2f} of the golden samples; "
                             f"expected >= {min_reference_agreement:.2f} (a broken conversion?)")
    on_event("verify", "loading the bundle back in ONNX Runtime and replaying the golden samples")
    report = health_check(out, threads=1, atol=_EXPORT_ATOL, min_agreement=1.0)
    if not report.ok:
        raise GoldenMismatch(f"{bid}: {report.error}")
    manifest.checks["export_golden"] = report.golden.to_dict() if report.golden else None
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    read_manifest(out)  # the file we just wrote parses

    final = parent / bid
    if final.exists():
        old = parent / f".old-{uuid.uuid4().hex}"
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    out.rename(final)
    return final


def _tensorrt_options(onnx_file: Path, card: ModelCard, prof: TargetProfile) -> dict[str, Any]:
    """TensorRT EP options for the device; the engine cache path is filled in by the agent."""
    from edge_export.tensorrt import onnx_traits, ort_tensorrt_provider_options

    traits = onnx_traits(onnx_file)
    precision = Precision.INT8 if traits.get("qdq") else prof.precision
    engine = prof.engine
    assert engine is not None  # every plan-format profile has one (visionfleet.targets checks)
    opts = ort_tensorrt_provider_options(
        precision, ".", input_size=tuple(card.input_size), input_sizes=card.sizes,  # type: ignore[arg-type]
        input_name=traits.get("input_name", "images"),
        min_batch=engine.min_batch, opt_batch=engine.opt_batch, max_batch=engine.max_batch,
        workspace_bytes=engine.workspace_bytes, qdq=bool(traits.get("qdq")),
    )
    opts.pop("trt_engine_cache_path", None)
    opts.pop("trt_timing_cache_path", None)
    return opts


def pack_bundle(bundle_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Write the bundle folder as one deterministic tar archive (sorted, no owners, mtime 0).

    The same folder always packs to the same bytes, so re-publishing an unchanged bundle
    gives the same TUF target hash.
    """
    src = Path(bundle_dir)
    read_manifest(src)  # only bundles go in
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(src.rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(src).parts):
                continue
            info = tarfile.TarInfo(p.relative_to(src).as_posix())
            info.size = p.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with open(p, "rb") as f:
                tar.addfile(info, f)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    tmp.replace(dest)
    return dest
