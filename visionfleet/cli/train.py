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
    flips: str = "dihedral",
    val_fraction: float = 0.0,
    patience: Optional[int] = None,
    class_weights: Optional[list[float]] = None,
    in_channels: int = 3,
    init_weights: Optional[str] = None,
    plan: Optional[dict] = None,
    serve_sizes: Optional[list[tuple[int, int]]] = None,
    gpu: Optional[bool] = None,
    max_failures: int = 1,
):
    """Train, export, register; returns ``(card, train_result)``. Ray is started if needed.

    ``serve_sizes``: more (height, width) sizes the version also serves at; the ONNX
    graph then keeps H x W dynamic (parity-checked at each) and the card lists them,
    the trained size first. ``gpu``: None takes GPU workers when the cluster has one per
    worker (``$VISIONFLEET_TRAIN_GPU`` = auto|on|off sets the default). Checkpoints and Ray
    Train's run state go to the store area ``runs``; a worker that dies is restarted up to
    ``max_failures`` times from the latest epoch checkpoint.
    """
    import os

    import ray

    from cluster.local import init_embedded, runtime_env
    from train.loop import TrainConfig, fit
    from train.pipeline import register_checkpoint
    from train.scaling import ENV_TRAIN_GPU, parse_gpu_setting
    from visionfleet.datasets.store import load_arrays, local_dataset, read_info, resolve_dataset_ref
    from visionfleet.imaging import ResizeMode
    from visionfleet.registry import Registry
    from visionfleet.spec import validate_name

    s = settings().ensure()
    validate_name(model_name)
    ResizeMode(resize)
    if gpu is None:
        gpu = parse_gpu_setting(os.environ.get(ENV_TRAIN_GPU))
    ref = resolve_dataset_ref(dataset, s)  # a folder, or a dataset on the store (every worker copies it)
    ds = local_dataset(ref, s.cache_dir)  # this node's copy, for the parity images
    read_info(ds)  # clear error before Ray starts
    try:
        depth_t = tuple(int(d) for d in depths.split(","))
    except ValueError:
        raise ValueError(f"Got {depths!r} for --depths; expected comma-separated integers like 1,1,1,1") from None
    cfg = TrainConfig(
        dataset=ref,
        arch={"arch": arch, "width": width, "depths": list(depth_t), "stem_stride": stem_stride,
              **({"in_channels": in_channels} if in_channels != 3 else {})},
        input_size=input_size,
        resize=resize,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        num_workers=workers,
        cpus_per_worker=cpus_per_worker,
        seed=seed,
        wandb=wandb,
        flips=flips,
        val_fraction=val_fraction,
        patience=patience,
        class_weights=tuple(class_weights) if class_weights else None,
        init_weights=init_weights,
        plan=plan,
        gpu=gpu,
        max_failures=max_failures,
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
                info += f"  {doc['metrics'].get('split', 'holdout')} top-1 {doc['metrics']['top1']:.3f}"
            elif "loss" in doc:
                info += f"  loss {doc['loss']:.3f}"
            p.update(task, total=doc.get("total"), completed=doc.get("step", 0), info=info)

        result = fit(cfg, runs_dir=s.runs_dir, wandb_dir=s.home / "wandb", on_progress=on_progress,
                     storage=f"{s.store_uri('runs').rstrip('/')}/_ray")
    m = result.metrics
    early = f", best epoch {m['best_epoch']} of {m['epochs_run']} (validation top-1 {m['val_top1']:.4f})" if "best_epoch" in m else ""
    err.print(f"trained in {result.seconds:.0f}s: holdout top-1 {m['top1']:.4f}, ECE {m['ece']:.4f}{early}")
    size = (input_size, input_size)
    parity, _ = load_arrays(ds, "holdout", size, resize, limit=64)
    card = register_checkpoint(
        result.checkpoint,
        Registry.from_settings(s),
        model_name,
        parity_images=parity,
        run_id=result.run_id,
        description=description,
        steps=[{"op": "train", "run": result.run_id, **({"training": plan} if plan else {})}],
        input_sizes=[size, *[sz for sz in serve_sizes if tuple(sz) != size]] if serve_sizes else None,
    )
    return card, result


def _print_plan(plan) -> None:
    from rich.table import Table

    table = Table("setting", "value", "why", title="training settings", title_justify="left")
    for key, value in plan.values.items():
        table.add_row(key, str(value), plan.why[key])
    err.print(table)


@app.command()
@cli_errors
def train(
    data: Annotated[str, typer.Option(help="dataset name in the state dir, or a dataset folder")] = "synth",
    name: Annotated[str, typer.Option(help="model name to register under")] = "demo",
    arch: Annotated[Optional[str], typer.Option(help="resnet|mobilenetv3|anchorfree (default: resnet; anchorfree for detection data)")] = None,
    width: Annotated[Optional[int], typer.Option(help="channels of the first stage (default: from the data size)")] = None,
    depths: Annotated[Optional[str], typer.Option(help="blocks per stage, e.g. 2,2,2,2 for ResNet-18")] = None,
    stem_stride: Annotated[Optional[int], typer.Option(help="1 (CIFAR-style stem) or 2 (default: from the input size)")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="model input side in pixels (default: from the images)")] = None,
    resize: Annotated[str, typer.Option(help="stretch|letterbox|center-crop")] = "stretch",
    epochs: Annotated[Optional[int], typer.Option(help="most training epochs (default: from the data size)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="global batch size (default: 128, less for small data)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate, warm-up then cosine (default: 0.2 x batch/128)")] = None,
    flips: Annotated[str, typer.Option(help="augmentation flips: auto|off|horizontal|dihedral")] = "auto",
    grayscale: Annotated[Optional[bool], typer.Option("--grayscale/--rgb", help="1-channel model (default: when R = G = B)")] = None,
    balance: Annotated[Optional[bool], typer.Option("--balance/--no-balance", help="class-weighted loss (default: when skewed)")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="share of train held back for early stopping (0: none)")] = None,
    patience: Annotated[Optional[int], typer.Option(help="epochs without a better validation top-1 before stopping")] = None,
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="torch state dict (.pt) of a built-in architecture to start from")] = None,
    input_sizes: Annotated[Optional[str], typer.Option(
        "--input-sizes", help="also serve at these sizes, e.g. 96x96,128x128: the ONNX keeps H x W dynamic "
        "(the trained size stays the default)")] = None,
    report: Annotated[Optional[str], typer.Option("--report", help="write an HTML page: settings, per-class accuracy, confusion matrix")] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers")] = 2,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--no-gpu", help="GPU workers (default: when the cluster has a "
                                                "GPU per worker; $VISIONFLEET_TRAIN_GPU=auto|on|off)")] = None,
    max_failures: Annotated[int, typer.Option(help="worker failures to survive; each restart resumes from the "
                                               "latest epoch checkpoint")] = 1,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs reserved per worker")] = 0.5,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    wandb: Annotated[bool, typer.Option(help="log to W&B (offline unless configured)")] = True,
    address: Annotated[Optional[str], typer.Option(help="Ray address to join (default: embedded local Ray)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the registered card as JSON")] = False,
) -> None:
    """Train a built-in architecture with Ray Train, export it to ONNX and register it.

    Settings left unset adapt to the data (train.auto): input size, model size, batch,
    learning rate, epoch budget with early stopping on a validation split, flips,
    grayscale and class weights. The choices are printed and kept in the card.
    """
    from pathlib import Path

    from train.auto import plan_training
    from visionfleet.datasets.store import local_dataset, resolve_dataset_ref

    s = settings().ensure()
    ref = resolve_dataset_ref(data, s)
    ds = local_dataset(ref, s.cache_dir)  # a dataset on the store is copied to this node's cache once
    from visionfleet.datasets.detect import is_detection_dataset

    serve_sizes = None
    if input_sizes is not None:
        from visionfleet.cli.models import _parse_sizes

        serve_sizes = _parse_sizes(input_sizes)
    if is_detection_dataset(ds) or arch == "anchorfree":  # boxes: the built-in detector (docs/detection.md)
        if serve_sizes:
            raise ValueError(f"Got --input-sizes {input_sizes} for a detector; expected one size (--input-size): "
                             "the detector's decode is exported for its training size")
        from visionfleet.cli._detect import train_detector

        return train_detector(ds, name=name, arch=arch, width=width, input_size=input_size, resize=resize, epochs=epochs,
                              batch_size=batch_size, lr=lr, workers=workers, cpus_per_worker=cpus_per_worker,
                              seed=seed, address=address, as_json=as_json)
    inferred: dict = {}
    if init_from:
        from train.models import infer_arch

        if not Path(init_from).is_file():
            raise FileNotFoundError(f"Got no file at {init_from} for --init-from; expected a torch state dict (.pt)")
        if width is None:  # the file tells the architecture
            inferred = infer_arch(init_from)
    depth_list = [int(d) for d in depths.split(",")] if depths and depths.replace(",", "").isdigit() else None
    if depths and depth_list is None:
        raise ValueError(f"Got {depths!r} for --depths; expected comma-separated integers like 1,1,1,1")
    given = {"arch": arch or inferred.get("arch"), "width": width or inferred.get("width"),
             "depths": depth_list or inferred.get("depths"), "stem_stride": stem_stride, "input_size": input_size,
             "epochs": epochs, "batch_size": batch_size, "lr": lr, "val_fraction": val_fraction, "patience": patience,
             "grayscale": grayscale if grayscale is not None else (inferred["in_channels"] == 1 if inferred else None),
             "balance": balance}
    plan = plan_training(ds, given=given, flips=flips)
    if inferred:
        plan.why.update({k: f"from {Path(init_from).name}" for k in ("arch", "width", "depths") if k in inferred})
    _print_plan(plan)
    v = plan.values
    card, result = run_training(
        dataset=ref,
        model_name=name,
        arch=v["arch"],
        width=v["width"],
        depths=",".join(str(d) for d in v["depths"]),
        stem_stride=v["stem_stride"],
        input_size=v["input_size"],
        resize=resize,
        epochs=v["epochs"],
        batch_size=v["batch_size"],
        lr=v["lr"],
        flips=v["flips"],
        val_fraction=v["val_fraction"],
        patience=v["patience"] if v["val_fraction"] > 0 else None,
        class_weights=plan.data.get("class_weights") if v["balance"] else None,
        in_channels=1 if v["grayscale"] else 3,
        init_weights=init_from,
        plan=plan.to_dict(),
        serve_sizes=serve_sizes,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        seed=seed,
        wandb=wandb,
        address=address,
        gpu=gpu,
        max_failures=max_failures,
    )
    if report:
        from visionfleet.report import write_model_report

        err.print(f"report: {write_model_report(card, Path(report))}")
    if as_json:
        print_json(card.model_dump(mode="json"))
    else:
        out.print(f"registered {card.ref} (holdout top-1 {card.metrics.get('holdout_top1', float('nan')):.4f}) run {result.run_id}")
