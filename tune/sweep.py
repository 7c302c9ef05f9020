"""The compression sweep: Ray Tune + Optuna TPE over prune x quantization x input size under a latency budget.

A ``ray job submit`` entrypoint that also runs embedded::

    ray job submit --working-dir . -- python -m tune.sweep --model demo:1 \\
        --latency-budget-ms 4 --target x86-cpu --trials 24
    python -m tune.sweep --model demo:1 --budget-fraction 0.3 --trials 24   # embedded Ray

It reads top to bottom (:func:`run_sweep`):

1. **prepare** (:func:`prepare`, before Ray is touched): resolve the model reference
   (an unknown model or version is refused here, before any trial), check the parent
   (classification, ONNX, FP32, PyTorch weights where pruning or another size needs
   them), find its dataset, build the space;
2. **baseline**: the parent's FP32 p95 latency and top-1 on the target's threads,
   measured by a Ray task like a trial; ``--budget-fraction F`` sets the budget to F x
   that p95. The target profile's own p95 budget applies too when it is tighter;
3. **search**: ``tune.Tuner`` with ``OptunaSearch`` (TPE, seeded), one trial at a time
   (``max_concurrent_trials=1``: timings on a shared 2-core box are noise otherwise),
   a stopper that ends a trial whose fastest probe query is already over budget, every
   trial logged to W&B by ``WandbLoggerCallback`` (offline unless configured; one group
   per sweep). A config Optuna proposes again is not run twice (:class:`_UniqueConfigs`);
4. **results**: feasibility, the Pareto front and the best feasible config
   (``tune.pareto``), the report files (``tune.report``), the best config registered as
   a new version with alias ``candidate`` and its full lineage, and
   ``<state>/tune/best/<model>--<target>.json`` for the retraining pipeline.

An impossible budget is a result, not a crash: the report says "no feasible config",
nothing is registered, and the entrypoint exits with status 3.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.local import connect_ray
from tune.pareto import COMPLETE, ERROR, STOPPED, Constraints, TrialRecord, best_feasible, checks, is_feasible, pareto_front
from tune.space import Point, Space, SpaceConfig
from tune.trial import FinetunePlan, LatencyPlan, TrialContext
from visionfleet.settings import ENV_HOME, Settings
from visionfleet.spec import ModelCard

__all__ = [
    "SweepConfig",
    "SweepPlan",
    "SweepResult",
    "NO_FEASIBLE_EXIT",
    "prepare",
    "measure_baseline",
    "decide_budget",
    "run_sweep",
    "finish",
    "best_file",
    "connect_ray",
    "SweepFlag",
    "SWEEP_FLAGS",
    "build_config",
    "config_from_flags",
    "add_arguments",
    "flag_values",
    "main",
]

NO_FEASIBLE_EXIT = 3  # exit status of the entrypoint and `visionfleet tune run` when nothing is feasible
_SWEEP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

Event = Callable[[str, str], None]


def _no_event(stage: str, message: str) -> None:
    return None


class SweepConfig(BaseModel):
    """Everything a sweep is told (CLI flags, the job's arguments, or a YAML file's ``space``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="parent model NAME[:VERSION|@ALIAS]")
    target: str = Field(default="x86-cpu", description="target profile x86-cpu|arm64-cpu|android|ios|jetson: threads and budgets")
    latency_budget_ms: float | None = Field(default=None, description="p95 latency budget at batch 1, in ms")
    budget_fraction: float | None = Field(
        default=None, description="budget as a fraction of the parent's measured FP32 p95 (e.g. 0.3)"
    )
    trials: int = Field(default=24, description="trials (distinct configs) the search may run")
    space: SpaceConfig = Field(default_factory=SpaceConfig, description="the search space (tune.space.SpaceConfig)")
    seed: int = Field(default=0, description="seeds TPE, calibration sampling and fine-tunes")
    startup_trials: int | None = Field(default=None, description="random trials before TPE models (default trials/3, at most 8)")
    dataset: str | None = Field(default=None, description="dataset (default: the parent card's lineage.dataset)")
    holdout_limit: int | None = Field(default=None, description="measure top-1 on the first N holdout images")
    latency_queries: int = Field(default=100, description="batch-1 queries per latency block")
    latency_repeats: int = Field(
        default=5, description="latency blocks; p95 is that of the quietest block (the median is kept beside it)"
    )
    latency_warmup: int = Field(default=10, description="untimed runs before the first block")
    probe_queries: int = Field(default=20, description="queries of the early latency probe")
    hopeless_factor: float = Field(
        default=1.0, description="stop a trial when even its fastest probe query exceeds this x the budget"
    )
    peak_memory: bool = Field(default=True, description="measure peak memory per trial (a fresh process)")
    penalty: float = Field(
        default=0.5, description="searcher objective: top-1 minus this x the relative budget overrun (see tune.pareto.score)"
    )
    require_precision: bool = Field(default=False, description="only the target's precision is feasible")
    trial_cpus: float = Field(default=1.0, description="Ray CPUs reserved per trial")
    wandb: bool = Field(default=True, description="log every trial to W&B (offline unless configured)")
    wandb_project: str = Field(default="visionfleet", description="W&B project of the trials")
    register_candidate: bool = Field(default=True, description="register the best feasible config as @candidate")
    write_best: bool = Field(default=True, description="write <state>/tune/best/<model>--<target>.json")
    sweep_id: str | None = Field(default=None, description="folder name under <state>/tune (default: generated)")

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        from visionfleet.targets import profile

        return profile(v).target.value

    @field_validator("trials")
    @classmethod
    def _trials(cls, v: int) -> int:
        if not 1 <= v <= 10_000:
            raise ValueError(f"Got {v} for --trials; expected 1 <= trials <= 10000")
        return v

    @field_validator("latency_budget_ms")
    @classmethod
    def _budget(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"Got {v} for --latency-budget-ms; expected a positive number of milliseconds")
        return v

    @field_validator("budget_fraction")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 10:
            raise ValueError(f"Got {v} for --budget-fraction; expected 0 < fraction <= 10 (0.3 = 30% of FP32 p95)")
        return v

    @field_validator("hopeless_factor")
    @classmethod
    def _hopeless(cls, v: float) -> float:
        if v < 1:
            raise ValueError(f"Got {v} for hopeless_factor; expected >= 1 (a trial under budget must never be stopped)")
        return v

    @field_validator("latency_queries", "latency_repeats", "probe_queries")
    @classmethod
    def _positive(cls, v: int, info: Any) -> int:
        if v < 1:
            raise ValueError(f"Got {v} for {info.field_name}; expected >= 1")
        return v

    @field_validator("penalty")
    @classmethod
    def _penalty(cls, v: float) -> float:
        if not v >= 0:
            raise ValueError(f"Got {v} for penalty; expected >= 0")
        return v

    @field_validator("trial_cpus")
    @classmethod
    def _cpus(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"Got {v} for trial_cpus; expected > 0")
        return v

    @field_validator("sweep_id")
    @classmethod
    def _sweep_id(cls, v: str | None) -> str | None:
        if v is not None and not _SWEEP_ID.match(v):
            raise ValueError(f"Got {v!r} for --sweep-id; expected letters, digits, '_', '.', '-' (max 100)")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> "SweepConfig":
        if self.latency_budget_ms is not None and self.budget_fraction is not None:
            raise ValueError(
                "Got both --latency-budget-ms and --budget-fraction; expected one of them "
                "(or neither: the target's own p95 budget)"
            )
        if self.startup_trials is not None and self.startup_trials < 1:
            raise ValueError(f"Got {self.startup_trials} for startup_trials; expected >= 1")
        if self.holdout_limit is not None and self.holdout_limit < 1:
            raise ValueError(f"Got {self.holdout_limit} for --holdout-limit; expected >= 1")
        return self

    @property
    def latency_plan(self) -> LatencyPlan:
        return LatencyPlan(self.latency_queries, self.latency_repeats, self.latency_warmup, self.probe_queries)

    @property
    def finetune_plan(self) -> FinetunePlan:
        s = self.space
        return FinetunePlan(s.finetune_epochs, s.finetune_lr, s.finetune_batch, s.finetune_limit, s.resize_finetune,
                            s.prune_round_to)


