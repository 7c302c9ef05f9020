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
        (("serve", "batching"), "--ingress-max-concurrent"),
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
