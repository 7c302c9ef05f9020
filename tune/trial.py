"""One trial: build a point of the space for real, measure its latency and accuracy, report both.

A point is built in up to three cached stages, each one a folder under
``<state>/cache/`` that later trials, later sweeps and the exhaustive grid reuse:

1. **resize** (ours, ``cache/tune-resized/<key>``): when the point's input size differs
   from the parent's, the parent's PyTorch weights are (optionally) fine-tuned at the
   new size and re-exported to a contract-obeying ONNX file at that size. The issue-3
   pipeline keeps a model's size fixed, so this stage lives here;
2. **prune** (``edge_export.optimize.build_variant`` with ``prune=r``, no quantization):
   structured pruning + fine-tune + export, cached by the stage-1 file's sha256. Built
   apart from quantization so that the seven quantization schemes of one pruned
   network share one (expensive) fine-tune;
3. **quantize** (``build_variant`` with the scheme) on the stage-2 (or stage-1) model.

Then the model is measured on the target's thread count: first a short latency probe,
on the same architecture built without fine-tuning when the point needs any (latency
does not depend on the weights; the sweep stops a trial whose fastest probe query is
over budget before its fine-tunes run: :func:`is_hopeless`), then p95 latency at batch 1
in several repeated blocks after a warm-up, top-1 on the holdout, file size, MACs and
peak memory. The p95 is that of the *quietest* block (the lowest block
p95): on a shared machine other processes only ever add latency, and a target device runs
the model alone; the median over blocks is kept beside it (``p95_median_ms``) so the
noise stays visible.

:func:`evaluate_point` is the plain function (the grid calls it in a loop);
:func:`tune_trial` is the Ray Tune function trainable around it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tune.pareto import COMPLETE, ERROR, STOPPED, Constraints, TrialRecord, is_feasible, score
from tune.space import Point, Space
from visionfleet.spec import FileEntry, Lineage, ModelCard

__all__ = [
    "LatencyPlan",
    "FinetunePlan",
    "TrialContext",
    "Stage",
    "BuiltPoint",
    "LatencyResult",
    "resize_stage",
    "build_point",
    "measure_latency",
    "holdout_arrays",
    "is_hopeless",
    "evaluate_point",
    "tune_trial",
]

# Bump when the resize stage's procedure changes the files it writes.
_RESIZE_FORMAT = 1
_BY = "visionfleet tune"

Event = Callable[[str, str], None]  # (stage, message)


def _no_event(stage: str, message: str) -> None:
    return None


@dataclass(frozen=True)
class LatencyPlan:
    """How latency is measured: batch 1, ``repeats`` blocks of ``queries`` after ``warmup`` runs.

    The probe is one short block, used only to stop hopeless trials early.
    """

    queries: int = 100
    repeats: int = 5
    warmup: int = 10
    probe_queries: int = 20

    def __post_init__(self) -> None:
        if min(self.queries, self.repeats, self.probe_queries) < 1 or self.warmup < 0:
            raise ValueError(f"Got {self}; expected queries, repeats, probe_queries >= 1 and warmup >= 0")


@dataclass(frozen=True)
class FinetunePlan:
    """The short fine-tune after pruning and after a resolution change."""

    epochs: int = 2
    lr: float = 0.02
    batch: int = 64
    limit: int | None = 2000
    resize: bool = True  # fine-tune at a new input size (else re-export only)
    round_to: int = 8  # pruned channel counts are multiples of this


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares: small and picklable (it travels to the trial actors)."""

    home: str
    parent_ref: str  # NAME:VERSION, resolved on the driver
    dataset: str  # absolute dataset folder, or a store URI (each node opens its own copy)
    out_dir: str  # the sweep's (or grid's) folder; trial records go to out_dir/trials
    constraints: Constraints
    calibration: int = 256
    finetune: FinetunePlan = field(default_factory=FinetunePlan)
    latency: LatencyPlan = field(default_factory=LatencyPlan)
    target: str | None = None
    build_threads: int = 2
    seed: int = 0
    holdout_limit: int | None = None
    peak_memory: bool = True
    hopeless_factor: float = 1.0
    space: Space | None = None  # decodes the searcher's configs (the sweep sets it)
    penalty: float = 0.5  # the searcher's objective, see tune.pareto.score

    @property
    def cache_dir(self) -> Path:
        return Path(self.home) / "cache"


