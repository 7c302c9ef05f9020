"""Ray Train training of the built-in detector, then export, holdout mAP and registration.

Read it top to bottom, like :mod:`train.loop` (whose plumbing it reuses: the warm-up
cosine schedule, the progress file, ``TorchTrainer``): :func:`detect_loop_per_worker`
is the whole loop (setup, step, report), :func:`fit_detector` runs it on Ray Train and
:func:`register_detector` exports the checkpoint with decode + NMS inside
(:func:`train.detect_export.export_detector`), measures COCO mAP on the holdout with
ONNX Runtime through the one prediction path (:func:`visionfleet.evaluation.evaluate_detector`)
and registers the version with those numbers on its card.

Each worker decodes its shard of the COCO-labeled train split with
``visionfleet.imaging`` (the server's resize), so boxes are mapped exactly as served.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from train.loop import CHECKPOINT_FILE, TrainResult, _write_progress, run_trainer, warmup_cosine

__all__ = ["DetectTrainConfig", "fit_detector", "detect_loop_per_worker", "load_detection_arrays",
           "register_detector", "holdout_map"]

_PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class DetectTrainConfig:
    """One detector training run; built at the edge (CLI, tests) and passed down."""

    dataset: str  # absolute path of a detection dataset folder
    arch: dict = field(default_factory=lambda: {"arch": "anchorfree", "width": 16, "depths": [1, 1, 1, 1]})
    input_size: int = 128
    resize: str = "letterbox"
    epochs: int = 30
    batch_size: int = 32  # global, split across workers
    lr: float = 3e-3  # AdamW peak
    weight_decay: float = 5e-4
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    threads_per_worker: int = 1
    seed: int = 0
    augment: bool = True
    limit_train: int | None = None
    run_name: str | None = None
    max_failures: int = 1  # worker failures survived (the detector restarts its fit from the start)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"Got {self.epochs} for epochs; expected >= 1")
        if self.max_failures < 0:
            raise ValueError(f"Got {self.max_failures} for max_failures; expected >= 0")
        if self.num_workers < 1 or self.batch_size < self.num_workers:
            raise ValueError(
                f"Got batch_size {self.batch_size} and {self.num_workers} workers; expected workers >= 1 and "
                "batch_size >= workers"
            )
        if not 32 <= self.input_size <= 1024 or self.input_size % 16:
            raise ValueError(f"Got {self.input_size} for input_size; expected a multiple of 16 in 32..1024")
        if self.lr <= 0:
            raise ValueError(f"Got {self.lr} for lr; expected > 0")


def load_detection_arrays(
    dataset: str | os.PathLike[str], split: str, size: tuple[int, int], resize: str, *,
    shard: tuple[int, int] | None = None, limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a split into images ``uint8 [N, H, W, 3]``, boxes ``[N, M, 4]`` (model pixels) and classes ``[N, M]``.

    Boxes are padded with class -1; categories are mapped to label indices by name.
    """
    from visionfleet.datasets.detect import coco_split
    from visionfleet.datasets.store import read_info
    from visionfleet.imaging import load_for_model

    labels = read_info(Path(dataset)).labels
    split_ = coco_split(dataset, split)
    cat_to_label = {cid: labels.index(name) for name, cid in split_.categories.items() if name in labels}
    by_image = split_.boxes_by_image()
    images = split_.doc["images"][:limit] if limit else split_.doc["images"]
    if shard is not None:
        images = images[shard[0] :: shard[1]]
    xs, bs, cs = [], [], []
    for im in images:
        x, info = load_for_model(split_.image_path(im).read_bytes(), size, resize)
        b, c = by_image.get(int(im["id"]), (np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
        b = b.copy()
        b[:, [0, 2]] = b[:, [0, 2]] * info.scale_x - info.offset_x
        b[:, [1, 3]] = b[:, [1, 3]] * info.scale_y - info.offset_y
        keep = np.array([int(ci) in cat_to_label for ci in c], bool)
        xs.append(x)
        bs.append(b[keep])
        cs.append(np.array([cat_to_label[int(ci)] for ci in c[keep]], np.int64))
    m = max([1, *(len(c) for c in cs)])
    boxes = np.zeros((len(xs), m, 4), np.float32)
    classes = np.full((len(xs), m), -1, np.int64)
    for i, (b, c) in enumerate(zip(bs, cs)):
        boxes[i, : len(c)] = b
        classes[i, : len(c)] = c
    out = np.stack(xs) if xs else np.zeros((0, size[0], size[1], 3), np.uint8)
    return out, boxes, classes


def _augment(xb, boxes, size: int):
    """Horizontal and vertical flips and transposes (the 8 dihedral turns), boxes moved along."""
    import torch

    n = xb.shape[0]
    boxes = boxes.clone()
    f = torch.rand(n) < 0.5
    xb = torch.where(f[:, None, None, None], xb.flip(3), xb)
    boxes[f] = torch.stack([size - boxes[f][..., 2], boxes[f][..., 1], size - boxes[f][..., 0], boxes[f][..., 3]], -1)
    f = torch.rand(n) < 0.5
    xb = torch.where(f[:, None, None, None], xb.flip(2), xb)
    boxes[f] = torch.stack([boxes[f][..., 0], size - boxes[f][..., 3], boxes[f][..., 2], size - boxes[f][..., 1]], -1)
    if torch.rand(()) < 0.5:
        xb = xb.transpose(2, 3)
        boxes = boxes[..., [1, 0, 3, 2]]
    return xb, boxes


# ------------------------------------------------------------------------ the loop


def detect_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import torch
    import torch.distributed as dist
    import ray.train
    import ray.train.torch

    from train.checkpoint import save_checkpoint
    from train.detect_models import detection_loss, grid_points
    from train.models import ArchSpec, build_model
    from visionfleet.datasets.store import read_info

    cfg = DetectTrainConfig(**config["train"])
    torch.set_num_threads(cfg.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed + rank)

    # --- data: each worker decodes its own shard
    size = (cfg.input_size, cfg.input_size)
    labels = read_info(Path(cfg.dataset)).labels
    x, b, c = load_detection_arrays(cfg.dataset, "train", size, cfg.resize, shard=(rank, world), limit=cfg.limit_train)
    x_train = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    b_train, c_train = torch.from_numpy(b), torch.from_numpy(c)
    points = grid_points(*size)

    # --- model
    spec = ArchSpec.from_dict({**cfg.arch, "num_classes": len(labels)})
    model = build_model(spec)
    stats = torch.stack([x_train.float().mean((0, 2, 3)), x_train.float().pow(2).mean((0, 2, 3))])
    if world > 1:
        dist.all_reduce(stats)
        stats /= world
    mean = stats[0].view(1, 3, 1, 1)
    std = (stats[1].view(1, 3, 1, 1) - mean**2).clamp_min(1.0).sqrt()
    model = ray.train.torch.prepare_model(model)

    local_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, len(x_train) // local_batch)
    if world > 1:  # every rank must run the same number of steps (DDP all-reduce)
        t = torch.tensor([steps_per_epoch])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        steps_per_epoch = int(t.item())
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warmup_frac=0.1, start=0.1))

    progress_path = Path(config["progress_path"])
    step = 0
    t0 = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        sums = {"loss": 0.0, "cls": 0.0, "box": 0.0, "ctr": 0.0}
        for i in range(steps_per_epoch):
            idx = perm[i * local_batch : (i + 1) * local_batch]
            xb, bb = x_train[idx].float(), b_train[idx]
            if cfg.augment:
                xb, bb = _augment(xb, bb, cfg.input_size)
            loss, parts = detection_loss(model((xb - mean) / std), points, bb, c_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            sums["loss"] += float(loss.detach())
            for k in ("cls", "box", "ctr"):
                sums[k] += parts[k]
            step += 1
            if rank == 0 and (step % 5 == 0 or step == total):
                _write_progress(progress_path, {"step": step, "total": total, "epoch": epoch + 1, "loss": float(loss)})
        metrics: dict[str, Any] = {f"train_{k}": v / steps_per_epoch for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, step=step, seconds=time.time() - t0, n_train=int(len(x_train)) * world)
        if rank == 0:
            _write_progress(progress_path, {"step": step, "total": total, "epoch": epoch + 1, "metrics": metrics})
        if epoch < cfg.epochs - 1:
            continue  # progress goes through the progress file; one report (a sync of all workers) at the end
        checkpoint = None
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="vf-ckpt-")
            raw = model.module if hasattr(model, "module") else model
            save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), raw, {
                "task": "detection",
                "arch": spec.to_dict(),
                "labels": labels,
                "input_size": [cfg.input_size, cfg.input_size],
                "resize": cfg.resize,
                "mean": mean.flatten().tolist(),
                "std": std.flatten().tolist(),
                "metrics": json.dumps(metrics),
                "dataset": cfg.dataset,
            })
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