# ---------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class SweepPlan:
    """The checked sweep: what :func:`prepare` found before any Ray work."""

    config: SweepConfig
    settings: Settings
    parent: ModelCard  # resolved (has a version)
    dataset: Path
    space: Space
    sweep_id: str
    out_dir: Path
    dataset_ref: str = ""  # what any node can open (a store URI on a cluster); "" means ``dataset``

    @property
    def trial_dataset(self) -> str:
        """The dataset as trials on other nodes open it: the store URI, else the local folder."""
        return self.dataset_ref if "://" in self.dataset_ref else str(self.dataset)

    @property
    def parent_ref(self) -> str:
        return self.parent.ref


def _dataset(card: ModelCard, explicit: str | None, settings: Settings) -> tuple[Path, str]:
    """This node's folder of the sweep's dataset and the reference every node can open."""
    from visionfleet.datasets.store import local_dataset, read_info, resolve_dataset_ref

    ref = explicit or card.lineage.dataset
    if not ref:
        raise ValueError(
            f"Got no dataset for {card.ref} (its card has no lineage.dataset); expected --dataset DATASET "
            "for calibration, fine-tuning and the holdout"
        )
    shared_ref = resolve_dataset_ref(ref, settings)
    path = local_dataset(shared_ref, settings.cache_dir)  # a store URI: this node's checked copy
    info = read_info(path)
    if info.labels != list(card.labels):
        raise ValueError(f"Got dataset {path} with labels {info.labels}; expected the model's labels {card.labels}")
    if not info.splits.get("holdout"):
        raise ValueError(f"Got dataset {path} without a holdout split; expected one to measure accuracy on")
    return path, shared_ref


