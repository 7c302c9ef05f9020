"""Ray Train training: data-parallel fit of a built-in architecture on a Parquet dataset.

Read it top to bottom: :func:`train_loop_per_worker` is the whole loop (setup, step,
evaluate, report); :func:`fit` wires it into a ``TorchTrainer`` and shows progress.
Each worker decodes its shard of the Parquet dataset with ``visionfleet.imaging``, the
same code the server uses, so training and serving see identical pixels.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["TrainConfig", "TrainResult", "fit", "train_loop_per_worker", "evaluate_arrays"]

CHECKPOINT_FILE = "model.pt"
_PROGRESS_FILE = "progress.json"
# Rank 0 appends one line per finished epoch: {"epoch", "resumed_from", "pid", "at", "checkpoint"}.
EPOCHS_LOG = "epochs.jsonl"
# An epoch-end resume point (epoch, model, optimizer, schedule, early-stopping state); the
# final checkpoint holds model.pt instead.
_RESUME_FILE = "resume.pt"


@dataclass(frozen=True)
class TrainConfig:
    """One training run; built at the edge (CLI, controller) and passed down."""

    dataset: str  # absolute path of a dataset folder
    arch: dict = field(default_factory=lambda: {"arch": "resnet", "width": 16, "stem_stride": 2})
    input_size: int = 64
    resize: str = "stretch"
    epochs: int = 12
    batch_size: int = 128  # global batch, split across workers
    lr: float = 0.2
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    threads_per_worker: int = 1
    seed: int = 0
    augment: bool = True
    init_checkpoint: str | None = None  # a model.pt to fine-tune from
    init_weights: str | None = None  # a torch state dict of the same built-in architecture to start from
    val_fraction: float = 0.0  # > 0: hold back this share of train (stratified) for early stopping
    patience: int | None = None  # stop after this many epochs without a better validation top-1
    flips: str = "dihedral"  # augmentation flips: off | horizontal | dihedral (all 8 flips and turns)
    class_weights: tuple[float, ...] | None = None  # per-class loss weights (class imbalance)
    plan: dict | None = None  # what train.auto chose and why, kept in the checkpoint and the card
    extra_datasets: tuple[str, ...] = ()  # more datasets whose train split joins the base
    extra_repeat: int = 1  # repeat the extra datasets' images this many times (new data is scarce)
    limit_train: int | None = None
    wandb: bool = True
    wandb_project: str = "visionfleet"
    wandb_group: str | None = None
    run_name: str | None = None
    gpu: bool | None = None  # None: GPU workers when the cluster has a GPU for each (train.scaling)
    max_failures: int = 1  # worker failures survived; each restart resumes from the latest epoch checkpoint
    checkpoint_every: int = 1  # epochs between resume checkpoints (to the run's storage_path)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"Got {self.epochs} for epochs; expected >= 1")
        if self.max_failures < 0:
            raise ValueError(f"Got {self.max_failures} for max_failures; expected >= 0")
        if self.checkpoint_every < 1:
            raise ValueError(f"Got {self.checkpoint_every} for checkpoint_every; expected >= 1")
        if self.batch_size < self.num_workers:
            raise ValueError(f"Got batch_size {self.batch_size} < num_workers {self.num_workers}")
        if self.num_workers < 1:
            raise ValueError(f"Got {self.num_workers} for num_workers; expected >= 1")
        if not 16 <= self.input_size <= 1024:
            raise ValueError(f"Got {self.input_size} for input_size; expected 16..1024")
        if self.lr <= 0:
            raise ValueError(f"Got {self.lr} for lr; expected > 0")
        if self.extra_repeat < 1:
            raise ValueError(f"Got {self.extra_repeat} for extra_repeat; expected >= 1")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ValueError(f"Got {self.val_fraction} for val_fraction; expected 0 <= f < 0.5")
        if self.flips not in ("off", "horizontal", "dihedral"):
            raise ValueError(f"Got {self.flips!r} for flips; expected off, horizontal or dihedral")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"Got {self.patience} for patience; expected >= 1 or unset")
        if self.init_checkpoint and self.init_weights:
            raise ValueError("Got both init_checkpoint and init_weights; expected at most one starting point")


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    checkpoint: Path  # the model.pt file
    metrics: dict[str, Any]
    seconds: float


# ----------------------------------------------------------------------------- helpers


def evaluate_arrays(probs: np.ndarray, labels: np.ndarray, num_classes: int, bins: int = 15) -> dict[str, Any]:
    """Top-1, per-class accuracy and expected calibration error from probabilities."""
    pred = probs.argmax(1)
    conf = probs.max(1)
    correct = pred == labels
    per_class = {}
    for c in range(num_classes):
        m = labels == c
        per_class[c] = float(correct[m].mean()) if m.any() else float("nan")
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return {
        "top1": float(correct.mean()),
        "per_class": per_class,
        "ece": float(ece),
        "mean_confidence": float(conf.mean()),
        "n": int(len(labels)),
    }


def _stats_vector(probs, labels, num_classes: int, bins: int = 15):
    """Sufficient statistics that sum across shards: per-class correct/count, ECE bins."""
    import torch

    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    v_correct = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct)
    v_count = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, torch.ones_like(correct))
    b = torch.clamp((conf * bins).ceil().long() - 1, 0, bins - 1)
    v_bconf = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, conf.double())
    v_bacc = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, correct)
    v_bn = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, torch.ones_like(correct))
    return torch.cat([v_correct, v_count, v_bconf, v_bacc, v_bn])


def _metrics_from_stats(v, num_classes: int, labels: list[str], bins: int = 15) -> dict[str, Any]:
    v = v.tolist()
    k = num_classes
    correct, count = v[:k], v[k : 2 * k]
    bconf, bacc, bn = v[2 * k : 2 * k + bins], v[2 * k + bins : 2 * k + 2 * bins], v[2 * k + 2 * bins :]
    n = sum(count)
    ece = sum(abs(bacc[i] - bconf[i]) for i in range(bins) if bn[i]) / max(n, 1)
    return {
        "top1": sum(correct) / max(n, 1),
        "per_class": {labels[c]: (correct[c] / count[c] if count[c] else None) for c in range(k)},
        "ece": ece,
        "mean_confidence": sum(bconf) / max(n, 1),
        "n": int(n),
    }


def _augment(xb, pad: int, flips: str = "dihedral"):
    """Flips (``off``, ``horizontal`` or ``dihedral``: all 8 flips and 90-degree turns) and a
    random translation (reflect padding)."""
    import torch
    import torch.nn.functional as F

    n = xb.shape[0]
    if flips != "off":
        flip = torch.rand(n, device=xb.device) < 0.5  # on the batch's device (a GPU too: bench/gpu_heavy.py)
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
    if flips == "dihedral":
        flip = torch.rand(n, device=xb.device) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(2), xb)
        if xb.shape[2] == xb.shape[3] and torch.rand(()) < 0.5:
            xb = xb.transpose(2, 3)  # with the flips above, any of the 8 dihedral turns
    if pad:
        h, w = xb.shape[2:]
        padded = F.pad(xb, (pad, pad, pad, pad), mode="reflect")
        dx, dy = np.random.randint(0, 2 * pad + 1, 2)
        xb = padded[:, :, dy : dy + h, dx : dx + w]
    return xb


def warmup_cosine(total: int, warmup_frac: float = 0.2, start: float = 0.04):
    """LR factor per step: linear warm-up from ``start`` to 1, then cosine to 0.

    Unlike OneCycleLR it is defined for any number of steps, even 1.
    """

    warmup = max(1, int(total * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * step / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * t))

    return factor


# ------------------------------------------------------------------------ the loop


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import ray.train
    import ray.train.torch

    from train.checkpoint import load_checkpoint, save_checkpoint
    from train.models import ArchSpec, build_model, load_init_weights
    from visionfleet.datasets.store import load_arrays, local_dataset, read_info
    from visionfleet.settings import Settings

    cfg = TrainConfig(**{**config["train"], "extra_datasets": tuple(config["train"]["extra_datasets"]),
                         "class_weights": tuple(config["train"]["class_weights"]) if config["train"].get("class_weights") else None})
    torch.set_num_threads(cfg.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # the CPU, or this worker's GPU when the run has use_gpu
    # A restarted worker group continues from the latest epoch checkpoint (max_failures >= 1).
    resume = _load_resume(ray.train.get_checkpoint())
    start_epoch = resume["epoch"] if resume else 0
    torch.manual_seed(cfg.seed + 1000 * start_epoch)
    np.random.seed(cfg.seed + rank + 1000 * start_epoch)

    def all_reduce(t, op=dist.ReduceOp.SUM):
        """Sum (or ``op``) ``t`` across workers in place, through the device (NCCL reduces GPU tensors only)."""
        if world > 1:
            on_device = t.to(device)
            dist.all_reduce(on_device, op=op)
            t.copy_(on_device.cpu())
        return t

    # --- data: each worker decodes its own shard (a dataset on the store is copied to this node once)
    cache_dir = Settings.from_env().cache_dir
    base = local_dataset(cfg.dataset, cache_dir)
    size = (cfg.input_size, cfg.input_size)
    info = read_info(base)
    labels = info.labels
    k = len(labels)
    xs, ys = [], []
    for j, ds in enumerate((cfg.dataset, *cfg.extra_datasets)):
        ds_path = local_dataset(ds, cache_dir)
        ds_info = read_info(ds_path)
        if ds_info.labels != labels:
            raise ValueError(f"dataset {ds} has labels {ds_info.labels}; expected {labels}")
        x, y = load_arrays(ds_path, "train", size, cfg.resize, shard=(rank, world), limit=cfg.limit_train)
        repeat = cfg.extra_repeat if j > 0 else 1
        xs.extend([x] * repeat)
        ys.extend([y] * repeat)

    # --- model
    init_meta: dict = {}
    init_note: dict = {}
    if cfg.init_checkpoint:
        model, init_meta = load_checkpoint(cfg.init_checkpoint)
        spec = ArchSpec.from_dict(init_meta["arch"])
        if list(init_meta["labels"]) != labels:
            raise ValueError("the checkpoint's labels differ from the dataset's")
    else:
        spec = ArchSpec.from_dict({**cfg.arch, "num_classes": k})
        model = build_model(spec)
        if cfg.init_weights:
            init_note = load_init_weights(model, cfg.init_weights)
    ch = spec.in_channels  # a grayscale model trains on 1 channel (the images' R = G = B)

    def nchw(a: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a[..., :ch])).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW

    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    x_val = y_val = None
    if cfg.val_fraction > 0:
        # stratified: every class gives the same share (at least one image when it has two)
        rng = np.random.default_rng(cfg.seed + 1000 * rank)
        is_val = np.zeros(len(y_all), bool)
        for c in range(k):
            idx = np.flatnonzero(y_all == c)
            take = int(round(len(idx) * cfg.val_fraction)) if len(idx) > 1 else 0
            if len(idx) > 1:
                take = max(1, take)
            is_val[rng.choice(idx, take, replace=False)] = True
        x_val, y_val = nchw(x_all[is_val]), torch.from_numpy(y_all[is_val])
        x_all, y_all = x_all[~is_val], y_all[~is_val]
    x_train, y_train = nchw(x_all), torch.from_numpy(y_all)
    x_hold, y_hold = load_arrays(base, "holdout", size, cfg.resize, shard=(rank, world))
    x_hold, y_hold = nchw(x_hold), torch.from_numpy(y_hold)

    if resume:  # the statistics the first attempt computed, so that every epoch sees the same pixels
        mean, std = resume["mean"], resume["std"]
        model.load_state_dict(resume["model"])
    elif cfg.init_checkpoint:
        mean = torch.tensor(init_meta["mean"][:ch]).view(1, ch, 1, 1)
        std = torch.tensor(init_meta["std"][:ch]).view(1, ch, 1, 1)
    else:
        # per-channel statistics of the training pixels, averaged over workers
        stats = all_reduce(torch.stack([x_train.float().mean((0, 2, 3)), x_train.float().pow(2).mean((0, 2, 3))]))
        stats /= world
        mean = stats[0].view(1, ch, 1, 1)
        std = (stats[1].view(1, ch, 1, 1) - mean**2).clamp_min(1.0).sqrt()
    model = ray.train.torch.prepare_model(model)  # moves it to `device`; DDP when world > 1
    raw = model.module if hasattr(model, "module") else model
    mean_cpu, std_cpu = mean, std
    mean, std = mean.to(device), std.to(device)

    local_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, len(x_train) // local_batch)
    # every rank must run the same number of steps (DDP all-reduce)
    steps_per_epoch = int(all_reduce(torch.tensor([steps_per_epoch]), op=dist.ReduceOp.MIN).item())
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total))
    if resume:
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
    weight = torch.tensor(cfg.class_weights, dtype=torch.float32).to(device) if cfg.class_weights else None
    if weight is not None and len(weight) != k:
        raise ValueError(f"Got {len(weight)} class weights; expected {k} (one per label)")

    wandb_run = None
    if cfg.wandb and rank == 0:
        from ray.air.integrations.wandb import setup_wandb

        wandb_run = setup_wandb(
            config={kk: v for kk, v in asdict(cfg).items() if kk not in ("extra_datasets", "plan")},
            project=cfg.wandb_project,
            group=cfg.wandb_group or "train",
            name=config["run_id"],
            trial_id=config["run_id"],
            trial_name=config["run_id"],
            dir=config["wandb_dir"],
            rank_zero_only=False,
        )

    def normalize(xb):
        return (xb.float() - mean) / std

    def evaluate(xe, ye, confusion: bool = False) -> dict:
        model.eval()
        chunks = []
        with torch.no_grad():
            for i in range(0, len(xe), 256):
                chunks.append(F.softmax(model(normalize(xe[i : i + 256].to(device))), 1).cpu())
        probs = torch.cat(chunks) if chunks else torch.zeros(0, k)
        v = _stats_vector(probs, ye, k)
        nll = -torch.log(probs.gather(1, ye.view(-1, 1)).clamp_min(1e-12)).sum().double().view(1)
        cm = torch.zeros(k * k, dtype=torch.float64)
        if confusion:
            cm.index_add_(0, ye * k + probs.argmax(1), torch.ones(len(ye), dtype=torch.float64))
        v = all_reduce(torch.cat([v, nll, cm]))
        m = _metrics_from_stats(v[: -1 - k * k], k, labels)
        m["nll"] = float(v[-1 - k * k]) / max(m["n"], 1)
        if confusion:
            m["confusion"] = v[-k * k :].view(k, k).long().tolist()  # rows: true label, columns: predicted
            pcs = [a for a in m["per_class"].values() if a is not None]
            m["balanced_top1"] = sum(pcs) / max(1, len(pcs))
        return m

    progress_path = Path(config["progress_path"])
    epochs_log = progress_path.with_name(EPOCHS_LOG)
    pad = max(1, cfg.input_size // 16) if cfg.augment else 0
    step = resume["step"] if resume else 0
    t0 = time.time()
    best: tuple | None = None  # (val top-1, -val nll) of the best epoch
    best_state, best_epoch, since_best = None, 0, 0
    metrics: dict = {}
    if resume:
        best = tuple(resume["best"]) if resume["best"] is not None else None
        best_state, best_epoch, since_best = resume["best_state"], resume["best_epoch"], resume["since_best"]
        metrics = json.loads(resume["metrics"])
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        loss_sum = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * local_batch : (i + 1) * local_batch]
            xb = normalize(x_train[idx].to(device))
            if cfg.augment:
                xb = _augment(xb, pad, cfg.flips)
            loss = F.cross_entropy(model(xb), y_train[idx].to(device), weight=weight, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            step += 1
            if rank == 0 and (step % 10 == 0 or step == total):
                _write_progress(progress_path, {"step": step, "total": total, "epoch": epoch + 1, "loss": float(loss)})
        # with a validation split, epochs are judged on it and the holdout is read once, at the end
        on_val = x_val is not None
        metrics = evaluate(x_val, y_val) if on_val else evaluate(x_hold, y_hold)
        metrics.update(
            epoch=epoch + 1, train_loss=float(loss_sum) / steps_per_epoch, seconds=time.time() - t0, step=step,
            split="validation" if on_val else "holdout",
        )
        stop = False
        if on_val:
            score = (round(metrics["top1"], 6), -metrics["nll"])
            if best is None or score > best:
                best, best_epoch, since_best = score, epoch + 1, 0
                best_state = {kk: v.detach().clone() for kk, v in raw.state_dict().items()}
            else:
                since_best += 1
            stop = cfg.patience is not None and since_best >= cfg.patience  # same on every rank (all-reduced)
        if wandb_run is not None:
            wandb_run.log(
                {
                    "epoch": epoch + 1,
                    "train/loss": metrics["train_loss"],
                    "eval/top1": metrics["top1"],
                    "eval/ece": metrics["ece"],
                    "eval/mean_confidence": metrics["mean_confidence"],
                }
            )
        if rank == 0:
            _write_progress(progress_path, {"step": step, "total": total, "epoch": epoch + 1, "metrics": metrics})
        # per-epoch figures go to the progress file and W&B; Ray Train gets a resume point every
        # checkpoint_every epochs (a sync of all workers) and the model in one report at the end
        if stop or epoch + 1 == cfg.epochs:
            if rank == 0:
                _append_line(epochs_log, {"epoch": epoch + 1, "resumed_from": start_epoch, "pid": os.getpid(), "at": round(time.time(), 3),
                                          "checkpoint": False})
            break
        saved = (epoch + 1) % cfg.checkpoint_every == 0
        if saved:
            tmp_dir = None
            resume_ckpt = None
            if rank == 0:
                tmp_dir, resume_ckpt = _save_resume({
                    "epoch": epoch + 1, "step": step, "mean": mean_cpu, "std": std_cpu,
                    "model": {kk: v.detach().cpu() for kk, v in raw.state_dict().items()},
                    "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "best": best, "best_epoch": best_epoch, "since_best": since_best,
                    "best_state": {kk: v.cpu() for kk, v in best_state.items()} if best_state is not None else None,
                    "metrics": json.dumps({kk: v for kk, v in metrics.items() if kk != "per_class"}),
                })
            ray.train.report({"epoch": epoch + 1, "step": step, "top1": metrics["top1"],
                              "train_loss": metrics["train_loss"], "split": metrics["split"]}, checkpoint=resume_ckpt)
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)  # Ray copied it to the run's storage_path
        if rank == 0:
            _append_line(epochs_log, {"epoch": epoch + 1, "resumed_from": start_epoch, "pid": os.getpid(), "at": round(time.time(), 3),
                                      "checkpoint": saved})

    # --- the final model: the best validation epoch's weights (or the last epoch's), judged on the holdout
    last_epoch = metrics.get("epoch", 0)
    val_summary = {}
    if best_state is not None:
        raw.load_state_dict(best_state)
        val_summary = {"val_top1": best[0], "val_nll": -best[1], "best_epoch": best_epoch,
                       "stopped_early": last_epoch < cfg.epochs}
    final = evaluate(x_hold, y_hold, confusion=True)
    final.update(epoch=last_epoch, epochs_run=last_epoch, step=step, seconds=time.time() - t0,
                 train_loss=metrics.get("train_loss"), split="holdout", resumed_from_epoch=start_epoch,
                 device=device.type, **val_summary)
    if init_note:
        final["init_weights"] = init_note
    checkpoint = None
    if rank == 0:
        tmp = tempfile.mkdtemp(prefix="vf-ckpt-")
        save_checkpoint(
            os.path.join(tmp, CHECKPOINT_FILE),
            raw,
            {
                "arch": spec.to_dict(),
                "labels": labels,
                "input_size": [cfg.input_size, cfg.input_size],
                "resize": cfg.resize,
                # 3 values even for a gray model: RGB input is normalized per channel, then turned to luma
                "mean": mean_cpu.flatten().tolist() * (3 // ch),
                "std": std_cpu.flatten().tolist() * (3 // ch),
                "metrics": json.dumps(final),
                "dataset": cfg.dataset,
                **({"training": json.dumps(cfg.plan)} if cfg.plan else {}),
                # a pruned starting point keeps its channel counts: the loader rebuilds from them
                **({"pruned": init_meta["pruned"]} if init_meta.get("pruned") else {}),
            },
        )
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
    ray.train.report({kk: v for kk, v in final.items() if kk not in ("per_class", "confusion", "init_weights")} | {
        "per_class": json.dumps(final["per_class"]),
        "confusion": json.dumps(final["confusion"]),
        **({"init_weights": json.dumps(init_note)} if init_note else {}),
    }, checkpoint=checkpoint)
    if wandb_run is not None:
        wandb_run.summary.update({"eval/top1": final["top1"], "eval/ece": final["ece"]})
        wandb_run.finish()


def _write_progress(path: Path, doc: dict) -> None:
    # The folder is the driver's run dir; a worker on another node (no shared disk) writes its own copy.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def _append_line(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(doc) + "\n")


def _save_resume(state: dict):
    """A Ray Train checkpoint of a resume point (a temp folder that Ray copies to storage)."""
    import ray.train
    import torch

    tmp = tempfile.mkdtemp(prefix="vf-resume-")
    torch.save(state, os.path.join(tmp, _RESUME_FILE))
    return tmp, ray.train.Checkpoint.from_directory(tmp)


def _load_resume(checkpoint) -> dict | None:  # noqa: ANN001 - ray.train.Checkpoint | None
    """The resume point of ``ray.train.get_checkpoint()``; None on a first attempt."""
    import torch

    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        path = Path(d) / _RESUME_FILE
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only


# --------------------------------------------------------------------------- driver


def fit(
    cfg: TrainConfig,
    *,
    runs_dir: Path,
    wandb_dir: Path,
    on_progress: Callable[[dict], None] | None = None,
    storage: str | None = None,
) -> TrainResult:
    """Run :func:`train_loop_per_worker` on a ``TorchTrainer``; Ray must be initialized.

    ``on_progress`` is called from this thread with the latest progress document
    (step, total, epoch, metrics) while training runs. ``storage`` is where Ray Train keeps
    checkpoints and run state (``<store runs area>/_ray``: a local folder or ``s3://...``);
    by default ``runs_dir/_ray``. ``runs_dir`` keeps this node's copy of the run (config,
    progress, metrics, ``model.pt``).
    """
    from visionfleet.datasets.store import read_info

    read_info(cfg.dataset)  # fail fast, before any worker starts (a folder or a dataset on the store)
    for ds in cfg.extra_datasets:
        read_info(ds)
    if cfg.init_checkpoint and not Path(cfg.init_checkpoint).is_file():
        raise FileNotFoundError(f"no checkpoint at {cfg.init_checkpoint}")
    if cfg.init_weights:  # refuse a state dict that does not fit before any worker starts
        from train.models import ArchSpec, build_model, load_init_weights

        if not Path(cfg.init_weights).is_file():
            raise FileNotFoundError(f"Got no file at {cfg.init_weights} for init weights; expected a torch state dict (.pt)")
        labels = read_info(Path(cfg.dataset)).labels
        load_init_weights(build_model(ArchSpec.from_dict({**cfg.arch, "num_classes": len(labels)})), cfg.init_weights)
    run_id = cfg.run_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    runs_dir = Path(runs_dir)
    run_dir = runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    progress_path = run_dir / _PROGRESS_FILE
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))

    dest, metrics, seconds = run_trainer(
        train_loop_per_worker,
        {
            "train": {**asdict(cfg), "extra_datasets": list(cfg.extra_datasets),
                      "class_weights": list(cfg.class_weights) if cfg.class_weights else None},
            "run_id": run_id,
            "progress_path": str(progress_path),
            "wandb_dir": str(wandb_dir),
        },
        num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, run_id=run_id, run_dir=run_dir,
        storage=storage or str(runs_dir / "_ray"), progress_path=progress_path, on_progress=on_progress,
        thread_name="vf-train-fit", gpu=cfg.gpu, max_failures=cfg.max_failures,
    )
    for key in ("per_class", "confusion", "init_weights"):
        if key in metrics:
            metrics[key] = json.loads(metrics[key])
    if on_progress and progress_path.exists():
        on_progress(json.loads(progress_path.read_text()))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(run_id=run_id, run_dir=run_dir, checkpoint=dest, metrics=metrics, seconds=seconds)


def run_trainer(
    loop_per_worker: Callable[[dict], None],
    loop_config: dict[str, Any],
    *,
    num_workers: int,
    cpus_per_worker: float,
    run_id: str,
    run_dir: Path,
    storage: str,
    progress_path: Path,
    on_progress: Callable[[dict], None] | None,
    thread_name: str,
    gpu: bool | None = None,
    max_failures: int = 1,
) -> tuple[Path, dict[str, Any], float]:
    """Run ``loop_per_worker`` on a ``TorchTrainer``, relaying its progress file to ``on_progress``.

    The classifier (:func:`fit`) and the detector (``train.detect.fit_detector``) share it.
    Workers get a GPU each when the cluster has enough (``gpu=None``; ``train.scaling``).
    Checkpoints and run state go to ``storage`` (a local folder or ``s3://bucket/prefix``);
    a worker that dies is restarted up to ``max_failures`` times, from the latest checkpoint.
    Returns the checkpoint file copied into ``run_dir``, the final metrics (with ``use_gpu``)
    and the seconds taken.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from train.scaling import decide_workers, ray_storage

    workers = decide_workers(ray.cluster_resources(), num_workers=num_workers, cpus_per_worker=cpus_per_worker, gpu=gpu)
    storage_path, storage_fs = ray_storage(storage)
    trainer = TorchTrainer(
        loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers.num_workers, use_gpu=workers.use_gpu, resources_per_worker=workers.resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=run_id,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )
    box: dict[str, Any] = {}

    def _run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t0 = time.time()
    thread = threading.Thread(target=_run, name=thread_name, daemon=True)
    thread.start()
    last = None
    while thread.is_alive():
        thread.join(0.5)
        if on_progress and progress_path.exists():
            try:
                doc = json.loads(progress_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if doc != last:
                on_progress(doc)
                last = doc
    if "error" in box:
        raise box["error"]
    result = box["result"]
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_id} finished without a checkpoint")
    dest = Path(run_dir) / CHECKPOINT_FILE
    with result.checkpoint.as_directory() as d:  # downloaded from the store when it is remote
        dest.write_bytes((Path(d) / CHECKPOINT_FILE).read_bytes())
    return dest, {**dict(result.metrics), "use_gpu": workers.use_gpu}, time.time() - t0
