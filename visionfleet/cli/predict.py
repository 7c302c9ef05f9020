"""`visionfleet predict`: classify an image through the server, or locally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from visionfleet.cli._common import cli_errors, http_json, out, print_json, settings

app = typer.Typer()

_MEDIA = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "bmp": "image/bmp", "tiff": "image/tiff"}


@app.command()
@cli_errors
def predict(
    image: Annotated[Path, typer.Argument(help="image file (JPEG, PNG, WebP, BMP, TIFF)")],
    url: Annotated[str, typer.Option(help="server base URL")] = "http://127.0.0.1:8000",
    model: Annotated[Optional[str], typer.Option(help="NAME[:VERSION|@ALIAS] (default: the server's)")] = None,
    top_k: Annotated[int, typer.Option(help="classes to show")] = 5,
    local: Annotated[bool, typer.Option(help="run the registered model in-process instead of over HTTP")] = False,
    timeout: Annotated[float, typer.Option(help="HTTP timeout in seconds")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the response as JSON")] = False,
) -> None:
    """Classify one image: POST it to /v1/predict (or run it locally with --local)."""
    import urllib.parse

    from visionfleet.imaging import sniff_format

    if not image.is_file():
        raise FileNotFoundError(f"no such file: {image}")
    data = image.read_bytes()
    if local:
        doc = _local(data, model, top_k)
    else:
        fmt = sniff_format(data)
        ctype = _MEDIA[fmt.value] if fmt else "application/octet-stream"
        query = {"top_k": str(top_k)}
        if model:
            query["model"] = model
        doc = http_json("POST", f"{url.rstrip('/')}/v1/predict?{urllib.parse.urlencode(query)}", data=data,
                        headers={"Content-Type": ctype}, timeout=timeout)
    if as_json:
        print_json(doc)
        return
    out.print(f"[bold]{doc['label']}[/] {doc['score']:.3f}  ({doc['model']}:{doc['version']}, {doc.get('latency_ms', 0):.1f} ms)")
    for label, p in doc.get("probs", {}).items():
        out.print(f"  {label:<16} {p:.3f}")


def _local(data: bytes, model: Optional[str], top_k: int) -> dict:
    import time

    from visionfleet.imaging import preprocess
    from visionfleet.inference import RuntimeOptions, load_model_dir
    from visionfleet.predict import predictions
    from visionfleet.state import open_registry

    s = settings()
    reg = open_registry(s)
    resolved = reg.resolve(model or "demo")
    loaded = load_model_dir(reg.local_dir(resolved.name, resolved.version), RuntimeOptions(threads=2))
    t0 = time.perf_counter()
    img, info = preprocess(data, loaded.card.sizes, loaded.card.resize, max_pixels=s.max_pixels)  # nearest size
    (pred,) = predictions(loaded.card, loaded.run(img[None]), [info], top_k=top_k)
    return {
        "model": resolved.name,
        "version": resolved.version,
        "latency_ms": (time.perf_counter() - t0) * 1000,
        **pred.response(),
    }
