"""Datasets on the store area `datasets`: published to the S3 server (moto), copied to another
node's cache by content hash (whole or not at all), and the one-machine default unchanged."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from visionfleet.datasets.store import (
    list_datasets,
    load_arrays,
    local_dataset,
    publish_dataset,
    read_info,
    resolve_dataset_ref,
    synthesize,
)
from visionfleet.settings import Settings


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "writer" / "small"
    synthesize(path, n_train=24, n_holdout=8, size=16, seed=1)
    return path


def test_publish_then_read_on_another_node(small: Path, s3_env: str, tmp_path: Path) -> None:
    uri = f"{s3_env}/datasets/small"
    digest = publish_dataset(small, uri)
    assert read_info(uri).splits == {"train": 24, "holdout": 8}
    node_b = tmp_path / "node-b-cache"  # a node that never saw the writer's disk
    got = local_dataset(uri, node_b)
    assert got == node_b / "datasets" / digest
    a = load_arrays(small, "train", (16, 16))
    b = load_arrays(got, "train", (16, 16))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert [p.name for p in (node_b / "datasets").iterdir()] == [digest]  # no temp folder left behind
    assert local_dataset(uri, node_b) == got  # the second read is the cache
    with pytest.raises(FileExistsError, match="a dataset already exists at"):
        publish_dataset(small, uri)
    assert [ref for ref, _ in list_datasets(f"{s3_env}/datasets")] == [uri]


def test_concurrent_readers_share_one_copy(small: Path, s3_env: str, tmp_path: Path) -> None:
    uri = f"{s3_env}/datasets/small"
    publish_dataset(small, uri)
    out: list[Path] = []
    threads = [threading.Thread(target=lambda: out.append(local_dataset(uri, tmp_path / "c"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 1 and len(out) == 4
    assert len(list((tmp_path / "c" / "datasets").iterdir())) == 1
    assert read_info(out[0]).name == "small"


def test_unfinished_or_changed_dataset_is_refused(small: Path, s3_env: str, tmp_path: Path) -> None:
    from visionfleet.store import open_store

    store = open_store(f"{s3_env}/datasets/half")
    store.write_bytes("manifest.json", (small / "manifest.json").read_bytes())  # an upload that stopped early
    with pytest.raises(FileNotFoundError, match="missing _content.json"):
        read_info(f"{s3_env}/datasets/half")
    with pytest.raises(FileNotFoundError, match="missing _content.json"):
        local_dataset(f"{s3_env}/datasets/half", tmp_path / "c")
    uri = f"{s3_env}/datasets/small"
    publish_dataset(small, uri)
    open_store(uri).write_bytes("train/part-00000.parquet", b"not parquet")
    with pytest.raises(ValueError, match="Got SHA-256 .* expected .*changed after it was published"):
        local_dataset(uri, tmp_path / "c2")
    assert not any((tmp_path / "c2" / "datasets").iterdir())  # nothing half-copied is left


def test_refs_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedded = Settings(home=tmp_path / "h")
    assert resolve_dataset_ref("tiny", embedded) == str(tmp_path / "h" / "datasets" / "tiny")
    shared = Settings(home=tmp_path / "h", store="s3://bucket/vf")
    assert resolve_dataset_ref("tiny", shared) == "s3://bucket/vf/datasets/tiny"
    assert resolve_dataset_ref(str(tmp_path), shared) == str(tmp_path)  # a folder stays a folder
    assert local_dataset(str(tmp_path), tmp_path / "cache") == tmp_path


def test_cli_synth_publishes_to_the_store_and_lists(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visionfleet.cli import app

    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VISIONFLEET_STORE", f"{s3_env}/vf")
    r = CliRunner().invoke(app, ["data", "synth", "--name", "shapes", "--n-train", "20", "--n-holdout", "6",
                                 "--size", "16", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert doc["path"] == f"{s3_env}/vf/datasets/shapes" and doc["name"] == "shapes"
    assert not (tmp_path / "home" / "datasets" / "shapes").exists()  # nothing under the home's datasets
    cached = list((tmp_path / "home" / "cache" / "datasets").iterdir())
    assert len(cached) == 1 and read_info(cached[0]).name == "shapes"  # the writer keeps its copy
    r = CliRunner().invoke(app, ["data", "list", "--json"], catch_exceptions=False)
    assert [d["path"] for d in json.loads(r.stdout)["datasets"]] == [f"{s3_env}/vf/datasets/shapes"]
    r = CliRunner().invoke(app, ["data", "synth", "--name", "shapes", "--n-train", "4", "--n-holdout", "2",
                                 "--size", "16"])
    assert r.exit_code != 0 and "a dataset already exists at" in r.output


def test_cli_synth_embedded_default_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visionfleet.cli import app

    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VISIONFLEET_STORE", raising=False)
    r = CliRunner().invoke(app, ["data", "synth", "--name", "shapes", "--n-train", "10", "--n-holdout", "4",
                                 "--size", "16"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    folder = tmp_path / "home" / "datasets" / "shapes"
    assert read_info(folder).splits == {"train": 10, "holdout": 4}
    assert not (folder / "_content.json").exists() and not (tmp_path / "home" / "cache" / "datasets").exists()