def prepare(cfg: SweepConfig, settings: Settings) -> SweepPlan:
    """Check everything that can be checked without Ray; nothing runs when this raises.

    Raises:
        LookupError: unknown model, version or alias.
        ValueError: a parent the space cannot apply to, an unavailable provider, a
            sweep id that exists already.
        FileNotFoundError: the dataset is gone.
    """
    from visionfleet.registry import Registry
    from visionfleet.spec import Task
    from visionfleet.targets import profile

    registry = Registry.from_settings(settings)
    resolved = registry.resolve(cfg.model)  # NotFound (a LookupError) names the model and its versions
    parent = registry.card(resolved.name, resolved.version)
    if parent.task is not Task.CLASSIFICATION:
        raise ValueError(f"Got a {parent.task.value} model {parent.ref}; expected a classification model")
    if parent.format != "onnx" or parent.precision != "fp32":
        raise ValueError(f"Got {parent.ref} ({parent.format}, {parent.precision}); expected an FP32 ONNX parent")
    h, w = parent.input_size
    if h != w:
        raise ValueError(f"Got {parent.ref} with input {h}x{w}; expected a square input (the space's sizes are square)")
    space = cfg.space.build(native_size=h, default_threads=profile(cfg.target).threads)
    has_weights = parent.file("torch") is not None
    if not has_weights and (any(r > 0 for r in space.prune) or any(n != h for n in space.input_sizes)):
        raise ValueError(
            f"Got prune ratios {list(space.prune)} and input sizes {list(space.input_sizes)} for {parent.ref}, which "
            f"has no PyTorch weights; expected --prune 0 and --input-sizes {h} (pruning and resizing need the weights)"
        )
    import onnxruntime

    missing = [p for p in space.providers if p not in onnxruntime.get_available_providers()]
    if missing:
        raise ValueError(
            f"Got providers {missing}, which this ONNX Runtime lacks; expected some of {onnxruntime.get_available_providers()}"
        )
    dataset, dataset_ref = _dataset(parent, cfg.dataset, settings)
    sweep_id = cfg.sweep_id or (
        f"{parent.name}-{parent.version}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    )
    out_dir = settings.home / "tune" / sweep_id
    if out_dir.exists():
        raise ValueError(f"Got --sweep-id {sweep_id}, which exists under {out_dir.parent}; expected a new id")
    return SweepPlan(cfg, settings, parent, dataset, space, sweep_id, out_dir, dataset_ref)


# --------------------------------------------------------------------------- baseline


def measure_baseline(ctx: TrialContext, native: int, threads: int, provider: str) -> dict[str, Any]:
    """The parent's FP32 top-1 and batch-1 latency on the target's threads (measured like a trial)."""
    from edge_export.measure import holdout_top1
    from tune.trial import _runner, holdout_arrays, measure_latency, parent_stage

    parent = parent_stage(ctx)
    hx, hy = holdout_arrays(Path(ctx.dataset), native, parent.card.resize.value, ctx.holdout_limit, ctx.cache_dir)
    runner = _runner(parent.model_path, threads, provider)
    lat = measure_latency(runner, hx[:64], ctx.latency, threads=threads, provider=provider)
    return {"ref": ctx.parent_ref, "top1": holdout_top1(runner, hx, hy), "p95_ms": lat.p95_ms, "p50_ms": lat.p50_ms,
            "latency": lat.to_dict(), "input_size": native}


def decide_budget(cfg: SweepConfig, baseline_p95_ms: float) -> tuple[float | None, str]:
    """The sweep's own latency budget (None: the target's) and a sentence saying where it came from."""
    if cfg.latency_budget_ms is not None:
        return cfg.latency_budget_ms, f"--latency-budget-ms {cfg.latency_budget_ms:g}"
    if cfg.budget_fraction is not None:
        b = cfg.budget_fraction * baseline_p95_ms
        return b, f"{cfg.budget_fraction:g} x the parent's FP32 p95 {baseline_p95_ms:.3f} ms"
    return None, f"the {cfg.target} profile's p95 budget"


# ---------------------------------------------------------------------------- search


def _unique_configs(inner: Any, space: Space, *, seed: int, retries: int = 10) -> Any:
    """Wrap an ``OptunaSearch`` so that a config is never run twice (see ``_UniqueConfigs``)."""
    import random

    from ray.tune.search import Searcher

    class _UniqueConfigs(Searcher):
        """Never run the same config twice in one sweep.

        TPE on a small categorical space proposes configs it has measured already (with
        few observations its model can put all its mass on one point); each repeat would
        spend a trial of the budget on a measurement we have. A repeat is handed back to
        Optuna as failed (so it is neither counted twice nor reinforced) and TPE is asked
        again; after ``retries`` repeats, an unseen config is drawn at random (seeded)
        and enqueued in the Optuna study, so Optuna still records the trial and its
        result. When every config has been run, the sweep ends.
        """

        def __init__(self) -> None:
            super().__init__(metric=inner.metric, mode=inner.mode)
            self.seen: set[str] = set()
            self.repeats = 0
            self.random_fallbacks = 0
            self._rng = random.Random(seed)
            self._n = 0

        def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
            ok = inner.set_search_properties(metric, mode, config, **spec)
            self._metric, self._mode = inner.metric, inner.mode
            return ok

        def _discard(self, trial_id: str) -> None:
            # OptunaSearch keeps the Optuna trial under the Tune id; move it aside and fail it.
            self._n += 1
            aside = f"{trial_id}-repeat{self._n}"
            inner._ot_trials[aside] = inner._ot_trials.pop(trial_id)
            inner.on_trial_complete(aside, None, error=True)

        def suggest(self, trial_id: str) -> dict | None:
            unseen = [p for p in space.points() if p.key not in self.seen]
            if not unseen:
                return Searcher.FINISHED
            for attempt in range(retries + 1):
                if attempt == retries:
                    self.random_fallbacks += 1
                    inner._ot_study.enqueue_trial(space.encode(self._rng.choice(unseen)))
                config = inner.suggest(trial_id)
                if config is None or config == Searcher.FINISHED:
                    return config
                key = space.decode(config).key
                if key not in self.seen:
                    self.seen.add(key)
                    return config
                self.repeats += 1
                self._discard(trial_id)
            return Searcher.FINISHED

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            inner.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            inner.on_trial_complete(trial_id, result=result, error=error)

        def save(self, checkpoint_path: str) -> None:
            inner.save(checkpoint_path)

        def restore(self, checkpoint_path: str) -> None:
            inner.restore(checkpoint_path)

    return _UniqueConfigs()


def _param_space(space: Space) -> dict[str, Any]:
    """Ray Tune domains for :meth:`Space.search_dims`: ordered fields as integer indexes, the rest as choices."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, (kind, values) in space.search_dims().items():
        if kind == "index" and len(values) > 1:
            out[name] = tune.randint(0, len(values))  # Optuna: IntDistribution(0, n - 1), ordered
        elif kind == "index":
            out[name] = tune.choice([0])
        else:
            out[name] = tune.choice(values)
    return out


def _stopper(budget_ms: float, factor: float) -> Any:
    from ray.tune import Stopper

    from tune.trial import is_hopeless

    class HopelessStopper(Stopper):
        """Stop a trial after its latency probe when even its fastest query was over budget: it can never win."""

        def __call__(self, trial_id: str, result: dict) -> bool:
            probe = result.get("probe_min_ms")
            return result.get("stage") == 1 and probe is not None and is_hopeless(probe, budget_ms, factor)

        def stop_all(self) -> bool:
            return False

    return HopelessStopper()


def _progress_callback(space: Space, total: int, on_event: Event) -> Any:
    from ray.tune import Callback

    class _Progress(Callback):
        """Trial lines for the caller's progress display (driver side)."""

        def __init__(self, on_event: Event) -> None:
            self.done = 0
            self.on_event = on_event

        def __getstate__(self) -> dict:
            # Tune pickles its callbacks with the experiment state; a display is not state.
            return {"done": self.done}

        def __setstate__(self, state: dict) -> None:
            self.done, self.on_event = state["done"], _no_event

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            cfg = space.decode(trial.config).key
            if result.get("stage") == 1:
                self.on_event("trial", f"{cfg}: probe min {result.get('probe_min_ms', float('nan')):.3f} ms")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            r = trial.last_result or {}
            cfg = space.decode(trial.config).key
            if r.get("stage") == 2 and r.get("complete"):
                msg = (f"{cfg}: top-1 {100 * r.get('top1', 0):.2f}%, p95 {r.get('p95_ms', 0):.3f} ms, "
                       f"{'feasible' if r.get('feasible') else 'infeasible'}")
            elif r.get("stage") == 2:
                msg = f"{cfg}: build or measurement failed"
            else:
                msg = f"{cfg}: stopped (even the fastest probe query was over budget)"
            self.on_event("trial-done", f"[{self.done}/{total}] {msg}")

    return _Progress(on_event)


def _wandb_callback(plan: SweepPlan) -> Any:
    from ray.air.integrations.wandb import WandbLoggerCallback

    kwargs: dict[str, Any] = {"dir": str(plan.settings.home / "wandb"), "job_type": "tune-trial",
                              "tags": [plan.parent.name, plan.config.target]}
    if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        kwargs["mode"] = "offline"  # upload later with `wandb sync`
    (plan.settings.home / "wandb").mkdir(parents=True, exist_ok=True)
    return WandbLoggerCallback(project=plan.config.wandb_project, group=plan.sweep_id, **kwargs)


@dataclass
class SweepResult:
    """What a sweep found (also written to ``summary.json``)."""

    sweep_id: str
    out_dir: Path
    summary: dict[str, Any]
    trials: list[TrialRecord]
    constraints: Constraints
    best: TrialRecord | None
    registered: str | None = None
    best_file: Path | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.best is not None

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary, "files": self.files}


