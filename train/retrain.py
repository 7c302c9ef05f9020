"""The retraining pipeline: labeled field data -> fine-tune -> gate -> compress -> candidate.

Read it top to bottom in :func:`retrain`:

1. collect the labeled samples of the model from the labeling queue and split them
   (stable hash of the sample id) into a training part and a gate part;
2. fine-tune with Ray Train from the production weights (or the nearest ancestor that
   has torch weights) on the base dataset plus the new samples (repeated, since they
   are few);
3. export and register the FP32 result (no alias), then **gate** it: it must beat
   production on the gate part of the recent labels and lose at most ``max_base_drop``
   on the base holdout;
4. compress it with the best known recipe for the target (a Tune result when one
   exists, else the default INT8 recipe) and gate the compressed file the same way;
5. point ``@candidate`` at it.

Each step appends to ``<state>/retraining/<run>/log.jsonl``. Any failure raises
:class:`RetrainFailed` with the step and the reason; production is never touched here
(the canary experiment decides).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from visionfleet.registry import Registry
from visionfleet.settings import Settings

__all__ = ["RetrainConfig", "RetrainResult", "RetrainFailed", "retrain", "torch_ancestor", "collect_labeled"]


class RetrainFailed(RuntimeError):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass(frozen=True)
class RetrainConfig:
    model: str
    epochs: int = 4
    lr: float = 0.05
    batch_size: int = 128
    gate_fraction: float = 0.3
    min_new_labels: int = 100
    new_data_share: float = 0.3  # the new samples' share of each epoch (by repetition)
    max_base_drop: float = 0.01  # the candidate may lose at most 1 pt on the base holdout
    compress: bool = True
    target: str = "x86-cpu"
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    seed: int = 0
    wandb: bool = True
    since: float | None = None  # only labels of samples newer than this
    base_limit: int | None = None  # only the first N base training images (small runs, tests)

    def __post_init__(self) -> None:
        if not 0.05 <= self.gate_fraction <= 0.8:
            raise ValueError(f"Got {self.gate_fraction} for gate_fraction; expected 0.05..0.8")
        if not 0 < self.new_data_share < 1:
            raise ValueError(f"Got {self.new_data_share} for new_data_share; expected (0, 1)")


@dataclass
class RetrainResult:
    run_id: str
    candidate: str  # NAME:VERSION with @candidate
    fp32: str
    production: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def torch_ancestor(registry: Registry, name: str, version: int) -> tuple[int, Path]:
    """The version itself or the nearest ancestor with training weights (``model.pt``)."""
    seen = set()
    v: int | None = version
    while v is not None and v not in seen:
        seen.add(v)
        card = registry.card(name, v)
        f = card.file("torch")
        if f is not None:
            return v, registry.local_dir(name, v) / f.name
        parent = card.lineage.parent
        v = int(parent.split(":")[1]) if parent and parent.startswith(f"{name}:") else None
    raise RetrainFailed("weights", f"{name}:{version} has no ancestor with torch weights to fine-tune from")


def collect_labeled(settings: Settings, model: str, labels: list[str], since: float | None):
    """Labeled samples of ``model`` from the queue, as decoded-ready rows."""
    from visionfleet.labeling import LabelingQueue

    table = LabelingQueue.from_settings(settings).samples(labeled_only=True, since=since)
    rows = [r for r in table.to_pylist() if r["model"] == model]
    known = set(labels)
    kept = [r for r in rows if r["label"] in known]
    return kept, len(rows) - len(kept)


def _split(rows: list[dict], gate_fraction: float) -> tuple[list[dict], list[dict]]:
    train, gate = [], []
    for r in rows:
        h = int.from_bytes(hashlib.sha256(r["sample_id"].encode()).digest()[:8], "big") / 2**64
        (gate if h < gate_fraction else train).append(r)
    return train, gate


def _write_dataset(path: Path, train: list[dict], gate: list[dict], labels: list[str], source: str) -> None:
    from visionfleet.datasets.store import DatasetInfo, DatasetWriter, _write_manifest

    index = {c: i for i, c in enumerate(labels)}
    path.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, rows in (("train", train), ("holdout", gate)):
        with DatasetWriter(path, split) as w:
            for r in rows:
                w.write({
                    "id": r["sample_id"], "image": r["image"], "label": index[r["label"]], "label_name": r["label"],
                    "source": r.get("source") or source, "width": r.get("width"), "height": r.get("height"),
                    "format": None, "meta": json.dumps({"labeler": r.get("labeler"), "reason": r.get("reason")}),
                })
        splits[split] = len(rows)
    _write_manifest(path, DatasetInfo(name=path.name, labels=labels, splits=splits, source=source,
                                      params={"from": "labeling-queue"}))


def _accuracy(model_dir: Path, x: np.ndarray, y: np.ndarray) -> float:
    from visionfleet.inference import RuntimeOptions, load_model_dir

    if len(y) == 0:
        return float("nan")
    m = load_model_dir(model_dir, RuntimeOptions(threads=2))
    pred = np.concatenate([m.run(x[i : i + 256])[0].argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).mean())


def _best_known_recipe(settings: Settings, model: str, target: str) -> dict[str, Any]:
    """A Tune sweep's best feasible config for this model and target, else default INT8."""
    best = settings.home / "tune" / "best" / f"{model}--{target}.json"
    if best.is_file():
        doc = json.loads(best.read_text())
        return {"source": str(best), **doc.get("config", {})}
    return {"source": "default", "quantize": "int8-static", "engine": "nncf", "calibration": 300}


