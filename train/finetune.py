"""In-process training and fine-tuning of any ``nn.Module`` on a Parquet dataset.

A plain torch loop with an explicit thread count, for the short fine-tune after
pruning (and for small models in tests and benchmarks), without starting Ray. It reuses
the Ray Train loop's pieces (``_augment``, ``warmup_cosine``, ``evaluate_arrays``), so
augmentation, schedule and metrics are the same as in ``train.loop``.

Checkpoints are written and read by :mod:`train.checkpoint` (the one ``model.pt``
format). :func:`prune_tools` hands this module's fine-tune and that loader and saver
to ``edge_export.optimize``, which never imports ``train``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.loop import _augment, evaluate_arrays, warmup_cosine

if TYPE_CHECKING:
    from edge_export.optimize import FinetuneJob, PruneTools

__all__ = [
    "FinetuneConfig",
    "finetune",
    "predict_probs",
    "evaluate",
    "channel_stats",
    "dataset_finetune_fn",
    "train_in_process",
    "prune_tools",
]


@dataclass(frozen=True)
class FinetuneConfig:
    """A short SGD run: warm-up then cosine decay, the training loop's augmentation."""

    epochs: int = 3
    lr: float = 0.02
    batch_size: int = 64
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    momentum: float = 0.9
    threads: int = 2
    seed: int = 0
    augment: bool = True
    limit: int | None = None  # use only the first images of the train split

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"Got {self.epochs} for epochs; expected >= 1")
        if self.lr <= 0:
            raise ValueError(f"Got {self.lr} for lr; expected > 0")
        if self.batch_size < 1:
            raise ValueError(f"Got {self.batch_size} for batch_size; expected >= 1")
        if self.threads < 1:
            raise ValueError(f"Got {self.threads} for threads; expected >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"Got {self.limit} for limit; expected >= 1 or None")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images on the 0..255 scale (as ``train.loop``)."""
    x = images.reshape(-1, 3).astype(np.float64)
    mean = x.mean(0)
    std = np.sqrt(np.maximum((x**2).mean(0) - mean**2, 1.0))
    return mean.tolist(), std.tolist()


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def finetune(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    config: FinetuneConfig = FinetuneConfig(),
    on_step: Callable[[int, int, float], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (float NCHW -> logits) in place on uint8 NHWC images.

    ``on_step(step, total, loss)`` is called after every step; when ``stop()`` returns
    True training ends after the current step (a time budget). Returns the mean loss of
    the last (possibly partial) epoch, the step count, whether it stopped early and the
    seconds taken.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"Got {len(images)} images and {len(labels)} labels; expected the same, non-zero count")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    x = _nchw(images)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    batch = min(config.batch_size, len(x))
    steps_per_epoch = max(1, len(x) // batch)
    total = config.epochs * steps_per_epoch
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total))
    pad = max(1, x.shape[2] // 16) if config.augment else 0
    t0 = time.perf_counter()
    step = 0
    last_epoch_loss = float("nan")
    stopped = False
    for _epoch in range(config.epochs):
        if stopped:
            break
        model.train()
        perm = torch.randperm(len(x))
        loss_sum = 0.0
        done = 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            xb = (x[idx].float() - m) / s
            if config.augment:
                xb = _augment(xb, pad)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())
            loss_sum += value
            step += 1
            done += 1
            if on_step:
                on_step(step, total, value)
            if stop is not None and stop():
                stopped = True
                break
        last_epoch_loss = loss_sum / max(done, 1)
    model.eval()
    return {
        "train_loss": last_epoch_loss, "steps": step, "stopped_early": stopped,
        "seconds": time.perf_counter() - t0, **config.to_dict(),
    }


def predict_probs(
    model: nn.Module, images: np.ndarray, *, mean: Sequence[float], std: Sequence[float], batch: int = 256, threads: int = 2
) -> np.ndarray:
    """Softmax probabilities of a module on uint8 NHWC images."""
    torch.set_num_threads(threads)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            xb = (_nchw(images[i : i + batch]).float() - m) / s
            out.append(F.softmax(model(xb), 1).numpy())
    return np.concatenate(out)


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    threads: int = 2,
) -> dict[str, Any]:
    """Top-1, per-class accuracy and ECE of a module (``train.loop.evaluate_arrays``)."""
    probs = predict_probs(model, images, mean=mean, std=std, threads=threads)
    return evaluate_arrays(probs, np.asarray(labels), num_classes)


