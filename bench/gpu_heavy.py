"""Train, prune and fine-tune the heavy benchmark model on a GPU; measure torch CUDA.

    python3 bench/gpu_heavy.py --out "$OUT" --train-seconds 200 --finetune-seconds 90

Issue 3 asks for the accuracy drops of INT8 and of pruned 50% + fine-tuned + INT8 on the
heavy model (ResNet-18-style, CIFAR stem, 96 px, 5.0 GMAC/image). On this project's 2
CPU cores that model trains at about 3 images/s, so it stayed untrained there. This
script does the training on a lent GPU machine, in one short run:

1. renders the ``heavy96`` dataset's images in parallel with
   ``visionfleet.datasets.synth.render_sample`` (a pure function of seed and index, the
   images ``synthesize(n_train=12000, n_holdout=2500, size=96, seed=0)`` stores as
   lossless PNG): train indices 0..11999, holdout 12000..14499, plus ``--extra`` fresh
   training images from index 14500 on (never in the holdout);
2. trains ``ArchSpec(resnet, width 64, depths 2-2-2-2, stem_stride 1)`` with the
   training loop's recipe (SGD + Nesterov, warm-up + cosine, label smoothing 0.05, the
   same flips/turns/translation augmentation, ``train.loop._augment``, on the device) in bfloat16 autocast for
   a time budget: a short probe measures the step rate and fixes the schedule's length;
3. removes 50% of the MACs with ``edge_export.prune.prune_macs`` (torch-pruning, L2,
   channel counts multiples of 8, the ``visionfleet optimize`` defaults) and fine-tunes
   the pruned model for ``--finetune-seconds``;
4. measures torch CUDA inference (FP32 and bfloat16 autocast, channels-last) at several
   batch sizes, and what ``edge_export.tensorrt.detect`` and ONNX Runtime see there;
5. writes both checkpoints in the training loop's ``model.pt`` format, weights stored in
   FP16 to fit the device tool's 64 MiB return limit (``bench/train_heavy.py
   --from-parts`` upcasts, re-scores on the CPU and registers them), split into 15 MB
   parts, and ``gpu_heavy.json`` with every figure.

Runs on the CPU too (tiny settings), which is how it is tested before a device run.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HEAVY_ARCH = {"arch": "resnet", "width": 64, "depths": [2, 2, 2, 2], "stem_stride": 1}
PART_BYTES = 15_000_000
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def _render(args: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    from visionfleet.datasets.synth import render_sample

    seed, start, n, size = args
    x = np.empty((n, size, size, 3), np.uint8)
    y = np.empty(n, np.int64)
    for k in range(n):
        x[k], y[k] = render_sample(seed, start + k, size)
    return x, y


def render(seed: int, start: int, n: int, size: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    if n == 0:
        return np.empty((0, size, size, 3), np.uint8), np.empty(0, np.int64)
    chunk = max(1, math.ceil(n / (workers * 4)))
    jobs = [(seed, start + i, min(chunk, n - i), size) for i in range(0, n, chunk)]
    if workers <= 1:
        parts = [_render(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_render, jobs))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def train_for(model, x, y, *, mean, std, seconds: float, lr: float, batch: int, dev, amp: bool, label: str,
              probe_steps: int = 12) -> dict[str, Any]:
    """SGD for a time budget: probe the step rate, then a warm-up + cosine schedule."""
    import torch
    import torch.nn.functional as F

    from train.loop import _augment as augment, warmup_cosine

    m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    n = len(x)
    batch = min(batch, n)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    pad = max(1, x.shape[1] // 16)
    total = None
    factor = warmup_cosine(10_000)  # provisional, until the probe has measured the rate
    step = 0
    perm = torch.randperm(n, device=x.device)
    pos = 0
    losses: list[float] = []
    t_probe = None
    t0 = time.perf_counter()
    model.train()
    while total is None or step < total:
        if pos + batch > n:
            perm, pos = torch.randperm(n, device=x.device), 0
        idx = perm[pos : pos + batch]
        pos += batch
        xb = x[idx].to(dev, non_blocking=True).permute(0, 3, 1, 2).float()
        xb = augment((xb - m) / s, pad).contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr * factor(step)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(xb), y[idx].to(dev), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0 or step == probe_steps:
            losses.append(float(loss.detach()))
        if step == 3:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_probe = time.perf_counter()
        if step == probe_steps:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rate = (probe_steps - 3) / (time.perf_counter() - t_probe)
            total = max(probe_steps + 1, int(rate * (seconds - (time.perf_counter() - t0))) + probe_steps)
            factor = warmup_cosine(total, warmup_frac=0.05)
            log(f"{label}: {rate:.1f} steps/s x batch {batch} -> {total} steps ({total * batch / n:.1f} epochs)")
        if total and step % max(1, total // 10) == 0:
            log(f"{label}: step {step}/{total} loss {float(loss.detach()):.3f}")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    model.eval()
    secs = time.perf_counter() - t0
    return {"steps": step, "batch": batch, "lr": lr, "seconds": secs, "epochs": step * batch / n,
            "images_per_s": step * batch / secs, "last_losses": losses[-5:], "bf16_autocast": amp,
            "warmup_frac": 0.05, "train_images": n}


def top1(model, x, y, *, mean, std, dev, batch: int = 500) -> float:
    import torch

    m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    model.eval()
    right = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = (torch.from_numpy(x[i : i + batch]).to(dev).permute(0, 3, 1, 2).float() - m) / s
            right += int((model(xb.contiguous(memory_format=torch.channels_last)).argmax(1).cpu().numpy() == y[i : i + batch]).sum())
    return right / len(x)


def cuda_inference(model, size: int, batches: list[int], dev) -> list[dict[str, Any]]:
    """Images/s of torch CUDA inference, FP32 (TF32 off and on) and bf16 autocast."""
    import torch

    rows = []
    model.eval()
    for mode in ("fp32", "tf32", "bf16-autocast"):
        torch.backends.cudnn.allow_tf32 = mode != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = mode != "fp32"
        for b in batches:
            xb = torch.randn(b, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
                for _ in range(5):
                    model(xb)
                torch.cuda.synchronize()
                reps = []
                for _ in range(5):
                    iters = max(3, 512 // b)
                    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    for _ in range(iters):
                        model(xb)
                    e.record()
                    torch.cuda.synchronize()
                    reps.append(iters * b / (a.elapsed_time(e) / 1000))
            rows.append({"mode": mode, "batch": b, "images_per_s_median": float(np.median(reps)),
                         "min": float(min(reps)), "max": float(max(reps))})
            log(f"  torch CUDA {mode} batch {b}: {np.median(reps):.0f} img/s")
    torch.backends.cudnn.allow_tf32 = True
    return rows


def save_parts(blob: dict[str, Any], out: Path, stem: str) -> dict[str, Any]:
    """``torch.save`` the blob and split it into 15 MB parts; returns names, size and SHA-256."""
    import hashlib

    import torch

    buf = io.BytesIO()
    torch.save(blob, buf)
    data = buf.getvalue()
    names = []
    for k in range(0, len(data), PART_BYTES):
        name = f"{stem}.part{k // PART_BYTES}"
        (out / name).write_bytes(data[k : k + PART_BYTES])
        names.append(name)
    return {"parts": names, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fp16_state(model) -> dict[str, Any]:
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in model.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--n-holdout", type=int, default=2500)
    ap.add_argument("--extra", type=int, default=48000, help="fresh training images beyond the dataset's train split")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-seconds", type=float, default=200)
    ap.add_argument("--finetune-seconds", type=float, default=90)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--finetune-lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prune", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--bench-batches", default="1,8,64,256")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from edge_export.prune import prune_macs
    from train.finetune import channel_stats
    from train.models import ArchSpec, build_model
    from visionfleet.datasets.synth import CLASSES

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
                              "python": platform.python_version(), "device": str(dev), "cpus": os.cpu_count()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        report["gpu"] = {"name": p.name, "memory_gib": p.total_memory / 2**30, "sm_count": p.multi_processor_count,
                         "capability": f"{p.major}.{p.minor}"}
    log(f"torch {torch.__version__} on {report.get('gpu', {}).get('name', 'CPU')}")

    def dump() -> None:
        (args.out / "gpu_heavy.json").write_text(json.dumps(report, indent=2, default=str))

    # what the TensorRT / CUDA provider paths see on this machine
    try:
        from edge_export.tensorrt import detect

        report["tensorrt_detect"] = detect().to_dict()
    except Exception as exc:  # report, never stop the run for it
        report["tensorrt_detect"] = f"{type(exc).__name__}: {exc}"
    try:
        import onnxruntime as ort

        report["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError as exc:
        report["onnxruntime"] = f"not installed: {exc}"
    dump()

    t = time.time()
    x_tr, y_tr = render(args.seed, 0, args.n_train, args.size, args.workers)
    x_ho, y_ho = render(args.seed, args.n_train, args.n_holdout, args.size, args.workers)
    x_ex, y_ex = render(args.seed, args.n_train + args.n_holdout, args.extra, args.size, args.workers)
    report["data"] = {"train": len(x_tr), "extra": len(x_ex), "holdout": len(x_ho), "seconds": time.time() - t,
                      "holdout_first_sha": __import__("hashlib").sha256(x_ho[:8].tobytes()).hexdigest()}
    log(f"rendered {len(x_tr)} + {len(x_ex)} train, {len(x_ho)} holdout in {time.time() - t:.0f}s")
    mean, std = channel_stats(x_tr[:2000])
    x_all = torch.from_numpy(np.concatenate([x_tr, x_ex]))
    y_all = torch.from_numpy(np.concatenate([y_tr, y_ex]))
    del x_ex
    if dev.type == "cuda":
        x_all, y_all = x_all.to(dev), y_all.to(dev)

    spec = ArchSpec.from_dict({**HEAVY_ARCH, "num_classes": len(CLASSES)})
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = build_model(spec).to(dev).to(memory_format=torch.channels_last)
    fit = train_for(model, x_all, y_all, mean=mean, std=std, seconds=args.train_seconds, lr=args.lr,
                    batch=args.batch, dev=dev, amp=amp, label="train")
    fit["top1_holdout_device_fp32"] = top1(model, x_ho, y_ho, mean=mean, std=std, dev=dev)
    report["train"] = fit
    log(f"trained: holdout top-1 {fit['top1_holdout_device_fp32']:.4f} ({fit['epochs']:.1f} epochs, "
        f"{fit['images_per_s']:.0f} img/s)")
    meta = {"arch": spec.to_dict(), "labels": list(CLASSES), "input_size": [args.size, args.size], "resize": "stretch",
            "mean": mean, "std": std, "dataset": "heavy96"}
    report["parts"] = {}
    report["parts"]["heavy.pt"] = save_parts({**meta, "gpu_train": json.dumps(fit), "state_dict": fp16_state(model)},
                                       args.out, "heavy.pt")
    dump()

    example = torch.zeros(1, 3, args.size, args.size, device=dev)
    t = time.time()
    base = model.to(memory_format=torch.contiguous_format)
    pruned, rep = prune_macs(base, example, args.prune, importance="l2", round_to=8)
    report["prune"] = {k: v for k, v in rep.to_dict().items() if k != "layers"}
    report["prune"]["seconds_wall"] = time.time() - t
    pruned_before = top1(pruned, x_ho, y_ho, mean=mean, std=std, dev=dev)
    log(f"pruned {rep.mac_reduction:.1%} of the MACs (channel ratio {rep.channel_ratio:.3f}): top-1 before "
        f"fine-tune {pruned_before:.4f}")
    pruned = pruned.to(memory_format=torch.channels_last)
    ft = train_for(pruned, x_all, y_all, mean=mean, std=std, seconds=args.finetune_seconds, lr=args.finetune_lr,
                   batch=args.batch, dev=dev, amp=amp, label="fine-tune")
    ft["top1_holdout_before_finetune"] = pruned_before
    ft["top1_holdout_device_fp32"] = top1(pruned, x_ho, y_ho, mean=mean, std=std, dev=dev)
    report["finetune"] = ft
    log(f"fine-tuned: holdout top-1 {ft['top1_holdout_device_fp32']:.4f}")
    pmeta = {**meta, "pruned": {"mac_reduction": rep.mac_reduction, "layers": rep.layers},
             "gpu_train": json.dumps(fit), "gpu_prune": json.dumps(report["prune"]), "gpu_finetune": json.dumps(ft)}
    report["parts"]["pruned.pt"] = save_parts({**pmeta, "state_dict": fp16_state(pruned)}, args.out, "pruned.pt")
    dump()

    if dev.type == "cuda":
        batches = [int(b) for b in args.bench_batches.split(",")]
        log("torch CUDA inference, heavy")
        report["cuda_inference"] = {"heavy": cuda_inference(model.to(memory_format=torch.channels_last), args.size, batches, dev)}
        log("torch CUDA inference, pruned 50%")
        report["cuda_inference"]["pruned50"] = cuda_inference(pruned, args.size, batches, dev)
    report["wall_s"] = time.time() - T0
    dump()
    log(f"done in {report['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
