"""Ray Data batch inference on the shared local Ray: folders and Parquet, parity with the server.

Uses the session fixtures (one embedded Ray, the trained ``tiny:1`` at 32 px, the Serve
app); the job entrypoint and the docs example run as separate drivers attached to that
same cluster through ``RAY_ADDRESS``, as ``ray job submit`` would run them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from visionfleet.datasets.store import SCHEMA, read_split
from visionfleet.datasets.synth import render_sample
from visionfleet.datasets.variants import VARIANTS, encode_variant
from visionfleet.imaging import load_for_model
from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.registry import Registry

REPO = Path(__file__).resolve().parents[2]
_SUFFIX = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/bmp": "bmp", "image/tiff": "tiff"}


def _read(out: Path) -> list[dict]:
    return pads.dataset(out, format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """Every client image variant, nested two levels deep, plus two broken files and a stray text file."""
    root = tmp_path_factory.mktemp("folder-job")
    files: dict[str, bytes] = {}
    for i, variant in enumerate(VARIANTS):
        img, _ = render_sample(21, i, 40 + 8 * i)  # different sizes: resizing is exercised
        data, ctype = encode_variant(img, variant)
        path = root / f"class{i % 3}" / ("deep" if i % 2 else "") / f"{variant}.{_SUFFIX[ctype]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[str(path)] = data
    png = next(data for path, data in files.items() if path.endswith("/png.png"))
    broken = {
        root / "class0" / "broken.jpg": b"\xff\xd8\xff\xe0 this is not a JPEG",
        root / "cut.png": png[: len(png) // 2],
    }
    for path, data in broken.items():
        path.write_bytes(data)
        files[str(path)] = data
    (root / "class0" / "notes.txt").write_text("not an image: never read")
    return root, files


def test_folder_job_from_the_cli_matches_the_server(
    ray_session, trained, serve_url: str, image_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    from visionfleet.cli import app

    root, files = image_folder
    out = tmp_path / "results.parquet"
    r = CliRunner().invoke(app, ["infer", str(root), "--model", "tiny:1", "--out", str(out), "--batch", "4", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert (summary["rows"], summary["errors"], summary["kind"]) == (len(VARIANTS) + 2, 2, "images")
    rows = {row["path"]: row for row in _read(out)}
    assert set(rows) == set(files)  # exactly one row per image file, notes.txt skipped
    assert rows[str(root / "class0" / "broken.jpg")]["error"].startswith("CorruptImage")
    assert rows[str(root / "cut.png")]["error"].startswith("TruncatedImage")

    with httpx.Client(base_url=serve_url, timeout=60) as client:
        for path, data in files.items():
            row = rows[path]
            if row["error"]:
                assert row["label"] is None and row["probs"] is None
                continue
            served = client.post("/v1/predict?model=tiny:1&top_k=5", content=data,
                                 headers={"Content-Type": "application/octet-stream"}).json()
            assert (row["model"], row["version"], row["error"]) == ("tiny", 1, None)
            assert row["label"] == served["label"], path
            assert row["score"] == pytest.approx(served["score"], abs=1e-6)
            assert {p["label"]: p["prob"] for p in row["probs"]} == pytest.approx(served["probs"], abs=1e-6)


def test_parquet_dataset_job_matches_onnx_runtime_by_hand(ray_session, trained, settings, tmp_path: Path) -> None:
    from cluster.jobs.batch_infer import BatchJobConfig, run_batch_job

    out = tmp_path / "holdout-results"
    cfg = BatchJobConfig(model="tiny:1", input=str(trained.dataset), split="holdout", out=str(out), batch_size=40)
    summary = run_batch_job(cfg, settings)
    truth = read_split(trained.dataset, "holdout", columns=["id", "image", "label_name"]).to_pylist()
    assert (summary.rows, summary.errors, summary.version) == (len(truth), 0, 1)
    rows = {row["id"]: row for row in _read(out)}
    assert set(rows) == {t["id"] for t in truth}

    model = load_model_dir(Registry(settings.registry_dir).local_dir("tiny", 1), RuntimeOptions(threads=1))
    images = np.stack([load_for_model(t["image"], (32, 32), "stretch")[0] for t in truth])
    probs = model.run(images)[0]
    for t, p in zip(truth, probs):
        row = rows[t["id"]]
        assert row["true_label"] == t["label_name"]
        assert row["label"] == model.card.labels[int(p.argmax())]
        assert row["score"] == pytest.approx(float(p.max()), abs=1e-6)
    accuracy = np.mean([rows[t["id"]]["label"] == t["label_name"] for t in truth])
    by_hand = np.mean([model.card.labels[int(p.argmax())] == t["label_name"] for t, p in zip(truth, probs)])
    assert accuracy == pytest.approx(by_hand)


def _driver_env(settings) -> dict[str, str]:
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "VISIONFLEET_HOME": str(settings.home)}


def test_job_entrypoint_runs_as_a_separate_driver_from_any_directory(
    ray_session, trained, settings, tmp_path: Path
) -> None:
    # A Parquet file in our schema, with one row whose image is corrupt.
    rows = read_split(trained.dataset, "holdout").slice(0, 20).to_pylist()
    rows.append({**rows[0], "id": "corrupt-1", "image": b"\x89PNG\r\n\x1a\nbroken"})
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "data.parquet")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "cluster.jobs.batch_infer", "--model", "tiny@production",
         "--input", str(tmp_path / "data.parquet"),
         "--out", str(tmp_path / "out"), "--batch-size", "8", "--max-actors", "1"],
        capture_output=True, text=True, cwd=elsewhere, env=_driver_env(settings), timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert (summary["rows"], summary["errors"], summary["model"]) == (21, 1, "tiny")
    rows = {row["id"]: row for row in _read(tmp_path / "out")}
    assert rows["corrupt-1"]["error"].startswith("CorruptImage") and rows["corrupt-1"]["true_label"] is not None
    assert sum(1 for row in rows.values() if row["error"] is None) == 20
    assert not list(elsewhere.iterdir())  # nothing was written relative to the driver's cwd


def test_batch_docs_example_runs(ray_session, trained, settings, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "docs/examples/batch_inference.py"),
         "tiny:1", str(trained.dataset), str(tmp_path / "res")],
        capture_output=True, text=True, cwd=REPO, env=_driver_env(settings), timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    n = sum(len(read_split(trained.dataset, s, columns=["id"])) for s in ("train", "holdout"))
    assert f"tiny:1: {n} rows, 0 errors" in r.stdout
    assert "top-1 accuracy" in r.stdout and "candidates for labeling" in r.stdout
