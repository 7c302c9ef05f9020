"""A real Ray Train run: metrics, checkpoint, registered card and W&B offline logs."""

from __future__ import annotations

from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.registry import Registry


def test_ray_train_fit_registers_a_self_describing_model(trained, settings) -> None:
    metrics = trained.result.metrics
    assert metrics["epoch"] == 2 and metrics["n"] == 160
    assert 0.0 <= metrics["top1"] <= 1.0 and 0.0 <= metrics["ece"] <= 1.0
    assert set(metrics["per_class"]) == set(trained.card.labels)
    assert trained.result.checkpoint.is_file()
    reg = Registry(settings.registry_dir)
    card = reg.card("tiny", trained.card.version)
    assert card.lineage.run == trained.result.run_id
    assert card.metrics["export_parity"]["top1_agreement"] == 1.0
    assert {f.role for f in card.files} == {"onnx", "torch"}
    assert reg.aliases("tiny")["production"] == 1


def test_onnx_model_matches_train_eval(trained, settings) -> None:
    """ONNX Runtime on the registered file reproduces the Ray Train holdout top-1."""
    from visionfleet.datasets.store import load_arrays

    x, y = load_arrays(trained.dataset, "holdout", (32, 32))
    model = load_model_dir(Registry(settings.registry_dir).local_dir("tiny", trained.card.version), RuntimeOptions(threads=1))
    top1 = float((model.run(x)[0].argmax(1) == y).mean())
    assert abs(top1 - trained.result.metrics["top1"]) < 1e-9


def test_wandb_offline_run_was_written(trained, settings) -> None:
    from visionfleet.wandb_offline import find_runs, read_run

    runs = [r for r in find_runs(settings.home / "wandb") if r.name.endswith(trained.result.run_id)]
    assert len(runs) == 1, "no offline W&B run for the training run"
    run = read_run(runs[0])
    assert [row["epoch"] for row in run["history"]] == [1, 2]
    assert run["summary"]["eval/top1"] == trained.result.metrics["top1"]
    assert "train/loss" in run["summary"]