# --------------------------------------------------------------------------- driver


def fit_detector(
    cfg: DetectTrainConfig, *, runs_dir: Path, on_progress: Callable[[dict], None] | None = None,
    storage: str | None = None,
) -> TrainResult:
    """Run :func:`detect_loop_per_worker` on a ``TorchTrainer``; Ray must be initialized.

    ``storage``: Ray Train's checkpoints and run state (default ``runs_dir/_ray``). The
    detector trains on CPU workers and reports once, at the end: a worker that dies
    restarts the fit from the start (up to ``max_failures`` times).
    """
    from visionfleet.datasets.detect import coco_split

    coco_split(cfg.dataset, "train")  # fail fast, before any worker starts
    run_id = cfg.run_name or f"detect-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = Path(runs_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    progress_path = run_dir / _PROGRESS_FILE
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    dest, metrics, seconds = run_trainer(
        detect_loop_per_worker,
        {"train": asdict(cfg), "run_id": run_id, "progress_path": str(progress_path)},
        num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, run_id=run_id, run_dir=run_dir,
        storage=storage or str(Path(runs_dir) / "_ray"), progress_path=progress_path, on_progress=on_progress,
        thread_name="vf-detect-fit", gpu=False, max_failures=cfg.max_failures,  # its loop keeps tensors on the CPU
    )
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(run_id=run_id, run_dir=run_dir, checkpoint=dest, metrics=metrics, seconds=seconds)


