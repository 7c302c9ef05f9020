"""`visionfleet optimize`: prune, fine-tune, quantize a registered model and register the result."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, progress, settings

app = typer.Typer()


@app.command()
@cli_errors
def optimize(
    ref: Annotated[str, typer.Argument(help="parent model NAME[:VERSION|@ALIAS]")],
    quantize: Annotated[str, typer.Option(help="none|fp16|int8-dynamic|int8-static")] = "none",
    engine: Annotated[Optional[str], typer.Option(help="nncf|ort, for int8-static (default nncf)")] = None,
    calibration: Annotated[int, typer.Option(help="calibration images for int8-static (from the model's dataset)")] = 300,
    calibration_method: Annotated[
        Optional[str], typer.Option(help="minmax|entropy|percentile (int8-static with --engine ort)")
    ] = None,
    per_channel: Annotated[
        Optional[bool], typer.Option("--per-channel/--no-per-channel", help="per-channel weight scales (int8)")
    ] = None,
    max_drop: Annotated[
        Optional[float], typer.Option(help="NNCF accuracy control: largest top-1 (detectors: mAP@0.5) drop allowed, in points")
    ] = None,
    validation_images: Annotated[
        int, typer.Option(help="--max-drop: train images (after the calibration ones) the drop is measured on")
    ] = 1000,
    prune: Annotated[float, typer.Option(help="share of MACs to remove by channel pruning (0.5 = half)")] = 0.0,
    finetune_epochs: Annotated[
        Optional[int], typer.Option(help="fine-tune epochs after pruning (default 3 when pruning)")
    ] = None,
    finetune_lr: Annotated[float, typer.Option(help="fine-tune peak learning rate")] = 0.02,
    finetune_limit: Annotated[Optional[int], typer.Option(help="fine-tune on the first N training images")] = None,
    round_to: Annotated[int, typer.Option(help="pruned channel counts are multiples of this (1: any)")] = 8,
    target: Annotated[
        Optional[str], typer.Option(help="x86-cpu|arm64-cpu|android|ios|jetson|x86-gpu: threads and budgets to check")
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="measurement threads (default: the target's, else 2)")] = None,
    data: Annotated[
        Optional[str], typer.Option(help="dataset for calibration/fine-tune/holdout (default: the card's lineage)")
    ] = None,
    holdout_limit: Annotated[Optional[int], typer.Option(help="measure accuracy on the first N holdout images")] = None,
    rounds: Annotated[int, typer.Option(help="alternating Offline rounds against the parent")] = 5,
    force: Annotated[bool, typer.Option(help="register a new version even if this variant exists")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result (card, budgets) as JSON")] = False,
) -> None:
    """Build a compressed variant of a registered model, measure it beside its parent, register it.

    The new version's card records its lineage (the parent and every setting) and the
    measured holdout top-1, size, MACs, latency, throughput and peak memory. The same
    parent with the same settings is built once (cached) and registered once.
    """
    from edge_export.optimize import OptimizeSettings
    from edge_export.optimize import optimize as run_optimize
    from edge_export.quantize import QuantizeConfig
    from train.finetune import prune_tools
    from visionfleet.state import open_registry

    s = settings().ensure()
    cfg = OptimizeSettings(
        quantize=QuantizeConfig(
            mode=_choice(quantize, "--quantize", ("none", "fp16", "int8-dynamic", "int8-static")),
            engine=_choice(engine, "--engine", ("nncf", "ort")) if engine else None,
            calibration=calibration,
            method=_choice(calibration_method, "--calibration-method", ("minmax", "entropy", "percentile"))
            if calibration_method
            else None,
            per_channel=per_channel,
            max_drop_pt=max_drop,
        ),
        prune=prune,
        finetune_epochs=finetune_epochs,
        finetune_lr=finetune_lr,
        finetune_limit=finetune_limit,
        round_to=round_to,
        target=_target(target),
        threads=threads,
        dataset=data,
        holdout_limit=holdout_limit,
        validation_images=validation_images,
        compare_rounds=rounds,
    )
    with progress() as p:
        tasks: dict[str, Any] = {}

        def on_event(stage: str, done: int | None, total: int | None, info: str) -> None:
            if stage not in tasks:
                tasks[stage] = p.add_task(stage, total=total, info=info)
            p.update(tasks[stage], completed=done or 0, total=total, info=info)
            if total is None:
                p.update(tasks[stage], total=1, completed=1)

        result = run_optimize(
            ref,
            cfg,
            registry=open_registry(s),
            cache_dir=s.home / "cache" / "variants",
            datasets_dir=s.datasets_dir,
            tools=prune_tools(),  # edge_export never imports train: the built-in architectures come from here
            force=force,
            on_event=on_event,
        )
    if as_json:
        print_json(result.to_dict())
    else:
        _print(result)
    for b in result.budgets_exceeded:
        err.print(f"[bold yellow]budget exceeded[/] ({result.target}): {b.message()}")


def _choice(value: str | None, flag: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"Got {value!r} for {flag}; expected one of {', '.join(allowed)}")
    return value


def _target(value: str | None):
    if value is None:
        return None
    from visionfleet.targets import profile

    return profile(value).target


def _print(result) -> None:
    from rich.table import Table

    card = result.card
    m = card.metrics
    head = "already registered as" if result.reused else "registered"
    out.print(f"{head} [bold]{card.ref}[/] ({card.precision}, {card.model_file}) from {card.lineage.parent}")
    t = Table("metric", "variant", "parent", show_header=True)
    if "holdout_map50" in m:  # a detector: COCO mAP on the holdout (pycocotools)
        t.add_row(f"holdout mAP@0.5 (n={m['holdout_n']})", f"{m['holdout_map50']:.4f}", f"{m['parent_holdout_map50']:.4f}")
        t.add_row("mAP@0.5 drop (points)", f"{m['map50_drop_pt']:+.2f}", "")
        t.add_row("holdout mAP@0.5:0.95", f"{m['holdout_map50_95']:.4f}", f"{m['parent_holdout_map50_95']:.4f}")
        t.add_row("mAP@0.5:0.95 drop (points)", f"{m['map50_95_drop_pt']:+.2f}", "")
    else:
        t.add_row("holdout top-1", f"{m['holdout_top1']:.4f}", f"{m['parent_holdout_top1']:.4f}")
        t.add_row("top-1 drop (points)", f"{m['top1_drop_pt']:+.2f}", "")
    t.add_row("file size (MB)", f"{m['size_mb']:.2f}", f"{m['parent_size_mb']:.2f}")
    t.add_row("MACs / image (M)", f"{m['macs_per_image'] / 1e6:.1f}", f"{m['parent_macs_per_image'] / 1e6:.1f}")
    t.add_row(
        f"Offline batch 8 (img/s, {m['threads']} threads)",
        f"{m['offline_b8_images_per_s']:.1f}",
        f"{m['parent_offline_b8_images_per_s']:.1f}",
    )
    sp = m["speedup_offline_b8"]
    t.add_row("speed-up (median, min–max)", f"{sp['median']:.2f}x ({sp['min']:.2f}–{sp['max']:.2f})", "")
    t.add_row("latency batch 1 p50 / p95 (ms)", f"{m['latency_b1_p50_ms']:.2f} / {m['latency_b1_p95_ms']:.2f}", "")
    if "peak_memory_mb" in m:
        t.add_row("peak memory (MB)", f"{m['peak_memory_mb']:.1f}", "")
    out.print(t, width=None if out.is_terminal else 150)
    where = m.get("measured_on", {})
    out.print(f"measured on {where.get('cpu')} ({where.get('cores')} cores), {where.get('date')}")
    if result.budgets:
        out.print(f"target {result.target}: budgets checked against numbers measured on this host")
    for b in result.budgets:
        out.print(("  " if b.ok is not False else "! ") + b.message())
    if result.target == "jetson":
        out.print("jetson: the TensorRT engine is built on the device from this ONNX file (see docs/gpu.md)")
    if card.file("ort") is not None:
        out.print(f"ONNX Runtime mobile format: {card.file('ort').name}")
