"""A small Ray Tune search over training settings (learning rate, epochs, width) for one dataset.

It answers "how good can this model get here?", the yardstick for the adaptive defaults
of :mod:`train.auto`: every trial is a real :func:`train.loop.fit` run (Ray Train inside
a Tune function trainable) that starts from the default plan and changes only the
searched settings. Optuna's TPE picks the points; trials run one at a time (the machine's
cores go to the trial's Ray Train workers). Each trial reports its validation top-1 (what
the search maximizes) and its holdout top-1 (what the comparison reads).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["config_from_plan", "search_training"]


def config_from_plan(dataset: str, values: dict[str, Any], data: dict[str, Any], **extra):
    """The :class:`train.loop.TrainConfig` of a :class:`train.auto.Plan`'s values."""
    from train.loop import TrainConfig

    return TrainConfig(
        dataset=str(dataset),
        arch={"arch": values["arch"], "width": int(values["width"]), "depths": list(values["depths"]),
              "stem_stride": int(values["stem_stride"]), **({"in_channels": 1} if values["grayscale"] else {})},
        input_size=int(values["input_size"]),
        epochs=int(values["epochs"]),
        batch_size=int(values["batch_size"]),
        lr=float(values["lr"]),
        flips=values["flips"],
        val_fraction=float(values["val_fraction"]),
        patience=int(values["patience"]) if values["val_fraction"] > 0 else None,
        class_weights=tuple(data["class_weights"]) if values["balance"] and data.get("class_weights") else None,
        **extra,
    )


def _trial(config: dict, *, dataset: str, values: dict, data: dict, runs_dir: str, train_storage: str | None) -> None:
    from ray import tune

    from train.loop import fit

    v = {**values, "lr": config["lr"], "epochs": config["epochs"], "width": config["width"],
         "patience": max(8, config["epochs"] // 4)}
    cfg = config_from_plan(dataset, v, data, wandb=False)
    t0 = time.time()
    result = fit(cfg, runs_dir=Path(runs_dir), wandb_dir=Path(runs_dir) / "wandb", storage=train_storage)
    m = result.metrics
    tune.report({"val_top1": m.get("val_top1", m["top1"]), "holdout_top1": m["top1"],
                 "balanced_top1": m.get("balanced_top1"), "epochs_run": m.get("epochs_run"), "seconds": time.time() - t0})


def search_training(
    dataset: str | Path,
    *,
    trials: int = 8,
    out_dir: Path,
    seed: int = 0,
    lr_range: tuple[float, float] | None = None,
    epochs_choices: list[int] | None = None,
    widths: list[int] | None = None,
    on_trial: Callable[[dict], None] | None = None,
    storage: str | None = None,
) -> dict[str, Any]:
    """Search lr (log-uniform), epochs and width around the default plan; Ray must be initialized.

    ``storage``: where Tune's experiment state and the trials' Ray Train checkpoints go (a
    folder or ``s3://bucket/prefix``, e.g. ``Settings.store_uri("tune") + "/search"``);
    by default ``out_dir/ray`` and each trial's ``runs/_ray``, as before.

    Returns ``{"default_plan", "space", "trials": [...], "best_by_validation", "best_holdout_top1"}``.
    """
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from train.auto import plan_training
    from train.scaling import ray_storage

    plan = plan_training(dataset)
    v = plan.values
    lr_range = lr_range or (v["lr"] / 8, min(0.8, v["lr"] * 4))
    epochs_choices = epochs_choices or sorted({max(4, v["epochs"] // 3), max(6, v["epochs"] * 2 // 3), v["epochs"]})
    widths = widths or [8, 16, 32]
    space = {"lr": tune.loguniform(*lr_range), "epochs": tune.choice(epochs_choices), "width": tune.choice(widths)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_parameters(_trial, dataset=str(dataset), values=v, data=plan.data,
                                     runs_dir=str(out_dir / "runs"),
                                     train_storage=f"{storage.rstrip('/')}/runs" if storage else None)
    storage_path, storage_fs = ray_storage(storage or out_dir / "ray")
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.01}),  # the trial's Ray Train workers hold the CPUs
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_top1", mode="max", num_samples=trials, max_concurrent_trials=1,
            search_alg=OptunaSearch(sampler=TPESampler(seed=seed, n_startup_trials=max(2, trials // 2))),
        ),
        run_config=tune.RunConfig(name="search", storage_path=storage_path, storage_filesystem=storage_fs, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    with contextlib.redirect_stdout(sys.stderr):
        grid = tuner.fit()
    rows = []
    for r in grid:
        if r.error or not r.metrics:
            rows.append({"config": r.config, "error": str(r.error)[:300]})
            continue
        row = {"config": {k: r.config[k] for k in ("lr", "epochs", "width")},
               **{k: r.metrics.get(k) for k in ("val_top1", "holdout_top1", "balanced_top1", "epochs_run", "seconds")}}
        rows.append(row)
        if on_trial:
            on_trial(row)
    ok = [r for r in rows if "holdout_top1" in r]
    if not ok:
        raise RuntimeError(f"Got no finished trial of {len(rows)}; expected at least one: {json.dumps(rows)[:600]}")
    best_val = max(ok, key=lambda r: (r["val_top1"], r["holdout_top1"]))
    return {
        "default_plan": plan.to_dict(),
        "space": {"lr": list(lr_range), "epochs": epochs_choices, "width": widths},
        "trials": rows,
        "best_by_validation": best_val,
        "best_holdout_top1": max(r["holdout_top1"] for r in ok),
    }
