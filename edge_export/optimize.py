"""``optimize(parent_ref, settings)``: build a compressed variant, measure it, register it.

The pipeline reads top to bottom:

1. resolve the parent in the registry (unknown version: a clear error) and find the
   dataset it was trained on (``lineage.dataset``, or an explicit one);
2. build the variant (:func:`build_variant`): prune to a MAC reduction and fine-tune
   (needs the parent's PyTorch weights and the caller's :class:`PruneTools`), export to
   ONNX, quantize; the built files are cached under a key derived from the parent
   file's sha256 and every setting that shapes the file (:func:`variant_key`), so the
   same parent + settings is built once;
3. measure it beside its parent (:func:`measure_variant`): holdout top-1 of both,
   file size, MACs, batch-1 latency on the target's threads, Offline throughput
   alternating with the parent, peak memory;
4. check the target profile's budgets and register a new version whose card records
   its lineage (parent, every setting in ``lineage.steps``) and the measured metrics.

Issue 6's Tune sweep composes the same pieces: :func:`build_variant` for a trial's
settings (reused across trials through the cache) and ``edge_export.measure`` for
latency, throughput and accuracy.

``edge_export`` never imports ``train``: loading the parent's weights into an
``nn.Module``, the fine-tune after pruning and saving the pruned weights come in as
callables (:class:`PruneTools`); ``train.finetune.prune_tools()`` gives the ones for the
built-in architectures, and the CLI, the retraining pipeline and the Tune trials pass
them in.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from edge_export.prune import Importance
from edge_export.quantize import CalibrationMissing, QuantizeConfig, QuantizeMode
from visionfleet.registry import Registry
from visionfleet.spec import Lineage, ModelCard, Task
from visionfleet.targets import BudgetCheck, ModelFormat, Precision, Target, check_budgets, profile

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "OptimizeSettings",
    "OptimizeResult",
    "FinetuneJob",
    "PruneTools",
    "BuiltVariant",
    "variant_key",
    "build_variant",
    "measure_variant",
    "optimize",
    "BUILD_FORMAT",
]

# Bump when the build procedure changes in a way that changes the files, so that old
# cache entries are not reused for new builds.
BUILD_FORMAT = 2
_DEFAULT_FINETUNE_EPOCHS = 3
_DEFAULT_THREADS = 2

# on_event(stage, done, total, info): progress for the caller (the CLI draws bars)
Event = Callable[[str, int | None, int | None, str], None]


def _no_event(stage: str, done: int | None, total: int | None, info: str) -> None:
    return None


@dataclass(frozen=True)
class FinetuneJob:
    """The fine-tune after pruning, as the build describes it; :attr:`PruneTools.finetune` runs it."""

    dataset: Path
    input_size: tuple[int, int]
    resize: str
    mean: Sequence[float]  # 0..255 scale, as in the checkpoint
    std: Sequence[float]
    epochs: int
    lr: float
    batch_size: int
    threads: int
    seed: int
    limit: int | None  # only the first N images of the train split
    on_step: Callable[[int, int, float], None] | None = None  # (step, total, loss)


@dataclass(frozen=True)
class PruneTools:
    """What pruning needs from the code that owns the architectures; the caller passes it in.

    Args:
        load: ``model.pt`` path -> ``(module, meta)``; ``meta`` holds ``mean``/``std``
            and is written back, with a ``pruned`` entry, beside the pruned weights.
        save: ``(path, module, meta)`` -> path; writes weights a later ``load`` rebuilds.
        finetune: a :class:`FinetuneJob` -> a callable that trains a module in place and
            returns its metrics (``epochs``, ``lr``, ``batch_size``, ``limit``, ``steps``,
            ``train_loss``, ``seconds``).
    """

    load: Callable[[Path], "tuple[nn.Module, dict[str, Any]]"]
    save: Callable[[Path, "nn.Module", Mapping[str, Any]], Path]
    finetune: Callable[[FinetuneJob], Callable[["nn.Module"], Mapping[str, Any]]]


@dataclass(frozen=True)
class OptimizeSettings:
    """Everything `visionfleet optimize` can be told; validated when built.

    Args:
        quantize: the quantization recipe (mode none keeps FP32).
        prune: share of MACs to remove by structured pruning, 0 (off) to 0.9.
        finetune_epochs: epochs of fine-tuning after pruning (default 3 when pruning).
        finetune_lr, finetune_batch, finetune_limit: the fine-tune's SGD settings and how
            many training images it uses (None: the whole train split).
        importance: channel ranking for pruning.
        round_to: pruned channel counts are multiples of this (1: any count). 8 by default:
            SIMD kernels want aligned channel counts; on the demo model, pruning to odd
            counts (11, 22, 45...) gave no speed-up at all, multiples of 8 gave 1.36x FP32.
        target: a target profile whose threads the measurements use and whose budgets
            are checked.
        threads: measurement threads (default: the target's, else 2).
        dataset: dataset folder for calibration, fine-tuning and the holdout (default:
            the parent card's ``lineage.dataset``).
        holdout_limit: measure accuracy on the first N holdout images only.
        validation_images: images of the train split used by ``--max-drop``.
        compare_rounds: alternating Offline rounds against the parent.
        seed: seeds calibration sampling and the fine-tune.
    """

    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    prune: float = 0.0
    finetune_epochs: int | None = None
    finetune_lr: float = 0.02
    finetune_batch: int = 64
    finetune_limit: int | None = None
    importance: Importance = Importance.L2
    round_to: int = 8
    target: Target | None = None
    threads: int | None = None
    dataset: str | None = None
    holdout_limit: int | None = None
    validation_images: int = 1000
    compare_rounds: int = 5
    latency_queries: int = 50
    peak_memory: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "importance", Importance(self.importance))
        if self.target is not None:
            object.__setattr__(self, "target", Target(self.target))
        if not 0.0 <= self.prune <= 0.9:
            raise ValueError(f"Got {self.prune} for --prune; expected a share of MACs to remove, 0 <= r <= 0.9")
        if self.finetune_epochs is not None:
            if self.finetune_epochs < 0:
                raise ValueError(f"Got {self.finetune_epochs} for --finetune-epochs; expected >= 0")
            if self.finetune_epochs > 0 and self.prune == 0:
                raise ValueError("Got --finetune-epochs without --prune; expected fine-tuning only after pruning")
        if self.prune == 0 and self.quantize.mode is QuantizeMode.NONE:
            raise ValueError("Got --quantize none and no --prune; expected at least one optimization")
        if self.finetune_lr <= 0 or self.finetune_batch < 1:
            raise ValueError(f"Got lr {self.finetune_lr}, batch {self.finetune_batch}; expected lr > 0, batch >= 1")
        if self.finetune_limit is not None and self.finetune_limit < 1:
            raise ValueError(f"Got {self.finetune_limit} for --finetune-limit; expected >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"Got {self.threads} for --threads; expected >= 1")
        if self.holdout_limit is not None and self.holdout_limit < 1:
            raise ValueError(f"Got {self.holdout_limit} for --holdout-limit; expected >= 1")
        if self.compare_rounds < 1 or self.latency_queries < 1:
            raise ValueError("Got compare_rounds or latency_queries < 1; expected >= 1")
        if self.round_to < 1:
            raise ValueError(f"Got {self.round_to} for --round-to; expected >= 1 (1 keeps any channel count)")
        if self.validation_images < 1:
            raise ValueError(f"Got {self.validation_images} for validation_images; expected >= 1")

    @property
    def resolved_finetune_epochs(self) -> int:
        if self.prune == 0:
            return 0
        return _DEFAULT_FINETUNE_EPOCHS if self.finetune_epochs is None else self.finetune_epochs

    @property
    def resolved_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        return profile(self.target).threads if self.target is not None else _DEFAULT_THREADS

    def build_dict(self) -> dict[str, Any]:
        """The settings that shape the built files (the cache key's input), defaults resolved."""
        d: dict[str, Any] = {"quantize": self.quantize.to_dict(), "seed": self.seed}
        if self.prune > 0:
            d["prune"] = {"mac_reduction": self.prune, "importance": self.importance.value, "round_to": self.round_to}
            epochs = self.resolved_finetune_epochs
            if epochs:
                d["finetune"] = {
                    "epochs": epochs, "lr": self.finetune_lr, "batch": self.finetune_batch, "limit": self.finetune_limit,
                }
        if self.quantize.max_drop_pt is not None:
            d["validation_images"] = self.validation_images
        if self.target is not None and profile(self.target).format is ModelFormat.ORT:
            d["format"] = ModelFormat.ORT.value  # an extra .ort file is built
        return d


def variant_key(parent_sha256: str, build: dict[str, Any], dataset_id: str) -> str:
    """Deterministic cache key of a variant: same parent file + same settings + same data."""
    doc = {"format": BUILD_FORMAT, "parent_sha256": parent_sha256, "build": build, "dataset": dataset_id}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _dataset_id(dataset: Path) -> str:
    """A dataset's identity: its manifest (regenerating a folder in place changes it)."""
    manifest = dataset / "manifest.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ build


@dataclass(frozen=True)
class BuiltVariant:
    """The files of a built variant (in the cache) and what was done to make them."""

    key: str
    dir: Path
    model_file: str
    precision: str
    files: dict[str, str]  # role -> file name in dir
    steps: list[dict[str, Any]]
    reused: bool

    @property
    def model_path(self) -> Path:
        return self.dir / self.model_file


def build_variant(
    parent_dir: Path,
    parent: ModelCard,
    settings: OptimizeSettings,
    *,
    dataset: Path,
    cache_dir: Path,
    tools: PruneTools | None = None,
    on_event: Event = _no_event,
) -> BuiltVariant:
    """Build (or reuse from ``cache_dir``) the variant ``settings`` describe.

    ``tools`` loads, fine-tunes and saves the PyTorch weights; pruning needs it.

    Raises:
        ValueError: pruning without ``tools`` or a parent without PyTorch weights, or a
            parent that is not FP32.
        CalibrationMissing: int8-static without usable calibration data.
    """
    if settings.prune > 0 and tools is None:
        raise ValueError(
            "Got --prune without PruneTools; expected tools= from the caller (train.finetune.prune_tools() "
            "loads, fine-tunes and saves the built-in architectures)"
        )
    model_entry = next((f for f in parent.files if f.name == parent.model_file), None)
    if model_entry is None:
        raise ValueError(f"Got a card for {parent.ref} that lists no {parent.model_file}; expected its model file")
    key = variant_key(model_entry.sha256, settings.build_dict(), _dataset_id(dataset))
    final = cache_dir / key
    if (final / "build.json").is_file():
        doc = json.loads((final / "build.json").read_text())
        on_event("build", 1, 1, f"reused cached build {key[:12]}")
        return BuiltVariant(key, final, doc["model_file"], doc["precision"], doc["files"], doc["steps"], True)

    cache_dir.mkdir(parents=True, exist_ok=True)
    work = cache_dir / f".tmp-{uuid.uuid4().hex}"
    work.mkdir()
    try:
        steps: list[dict[str, Any]] = []
        files: dict[str, str] = {}
        src = parent_dir / parent.model_file
        precision = parent.precision
        if settings.prune > 0:
            assert tools is not None
            src = _prune_step(parent_dir, parent, settings, dataset, work, steps, files, tools, on_event)
            precision = Precision.FP32.value  # exported afresh from the (pruned) PyTorch weights
        if settings.quantize.mode is not QuantizeMode.NONE:
            if precision != Precision.FP32.value:
                raise ValueError(f"Got {parent.ref} in {precision}; expected an FP32 model to quantize")
            src, precision = _quantize_step(src, parent, settings, dataset, work, steps, on_event)
        files["onnx"] = src.name
        if settings.target is not None and profile(settings.target).format is ModelFormat.ORT:
            files["ort"] = _ort_format_step(src, work, steps, on_event).name
        doc = {
            "key": key, "model_file": src.name, "precision": precision, "files": files, "steps": steps,
            "parent": parent.ref, "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        }
        (work / "build.json").write_text(json.dumps(doc, indent=2))
        try:
            work.rename(final)
        except OSError:  # a concurrent build of the same key finished first: use it
            shutil.rmtree(work, ignore_errors=True)
            doc = json.loads((final / "build.json").read_text())
            return BuiltVariant(key, final, doc["model_file"], doc["precision"], doc["files"], doc["steps"], True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return BuiltVariant(key, final, src.name, precision, files, steps, False)


def _prune_step(
    parent_dir: Path,
    parent: ModelCard,
    settings: OptimizeSettings,
    dataset: Path,
    work: Path,
    steps: list[dict[str, Any]],
    files: dict[str, str],
    tools: PruneTools,
    on_event: Event,
) -> Path:
    import torch

    from edge_export.prune import prune_finetune_export
    from visionfleet.datasets.store import load_arrays

    weights = parent.file("torch")
    if weights is None:
        raise ValueError(
            f"Got --prune for {parent.ref}, which has no PyTorch weights (an imported ONNX model?); "
            "expected a model trained or imported as a PyTorch checkpoint (pruning needs the weights)"
        )
    model, meta = tools.load(parent_dir / weights.name)
    h, w = parent.input_size
    mean, std = parent.preprocessing.get("mean", meta["mean"]), parent.preprocessing.get("std", meta["std"])
    epochs = settings.resolved_finetune_epochs
    finetune = None
    if epochs:
        finetune = tools.finetune(FinetuneJob(
            dataset=dataset, input_size=(h, w), resize=parent.resize.value, mean=mean, std=std, epochs=epochs,
            lr=settings.finetune_lr, batch_size=settings.finetune_batch, threads=settings.resolved_threads,
            seed=settings.seed, limit=settings.finetune_limit,
            on_step=lambda step, total, loss: on_event("fine-tune", step, total, f"loss {loss:.3f}"),
        ))
    on_event("prune", None, None, f"removing {settings.prune:.0%} of the MACs")
    parity, _ = load_arrays(dataset, "holdout", (h, w), parent.resize.value, limit=32)
    result = prune_finetune_export(
        model,
        example_inputs=torch.zeros(1, 3, h, w),
        mac_reduction=settings.prune,
        finetune=finetune,
        out_path=work / "model.onnx",
        input_size=(h, w),
        mean=mean,
        std=std,
        metadata={
            "task": parent.task.value, "labels": parent.labels, "resize": parent.resize.value,
            "model_name": parent.name, "framework": parent.framework, "arch": parent.arch or {},
        },
        parity_images=parity,
        importance=settings.importance,
        round_to=settings.round_to if settings.round_to > 1 else None,
    )
    rep = result.report
    steps.append({
        "op": "prune", "mac_reduction_requested": rep.mac_reduction_requested, "mac_reduction": rep.mac_reduction,
        "channel_ratio": rep.channel_ratio, "importance": rep.importance, "round_to": rep.round_to,
        "macs_before": rep.macs_before, "macs_after": rep.macs_after,
        "params_before": rep.params_before, "params_after": rep.params_after, "tool": "torch-pruning",
    })
    if result.finetune is not None:
        ft = result.finetune
        steps.append({
            "op": "finetune", "epochs": ft["epochs"], "lr": ft["lr"], "batch": ft["batch_size"], "limit": ft["limit"],
            "steps": ft["steps"], "train_loss": ft["train_loss"], "seconds": ft["seconds"], "dataset": str(dataset),
        })
    steps.append({"op": "export", "format": "onnx", "parity": result.parity})
    # The pruned weights, rebuildable from their shapes (no pickled code): a later
    # optimize can prune or quantize this version again.
    tools.save(
        work / "model.pt",
        result.model,
        {**meta, "pruned": {"mac_reduction": rep.mac_reduction, "layers": rep.layers}, "dataset": str(dataset)},
    )
    files["torch"] = "model.pt"
    return work / "model.onnx"


def _quantize_step(
    src: Path,
    parent: ModelCard,
    settings: OptimizeSettings,
    dataset: Path,
    work: Path,
    steps: list[dict[str, Any]],
    on_event: Event,
) -> tuple[Path, str]:
    from edge_export.quantize import QuantizeMode, calibration_images, describe, labeled_images, quantize

    q = settings.quantize
    size, resize = tuple(parent.input_size), parent.resize.value
    calib = validation = None
    if q.mode is QuantizeMode.INT8_STATIC and parent.task is Task.DETECTION:
        from edge_export.quantize import detection_calibration_images, detection_validation

        on_event("calibration data", None, None, f"{q.calibration} images from {dataset.name}")
        calib = detection_calibration_images(dataset, size, resize, q.calibration, seed=settings.seed)  # type: ignore[arg-type]
        if q.max_drop_pt is not None:  # mAP@0.5 on train images the calibration did not use
            validation = detection_validation(
                dataset, parent, settings.validation_images, split="train", offset=q.calibration, seed=settings.seed
            )
    elif q.mode is QuantizeMode.INT8_STATIC:
        on_event("calibration data", None, None, f"{q.calibration} images from {dataset.name}")
        calib = calibration_images(dataset, size, resize, q.calibration, seed=settings.seed)  # type: ignore[arg-type]
        if q.max_drop_pt is not None:
            validation = labeled_images(
                dataset, size, resize, settings.validation_images,  # type: ignore[arg-type]
                split="train", offset=q.calibration, seed=settings.seed,
            )
    on_event("quantize", None, None, describe(q))
    dst = work / f"model{q.suffix}.onnx"
    report = quantize(src, dst, q, calib=calib, validation=validation, threads=settings.resolved_threads)
    step = {"op": "quantize", **report.settings, "seconds": report.seconds, "tool": _tool(q)}
    if calib is not None:
        step["calibration_source"] = f"{dataset}:train (seeded random subset)"
    if report.accuracy_control:
        step["accuracy_control"] = report.accuracy_control
    steps.append(step)
    return dst, report.precision


def _ort_format_step(src: Path, work: Path, steps: list[dict[str, Any]], on_event: Event) -> Path:
    """The ONNX Runtime mobile format (``.ort``) for android/ios targets, checked to run the same.

    Saved with basic graph optimizations only: extended fusions are hardware-specific
    and are applied by the runtime on the device when it loads the file.
    """
    import onnxruntime as ort

    from edge_export.measure import OrtRunner

    on_event("ort format", None, None, f"{src.name} -> {src.stem}.ort")
    dst = work / f"{src.stem}.ort"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    a, b = OrtRunner(src, 1), OrtRunner(dst, 1)
    h, w = (int(d) for d in a.session.get_inputs()[0].shape[1:3])
    x = np.random.default_rng(0).integers(0, 256, (4, h, w, 3), dtype=np.uint8)
    diff = float(np.abs(a(x) - b(x)).max())
    if diff > 1e-4:
        raise RuntimeError(f"the ORT-format file disagrees with {src.name} (max |diff| {diff:.2e})")
    steps.append({"op": "convert", "format": "ort", "optimization": "basic", "source": src.name, "max_abs_diff": diff})
    return dst


def _tool(q: QuantizeConfig) -> str:
    import importlib.metadata as md

    if q.resolved_engine is not None and q.resolved_engine.value == "nncf":
        return f"nncf {md.version('nncf')}"
    return f"onnxruntime {md.version('onnxruntime')}"


# ---------------------------------------------------------------------------- measure


def measure_variant(
    variant_path: Path,
    parent_path: Path,
    card: ModelCard,
    dataset: Path,
    settings: OptimizeSettings,
    *,
    on_event: Event = _no_event,
) -> dict[str, Any]:
    """Measure a variant beside its parent on the same holdout, threads and moment."""
    from edge_export import measure as M
    from visionfleet.datasets.store import load_arrays

    threads = settings.resolved_threads
    size = tuple(card.input_size)
    if card.task is Task.DETECTION:
        return _measure_detector(variant_path, parent_path, card, dataset, settings, on_event)
    on_event("holdout", None, None, f"decoding {dataset.name}:holdout")
    hx, hy = load_arrays(dataset, "holdout", size, card.resize.value, limit=settings.holdout_limit)  # type: ignore[arg-type]
    variant = M.OrtRunner(variant_path, threads, name="variant")
    parent = M.OrtRunner(parent_path, threads, name="parent")
    on_event("accuracy", None, None, f"top-1 on {len(hy)} holdout images")
    top1 = M.holdout_top1(variant, hx, hy)
    parent_top1 = M.holdout_top1(parent, hx, hy)
    return {
        "holdout_top1": top1,
        "holdout_n": int(len(hy)),
        "parent_holdout_top1": parent_top1,
        "top1_drop_pt": (parent_top1 - top1) * 100.0,
        **_measure_cost(variant, parent, hx[:64], variant_path, parent_path, settings, on_event),
    }


def _measure_cost(
    variant: Any, parent: Any, images: np.ndarray, variant_path: Path, parent_path: Path,
    settings: OptimizeSettings, on_event: Event,
) -> dict[str, Any]:
    """What a variant costs beside its parent, whatever the task: size, MACs, batch-1 latency,
    batch-8 throughput alternating with the parent (the speed-up), peak memory, the machine."""
    from edge_export import measure as M

    threads = settings.resolved_threads
    on_event("latency", None, None, f"batch 1, {threads} threads")
    lat = M.single_stream(variant, images, queries=settings.latency_queries)
    rounds = M.alternate(
        [parent, variant],
        lambda r: M.offline(r, images, batch=8, batches=4).images_per_s,
        rounds=settings.compare_rounds,
        on_round=lambda k: on_event("offline", k, settings.compare_rounds, "alternating with the parent"),
    )
    cost: dict[str, Any] = {
        "size_mb": M.file_mb(variant_path),
        "parent_size_mb": M.file_mb(parent_path),
        "macs_per_image": M.count_macs(variant_path),
        "parent_macs_per_image": M.count_macs(parent_path),
        "latency_b1_p50_ms": lat.p50_ms,
        "latency_b1_p95_ms": lat.p95_ms,
        "offline_b8_images_per_s": float(np.median(rounds["variant"])),
        "parent_offline_b8_images_per_s": float(np.median(rounds["parent"])),
        "speedup_offline_b8": M.ratio_stats(rounds["variant"], rounds["parent"]).to_dict(),
        "threads": threads,
    }
    if settings.peak_memory:
        on_event("memory", None, None, "peak memory in a fresh process")
        cost["peak_memory_mb"] = M.peak_memory_mb(variant_path, threads=threads)
    cost["measured_on"] = M.machine_info(threads)
    return cost


def _measure_detector(
    variant_path: Path, parent_path: Path, card: ModelCard, dataset: Path, settings: OptimizeSettings, on_event: Event
) -> dict[str, Any]:
    """:func:`measure_variant` for a detector: COCO mAP of both on the holdout instead of top-1."""
    from edge_export import measure as M
    from visionfleet.datasets.detect import coco_split
    from visionfleet.evaluation import evaluate_detector
    from visionfleet.imaging import load_for_model
    from visionfleet.names import DETECTION_OUTPUTS, INPUT_NAME

    threads = settings.resolved_threads
    split = coco_split(dataset, "holdout")
    variant = M.OrtRunner(variant_path, threads, name="variant")
    parent = M.OrtRunner(parent_path, threads, name="parent")
    n = min(len(split), settings.holdout_limit or len(split))
    on_event("accuracy", None, None, f"COCO mAP on {n} holdout images")
    scores = {}
    for r in (variant, parent):
        scores[r.name] = evaluate_detector(
            lambda x, r=r: r.session.run(list(DETECTION_OUTPUTS), {INPUT_NAME: x}), card, split,
            limit=settings.holdout_limit,
        )
    v, p = scores["variant"], scores["parent"]
    hx = np.stack([load_for_model(split.image_path(im).read_bytes(), tuple(card.input_size), card.resize)[0]
                   for im in split.doc["images"][:64]])
    return {
        "holdout_map50": v.map50,
        "holdout_map50_95": v.map50_95,
        "parent_holdout_map50": p.map50,
        "parent_holdout_map50_95": p.map50_95,
        "map50_drop_pt": (p.map50 - v.map50) * 100.0,
        "map50_95_drop_pt": (p.map50_95 - v.map50_95) * 100.0,
        "holdout_n": v.images,
        "holdout_boxes": v.gt_boxes,
        "evaluator": v.evaluator,
        **_measure_cost(variant, parent, hx, variant_path, parent_path, settings, on_event),
    }


# --------------------------------------------------------------------------- pipeline


@dataclass
class OptimizeResult:
    card: ModelCard
    reused: bool  # an identical variant was registered already; no new version
    cached_build: bool  # the files came from the build cache
    budgets: list[BudgetCheck] = field(default_factory=list)
    target: str | None = None

    @property
    def budgets_exceeded(self) -> list[BudgetCheck]:
        return [b for b in self.budgets if b.ok is False]

    def to_dict(self) -> dict[str, Any]:
        return {
            "card": self.card.model_dump(mode="json"),
            "reused": self.reused,
            "cached_build": self.cached_build,
            "target": self.target,
            "budgets": [b.to_dict() for b in self.budgets],
            "budgets_exceeded": [b.name for b in self.budgets_exceeded],
        }


def _budgets(card: ModelCard, settings: OptimizeSettings) -> list[BudgetCheck]:
    if settings.target is None:
        return []
    m = card.metrics
    return check_budgets(
        profile(settings.target),
        model_mb=m.get("size_mb"),
        peak_memory_mb=m.get("peak_memory_mb"),
        p95_ms=m.get("latency_b1_p95_ms"),
        input_size=tuple(card.input_size),  # type: ignore[arg-type]
        precision=card.precision,
        threads=m.get("threads"),
    )


def optimize(
    parent_ref: str,
    settings: OptimizeSettings,
    *,
    registry: Registry,
    cache_dir: Path,
    datasets_dir: Path | None = None,
    tools: PruneTools | None = None,
    force: bool = False,
    on_event: Event = _no_event,
) -> OptimizeResult:
    """Build, measure and register the variant of ``parent_ref`` that ``settings`` describe.

    ``tools`` (see :class:`PruneTools`) is needed when ``settings.prune`` is set.

    An identical variant already registered (same parent file, settings and data,
    measured on the same thread count) is returned as is unless ``force``; its budgets
    are re-checked for ``settings.target``.

    Raises:
        LookupError: unknown model, version or alias (``visionfleet.registry.NotFound``).
        ValueError: unusable settings for this parent (pruning an imported ONNX model,
            quantizing a non-FP32 model, a non-classification model, no dataset).
        CalibrationMissing: int8-static without calibration data.
    """
    resolved = registry.resolve(parent_ref)
    parent = registry.card(resolved.name, resolved.version)
    if parent.task is Task.DETECTION and settings.prune > 0:
        raise ValueError(
            f"Got --prune for the detector {parent.ref}; expected --quantize only for detectors "
            "(pruning fine-tunes with the classification loss)"
        )
    if parent.format != "onnx":
        raise ValueError(f"Got {parent.ref} in {parent.format} format; expected an ONNX parent")
    dataset = _dataset(parent, settings, datasets_dir)
    parent_dir = registry.local_dir(resolved.name, resolved.version)

    built = build_variant(
        parent_dir, parent, settings, dataset=dataset, cache_dir=cache_dir, tools=tools, on_event=on_event
    )
    if not force:
        for v in registry.versions(parent.name):
            existing = registry.card(parent.name, v)
            # A registered version records measurements at one thread count; a request
            # for other threads (another target) measures and registers anew (the files
            # still come from the build cache).
            if (
                existing.metrics.get("variant_key") == built.key
                and existing.metrics.get("threads") == settings.resolved_threads
            ):
                on_event("register", 1, 1, f"{existing.ref} is this variant already")
                return OptimizeResult(existing, True, built.reused, _budgets(existing, settings), _target_name(settings))

    metrics = measure_variant(
        built.model_path, parent_dir / parent.model_file, parent, dataset, settings, on_event=on_event
    )
    metrics["variant_key"] = built.key
    if settings.target is not None:
        metrics["target"] = settings.target.value
    steps = [*parent.lineage.steps, *({**s, "by": "visionfleet optimize"} for s in built.steps)]
    sizes: list[tuple[int, int]] = []
    if len(parent.sizes) > 1:  # the optimized graph must still run at every size its parent serves
        from edge_export.onnx_export import check_runs_at_sizes

        check_runs_at_sizes(built.model_path, parent.sizes)
        sizes = list(parent.sizes)
    card = ModelCard(
        name=parent.name,
        task=parent.task,
        labels=parent.labels,
        input_size=parent.input_size,
        input_sizes=sizes,
        resize=parent.resize,
        model_file=built.model_file,
        format="onnx",
        precision=built.precision,
        framework=parent.framework,
        arch=parent.arch,
        preprocessing=parent.preprocessing,
        metrics=metrics,
        lineage=Lineage(parent=parent.ref, dataset=str(dataset), run=f"optimize-{built.key[:12]}", steps=steps),
        description=_describe(settings),
    )
    budgets = _budgets(card, settings)
    if budgets:
        card.metrics["budgets"] = [b.to_dict() for b in budgets]
    on_event("register", None, None, f"registering a new version of {parent.name}")
    files = {role: built.dir / name for role, name in built.files.items()}
    stored = registry.register(card, files, set_production_if_none=False)
    return OptimizeResult(stored, False, built.reused, budgets, _target_name(settings))


def _target_name(settings: OptimizeSettings) -> str | None:
    return settings.target.value if settings.target else None


def _dataset(parent: ModelCard, settings: OptimizeSettings, datasets_dir: Path | None) -> Path:
    from visionfleet.datasets.store import read_info, resolve_dataset

    ref = settings.dataset or parent.lineage.dataset
    if not ref:
        raise CalibrationMissing(
            f"Got no dataset for {parent.ref} (its card has no lineage.dataset); expected --data DATASET "
            "for calibration, fine-tuning and the holdout measurement"
        )
    path = resolve_dataset(ref, datasets_dir) if datasets_dir else Path(ref).expanduser().resolve()
    info = read_info(path)  # FileNotFoundError with the path when it is gone
    if parent.task is Task.DETECTION:
        from visionfleet.datasets.detect import coco_split, is_detection_dataset

        if not is_detection_dataset(path):
            raise ValueError(
                f"Got the classification dataset {path} for the detector {parent.ref}; expected a detection dataset "
                "with COCO boxes (visionfleet data synth --task detection), e.g. --data DATASET"
            )
        cats = set(coco_split(path, "holdout").categories)
        if not cats & set(parent.labels):
            raise ValueError(
                f"Got dataset {path} with categories {sorted(cats)[:10]}; expected some of the model's labels "
                f"{parent.labels[:10]}"
            )
        return path
    if info.labels != list(parent.labels):
        raise ValueError(f"Got dataset {path} with labels {info.labels}; expected the model's labels {parent.labels}")
    return path


def _describe(s: OptimizeSettings) -> str:
    parts = []
    if s.prune:
        parts.append(f"pruned {s.prune:.0%} of MACs + {s.resolved_finetune_epochs} fine-tune epochs")
    if s.quantize.mode is not QuantizeMode.NONE:
        from edge_export.quantize import describe

        parts.append(describe(s.quantize))
    return "; ".join(parts)


def settings_dict(s: OptimizeSettings) -> dict[str, Any]:
    """All settings (for logs and JSON output)."""
    d = asdict(s)
    d["quantize"] = s.quantize.to_dict()
    d["importance"] = s.importance.value
    d["target"] = s.target.value if s.target else None
    return d

