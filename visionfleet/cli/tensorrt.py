"""`visionfleet tensorrt`: what this machine offers for TensorRT, and engine builds.

Engines are built here, on the GPU that will run them, from a registered ONNX version;
an engine file is never accepted from outside. Without TensorRT or a CUDA device the
build says so and exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, settings

app = typer.Typer(
    help="TensorRT engines for NVIDIA GPU servers and Jetson (needs TensorRT and a CUDA device).",
    no_args_is_help=True,
)


@app.command()
@cli_errors
def info(as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """Show TensorRT, torch-tensorrt, CUDA devices and ONNX Runtime providers found here."""
    from edge_export.tensorrt import detect

    av = detect()
    doc = av.to_dict()
    doc["builder_problem"] = av.problem(need="tensorrt")
    if as_json:
        print_json(doc)
        return
    out.print(f"TensorRT: {av.tensorrt or 'not installed'}")
    out.print(f"torch-tensorrt: {av.torch_tensorrt or 'not installed'}")
    out.print(f"CUDA devices: {', '.join(av.cuda_devices) or 'none'}")
    out.print(f"ONNX Runtime providers: {', '.join(av.ort_providers) or 'onnxruntime not installed'}")
    out.print(f"Jetson: {'yes' if av.jetson else 'no'} ({av.machine})")
    out.print(f"engine builds: {'ready' if doc['builder_problem'] is None else doc['builder_problem']}")


def _dataset_images(card, split: str, limit: int):
    from visionfleet.datasets.store import load_arrays, resolve_dataset

    if not card.lineage.dataset:
        return None
    path = resolve_dataset(card.lineage.dataset, settings().datasets_dir)
    if not path.is_dir():
        return None
    images, _ = load_arrays(path, split, tuple(card.input_size), card.resize, limit=limit)
    return images if len(images) else None


@app.command()
@cli_errors
def build(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION (or NAME@ALIAS) of an ONNX version")],
    precision: Annotated[str, typer.Option(help="fp16 | int8 | fp32")] = "fp16",
    target: Annotated[str, typer.Option(help="x86-gpu | jetson (built on the Jetson itself)")] = "x86-gpu",
    min_batch: Annotated[Optional[int], typer.Option("--min-batch", help="smallest batch (default per target)")] = None,
    opt_batch: Annotated[
        Optional[int], typer.Option("--opt-batch", help="batch the engine is tuned for (default per target)")
    ] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="largest batch (default per target)")] = None,
    workspace_gb: Annotated[
        Optional[float], typer.Option("--workspace-gb", help="builder workspace in GiB (default per target)")
    ] = None,
    calibration: Annotated[
        int, typer.Option(help="int8 without Q/DQ: this many images from the model's dataset (train split)")
    ] = 0,
    calibration_images: Annotated[
        Optional[Path], typer.Option("--calibration-images", help="int8: a folder of images instead of the dataset")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the new card and build report as JSON")] = False,
) -> None:
    """Build a TensorRT engine (.plan) from a registered ONNX version and register it as a new version.

    The engine is checked against ONNX Runtime on real images before it is registered.
    Exits 1 with the reason when TensorRT or a CUDA device is missing. See docs/gpu.md.
    """
    from edge_export.importer import load_sample_images, sample_images
    from edge_export.tensorrt import build_registered_engine, engine_profile, require_tensorrt
    from visionfleet.state import open_registry
    from visionfleet.targets import Precision, Target, profile

    try:
        prec = Precision(precision)
    except ValueError:
        raise ValueError(f"Got {precision!r} for --precision; expected fp16, int8 or fp32") from None
    engine_profile(target)  # "Got 'mars' for --target; expected one of jetson, x86-gpu"
    tgt = Target(target)
    if calibration < 0:
        raise ValueError(f"Got {calibration} for --calibration; expected >= 0")
    if (calibration or calibration_images) and prec is not Precision.INT8:
        raise ValueError(f"Got calibration images for --precision {prec.value}; expected them only with int8")
    if calibration and calibration_images:
        raise ValueError("Got both --calibration and --calibration-images; expected one")
    if workspace_gb is not None and workspace_gb <= 0:
        raise ValueError(f"Got {workspace_gb} for --workspace-gb; expected > 0")
    s = settings().ensure()
    registry = open_registry(s)
    card = registry.card_for(ref)  # unknown model or version: a clear error before anything heavy
    if card.format != "onnx":
        raise ValueError(f"Got {card.ref} in format {card.format!r}; expected an ONNX version to build from")
    av = require_tensorrt("tensorrt")  # exits 1 here when TensorRT or a CUDA device is missing
    calib = None
    if calibration_images is not None:
        calib = load_sample_images(calibration_images, tuple(card.input_size), card.resize, limit=100_000)
    elif calibration:
        calib = _dataset_images(card, "train", calibration)
        if calib is None:
            raise ValueError(
                f"Got --calibration {calibration}, but {card.ref} has no dataset in its lineage; expected "
                "--calibration-images DIR (never random noise)"
            )
    check = _dataset_images(card, "holdout", 256)
    if check is None:
        check = sample_images(tuple(card.input_size), card.resize, n=64)
    err.print(f"building a {prec.value} engine for {card.ref} on {av.cuda_devices[0]} ({profile(tgt).description})…")
    stored, report, parity = build_registered_engine(
        registry,
        card.ref,
        prec,
        tgt,
        images=check,
        calibration_images=calib,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_bytes=int(workspace_gb * (1 << 30)) if workspace_gb else None,
        cache_dir=s.home / "tensorrt-cache",
        availability=av,
    )
    if as_json:
        print_json({"card": stored.model_dump(mode="json"), "build": report.to_dict(), "parity": parity})
        return
    out.print(
        f"registered [bold]{stored.ref}[/]: {report.precision} engine, {report.bytes / 1e6:.1f} MB, TensorRT "
        f"{report.tensorrt} on {report.device}, built in {report.seconds:.0f} s; agreement with ONNX Runtime "
        f"{parity['agreement']:.2%} on {parity['n']} images"
    )