def _context(plan: SweepPlan, constraints: Constraints) -> TrialContext:
    cfg = plan.config
    return TrialContext(
        home=str(plan.settings.home),
        parent_ref=plan.parent_ref,
        dataset=plan.trial_dataset,
        out_dir=str(plan.out_dir),
        constraints=constraints,
        calibration=cfg.space.calibration,
        finetune=cfg.finetune_plan,
        latency=cfg.latency_plan,
        target=cfg.target,
        build_threads=max(plan.space.threads),
        seed=cfg.seed,
        holdout_limit=cfg.holdout_limit,
        peak_memory=cfg.peak_memory,
        hopeless_factor=cfg.hopeless_factor,
        space=plan.space,
        penalty=cfg.penalty,
    )


def run_sweep(plan: SweepPlan, *, on_event: Event = _no_event) -> SweepResult:
    """Baseline, search, results (see the module docstring). Ray must be initialized.

    Raises:
        RuntimeError: Ray is not initialized, or the search itself failed.
    """
    import ray
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from train.scaling import ray_storage
    from tune.trial import tune_trial
    from visionfleet.targets import profile

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialized; call tune.sweep.connect_ray first")
    cfg, space = plan.config, plan.space
    t0 = time.time()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    plan.out_dir.mkdir(parents=True)
    (plan.out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))

    # 2. baseline: the parent on the target's threads, on a worker like the trials
    on_event("baseline", f"measuring {plan.parent_ref} (FP32, {space.native_size} px, "
                        f"{profile(cfg.target).threads} threads)")
    probe_ctx = _context(plan, Constraints(latency_ms=1.0))
    baseline = ray.get(
        ray.remote(num_cpus=cfg.trial_cpus)(measure_baseline).remote(
            probe_ctx, space.native_size, profile(cfg.target).threads, space.providers[0]
        )
    )
    budget, source = decide_budget(cfg, baseline["p95_ms"])
    constraints = Constraints.for_target(profile(cfg.target), budget, require_precision=cfg.require_precision)
    on_event("budget", f"p95 <= {constraints.latency_ms:.3f} ms ({source}); parent top-1 {100 * baseline['top1']:.2f}%, "
                       f"p95 {baseline['p95_ms']:.3f} ms")
    ctx = _context(plan, constraints)

    # 3. search
    startup = cfg.startup_trials or max(2, min(8, cfg.trials // 3))
    searcher = _unique_configs(
        OptunaSearch(sampler=TPESampler(seed=cfg.seed, n_startup_trials=startup, multivariate=True)),
        space, seed=cfg.seed,
    )
    callbacks = [_progress_callback(space, cfg.trials, on_event)]
    if cfg.wandb:
        callbacks.append(_wandb_callback(plan))
    # Tune's experiment state goes to the store area `tune` (<home>/tune/<sweep> on one machine,
    # as the report files; s3://.../tune/<sweep> on a cluster). The trial records and the report
    # stay in plan.out_dir on this node.
    storage_path, storage_fs = ray_storage(f"{plan.settings.store_uri('tune').rstrip('/')}/{plan.sweep_id}")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, ctx=ctx), {"cpu": cfg.trial_cpus}),
        param_space=_param_space(space),
        tune_config=tune.TuneConfig(
            metric="score", mode="max", search_alg=searcher, num_samples=min(cfg.trials, len(space)),
            max_concurrent_trials=1,  # latency is measured: one trial at a time, or the numbers are noise
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="ray",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            stop=_stopper(constraints.latency_ms, cfg.hopeless_factor),
            callbacks=callbacks,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    on_event("search", f"{min(cfg.trials, len(space))} trials over {len(space)} configs (TPE, {startup} random first)")
    # Tune prints its experiment table on stdout; stdout is for our JSON result.
    with contextlib.redirect_stdout(sys.stderr):
        grid = tuner.fit()
    records = _collect(plan.out_dir, grid, space)
    extra = {"ray_trials": len(grid), "repeats_skipped": searcher.repeats, "random_fallbacks": searcher.random_fallbacks,
             "startup_trials": startup}
    # Drop the W&B callback while Ray is up: its __del__ needs Ray (at exit it is gone).
    del tuner, callbacks
    gc.collect()
    return finish(plan, records, constraints, baseline=baseline, budget_source=source, started_at=started,
                  wall_s=time.time() - t0, extra=extra, on_event=on_event)


def _collect(out_dir: Path, grid: Any, space: Space) -> list[TrialRecord]:
    """The trials' own records (they write them), completed from Tune's results where a trial died early."""
    records: list[TrialRecord] = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        path = out_dir / "trials" / f"{trial_id}.json"
        if path.is_file():
            records.append(TrialRecord.from_dict(json.loads(path.read_text())))
            continue
        point = space.decode(result.config)
        records.append(TrialRecord(key=point.key, config=point.to_dict(), status=ERROR, input_size=point.input_size,
                                   error=f"{type(result.error).__name__}: {result.error}" if result.error else "no result"))
    return records


def best_file(settings: Settings, model: str, target: str) -> Path:
    """``<state>/tune/best/<model>--<target>.json``: the retraining pipeline's "best known config"."""
    return settings.home / "tune" / "best" / f"{model}--{target}.json"


def finish(
    plan: SweepPlan,
    records: list[TrialRecord],
    constraints: Constraints,
    *,
    baseline: dict[str, Any],
    budget_source: str,
    started_at: str,
    wall_s: float,
    extra: dict[str, Any] | None = None,
    on_event: Event = _no_event,
) -> SweepResult:
    """Front, best feasible, registration, best file and report files for measured ``records``."""
    cfg = plan.config
    best = best_feasible(records, constraints)
    front = pareto_front(records)
    summary: dict[str, Any] = {
        "sweep": plan.sweep_id,
        "model": plan.parent_ref,
        "target": cfg.target,
        "dataset": str(plan.dataset),
        "constraints": constraints.to_dict(),
        "budget_source": budget_source,
        "baseline": baseline,
        "space": plan.space.to_dict(),
        "space_points": len(plan.space),
        "trials": len(records),
        "unique_configs": len({r.key for r in records}),
        "complete": sum(r.status == COMPLETE for r in records),
        "stopped_early": sum(r.status == STOPPED for r in records),
        "errors": sum(r.status == ERROR for r in records),
        "feasible": sum(is_feasible(r, constraints) for r in records),
        "front": [r.key for r in front],
        "started_at": started_at,
        "wall_s": wall_s,
        "config": cfg.model_dump(mode="json"),
        **(extra or {}),
    }
    result = SweepResult(plan.sweep_id, plan.out_dir, summary, records, constraints, best)
    if best is None:
        summary["best"] = None
        summary["no_feasible_reason"] = _no_feasible_reason(records, constraints)
        on_event("result", f"no feasible config: {summary['no_feasible_reason']}")
    else:
        point = Point.from_dict(best.config)
        summary["best"] = {"key": best.key, "config": point.best_config(cfg.space.calibration), "top1": best.top1,
                           "p95_ms": best.p95_ms, "p50_ms": best.p50_ms, "size_mb": best.size_mb}
        if cfg.register_candidate:
            result.registered = _register(plan, point, best, constraints, baseline)
            summary["registered"] = result.registered
            on_event("register", f"{result.registered} is @candidate")
        if cfg.write_best:
            result.best_file = _write_best(plan, point, best, result.registered)
            summary["best_file"] = str(result.best_file)
    result.files = _write(plan, summary, records, constraints, best)
    return result


def _write(plan: SweepPlan, summary: dict, records: list[TrialRecord], c: Constraints, best: TrialRecord | None) -> dict:
    from tune.report import write_report

    return write_report(plan.out_dir, summary, records, c, best)


def _no_feasible_reason(records: list[TrialRecord], c: Constraints) -> str:
    measured = [r for r in records if r.p95_ms is not None or r.probe_min_ms is not None]
    if not measured:
        return f"no trial was measured ({sum(r.status == ERROR for r in records)} failed)"
    fastest = min(measured, key=lambda r: r.p95_ms if r.p95_ms is not None else r.probe_min_ms)  # type: ignore[arg-type, return-value]
    lat = fastest.p95_ms if fastest.p95_ms is not None else fastest.probe_min_ms
    failed = [x.name for x in checks(fastest, c) if x.ok is False]
    return (f"the fastest trial, {fastest.key}, took {lat:.3f} ms against a budget of {c.latency_ms:.3g} ms"
            + (f" (failing: {', '.join(failed)})" if failed else ""))


def _register(plan: SweepPlan, point: Point, best: TrialRecord, c: Constraints, baseline: dict) -> str:
    """Register the best feasible config as a new version with alias ``candidate`` (files from the build cache)."""
    from tune.trial import build_point, parent_stage
    from visionfleet.registry import Registry
    from visionfleet.spec import Lineage

    cfg = plan.config
    registry = Registry.from_settings(plan.settings)
    ctx = _context(plan, c)
    parent = parent_stage(ctx)
    if point.is_identity(plan.space.native_size):
        # The parent itself won: no new files, the candidate is the parent.
        registry.set_alias(plan.parent.name, "candidate", plan.parent.version, reason=f"tune {plan.sweep_id}")  # type: ignore[arg-type]
        return plan.parent_ref
    built = build_point(parent, point, dataset=plan.dataset, cache_dir=ctx.cache_dir, calibration=ctx.calibration,
                        finetune=ctx.finetune, target=cfg.target, threads=ctx.build_threads, seed=cfg.seed)
    n = point.input_size
    metrics = {
        "holdout_top1": best.top1,
        "holdout_n": best.extra.get("holdout_n"),
        "parent_holdout_top1": baseline.get("top1"),
        "top1_drop_pt": (baseline["top1"] - best.top1) * 100.0 if best.top1 is not None else None,
        "size_mb": best.size_mb,
        "macs_per_image": best.extra.get("macs_per_image"),
        "latency_b1_p50_ms": best.p50_ms,
        "latency_b1_p95_ms": best.p95_ms,
        "parent_latency_b1_p95_ms": baseline.get("p95_ms"),
        "peak_memory_mb": best.peak_memory_mb,
        "threads": point.threads,
        "provider": point.provider,
        "target": cfg.target,
        "measured_on": best.extra.get("measured_on"),
        "tune": {"sweep": plan.sweep_id, "config": point.best_config(cfg.space.calibration),
                 "budget_ms": c.latency_ms, "checks": [x.to_dict() for x in checks(best, c)]},
    }
    card = ModelCard(
        name=plan.parent.name,
        task=plan.parent.task,
        labels=plan.parent.labels,
        input_size=(n, n),
        resize=plan.parent.resize,
        model_file=built.model_path.name,
        format="onnx",
        precision=built.card.precision,
        framework=plan.parent.framework,
        arch=plan.parent.arch,
        preprocessing=plan.parent.preprocessing,
        metrics={k: v for k, v in metrics.items() if v is not None},
        lineage=Lineage(parent=plan.parent_ref, dataset=plan.dataset_ref or str(plan.dataset), run=f"tune-{plan.sweep_id}",
                        steps=[*plan.parent.lineage.steps, *built.steps]),
        description=f"best feasible config of sweep {plan.sweep_id}: {point.key}",
    )
    stored = registry.register(card, built.files, set_production_if_none=False, aliases=("candidate",))
    return stored.ref


def _write_best(plan: SweepPlan, point: Point, best: TrialRecord, registered: str | None) -> Path:
    path = best_file(plan.settings, plan.parent.name, plan.config.target)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "config": point.best_config(plan.config.space.calibration),
        "ref": registered,
        "sweep": plan.sweep_id,
        "metrics": {"top1": best.top1, "p95_ms": best.p95_ms, "size_mb": best.size_mb},
        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------ entrypoint


@dataclass(frozen=True)
class SweepFlag:
    """One command-line option of a sweep: a field of :class:`SweepConfig` (or, ``space=True``, of SpaceConfig).

    Its type, default and help are the field's own; this names only what a flag needs
    beyond them. ``python -m tune.sweep`` (:func:`add_arguments`) and ``visionfleet tune
    run`` are both generated from :data:`SWEEP_FLAGS`, so the two cannot drift apart.
    """

    field: str
    space: bool = False  # a field of the space: given, it overrides the --space file
    name: str | None = None  # the flag's name where it is not the field's (--register for register_candidate)
    aliases: tuple[str, ...] = ()  # more spellings of the flag
    help_text: str | None = None  # only where the field's description does not fit the flag (--space FILE)

    @property
    def key(self) -> str:
        """The parameter's Python name: typer's keyword and argparse's ``dest``."""
        return self.name or self.field

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def info(self) -> Any:
        return (SpaceConfig if self.space else SweepConfig).model_fields[self.field]

    @property
    def type(self) -> type:
        """``bool``, ``int``, ``float`` or ``str`` (a list field is comma-separated text, a nested model a file)."""
        return _flag_types(self.info.annotation)[0]

    @property
    def item_type(self) -> type | None:
        """The item type of a list field (its text is split on commas); None otherwise."""
        return _flag_types(self.info.annotation)[1]

    @property
    def file(self) -> bool:
        """The field is a nested model, given on the command line as a YAML/JSON file of its fields."""
        a = self.info.annotation
        return isinstance(a, type) and issubclass(a, BaseModel)

    @property
    def required(self) -> bool:
        return self.info.is_required()

    @property
    def default(self) -> Any:
        """The flag's value when it is not given: the field's default; None for a space field or a file
        (the space file, else the space's own default, decides)."""
        if self.required or self.space or self.file:
            return None
        return self.info.get_default(call_default_factory=True)

    @property
    def help(self) -> str:
        """The field's description, with "comma-separated" and the field's default where they apply."""
        notes = ["comma-separated"] if self.item_type is not None else []
        if not (self.required or self.file or self.type is bool):
            default = self.info.get_default(call_default_factory=True)
            if default is not None:
                notes.append(f"default {_spell(default)}")
        return "; ".join([self.help_text or self.info.description or "", *notes])


def _flag_types(annotation: Any) -> tuple[type, type | None]:
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return str, typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return str, None  # a YAML/JSON file of the model's fields
    return annotation, None


def _spell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_spell(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


# Every option of `python -m tune.sweep` and `visionfleet tune run`, in --help order. The
# other fields (startup_trials, latency_warmup, hopeless_factor, penalty, wandb_project,
# write_best, the space's finetune_lr, finetune_batch, resize_finetune) are set from code
# or, for the space, in the --space file.
SWEEP_FLAGS: tuple[SweepFlag, ...] = (
    SweepFlag("model"),
    SweepFlag("target"),
    SweepFlag("latency_budget_ms"),
    SweepFlag("budget_fraction"),
    SweepFlag("trials"),
    SweepFlag("space", help_text="YAML/JSON file with the space (prune, quantize, input_sizes, threads, ...); "
                                 "the flags below override it"),
    SweepFlag("prune", space=True),
    SweepFlag("quantize", space=True),
    SweepFlag("input_sizes", space=True),
    SweepFlag("threads", space=True),
    SweepFlag("providers", space=True),
    SweepFlag("calibration", space=True),
    SweepFlag("finetune_epochs", space=True),
    SweepFlag("finetune_limit", space=True),
    SweepFlag("prune_round_to", space=True),
    SweepFlag("dataset", aliases=("--data",)),
    SweepFlag("holdout_limit"),
    SweepFlag("seed"),
    SweepFlag("latency_queries"),
    SweepFlag("latency_repeats"),
    SweepFlag("probe_queries"),
    SweepFlag("require_precision"),
    SweepFlag("peak_memory"),
    SweepFlag("wandb"),
    SweepFlag("register_candidate", name="register"),
    SweepFlag("sweep_id"),
    SweepFlag("trial_cpus"),
)


def build_config(model: str, *, space_file: str | None = None, **flags: Any) -> SweepConfig:
    """A :class:`SweepConfig` from command-line values: ``space_file`` first, then the flags over it.

    Args:
        model: the parent model reference.
        space_file: a YAML/JSON file of space fields (``--space``).
        **flags: values keyed by field name (the fields of :data:`SWEEP_FLAGS`); None is
            "not given" (the field's default). List flags are comma-separated text
            (``"0,0.25,0.5"``), as the CLI and the job take them, or lists.

    Raises:
        ValueError: one line per invalid value.
        TypeError: a name that is not a sweep flag.
    """
    by_field = {f.field: f for f in SWEEP_FLAGS if not (f.required or f.file)}  # model and space_file are named
    unknown = sorted(set(flags) - set(by_field))
    if unknown:
        raise TypeError(f"build_config() got unexpected options {unknown}; expected fields of SWEEP_FLAGS")
    space: dict[str, Any] = _read_space_file(Path(space_file)) if space_file else {}
    top: dict[str, Any] = {"model": model}
    for name, value in flags.items():
        f = by_field[name]
        if value is None:
            continue
        if f.item_type is not None and isinstance(value, str):
            value = _split(value, f.item_type, f.option)
        (space if f.space else top)[name] = value
    from pydantic import ValidationError

    try:
        return SweepConfig(**top, space=SpaceConfig(**space))
    except ValidationError as exc:  # one line per problem, without pydantic's boilerplate
        raise ValueError("; ".join(_error_line(e) for e in exc.errors())) from None


def config_from_flags(values: dict[str, Any]) -> SweepConfig:
    """The :class:`SweepConfig` of parsed flags keyed by :attr:`SweepFlag.key` (typer's keywords).

    Raises:
        ValueError: one line per invalid value.
    """
    fields = {f.field: values[f.key] for f in SWEEP_FLAGS if f.key in values}
    return build_config(fields.pop("model"), space_file=fields.pop("space", None), **fields)


def _error_line(e: dict[str, Any]) -> str:
    msg = str(e.get("msg", "")).removeprefix("Value error, ")
    if msg.startswith("Got "):
        return msg
    where = ".".join(str(x) for x in e.get("loc", ()))
    return f"Got {e.get('input')!r} for {where}; expected {msg.lower()}"


def _read_space_file(path: Path) -> dict[str, Any]:
    import yaml

    doc = yaml.safe_load(path.read_text())  # JSON is YAML too
    if not isinstance(doc, dict):
        raise ValueError(f"Got {type(doc).__name__} in {path}; expected a mapping of space fields (prune, quantize, …)")
    return doc


def _split(text: str, item: type, flag: str) -> list[Any]:
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [item(t) for t in parts]
    except ValueError:
        kind = "integers" if item is int else "numbers"
        raise ValueError(f"Got {text!r} for {flag}; expected comma-separated {kind}") from None


def _negated(f: SweepFlag) -> bool:
    # argparse spells a flag that is on by default as --no-X (store_true), as the job always has.
    return f.type is bool and bool(f.default)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every flag of :data:`SWEEP_FLAGS` to ``p`` (read them back with :func:`flag_values`).

    A boolean that is on by default is ``--no-X`` (``dest`` ``no_X``), one that is off is
    ``--X``; every other flag's ``dest`` is :attr:`SweepFlag.key`.
    """
    for f in SWEEP_FLAGS:
        text = f.help.replace("%", "%%")  # argparse %-formats help
        if _negated(f):
            p.add_argument(f"--no-{f.option[2:]}", dest=f"no_{f.key}", action="store_true", help=f"do not {text}")
        elif f.type is bool:
            p.add_argument(f.option, dest=f.key, action="store_true", help=text)
        else:
            p.add_argument(f.option, *f.aliases, dest=f.key, type=None if f.type is str else f.type,
                           default=f.default, required=f.required, help=text)
    return p


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep flags of a namespace parsed with :func:`add_arguments`, keyed by :attr:`SweepFlag.key`."""
    return {f.key: not getattr(args, f"no_{f.key}") if _negated(f) else getattr(args, f.key) for f in SWEEP_FLAGS}


_T0 = time.monotonic()


def _print_event(stage: str, message: str) -> None:
    # Job logs have no timestamps of their own: each line says when, since the job started.
    print(f"[{time.monotonic() - _T0:7.1f}s {stage}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The job entrypoint: check, connect, sweep, print the summary as JSON on stdout.

    Exit status: 0 with a best feasible config, 3 when no config was feasible, 2 for bad input.
    """
    p = add_arguments(argparse.ArgumentParser(
        prog="python -m tune.sweep",
        description="Ray Tune compression sweep under a latency budget (a `ray job submit` entrypoint).",
    ))
    p.add_argument("--home", help=f"state dir (default ${ENV_HOME}, else ./.visionfleet); made absolute here")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, as set by `ray job submit`, else embedded)")
    args = p.parse_args(argv)
    try:
        settings = Settings.from_env(args.home)
        os.environ[ENV_HOME] = str(settings.home)  # absolute, for this driver and its workers
        cfg = config_from_flags(flag_values(args))
        plan = prepare(cfg, settings)  # refuses bad input before Ray starts
    except (ValueError, LookupError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    connect_ray(settings, args.address, join_head=False)
    result = run_sweep(plan, on_event=_print_event)
    print(json.dumps(result.to_dict(), indent=2, default=str))
    if not result.feasible:
        print(f"no feasible config: {result.summary['no_feasible_reason']}", file=sys.stderr)
        return NO_FEASIBLE_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
