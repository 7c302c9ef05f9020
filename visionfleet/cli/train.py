"""`visionfleet train`: fit a built-in architecture with Ray Train and register it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, progress, settings

app = typer.Typer()


def run_training(
    *,
    dataset: str,
    model_name: str,
    arch: str,
    width: int,
    depths: str,
    stem_stride: int,
    input_size: int,
    resize: str,
    epochs: int,
    batch_size: int,
    lr: float,
    workers: int,
    cpus_per_worker: float,
    seed: int,
    wandb: bool,
    address: Optional[str],
    description: str = "",
):
    """Train, export, register; returns ``(card, train_result)``. Ray is started if needed."""
    import ray

    from cluster.local import init_embedded, runtime_env
    from train.loop import TrainConfig, fit
    from train.pipeline import register_checkpoint
    from visionfleet.datasets.store import load_arrays, read_info, resolve_dataset
    from visionfleet.imaging import ResizeMode
    from visionfleet.registry import Registry
    from visionfleet.spec import validate_name

    s = settings().ensure()
    validate_name(model_name)
    ResizeMode(resize)
    ds = resolve_dataset(dataset, s.datasets_dir)
    read_info(ds)  # clear error before Ray starts
    try:
        depth_t = tuple(int(d) for d in depths.split(","))
    except ValueError:
        raise ValueError(f"Got {depths!r} for --depths; expected comma-separated integers like 1,1,1,1") from None
    cfg = TrainConfig(
        dataset=str(ds),
        arch={"arch": arch, "width": width, "depths": list(depth_t), "stem_stride": stem_stride},
        input_size=input_size,
        resize=resize,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        num_workers=workers,
        cpus_per_worker=cpus_per_worker,
        seed=seed,
        wandb=wandb,
    )
    from train.models import ArchSpec

    ArchSpec.from_dict({**cfg.arch, "num_classes": 2})  # validate the architecture now
    if address and not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env(s), log_to_driver=False, logging_level="WARNING")
    else:
        init_embedded(s)
    with progress() as p:
        task = p.add_task("training", total=None, info="starting Ray Train workers")

        def on_progress(doc: dict) -> None:
            info = f"epoch {doc.get('epoch')}/{epochs}"
            if "metrics" in doc:
                info += f"  holdout top-1 {doc['metrics']['top1']:.3f}"
            elif "loss" in doc:
                info += f"  loss {doc['loss']:.3f}"
            p.update(task, total=doc.get("total"), completed=doc.get("step", 0), info=info)

        result = fit(cfg, runs_dir=s.runs_dir, wandb_dir=s.home / "wandb", on_progress=on_progress)
    err.print(f"trained in {result.seconds:.0f}s: holdout top-1 {result.metrics['top1']:.4f}, ECE {result.metrics['ece']:.4f}")
    size = (input_size, input_size)
    parity, _ = load_arrays(ds, "holdout", size, resize, limit=64)
    card = register_checkpoint(
        result.checkpoint,
        Registry(s.registry_dir),
        model_name,
        parity_images=parity,
        run_id=result.run_id,
        description=description,
    )
    return card, result


@app.command()
@cli_errors
def train(
    data: Annotated[str, typer.Option(help="dataset name in the state dir, or a dataset folder")] = "synth",
    name: Annotated[str, typer.Option(help="model name to register under")] = "demo",
    arch: Annotated[str, typer.Option(help="resnet|mobilenetv3")] = "resnet",
    width: Annotated[int, typer.Option(help="channels of the first stage")] = 16,
    depths: Annotated[str, typer.Option(help="blocks per stage, e.g. 2,2,2,2 for ResNet-18")] = "1,1,1,1",
    stem_stride: Annotated[int, typer.Option(help="1 (CIFAR-style stem) or 2")] = 2,
    input_size: Annotated[int, typer.Option(help="model input side in pixels")] = 64,
    resize: Annotated[str, typer.Option(help="stretch|letterbox|center-crop")] = "stretch",
    epochs: Annotated[int, typer.Option(help="training epochs")] = 12,
    batch_size: Annotated[int, typer.Option(help="global batch size")] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate (one-cycle)")] = 0.2,
    workers: Annotated[int, typer.Option(help="Ray Train workers")] = 2,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs reserved per worker")] = 0.5,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    wandb: Annotated[bool, typer.Option(help="log to W&B (offline unless configured)")] = True,
    address: Annotated[Optional[str], typer.Option(help="Ray address to join (default: embedded local Ray)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the registered card as JSON")] = False,
) -> None:
    """Train a built-in architecture with Ray Train, export it to ONNX and register it."""
    card, result = run_training(
        dataset=data,
        model_name=name,
        arch=arch,
        width=width,
        depths=depths,
        stem_stride=stem_stride,
        input_size=input_size,
        resize=resize,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        seed=seed,
        wandb=wandb,
        address=address,
    )
    if as_json:
        print_json(card.model_dump(mode="json"))
    else:
        out.print(f"registered {card.ref} (holdout top-1 {card.metrics.get('holdout_top1', float('nan')):.4f}) run {result.run_id}")