def dataset_finetune_fn(
    dataset: str | os.PathLike[str],
    *,
    input_size: tuple[int, int],
    resize: str,
    mean: Sequence[float],
    std: Sequence[float],
    config: FinetuneConfig = FinetuneConfig(),
    on_step: Callable[[int, int, float], None] | None = None,
) -> Callable[[nn.Module], dict[str, Any]]:
    """A fine-tune callable for :func:`edge_export.prune.prune_finetune_export`.

    The train split is decoded (with ``visionfleet.imaging``) on the first call.
    """
    from visionfleet.datasets.store import load_arrays

    cache: dict[str, np.ndarray] = {}

    def run(model: nn.Module) -> dict[str, Any]:
        if not cache:
            cache["x"], cache["y"] = load_arrays(Path(dataset), "train", input_size, resize, limit=config.limit)
        return finetune(model, cache["x"], cache["y"], mean=mean, std=std, config=config, on_step=on_step)

    return run


def train_in_process(
    arch: Mapping[str, Any],
    dataset: str | os.PathLike[str],
    *,
    input_size: int,
    resize: str = "stretch",
    config: FinetuneConfig = FinetuneConfig(epochs=10, lr=0.1),
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a built-in architecture from scratch without Ray; returns ``(model, meta)``.

    ``meta`` holds what :func:`train.checkpoint.save_checkpoint` writes (arch, labels, size, normalization,
    holdout metrics), the same fields as a Ray Train checkpoint.
    """
    from train.models import ArchSpec, build_model
    from visionfleet.datasets.store import load_arrays, read_info

    info = read_info(Path(dataset))
    size = (input_size, input_size)
    x, y = load_arrays(Path(dataset), "train", size, resize, limit=config.limit)
    spec = ArchSpec.from_dict({**dict(arch), "num_classes": len(info.labels)})
    torch.manual_seed(config.seed)
    model = build_model(spec)
    mean, std = channel_stats(x)
    fit = finetune(model, x, y, mean=mean, std=std, config=config, on_step=on_step)
    hx, hy = load_arrays(Path(dataset), "holdout", size, resize)
    metrics = evaluate(model, hx, hy, mean=mean, std=std, num_classes=len(info.labels), threads=config.threads)
    metrics["per_class"] = {info.labels[int(k)]: v for k, v in metrics["per_class"].items()}
    metrics["train_loss"] = fit["train_loss"]
    meta = {
        "arch": spec.to_dict(),
        "labels": list(info.labels),
        "input_size": [input_size, input_size],
        "resize": resize,
        "mean": mean,
        "std": std,
        "metrics": json.dumps(metrics),
        "dataset": str(Path(dataset).resolve()),
    }
    return model, meta


def prune_tools() -> "PruneTools":
    """What ``edge_export.optimize`` needs to prune a built-in architecture: load, fine-tune, save."""
    from edge_export.optimize import PruneTools
    from train.checkpoint import load_checkpoint, save_checkpoint

    return PruneTools(load=load_checkpoint, save=save_checkpoint, finetune=_job_finetune_fn)


def _job_finetune_fn(job: "FinetuneJob") -> Callable[[nn.Module], dict[str, Any]]:
    cfg = FinetuneConfig(
        epochs=job.epochs, lr=job.lr, batch_size=job.batch_size, threads=job.threads, seed=job.seed, limit=job.limit,
    )
    return dataset_finetune_fn(
        job.dataset, input_size=job.input_size, resize=job.resize, mean=job.mean, std=job.std, config=cfg,
        on_step=job.on_step,
    )