# ------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class Stage:
    """A model folder and the card that describes it: the registered parent or a cached derived stage."""

    dir: Path
    card: ModelCard
    steps: tuple[dict[str, Any], ...] = ()  # what this stage added on top of the registered parent
    reused: bool = True

    @property
    def model_path(self) -> Path:
        return self.dir / self.card.model_file


def _entries(folder: Path, files: dict[str, str]) -> list[FileEntry]:
    from edge_export.importer import source_sha256

    return [
        FileEntry(name=name, role=role, bytes=(folder / name).stat().st_size, sha256=source_sha256(folder / name))
        for role, name in files.items()
    ]


def _stage_card(base: ModelCard, folder: Path, files: dict[str, str], model_file: str, precision: str,
                steps: list[dict[str, Any]], input_size: tuple[int, int] | None = None) -> ModelCard:
    """A card for a cached intermediate stage, so ``build_variant`` can take it as a parent."""
    return base.model_copy(update={
        "input_size": tuple(input_size or base.input_size),
        "model_file": model_file,
        "precision": precision,
        "files": _entries(folder, files),
        "metrics": {},
        "lineage": Lineage(parent=base.lineage.parent, dataset=base.lineage.dataset, run=base.lineage.run,
                           steps=[*base.lineage.steps, *steps]),
    })


def _dataset_id(dataset: Path) -> str:
    return hashlib.sha256((dataset / "manifest.json").read_bytes()).hexdigest()


def resize_stage(
    parent: Stage,
    size: int,
    *,
    dataset: Path,
    cache_dir: Path,
    finetune: FinetunePlan,
    threads: int = 2,
    seed: int = 0,
    on_event: Event = _no_event,
) -> Stage:
    """The parent re-exported at ``size`` x ``size`` (fine-tuned there first unless told not to).

    Cached under ``cache_dir/tune-resized/<key>``, the key being the parent's ONNX and
    weights sha256, the size, the fine-tune settings and the dataset's manifest.

    Raises:
        ValueError: the parent has no PyTorch weights (an imported ONNX model), or is not FP32.
    """
    card = parent.card
    if tuple(card.input_size) == (size, size):
        return parent
    weights = card.file("torch")
    model_entry = next((f for f in card.files if f.name == card.model_file), None)
    if weights is None or model_entry is None:
        raise ValueError(
            f"Got input size {size} for {card.ref}, which has no PyTorch weights; "
            f"expected only its own size {card.input_size[0]} (re-exporting at another size needs the weights)"
        )
    if card.precision != "fp32":
        raise ValueError(f"Got {card.ref} in {card.precision}; expected an FP32 parent to re-export at {size} px")
    ft = {"epochs": finetune.epochs, "lr": finetune.lr, "batch": finetune.batch, "limit": finetune.limit} if finetune.resize else None
    doc = {"format": _RESIZE_FORMAT, "onnx": model_entry.sha256, "torch": weights.sha256, "size": size,
           "finetune": ft, "seed": seed, "dataset": _dataset_id(dataset)}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    final = cache_dir / "tune-resized" / key
    if (final / "card.json").is_file():
        stored = ModelCard.model_validate_json((final / "card.json").read_text())
        on_event("resize", f"reused {size} px export {key[:12]}")
        return Stage(final, stored, tuple(json.loads((final / "steps.json").read_text())), True)

    import torch

    from edge_export.onnx_export import export_onnx
    from train.checkpoint import load_checkpoint, save_checkpoint
    from train.finetune import FinetuneConfig, dataset_finetune_fn
    from visionfleet.datasets.store import load_arrays

    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f".tmp-{uuid.uuid4().hex}"
    work.mkdir()
    try:
        model, meta = load_checkpoint(parent.dir / weights.name)
        mean = card.preprocessing.get("mean", meta["mean"])
        std = card.preprocessing.get("std", meta["std"])
        steps: list[dict[str, Any]] = []
        step: dict[str, Any] = {"op": "resize", "from": list(card.input_size), "to": [size, size], "by": _BY}
        if ft is not None:
            on_event("resize", f"fine-tuning at {size} px")
            cfg = FinetuneConfig(epochs=finetune.epochs, lr=finetune.lr, batch_size=finetune.batch, threads=threads,
                                 seed=seed, limit=finetune.limit)
            run = dataset_finetune_fn(dataset, input_size=(size, size), resize=card.resize.value, mean=mean, std=std,
                                      config=cfg)
            result = run(model)
            step["finetune"] = {**ft, "steps": result["steps"], "train_loss": result["train_loss"],
                                "seconds": result["seconds"], "dataset": str(dataset)}
        on_event("resize", f"exporting at {size} px")
        parity, _ = load_arrays(dataset, "holdout", (size, size), card.resize.value, limit=32)
        torch.set_num_threads(threads)
        report = export_onnx(
            model, work / "model.onnx", input_size=(size, size), mean=mean, std=std,
            metadata={"task": card.task.value, "labels": card.labels, "resize": card.resize.value,
                      "model_name": card.name, "framework": card.framework, "arch": card.arch or {}},
            parity_images=parity,
        )
        step["parity"] = report.to_dict() if report else None
        steps.append(step)
        save_checkpoint(work / "model.pt", model, {**meta, "input_size": [size, size], "dataset": str(dataset)})
        stored = _stage_card(card, work, {"onnx": "model.onnx", "torch": "model.pt"}, "model.onnx", "fp32", steps,
                             (size, size))
        (work / "steps.json").write_text(json.dumps(steps, indent=2))
        (work / "card.json").write_text(stored.model_dump_json(indent=2))
        try:
            work.rename(final)
        except OSError:  # a concurrent build of the same key finished first: use it
            shutil.rmtree(work, ignore_errors=True)
            return resize_stage(parent, size, dataset=dataset, cache_dir=cache_dir, finetune=finetune,
                                threads=threads, seed=seed, on_event=on_event)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Stage(final, stored, tuple(steps), False)