def retrain(
    settings: Settings,
    cfg: RetrainConfig,
    *,
    reason: str = "manual",
    log: Callable[[str, dict[str, Any]], None] | None = None,
) -> RetrainResult:
    """Run the pipeline (Ray must be initialized); see the module docstring.

    Raises:
        RetrainFailed: a step failed or the gate refused; production is untouched.
    """
    from edge_export.optimize import OptimizeSettings, optimize
    from edge_export.quantize import QuantizeConfig
    from train.finetune import prune_tools
    from train.loop import TrainConfig, fit
    from train.pipeline import register_checkpoint
    from visionfleet.datasets.store import load_arrays, local_dataset, read_info
    from visionfleet.store import StoreError

    t0 = time.time()
    run_id = f"retrain-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = settings.home / "retraining" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)

    def step(name: str, **info: Any) -> None:
        entry = {"at": time.time(), "run": run_id, "step": name, **info}
        with open(run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        if log:
            log(name, entry)

    registry = Registry.from_settings(settings)
    prod = registry.resolve(f"{cfg.model}@production")
    prod_card = registry.card(prod.name, prod.version)
    step("start", reason=reason, production=str(prod), config=asdict(cfg))

    # 1. labeled field data
    rows, dropped = collect_labeled(settings, cfg.model, prod_card.labels, cfg.since)
    train_rows, gate_rows = _split(rows, cfg.gate_fraction)
    step("data", labeled=len(rows), unknown_labels=dropped, train=len(train_rows), gate=len(gate_rows))
    if len(rows) < cfg.min_new_labels or not train_rows or not gate_rows:
        raise RetrainFailed("data", f"{len(rows)} labeled samples ({len(train_rows)} train, {len(gate_rows)} gate); need {cfg.min_new_labels}")
    new_ds = settings.datasets_dir / f"labeled-{run_id}"
    _write_dataset(new_ds, train_rows, gate_rows, prod_card.labels, source=f"labeling:{cfg.model}")

    # 2. fine-tune from the production weights on base + new data
    anc_version, weights = torch_ancestor(registry, prod.name, prod.version)
    base_ds = registry.card(prod.name, anc_version).lineage.dataset  # a folder, or a dataset on the store
    try:
        base_local = local_dataset(base_ds, settings.cache_dir) if base_ds else None
        base_n = read_info(base_local).splits.get("train", 0) if base_local else None
    except (FileNotFoundError, StoreError) as exc:
        raise RetrainFailed("data", f"the base dataset of {prod.name}:{anc_version} ({base_ds}) is not available: "
                                    f"{exc}") from exc
    if base_n is None:
        raise RetrainFailed("data", f"the base dataset of {prod.name}:{anc_version} ({base_ds}) is not available")
    if cfg.base_limit is not None:
        base_n = min(base_n, cfg.base_limit)
    repeat = max(1, round(cfg.new_data_share * base_n / ((1 - cfg.new_data_share) * len(train_rows))))
    step("train", init=f"{prod.name}:{anc_version}", base_dataset=base_ds, base_train=base_n, new_train=len(train_rows), repeat=repeat)
    tc = TrainConfig(
        dataset=base_ds,
        input_size=int(prod_card.input_size[0]),
        resize=prod_card.resize.value,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        num_workers=cfg.num_workers,
        cpus_per_worker=cfg.cpus_per_worker,
        seed=cfg.seed,
        init_checkpoint=str(weights),
        extra_datasets=(str(new_ds),),
        extra_repeat=repeat,
        limit_train=cfg.base_limit,
        wandb=cfg.wandb,
        wandb_group=f"retrain:{cfg.model}",
        run_name=run_id,
    )
    try:
        result = fit(tc, runs_dir=settings.runs_dir, wandb_dir=settings.home / "wandb",
                     storage=f"{settings.store_uri('runs').rstrip('/')}/_ray")
    except Exception as exc:  # noqa: BLE001 - any training failure is a failed step
        raise RetrainFailed("train", f"{type(exc).__name__}: {exc}") from exc
    size = tuple(prod_card.input_size)
    parity, _ = load_arrays(base_local, "holdout", size, prod_card.resize, limit=32)
    fp32 = register_checkpoint(
        result.checkpoint, registry, cfg.model, parity_images=parity, run_id=run_id, set_production_if_none=False,
        parent=f"{prod.name}:{anc_version}",
        steps=[*registry.card(prod.name, anc_version).lineage.steps,
               {"op": "retrain", "run": run_id, "reason": reason, "new_labels": len(train_rows), "repeat": repeat,
                "epochs": cfg.epochs, "lr": cfg.lr, "labels_dataset": str(new_ds)}],
        description=f"retrained on field labels ({reason})",
    )
    step("registered", version=fp32.ref, train_top1=result.metrics.get("top1"))

    # 3. gate: better on recent labels, no worse than max_base_drop on the base holdout
    gx, gy = load_arrays(new_ds, "holdout", size, prod_card.resize)
    bx, by = load_arrays(Path(base_ds), "holdout", size, prod_card.resize)
    prod_dir = registry.local_dir(prod.name, prod.version)

    def gate(ref_card) -> dict[str, float]:
        d = registry.local_dir(ref_card.name, ref_card.version)
        g = {
            "candidate_recent": _accuracy(d, gx, gy), "production_recent": _accuracy(prod_dir, gx, gy),
            "candidate_base": _accuracy(d, bx, by), "production_base": _accuracy(prod_dir, bx, by),
        }
        g["passed"] = float(g["candidate_recent"] > g["production_recent"] and g["candidate_base"] >= g["production_base"] - cfg.max_base_drop)
        return g

    g = gate(fp32)
    step("gate", version=fp32.ref, **g)
    if not g["passed"]:
        raise RetrainFailed("gate", f"{fp32.ref}: recent {g['candidate_recent']:.4f} vs production {g['production_recent']:.4f}, "
                                    f"base {g['candidate_base']:.4f} vs {g['production_base']:.4f} (max drop {cfg.max_base_drop})")
    candidate = fp32
    metrics: dict[str, Any] = {"gate_fp32": g}

    # 4. compress with the best known recipe for the target
    if cfg.compress:
        recipe = _best_known_recipe(settings, cfg.model, cfg.target)
        step("compress", recipe=recipe)
        mode = recipe.get("quantize", "int8-static")
        static = mode == "int8-static"
        qc = QuantizeConfig(
            mode=mode,
            engine=recipe.get("engine", "nncf") if static else None,
            calibration=int(recipe.get("calibration", 300)),
            method=recipe.get("method") if static and recipe.get("engine") == "ort" else None,
            per_channel=recipe.get("per_channel") if mode.startswith("int8") else None,
        )
        try:
            res = optimize(fp32.ref, OptimizeSettings(quantize=qc, prune=float(recipe.get("prune", 0.0)),
                                                      dataset=base_ds, compare_rounds=1, latency_queries=20,
                                                      peak_memory=False, seed=cfg.seed),
                           registry=registry, cache_dir=settings.home / "cache" / "variants", datasets_dir=settings.datasets_dir,
                           tools=prune_tools())
        except Exception as exc:  # noqa: BLE001
            raise RetrainFailed("compress", f"{type(exc).__name__}: {exc}") from exc
        gq = gate(res.card)
        step("gate", version=res.card.ref, **gq)
        if not gq["passed"]:
            raise RetrainFailed("gate", f"compressed {res.card.ref} failed the gate: {gq}")
        candidate = res.card
        metrics["gate_compressed"] = gq
        metrics["recipe"] = recipe

    # 5. candidate
    registry.set_alias(cfg.model, "candidate", candidate.version, reason=f"{run_id}: {reason}")  # type: ignore[arg-type]
    step("candidate", version=candidate.ref)
    return RetrainResult(run_id=run_id, candidate=candidate.ref, fp32=fp32.ref, production=str(prod),
                         metrics=metrics, seconds=time.time() - t0)
