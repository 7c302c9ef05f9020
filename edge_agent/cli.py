"""`visionfleet-edge`: the device-side command (light install: no torch, ray or pyarrow)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="visionfleet-edge",
    help="Run visionfleet models on a device, offline: bundles in, predictions out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(code)


@app.command()
def info(model_dir: Annotated[Path, typer.Argument(help="a model folder: card.json + model file")]) -> None:
    """Print a model folder's card as JSON."""
    from visionfleet.spec import ModelCard

    card_path = model_dir / "card.json"
    if not card_path.is_file():
        _fail(f"no card.json in {model_dir}")
    try:
        card = ModelCard.model_validate_json(card_path.read_text())
    except ValueError as exc:
        _fail(f"invalid card.json: {exc}")
    sys.stdout.write(card.model_dump_json(indent=2) + "\n")


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="a model folder: card.json + model file")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads")] = 1,
    top_k: Annotated[int, typer.Option(help="classes per result")] = 3,
) -> None:
    """Classify images offline with a local model folder; one JSON line per image."""
    from visionfleet.imaging import ImageError, load_for_model
    from visionfleet.inference import RuntimeOptions, classification_result, load_model_dir

    try:
        model = load_model_dir(model_dir, RuntimeOptions(threads=threads))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    failures = 0
    for path in images:
        t0 = time.perf_counter()
        try:
            img, _ = load_for_model(path.read_bytes(), model.card.input_size, model.card.resize)
        except (OSError, ImageError) as exc:
            failures += 1
            sys.stdout.write(json.dumps({"image": str(path), "error": str(exc)}) + "\n")
            continue
        probs = model.run(img[None])[0][0]
        res = classification_result(probs, model.card.labels, top_k)
        res.update(image=str(path), model=model.card.name, version=model.card.version,
                   latency_ms=round((time.perf_counter() - t0) * 1000, 3))
        sys.stdout.write(json.dumps(res) + "\n")
    if failures:
        raise typer.Exit(1)


def main() -> None:
    app()