def _variant_stage(parent: Stage, settings: Any, *, dataset: Path, cache_dir: Path, on_event: Event) -> Stage:
    """``build_variant`` (issue 3) on a stage, wrapped as the next stage."""
    from edge_export.optimize import build_variant
    from train.finetune import prune_tools

    built = build_variant(
        parent.dir, parent.card, settings, dataset=dataset, cache_dir=cache_dir / "variants", tools=prune_tools(),
        on_event=lambda stage, done, total, info: on_event(stage, info),
    )
    steps = [{**s, "by": _BY} for s in built.steps]
    card = _stage_card(parent.card, built.dir, dict(built.files), built.model_file, built.precision, steps)
    return Stage(built.dir, card, (*parent.steps, *steps), built.reused)


@dataclass(frozen=True)
class BuiltPoint:
    """A built point: the model to measure and the stages that made it."""

    point: Point
    model_path: Path
    card: ModelCard  # describes model_path (input size, precision, lineage steps)
    files: dict[str, Path]  # role -> file, what a registration copies
    steps: tuple[dict[str, Any], ...]
    reused: dict[str, bool]  # stage -> came from the cache
    seconds: float


def build_point(
    parent: Stage,
    point: Point,
    *,
    dataset: Path,
    cache_dir: Path,
    calibration: int,
    finetune: FinetunePlan,
    target: str | None = None,
    threads: int = 2,
    seed: int = 0,
    on_event: Event = _no_event,
) -> BuiltPoint:
    """Build ``point`` from ``parent`` through the three cached stages (see the module docstring)."""
    from edge_export.optimize import OptimizeSettings
    from edge_export.quantize import QuantizeConfig

    t0 = time.perf_counter()
    reused: dict[str, bool] = {}
    stage = resize_stage(parent, point.input_size, dataset=dataset, cache_dir=cache_dir, finetune=finetune,
                         threads=threads, seed=seed, on_event=on_event)
    if stage is not parent:
        reused["resize"] = stage.reused
    quantize = point.scheme.quantize != "none"
    # The target (e.g. android: an extra .ort file) shapes only the last stage's files.
    if point.prune > 0:
        stage = _variant_stage(
            stage,
            OptimizeSettings(prune=point.prune, finetune_epochs=finetune.epochs, finetune_lr=finetune.lr,
                             finetune_batch=finetune.batch, finetune_limit=finetune.limit, round_to=finetune.round_to,
                             threads=threads, seed=seed, target=None if quantize else target),
            dataset=dataset, cache_dir=cache_dir, on_event=on_event,
        )
        reused["prune"] = stage.reused
    if quantize:
        qc = QuantizeConfig(**point.scheme.quantize_kwargs(calibration))
        stage = _variant_stage(stage, OptimizeSettings(quantize=qc, threads=threads, seed=seed, target=target),
                               dataset=dataset, cache_dir=cache_dir, on_event=on_event)
        reused["quantize"] = stage.reused
    files = {f.role: stage.dir / f.name for f in stage.card.files}
    if "torch" not in files:
        # Keep the FP32 weights the quantized file came from: retraining and a later
        # prune start from them (the nearest stage that has them, at this input size).
        weights = _weights_for(parent, point, dataset=dataset, cache_dir=cache_dir, finetune=finetune,
                               threads=threads, seed=seed)
        if weights is not None:
            files["torch"] = weights
    return BuiltPoint(point, stage.model_path, stage.card, files, stage.steps, reused, time.perf_counter() - t0)