# ----------------------------------------------------------------- export, mAP, register


def holdout_map(model_path: str | os.PathLike[str], card, dataset: str | os.PathLike[str], *, threads: int = 2,
                limit: int | None = None, split: str = "holdout") -> dict[str, Any]:
    """COCO mAP of an ONNX detector file on a dataset split, run with ONNX Runtime (card gives labels and resize)."""
    from visionfleet.datasets.detect import coco_split
    from visionfleet.evaluation import evaluate_detector
    from visionfleet.inference import RuntimeOptions, create_session
    from visionfleet.names import DETECTION_OUTPUTS, INPUT_NAME

    sess = create_session(Path(model_path), RuntimeOptions(threads=threads, providers=("CPUExecutionProvider",)))
    m = evaluate_detector(lambda x: sess.run(list(DETECTION_OUTPUTS), {INPUT_NAME: x}), card,
                          coco_split(dataset, split), limit=limit)
    return m.to_dict()


def register_detector(
    checkpoint: str | Path,
    registry,
    name: str,
    *,
    run_id: str | None = None,
    options=None,
    holdout_limit: int | None = None,
    description: str = "",
    set_production_if_none: bool = True,
):
    """Export ``model.pt`` (decode + NMS inside, parity-checked), measure holdout mAP, register both files.

    Returns the stored card (``metrics``: ``holdout_map50``, ``holdout_map50_95``, ...).
    """
    from train.checkpoint import load_checkpoint
    from train.detect_export import PostprocessOptions, export_detector
    from visionfleet.spec import Lineage, ModelCard, Task

    options = options or PostprocessOptions()
    model, meta = load_checkpoint(checkpoint)
    size = tuple(int(v) for v in meta["input_size"])
    labels = list(meta["labels"])
    dataset = str(meta["dataset"])
    parity, _, _ = load_detection_arrays(dataset, "holdout", size, meta["resize"], limit=16)
    card = ModelCard(
        name=name, task=Task.DETECTION, labels=labels, input_size=size, resize=meta["resize"],  # type: ignore[arg-type]
        model_file="model.onnx", format="onnx", precision="fp32", framework="pytorch", arch=dict(meta["arch"]),
        preprocessing={
            "mean": list(meta["mean"]), "std": list(meta["std"]), "scale": "0-255", "layout": "NHWC",
            "channel_order": "RGB", "dtype": "uint8", "folded_into_graph": True,
            "postprocessing": {"decode": "fcos-ltrb", "nms": "onnx NonMaxSuppression, per class", **options.to_dict()},
        },
        lineage=Lineage(dataset=dataset, run=run_id, steps=[{"op": "train", "run": run_id, "task": "detection"}]),
        description=description,
    )
    with tempfile.TemporaryDirectory(prefix="vf-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        report = export_detector(
            model, onnx_path, input_size=size, mean=meta["mean"], std=meta["std"], labels=labels,  # type: ignore[arg-type]
            metadata={"task": Task.DETECTION.value, "resize": meta["resize"], "model_name": name,
                      "framework": "pytorch", "arch": meta["arch"]},
            options=options, parity_images=parity,
        )
        m = holdout_map(onnx_path, card, dataset, limit=holdout_limit)
        trained = json.loads(meta.get("metrics", "{}"))
        card.metrics = {
            "holdout_map50": m["map50"], "holdout_map50_95": m["map50_95"], "holdout_map75": m["map75"],
            "holdout_n": m["images"], "holdout_boxes": m["gt_boxes"], "per_class_ap50": m["per_class_ap50"],
            "evaluator": m["evaluator"], "train_loss": trained.get("train_loss"), "export_parity": report,
        }
        torch_path = Path(tmp) / "model.pt"
        torch_path.write_bytes(Path(checkpoint).read_bytes())
        return registry.register(card, {"onnx": onnx_path, "torch": torch_path},
                                 set_production_if_none=set_production_if_none)
