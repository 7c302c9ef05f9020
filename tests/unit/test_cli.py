"""CLI: clear messages and non-zero exits for bad arguments (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from visionfleet.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_every_area() -> None:
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("data", "models", "serve", "train", "predict", "demo"):
        assert cmd in r.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (("models", "show", "nope"), "unknown model 'nope'"),
        (("models", "show", "bad ref!"), "expected NAME"),
        (("models", "promote", "demo"), "expected NAME:VERSION"),
        (("predict", "/no/such/image.jpg"), "no such file"),
        (("data", "import-folder", "/no/such/folder"), "no such folder"),
        (("data", "synth", "--n-train", "0", "--n-holdout", "0"), "expected"),
        (("data", "synth", "--color-cast", "1,2"), "--color-cast"),
        (("data", "synth", "--contrast", "0"), "contrast"),
        (("train", "--data", "no-such-dataset"), "no dataset"),
        (("serve", "batching"), "--max-concurrent"),
    ],
)
def test_bad_arguments_give_a_message_and_exit_2(home: Path, args: tuple[str, ...], needle: str) -> None:
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and needle in r.output
    assert "Traceback" not in r.output


def test_train_validates_before_starting_ray(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.local
    from visionfleet.datasets.store import synthesize

    started: list[bool] = []
    monkeypatch.setattr(cluster.local, "init_embedded", lambda *a, **k: started.append(True))

    synthesize(home / "datasets" / "tiny", n_train=4, n_holdout=2, size=16)
    for args, needle in (
        (("--arch", "vgg"), "arch"),
        (("--resize", "squash"), "squash"),
        (("--depths", "a,b"), "--depths"),
        (("--epochs", "0"), "epochs"),
        (("--name", "bad name"), "model name"),
    ):
        r = invoke("train", "--data", "tiny", *args)
        assert r.exit_code == 2 and needle in r.output, (args, r.output)
    assert not started  # every argument was validated before any Ray cluster was started


def test_data_synth_and_list(home: Path) -> None:
    r = invoke("data", "synth", "--name", "small", "--n-train", "20", "--n-holdout", "10", "--size", "24", "--json")
    assert r.exit_code == 0, r.output
    assert '"train": 20' in r.output
    r = invoke("data", "list", "--json")
    assert r.exit_code == 0 and '"small"' in r.output
    r = invoke("data", "synth", "--name", "small", "--n-train", "2", "--n-holdout", "1")
    assert r.exit_code == 2 and "already exists" in r.output


def test_models_list_empty(home: Path) -> None:
    r = invoke("models", "list", "--json")
    assert r.exit_code == 0 and '"models": []' in r.output


def test_serve_status_without_head(home: Path) -> None:
    r = invoke("serve", "status")
    assert r.exit_code == 1 and "no local head" in r.output
    r = invoke("serve", "down")
    assert r.exit_code == 0 and "nothing to stop" in r.output


# `visionfleet tune run` and `python -m tune.sweep` are both generated from tune.sweep.SWEEP_FLAGS,
# whose types, defaults and help are the pydantic fields of SweepConfig / SpaceConfig.
SWEEP_ARGV = ["--model", "tiny:1", "--trials", "3", "--latency-budget-ms", "1000", "--prune", "0,0.5",
              "--quantize", "none,int8-dynamic", "--input-sizes", "32,24", "--calibration", "16", "--data", "tiny",
              "--require-precision", "--no-peak-memory", "--no-wandb", "--no-register", "--trial-cpus", "0.25",
              "--sweep-id", "it-1", "--latency-repeats", "2"]


def _tune_run_command():
    import typer.main

    from visionfleet.cli import tune

    return typer.main.get_command(tune.app).commands["run"]  # type: ignore[attr-defined]


def _job_parser():
    import argparse

    from tune.sweep import add_arguments

    return add_arguments(argparse.ArgumentParser(prog="python -m tune.sweep"))


def test_tune_run_the_job_entrypoint_and_the_config_model_have_the_same_options() -> None:
    from tune.space import SpaceConfig
    from tune.sweep import SWEEP_FLAGS, SweepConfig

    # every flag is a field of the models, once; the fields that are not flags are named, so a new field is a decision
    assert len({(f.space, f.field) for f in SWEEP_FLAGS}) == len(SWEEP_FLAGS) == 27
    assert all(f.field in (SpaceConfig if f.space else SweepConfig).model_fields for f in SWEEP_FLAGS)
    assert set(SweepConfig.model_fields) - {f.field for f in SWEEP_FLAGS if not f.space} == {
        "startup_trials", "latency_warmup", "hopeless_factor", "penalty", "wandb_project", "write_best"}
    assert set(SpaceConfig.model_fields) - {f.field for f in SWEEP_FLAGS if f.space} == {
        "finetune_lr", "finetune_batch", "resize_finetune"}

    cli = {p.name: p for p in _tune_run_command().params if p.name not in ("address", "as_json")}
    job = {a.dest: a for a in _job_parser()._actions if a.dest != "help"}
    on_by_default = {f.key for f in SWEEP_FLAGS if f.type is bool and f.default}
    assert set(cli) == {f.key for f in SWEEP_FLAGS}
    assert set(job) == {f"no_{f.key}" if f.key in on_by_default else f.key for f in SWEEP_FLAGS}
    # every spelling the job takes works on the CLI too (the CLI adds --X/--no-X for each boolean)
    job_spellings = {s for a in job.values() for s in a.option_strings}
    assert job_spellings <= {s for p in cli.values() for s in (*p.opts, *p.secondary_opts)}
    assert {"--data", "--dataset", "--no-register", "--no-peak-memory", "--require-precision"} <= job_spellings
    for f in SWEEP_FLAGS:
        assert cli[f.key].help == f.help and (f.help_text or f.info.description) in f.help
        action = job[f"no_{f.key}" if f.key in on_by_default else f.key]
        assert action.help and action.required == cli[f.key].required == f.required
        if f.type is not bool:
            assert cli[f.key].default == action.default == f.default
    assert cli["trials"].default == SweepConfig.model_fields["trials"].default == 24
    assert "default 256" in cli["calibration"].help  # a space field names the space's default

    r = runner.invoke(app, ["tune", "run", "--help"], env={"COLUMNS": "250"})  # wide: rich elides long names
    assert r.exit_code == 0, r.output
    for f in SWEEP_FLAGS:
        assert f.option in r.output, f.option


def test_tune_run_and_the_job_entrypoint_parse_the_same_flags_to_the_same_config() -> None:
    from tune.sweep import SweepConfig, config_from_flags, flag_values

    def both(argv: list[str]) -> tuple[SweepConfig, SweepConfig]:
        params = _tune_run_command().make_context("run", list(argv)).params
        cli = config_from_flags({k: v for k, v in params.items() if k not in ("address", "as_json")})
        return cli, config_from_flags(flag_values(_job_parser().parse_args(argv)))

    cli, job = both(SWEEP_ARGV)
    assert cli == job
    assert (cli.trials, cli.latency_budget_ms, cli.dataset, cli.sweep_id, cli.trial_cpus) == (3, 1000.0, "tiny", "it-1", 0.25)
    assert cli.space.prune == [0.0, 0.5] and cli.space.input_sizes == [32, 24] and cli.space.calibration == 16
    assert (cli.require_precision, cli.peak_memory, cli.wandb, cli.register_candidate) == (True, False, False, False)
    assert cli.latency_repeats == 2
    cli, job = both(["--model", "tiny:1", "--dataset", "tiny"])
    assert cli == job == SweepConfig(model="tiny:1", dataset="tiny")  # a flag not given is the field's default


def test_fleet_simulate_finds_its_harness_in_bench() -> None:
    """The fleet simulator is a test harness (bench/fleet_sim.py), not product code; the CLI loads it from the checkout."""
    from visionfleet.cli.fleet import _fleet_sim

    sim_config, run_simulation = _fleet_sim()
    assert sim_config.__module__ == "bench.fleet_sim" and run_simulation.__name__ == "run_simulation"
    assert sim_config(model="demo:1", update="demo:2", devices=2).devices == 2