def _weights_for(parent: Stage, point: Point, **kw: Any) -> Path | None:
    """The PyTorch weights of the FP32 network behind ``point`` (cached stages only, nothing rebuilt)."""
    stage = resize_stage(parent, point.input_size, dataset=kw["dataset"], cache_dir=kw["cache_dir"],
                         finetune=kw["finetune"], threads=kw["threads"], seed=kw["seed"])
    if point.prune > 0:
        from edge_export.optimize import OptimizeSettings

        ft: FinetunePlan = kw["finetune"]
        stage = _variant_stage(
            stage,
            OptimizeSettings(prune=point.prune, finetune_epochs=ft.epochs, finetune_lr=ft.lr, finetune_batch=ft.batch,
                             finetune_limit=ft.limit, round_to=ft.round_to, threads=kw["threads"], seed=kw["seed"]),
            dataset=kw["dataset"], cache_dir=kw["cache_dir"], on_event=_no_event,
        )
    weights = stage.card.file("torch")
    return stage.dir / weights.name if weights else None


# ---------------------------------------------------------------------------- measure


@dataclass(frozen=True)
class LatencyResult:
    """Batch-1 latency: p50/p95 of the quietest block (lowest p95), the median p95 over blocks beside it."""

    p50_ms: float
    p95_ms: float
    p95_median_ms: float
    min_ms: float
    block_p95_ms: tuple[float, ...]
    queries: int
    threads: int
    provider: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Runner:
    """An ONNX file in an ONNX Runtime session on one provider with explicit threads."""

    def __init__(self, path: Path, threads: int, provider: str) -> None:
        from visionfleet.inference import RuntimeOptions, create_session

        self.name = path.name
        self.session = create_session(path, RuntimeOptions(threads=threads, providers=(provider,)))
        if self.session.get_providers()[0] != provider:
            raise RuntimeError(f"ONNX Runtime fell back to {self.session.get_providers()[0]} instead of {provider}")
        self._input = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: images})[0]


def _runner(path: Path, threads: int, provider: str):
    from edge_export.measure import OrtRunner

    if provider == "CPUExecutionProvider":
        return OrtRunner(path, threads)
    return _Runner(path, threads, provider)


def measure_latency(runner: Any, images: np.ndarray, plan: LatencyPlan, *, threads: int, provider: str) -> LatencyResult:
    """Batch-1 latency in ``plan.repeats`` blocks (``edge_export.measure.single_stream`` each).

    The reported p50/p95 are those of the block with the lowest p95 (load from other
    processes only adds latency); ``p95_median_ms`` is the median of the blocks' p95s.
    """
    from edge_export.measure import single_stream

    blocks = [
        single_stream(runner, images, queries=plan.queries, warmup=plan.warmup if i == 0 else 1)
        for i in range(plan.repeats)
    ]
    quietest = min(blocks, key=lambda b: b.p95_ms)
    return LatencyResult(
        p50_ms=float(quietest.p50_ms),
        p95_ms=float(quietest.p95_ms),
        p95_median_ms=float(np.median([b.p95_ms for b in blocks])),
        min_ms=float(min(b.min_ms for b in blocks)),
        block_p95_ms=tuple(b.p95_ms for b in blocks),
        queries=plan.queries * plan.repeats,
        threads=threads,
        provider=provider,
    )


