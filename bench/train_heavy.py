"""Train the heavy benchmark model (ResNet-18-style, CIFAR-style stem) and register it.

    VISIONFLEET_HOME=/tmp/a1home .venv/bin/python bench/train_heavy.py

The architecture is the one of issue 3's targets: ``ArchSpec(arch="resnet", width=64,
depths=(2, 2, 2, 2), stem_stride=1)`` at 96 px, about 5.0 GMAC per image. Training it to
convergence at 96 px on 2 CPU cores takes many hours (about 3 images/s), so this script
trains progressively (``--phases``): most epochs at a low resolution (the same 96 px
images, resized by ``visionfleet.imaging``), then shorter phases at higher ones, the
last at 96 px. The result is registered as ``heavy`` with its measured holdout accuracy; the
numbers in docs/performance.md say how far it was trained.

``--max-minutes`` bounds all phases but the last: a phase still running at the deadline
stops after its current step (its cosine schedule unfinished) and later ones are skipped.
Several one-epoch phases therefore lose less to the budget than one long phase.
``--phase-eval-limit 0`` skips the per-phase holdout check, which costs minutes at 96 px.

``--from-parts DIR`` registers a checkpoint that ``bench/gpu_heavy.py`` trained on a GPU
machine instead of training here: it joins ``DIR/STEM.part0, .part1...``, upcasts the
FP16-stored weights to FP32, re-scores the model on the whole holdout here (CPU, the
decoded PNGs of the dataset, not the GPU run's rendered arrays) and registers it with
the GPU run's training, pruning and fine-tuning steps as lineage:

    VISIONFLEET_HOME=/tmp/a1home .venv/bin/python bench/train_heavy.py --from-parts /tmp/gpu_parts
    VISIONFLEET_HOME=/tmp/a1home .venv/bin/python bench/train_heavy.py --from-parts /tmp/gpu_parts \
        --stem pruned.pt --name heavy-p50 --parent heavy:4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEAVY_ARCH = {"arch": "resnet", "width": 64, "depths": [2, 2, 2, 2], "stem_stride": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="heavy96", help="dataset name in the state dir (created at 96 px if missing)")
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--n-holdout", type=int, default=2500)
    ap.add_argument(
        "--phases",
        default="32:3:12000:0.1,96:1:1000:0.01",
        help="SIZE:EPOCHS:IMAGES:LR,... trained in order (progressive resizing)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="time budget of all phases but the last (the model is registered as far as it got)")
    ap.add_argument("--phase-eval-limit", type=int, default=1000,
                    help="holdout images (at 96 px) scored after each phase; 0 skips it (it costs minutes on 2 cores)")
    ap.add_argument("--holdout-limit", type=int, default=None,
                    help="score the registered model on the first N holdout images (default: all)")
    ap.add_argument("--name", default="heavy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from-parts", type=Path, default=None,
                    help="register the checkpoint bench/gpu_heavy.py wrote (DIR/STEM.part0, .part1...) instead of training")
    ap.add_argument("--stem", default="heavy.pt", help="checkpoint name in --from-parts (heavy.pt or pruned.pt)")
    ap.add_argument("--parent", default=None, help="parent NAME:VERSION for the card's lineage (the pruned model's)")
    args = ap.parse_args()
    if args.from_parts is not None:
        register_parts(args)
        return

    import torch

    from train.checkpoint import save_checkpoint
    from train.finetune import FinetuneConfig, channel_stats, evaluate, finetune
    from train.models import ArchSpec, build_model
    from train.pipeline import register_checkpoint
    from visionfleet.datasets.store import load_arrays, read_info
    from visionfleet.registry import Registry
    from visionfleet.settings import Settings

    s = Settings.from_env().ensure()
    ds = _dataset(args, s)
    info = read_info(ds)
    spec = ArchSpec.from_dict({**HEAVY_ARCH, "num_classes": len(info.labels)})
    torch.manual_seed(args.seed)
    model = build_model(spec)
    log: list[dict] = []

    def phase(size: int, epochs: int, limit: int | None, lr: float, budgeted: bool) -> None:
        x, y = load_arrays(ds, "train", (size, size), "stretch", limit=limit)
        t0 = time.time()

        def on_step(step: int, total: int, loss: float) -> None:
            if step % 20 == 0 or step == total:
                print(f"  {size}px step {step}/{total} loss {loss:.3f} ({time.time() - t0:.0f}s)", file=sys.stderr)

        fit = finetune(
            model, x, y, mean=mean, std=std,
            config=FinetuneConfig(epochs=epochs, lr=lr, batch_size=64, threads=args.threads, seed=args.seed),
            on_step=on_step,
            stop=lambda: budgeted and deadline is not None and time.time() > deadline,
        )
        entry = {"size": size, "epochs": epochs, "lr": lr, "images": len(x), "steps": fit["steps"],
                 "stopped_early": fit["stopped_early"], "seconds": fit["seconds"], "train_loss": fit["train_loss"]}
        if args.phase_eval_limit > 0:
            hx, hy = load_arrays(ds, "holdout", (96, 96), "stretch", limit=args.phase_eval_limit)
            m = evaluate(model, hx, hy, mean=mean, std=std, num_classes=len(info.labels), threads=args.threads)
            entry[f"holdout96_top1_first{args.phase_eval_limit}"] = m["top1"]
        log.append(entry)
        print(json.dumps(entry), file=sys.stderr)
        # a checkpoint after every phase, so a run cut short still leaves its weights
        save_checkpoint(s.runs_dir / "heavy" / f"phase{len(log)}.pt", model, {**base_meta(), "phases": json.dumps(log)})

    def base_meta() -> dict:
        return {
            "arch": spec.to_dict(), "labels": list(info.labels), "input_size": [96, 96], "resize": "stretch",
            "mean": mean, "std": std, "dataset": str(ds),
        }

    x96, _ = load_arrays(ds, "train", (96, 96), "stretch", limit=2000)
    mean, std = channel_stats(x96)
    del x96
    # The time budget cuts the early phases; the last one (at 96 px) always runs.
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    phases = args.phases.split(",")
    for k, spec_ in enumerate(phases):
        last = k == len(phases) - 1
        if not last and deadline is not None and time.time() > deadline:
            continue
        size, epochs, images, lr = spec_.split(":")
        phase(int(size), int(epochs), int(images), float(lr), budgeted=not last)

    hx, hy = load_arrays(ds, "holdout", (96, 96), "stretch", limit=args.holdout_limit)
    metrics = evaluate(model, hx, hy, mean=mean, std=std, num_classes=len(info.labels), threads=args.threads)
    metrics["per_class"] = {info.labels[int(k)]: v for k, v in metrics["per_class"].items()}
    meta = {
        "arch": spec.to_dict(), "labels": list(info.labels), "input_size": [96, 96], "resize": "stretch",
        "mean": mean, "std": std, "metrics": json.dumps(metrics), "dataset": str(ds),
    }
    ckpt = save_checkpoint(s.runs_dir / "heavy" / "model.pt", model, meta)
    parity, _ = load_arrays(ds, "holdout", (96, 96), "stretch", limit=32)
    card = register_checkpoint(
        ckpt, Registry.from_settings(s), args.name, parity_images=parity, run_id="bench-train-heavy",
        steps=[{"op": "train", "run": "bench/train_heavy.py", "phases": log}],
        description="ResNet-18-style, CIFAR stem, 96 px: the issue-3 benchmark model",
    )
    print(json.dumps({"registered": card.ref, "holdout_top1": metrics["top1"], "holdout_n": metrics["n"], "phases": log}))


def _dataset(args: argparse.Namespace, s, size: int = 96) -> Path:
    from visionfleet.datasets.store import synthesize

    ds = s.datasets_dir / args.dataset
    if not (ds / "manifest.json").exists():
        t0 = time.time()
        synthesize(ds, n_train=args.n_train, n_holdout=args.n_holdout, size=size, seed=args.seed)
        print(f"dataset {ds} in {time.time() - t0:.0f}s", file=sys.stderr)
    return ds


def join_parts(folder: Path, stem: str) -> bytes:
    """The bytes of ``stem`` split by ``bench/gpu_heavy.py`` into ``stem.part0, .part1...``.

    Checked against the size and SHA-256 that the GPU run wrote to ``gpu_heavy.json``
    beside the parts, so a missing or damaged part is an error, not a corrupt model.
    """
    import hashlib

    parts = sorted(folder.glob(f"{stem}.part*"), key=lambda p: int(p.suffix[len(".part"):]))
    if not parts:
        raise SystemExit(f"error: no {stem}.part0 in {folder}")
    numbers = [int(p.suffix[len(".part"):]) for p in parts]
    if numbers != list(range(len(parts))):
        raise SystemExit(f"error: parts of {stem} in {folder} are {numbers}; expected 0..{len(parts) - 1}")
    data = b"".join(p.read_bytes() for p in parts)
    report = folder / "gpu_heavy.json"
    if not report.is_file():
        raise SystemExit(f"error: no gpu_heavy.json in {folder}; it holds the parts' size and checksum")
    want = json.loads(report.read_text()).get("parts", {}).get(stem)
    if want is None:
        raise SystemExit(f"error: {report} does not list {stem}")
    if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
        raise SystemExit(f"error: {stem} in {folder} is incomplete or damaged: {len(data)} bytes from "
                         f"{len(parts)} parts, expected {want['bytes']} bytes from {len(want['parts'])} parts")
    return data


def register_parts(args: argparse.Namespace) -> None:
    import io

    # the parts are checked before torch and the training code are imported: a missing or
    # damaged part is reported in about a second
    data = join_parts(args.from_parts, args.stem)

    import torch

    from train.checkpoint import load_checkpoint
    from train.finetune import evaluate
    from train.pipeline import register_checkpoint
    from visionfleet.datasets.store import load_arrays, read_info
    from visionfleet.registry import Registry
    from visionfleet.settings import Settings

    s = Settings.from_env().ensure()
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    size = tuple(int(v) for v in blob["input_size"])
    ds = _dataset(args, s, size[0])
    info = read_info(ds)
    if list(blob["labels"]) != list(info.labels):
        raise SystemExit(f"error: the checkpoint's labels {blob['labels']} differ from {ds}'s {info.labels}")
    blob["state_dict"] = {k: v.float() if v.dtype == torch.float16 else v for k, v in blob["state_dict"].items()}
    blob["dataset"] = str(ds)
    ckpt = s.runs_dir / "heavy-gpu" / args.stem
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, ckpt)
    model, _ = load_checkpoint(ckpt)
    hx, hy = load_arrays(ds, "holdout", size, blob["resize"], limit=args.holdout_limit)
    t0 = time.time()
    metrics = evaluate(model, hx, hy, mean=blob["mean"], std=blob["std"], num_classes=len(info.labels),
                       threads=args.threads)
    metrics["per_class"] = {info.labels[int(k)]: v for k, v in metrics["per_class"].items()}
    print(f"holdout top-1 here (CPU, {len(hy)} images): {metrics['top1']:.4f} in {time.time() - t0:.0f}s", file=sys.stderr)
    blob["metrics"] = json.dumps(metrics)
    torch.save(blob, ckpt)
    gpu = {k: json.loads(blob[k]) for k in ("gpu_train", "gpu_prune", "gpu_finetune") if k in blob}
    note = "bench/gpu_heavy.py on a GPU machine; weights carried back in FP16, upcast to FP32 here"
    steps = [{"op": "train", "run": "bench/gpu_heavy.py", "note": note, **gpu["gpu_train"]}]
    if "gpu_prune" in gpu:
        steps.append({"op": "prune", "tool": "torch-pruning", **gpu["gpu_prune"]})
    if "gpu_finetune" in gpu:
        steps.append({"op": "finetune", **gpu["gpu_finetune"]})
    parity, _ = load_arrays(ds, "holdout", size, blob["resize"], limit=32)
    card = register_checkpoint(
        ckpt, Registry.from_settings(s), args.name, parity_images=parity, run_id="bench-gpu-heavy",
        parent=args.parent, steps=steps,
        description=f"ResNet-18-style, CIFAR stem, {size[0]} px (issue-3 benchmark model), trained on a GPU"
        + (", pruned 50% of the MACs and fine-tuned" if "gpu_prune" in gpu else ""),
    )
    print(json.dumps({"registered": card.ref, "holdout_top1": metrics["top1"], "holdout_n": metrics["n"],
                      "gpu_holdout_top1": (gpu.get("gpu_finetune") or gpu["gpu_train"]).get("top1_holdout_device_fp32")}))


if __name__ == "__main__":
    main()
