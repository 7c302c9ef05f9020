"""`visionfleet train` on detection data: the built-in anchor-free detector, Ray Train, mAP, registration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from visionfleet.cli._common import err, out, print_json, progress, settings

_DEFAULTS = {"width": 16, "input_size": 128, "epochs": 30, "batch_size": 32, "lr": 3e-3}


def train_detector(
    ds: Path,
    *,
    name: str,
    arch: Optional[str],
    width: Optional[int],
    input_size: Optional[int],
    resize: str,
    epochs: Optional[int],
    batch_size: Optional[int],
    lr: Optional[float],
    workers: int,
    cpus_per_worker: float,
    seed: int,
    address: Optional[str],
    as_json: bool,
) -> None:
    """Train ``anchorfree`` on a detection dataset with Ray Train, export (NMS inside), score the holdout, register."""
    import ray

    from cluster.local import init_embedded, runtime_env
    from train.detect import DetectTrainConfig, fit_detector, register_detector
    from train.detect_models import DETECTION_ARCHS
    from visionfleet.datasets.detect import coco_split, is_detection_dataset
    from visionfleet.imaging import ResizeMode
    from visionfleet.state import open_registry
    from visionfleet.spec import validate_name

    s = settings().ensure()
    validate_name(name)
    ResizeMode(resize)
    if arch is not None and arch not in DETECTION_ARCHS:
        raise ValueError(f"Got --arch {arch} for the detection dataset {ds}; expected one of {list(DETECTION_ARCHS)}")
    if not is_detection_dataset(ds):
        raise ValueError(
            f"Got --arch {arch} and the classification dataset {ds}; expected a detection dataset "
            "(visionfleet data synth --task detection)"
        )
    coco_split(ds, "train")
    cfg = DetectTrainConfig(
        dataset=str(ds),
        arch={"arch": "anchorfree", "width": width or _DEFAULTS["width"], "depths": [1, 1, 1, 1]},
        input_size=input_size or _DEFAULTS["input_size"],
        resize=resize,
        epochs=epochs or _DEFAULTS["epochs"],
        batch_size=batch_size or _DEFAULTS["batch_size"],
        lr=lr or _DEFAULTS["lr"],
        num_workers=workers,
        cpus_per_worker=cpus_per_worker,
        seed=seed,
    )
    if address and not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env(s), log_to_driver=False, logging_level="WARNING")
    else:
        init_embedded(s)
    with progress() as p:
        task = p.add_task("training detector", total=None, info="starting Ray Train workers")

        def on_progress(doc: dict) -> None:
            info = f"epoch {doc.get('epoch')}/{cfg.epochs}"
            if "metrics" in doc:
                info += f"  loss {doc['metrics']['train_loss']:.3f}"
            elif "loss" in doc:
                info += f"  loss {doc['loss']:.3f}"
            p.update(task, total=doc.get("total"), completed=doc.get("step", 0), info=info)

        result = fit_detector(cfg, runs_dir=s.runs_dir, on_progress=on_progress)
        p.add_task("export + holdout mAP", total=None, info="decode + NMS in the graph, pycocotools")
        card = register_detector(result.checkpoint, open_registry(s), name, run_id=result.run_id)
    m = card.metrics
    err.print(f"trained in {result.seconds:.0f}s: holdout mAP@0.5 {m['holdout_map50']:.4f}, "
              f"mAP@0.5:0.95 {m['holdout_map50_95']:.4f} (n={m['holdout_n']})")
    if as_json:
        print_json(card.model_dump(mode="json"))
    else:
        out.print(f"registered {card.ref} (holdout mAP@0.5 {m['holdout_map50']:.4f}, "
                  f"mAP@0.5:0.95 {m['holdout_map50_95']:.4f}) run {result.run_id}")