def holdout_arrays(dataset: Path, size: int, resize: str, limit: int | None, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The holdout decoded at ``size`` (cached as .npz: every trial at one size decodes the same images)."""
    from visionfleet.datasets.store import load_arrays

    key = hashlib.sha256(f"{_dataset_id(dataset)}|{size}|{resize}|{limit}".encode()).hexdigest()[:24]
    path = cache_dir / "tune-holdout" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["x"], z["y"]
    x, y = load_arrays(dataset, "holdout", (size, size), resize, limit=limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}-{uuid.uuid4().hex}.npz")
    np.savez(tmp, x=x, y=y)
    tmp.replace(path)
    return x, y


def is_hopeless(probe_min_ms: float, budget_ms: float, factor: float = 1.0) -> bool:
    """A trial whose *fastest* probe query took longer than ``factor`` x the p95 budget cannot meet it.

    The minimum is robust to load (other processes only add latency), and a p95 is
    never below the minimum, so with ``factor`` 1 no feasible trial is ever stopped.
    """
    return probe_min_ms > budget_ms * factor


# --------------------------------------------------------------------------- evaluate


def _record(point: Point, status: str, **kw: Any) -> TrialRecord:
    return TrialRecord(key=point.key, config=point.to_dict(), status=status, input_size=point.input_size, **kw)


def _write_record(ctx: TrialContext, name: str, rec: TrialRecord) -> None:
    d = Path(ctx.out_dir) / "trials"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.json.tmp"
    tmp.write_text(json.dumps(rec.to_dict(), indent=2, default=str))
    tmp.replace(d / f"{name}.json")


def parent_stage(ctx: TrialContext) -> Stage:
    """The registered parent as stage 0."""
    from visionfleet.registry import Registry
    from visionfleet.settings import Settings

    settings = Settings.from_env(ctx.home)
    registry = Registry.from_settings(settings)
    name, _, version = ctx.parent_ref.partition(":")
    return Stage(registry.local_dir(name, int(version)), registry.card(name, int(version)))


def _needs_training(point: Point, parent: Stage, plan: FinetunePlan) -> bool:
    return point.prune > 0 or (point.input_size != parent.card.input_size[0] and plan.resize)


def evaluate_point(
    point: Point,
    ctx: TrialContext,
    *,
    record_name: str | None = None,
    on_probe: Callable[[TrialRecord], None] | None = None,
    on_event: Event = _no_event,
) -> tuple[TrialRecord, BuiltPoint | None]:
    """Build and measure one point; never raises for a failed build (the record says ``error``).

    With ``on_probe`` (the sweep), the latency probe comes first and cheap: a network's
    latency does not depend on its weights, so when the point needs fine-tuning (pruning,
    a new input size) the probe runs on the same architecture built *without* any
    fine-tune (seconds, cached apart), and ``on_probe`` gets a provisional ``stopped``
    record; the sweep's stopper ends a hopeless trial there, before the fine-tunes are
    paid for. Without ``on_probe`` (the grid) every point is built and measured in full.
    The record is written to ``<out_dir>/trials/<record_name>.json`` at each stage.
    """
    name = record_name or hashlib.sha256(point.key.encode()).hexdigest()[:16]
    if "://" in ctx.dataset:  # on a store: this node's checked copy, fetched once per node
        from visionfleet.datasets.store import local_dataset
        from visionfleet.settings import Settings

        dataset = local_dataset(ctx.dataset, Settings.from_env().cache_dir)
    else:
        dataset = Path(ctx.dataset)
    build = {"dataset": dataset, "cache_dir": ctx.cache_dir, "calibration": ctx.calibration, "target": ctx.target,
             "threads": ctx.build_threads, "seed": ctx.seed, "on_event": on_event}
    built: BuiltPoint | None = None
    try:
        parent = parent_stage(ctx)
        hx, hy = holdout_arrays(dataset, point.input_size, parent.card.resize.value, ctx.holdout_limit, ctx.cache_dir)
        pool = hx[:64]
        probe_plan = replace(ctx.latency, queries=ctx.latency.probe_queries, repeats=1)
        rec: TrialRecord | None = None
        if on_probe is not None:
            built = None
            if _needs_training(point, parent, ctx.finetune):
                on_event("probe", "building the architecture without fine-tuning for the latency probe")
                arch_plan = replace(ctx.finetune, epochs=0, resize=False)
                arch = build_point(parent, point, finetune=arch_plan, **build)  # type: ignore[arg-type]
            else:
                arch = built = build_point(parent, point, finetune=ctx.finetune, **build)  # type: ignore[arg-type]
            probe_model = arch.model_path
            on_event("probe", f"latency probe, {ctx.latency.probe_queries} queries")
            probe = measure_latency(_runner(probe_model, point.threads, point.provider), pool, probe_plan,
                                    threads=point.threads, provider=point.provider)
            rec = _record(point, STOPPED, probe_min_ms=probe.min_ms, size_mb=_file_mb(probe_model),
                          precision=arch.card.precision, extra={"probe": probe.to_dict()})
            _write_record(ctx, name, rec)
            on_probe(rec)
        if built is None:
            built = build_point(parent, point, finetune=ctx.finetune, **build)  # type: ignore[arg-type]
        runner = _runner(built.model_path, point.threads, point.provider)
        on_event("latency", f"p95 over {ctx.latency.repeats} x {ctx.latency.queries} queries")
        lat = measure_latency(runner, pool, ctx.latency, threads=point.threads, provider=point.provider)
        on_event("accuracy", f"top-1 on {len(hy)} holdout images")
        from edge_export.measure import count_macs, holdout_top1, machine_info, peak_memory_mb

        top1 = holdout_top1(runner, hx, hy)
        peak = peak_memory_mb(built.model_path, threads=point.threads) if ctx.peak_memory else None
        extra: dict[str, Any] = {
            **(rec.extra if rec else {}), "build_seconds": built.seconds, "reused": built.reused,
            "latency": lat.to_dict(), "macs_per_image": count_macs(built.model_path), "holdout_n": int(len(hy)),
            "measured_on": machine_info(point.threads),
        }
        rec = _record(point, COMPLETE, top1=top1, p95_ms=lat.p95_ms, p50_ms=lat.p50_ms,
                      probe_min_ms=rec.probe_min_ms if rec else lat.min_ms, size_mb=_file_mb(built.model_path),
                      peak_memory_mb=peak, precision=built.card.precision, extra=extra)
    except Exception as exc:  # noqa: BLE001 - a failed build is a data point, not the end of the sweep
        rec = _record(point, ERROR, error=f"{type(exc).__name__}: {exc}",
                      extra={"traceback": traceback.format_exc()[-4000:]})
        built = None
    _write_record(ctx, name, rec)
    return rec, built


def _file_mb(path: Path) -> float:
    from edge_export.measure import file_mb

    return file_mb(path)


def _metrics(rec: TrialRecord, ctx: TrialContext, stage: int) -> dict[str, Any]:
    """What a trial reports to Tune (and so to W&B): flat numbers only."""
    m: dict[str, Any] = {
        "score": score(rec, ctx.constraints, penalty=ctx.penalty),
        "stage": stage,
        "feasible": int(is_feasible(rec, ctx.constraints)),
        "complete": int(rec.status == COMPLETE),
        "error": int(rec.status == ERROR),
        "budget_ms": ctx.constraints.latency_ms,
    }
    for k in ("top1", "p95_ms", "p50_ms", "size_mb", "peak_memory_mb", "probe_min_ms"):
        v = getattr(rec, k)
        if v is not None:
            m[k] = float(v)
    if "macs_per_image" in rec.extra:
        m["macs_per_image"] = int(rec.extra["macs_per_image"])
    return m


def tune_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Ray Tune function trainable: report after the probe (stage 1) and at the end (stage 2)."""
    from ray import tune

    if not os.path.isabs(ctx.home):
        raise RuntimeError(f"Got state dir {ctx.home!r} in a trial; expected an absolute path")
    os.environ.setdefault("VISIONFLEET_HOME", ctx.home)
    if ctx.space is None:
        raise ValueError("Got a TrialContext without a space; expected the sweep's space to decode configs")
    point = ctx.space.decode(config)
    trial_id = tune.get_context().get_trial_id()
    rec, _ = evaluate_point(point, ctx, record_name=trial_id,
                            on_probe=lambda r: tune.report(_metrics(r, ctx, 1)))
    tune.report(_metrics(rec, ctx, 2))
