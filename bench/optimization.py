"""The issue-3 optimization table: torch eager, ONNX Runtime FP32, INT8 and pruned + INT8.

    VISIONFLEET_HOME=/tmp/a1home .venv/bin/python bench/optimization.py demo:1
    VISIONFLEET_HOME=/tmp/a1home .venv/bin/python bench/optimization.py heavy:1 --finetune-limit 2000

For one registered FP32 model (trained here, so its PyTorch weights are in the registry)
it builds, through the same cached ``edge_export.optimize.build_variant`` that
``visionfleet optimize`` uses:

* NNCF INT8 (post-training, 300 calibration images from the model's dataset),
* ONNX Runtime INT8 (static QDQ, per-channel, MinMax),
* pruned 50% of the MACs + fine-tuned + NNCF INT8 (and its FP32 intermediate),

With ``--pruned REF`` the pruned model is not built here: REF is a registered FP32 model
already pruned from this one and fine-tuned (the heavy model's, trained, pruned and
fine-tuned on a GPU by ``bench/gpu_heavy.py`` and registered by ``bench/train_heavy.py
--from-parts``, since fine-tuning a 5-GMAC model on 2 cores takes hours); only its NNCF
INT8 variant is built, the same way.

    VISIONFLEET_HOME=/tmp/a1home .venv/bin/python bench/optimization.py heavy:4 --pruned heavy-p50:1

then measures, in this one process on the same threads:

* Offline throughput at batch 8 and SingleStream latency (p50/p90), every variant once
  per round in rotating order; each ratio is the median of the per-round ratios with
  min–max (>= 5 rounds);
* holdout top-1 (the whole holdout split), file size, MACs from the ONNX graph;
* the GEMM ceiling (fastest square FP32 MatMul / INT8 MatMulInteger, 512..4096,
  through ONNX Runtime, measured before and after the rounds, best kept) and each
  variant's share of the ceiling of its precision;
* optionally the Server scenario (``--server``).

It prints the tables, checks the issue's targets and writes
``bench/results/optimization-<model>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# issue 3 targets: (name, numerator, denominator, min ratio, max top-1 drop in points)
TARGETS = [
    ("ONNX Runtime FP32 vs torch eager FP32", "ort-fp32", "torch-eager", 1.2, None),
    ("NNCF INT8 vs ONNX Runtime FP32", "nncf-int8", "ort-fp32", 3.0, 1.0),
    ("pruned 50% + fine-tuned + INT8 vs ONNX Runtime FP32", "pruned50-int8", "ort-fp32", 4.5, 2.0),
]
MIN_EFFICIENCY = 0.70


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", help="registered FP32 model NAME:VERSION with PyTorch weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (>= 5)")
    ap.add_argument("--queries", type=int, default=40, help="SingleStream queries per round")
    ap.add_argument("--calibration", type=int, default=300)
    ap.add_argument("--prune", type=float, default=0.5)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--finetune-limit", type=int, default=None, help="fine-tune on the first N training images")
    ap.add_argument("--finetune-lr", type=float, default=0.02)
    ap.add_argument("--holdout-limit", type=int, default=None)
    ap.add_argument("--server", action="store_true", help="also run the Server scenario (slow)")
    ap.add_argument("--p99-bound", type=float, default=100.0, help="Server p99 bound in ms")
    ap.add_argument("--round-to", type=int, default=8, help="pruned channel counts are multiples of this")
    ap.add_argument("--pruned", default=None,
                    help="a registered, already pruned and fine-tuned FP32 descendant NAME:VERSION to use instead of "
                         "pruning here (its NNCF INT8 variant is built)")
    ap.add_argument("--stress-holdout", type=Path, default=None,
                    help="a second dataset folder (e.g. a drifted one) whose holdout every variant is also scored on: "
                         "when the clean holdout saturates, drops show there")
    ap.add_argument("--gemm-sizes", default="512,1024,2048,4096",
                    help="square GEMM sizes of the machine-ceiling measurement (smaller: faster, a lower ceiling)")
    ap.add_argument("--build-only", action="store_true", help="build (cache) the variants and stop")
    ap.add_argument("--out", type=Path, default=None, help="output prefix (default bench/results/optimization-NAME)")
    args = ap.parse_args()
    if args.rounds < 5:
        ap.error("--rounds must be >= 5: ratios are medians of at least 5 alternating rounds")
    try:
        gemm_sizes = tuple(int(v) for v in args.gemm_sizes.split(","))
    except ValueError:
        gemm_sizes = ()
    if not gemm_sizes or min(gemm_sizes) < 16:
        ap.error(f"Got {args.gemm_sizes!r} for --gemm-sizes; expected comma-separated sizes >= 16, e.g. 512,1024,2048,4096")

    from visionfleet.registry import Registry
    from visionfleet.settings import Settings

    s = Settings.from_env().ensure()
    reg = Registry.from_settings(s)
    r = reg.resolve(args.ref)
    card = reg.card(r.name, r.version)
    parent_dir = reg.local_dir(r.name, r.version)
    if card.precision != "fp32" or card.file("torch") is None:
        raise SystemExit(f"error: {card.ref} must be an FP32 model with PyTorch weights")
    if args.pruned:  # checked before anything is built (or torch, ONNX Runtime and NNCF imported)
        pruned_card, pruned_dir, pruned_fp32, prune_steps = pruned_descendant(reg, args.pruned, card)

    from edge_export import measure as M
    from edge_export.optimize import OptimizeSettings, build_variant
    from edge_export.quantize import QuantizeConfig
    from train.checkpoint import load_checkpoint
    from train.finetune import prune_tools
    from visionfleet.datasets.store import load_arrays

    dataset = Path(card.lineage.dataset or "")
    cache = s.home / "cache" / "variants"
    h, w = card.input_size
    out = args.out or REPO / "bench" / "results" / f"optimization-{card.name}"
    machine_start = M.machine_info(args.threads)
    t_start = time.time()

    # ------------------------------------------------------------------ build variants
    def build(name: str, src_card=card, src_dir=parent_dir, **kw: Any):
        settings = OptimizeSettings(threads=args.threads, **kw)
        t0 = time.time()
        b = build_variant(
            src_dir, src_card, settings, dataset=dataset, cache_dir=cache, tools=prune_tools(),
            on_event=lambda stage, done, total, info: (
                log(f"{name}: {stage} {info}") if done in (None, total) or (done or 0) % 50 == 0 else None
            ),
        )
        log(f"{name}: {'cached' if b.reused else 'built'} {b.dir.name[:12]} in {time.time() - t0:.0f}s")
        return b

    nncf = build("nncf-int8", quantize=QuantizeConfig(mode="int8-static", engine="nncf", calibration=args.calibration))
    ortq = build("ort-int8", quantize=QuantizeConfig(mode="int8-static", engine="ort", calibration=args.calibration))
    if args.pruned:
        pct = round(next(st["mac_reduction_requested"] for st in prune_steps if st.get("op") == "prune") * 100)
        pruned = build("pruned-int8", src_card=pruned_card, src_dir=pruned_dir,
                       quantize=QuantizeConfig(mode="int8-static", engine="nncf", calibration=args.calibration))
        pruned_steps = [*prune_steps, *pruned.steps]
    else:
        pruned = build(
            "pruned-int8",
            prune=args.prune,
            finetune_epochs=args.finetune_epochs,
            finetune_lr=args.finetune_lr,
            finetune_limit=args.finetune_limit,
            round_to=args.round_to,
            quantize=QuantizeConfig(mode="int8-static", engine="nncf", calibration=args.calibration),
        )
        pct = round(args.prune * 100)
        pruned_fp32 = pruned.dir / "model.onnx"  # the fine-tuned export before quantization
        pruned_steps = pruned.steps
    if args.build_only:
        return
    files = {
        "ort-fp32": parent_dir / card.model_file,
        "nncf-int8": nncf.model_path,
        "ort-int8": ortq.model_path,
        f"pruned{pct}-fp32": pruned_fp32,
        f"pruned{pct}-int8": pruned.model_path,
    }
    precision = {"torch-eager": "fp32", "ort-fp32": "fp32", "nncf-int8": "int8", "ort-int8": "int8",
                 f"pruned{pct}-fp32": "fp32", f"pruned{pct}-int8": "int8"}
    steps = {"nncf-int8": nncf.steps, "ort-int8": ortq.steps, f"pruned{pct}-int8": pruned_steps}

    # ------------------------------------------------------------------ runners & data
    core, meta = load_checkpoint(parent_dir / card.file("torch").name)  # type: ignore[union-attr]
    runners = [M.TorchRunner(core, card.preprocessing["mean"], card.preprocessing["std"], args.threads, name="torch-eager")]
    runners += [M.OrtRunner(p, args.threads, name=n) for n, p in files.items()]
    log(f"decoding the holdout of {dataset.name}")
    hx, hy = load_arrays(dataset, "holdout", (h, w), card.resize.value, limit=args.holdout_limit)
    pool = hx[:64]

    rows: dict[str, dict[str, Any]] = {}
    for rn in runners:
        path = files.get(rn.name, files["ort-fp32"])
        rows[rn.name] = {
            "name": rn.name,
            "precision": precision[rn.name],
            "runtime": "torch" if rn.name == "torch-eager" else "onnxruntime",
            "size_mb": M.file_mb(path) if rn.name != "torch-eager" else M.file_mb(parent_dir / "model.pt"),
            "macs_per_image": M.count_macs(path),
        }
    log("GEMM ceiling (before)")
    ceil_before = {p: M.gemm_ceiling(p, args.threads, gemm_sizes) for p in ("fp32", "int8")}

    log(f"Offline batch {args.batch}: {args.rounds} alternating rounds over {len(runners)} variants")
    off = M.compare(runners, pool, "offline", rounds=args.rounds, batch=args.batch, offline_batches=4,
                    on_round=lambda k: log(f"  offline round {k}/{args.rounds}"))
    log(f"SingleStream: {args.rounds} alternating rounds")
    ss = M.compare(runners, pool, "single-stream", rounds=args.rounds, queries=args.queries,
                   on_round=lambda k: log(f"  single-stream round {k}/{args.rounds}"))
    srv = None
    if args.server:
        log("Server scenario")
        srv = M.compare(runners[1:], pool, "server", rounds=args.rounds, p99_bound_ms=args.p99_bound,
                        max_batch=args.batch, trial_seconds=2.0,
                        on_round=lambda k: log(f"  server round {k}/{args.rounds}"))
    log("GEMM ceiling (after)")
    ceil_after = {p: M.gemm_ceiling(p, args.threads, gemm_sizes) for p in ("fp32", "int8")}
    ceiling = {p: max(ceil_before[p].gmacs, ceil_after[p].gmacs) for p in ("fp32", "int8")}

    log(f"holdout top-1 on {len(hy)} images")
    for rn in runners:
        if rn.name == "torch-eager":
            continue  # same weights as ort-fp32 (export is parity-checked); see ort-fp32
        rows[rn.name]["top1"] = M.holdout_top1(rn, hx, hy)
    if args.stress_holdout is not None:
        sx, sy = load_arrays(args.stress_holdout, "holdout", (h, w), card.resize.value, limit=args.holdout_limit)
        log(f"stress holdout top-1 on {len(sy)} images of {args.stress_holdout.name}")
        for rn in runners:
            if rn.name != "torch-eager":
                rows[rn.name]["stress_top1"] = M.holdout_top1(rn, sx, sy)
        for row in rows.values():
            if "stress_top1" in row:
                row["stress_drop_pt_vs_ort_fp32"] = (rows["ort-fp32"]["stress_top1"] - row["stress_top1"]) * 100
    rows["torch-eager"]["top1"] = rows["ort-fp32"]["top1"]
    rows["torch-eager"]["top1_note"] = "same weights as ort-fp32 (export parity-checked), not re-measured"

    # ------------------------------------------------------------------ ratios & targets
    off_vals = {n: v["values"] for n, v in off["variants"].items()}
    ss_vals = {n: v["values"] for n, v in ss["variants"].items()}
    base_top1 = rows["ort-fp32"]["top1"]
    for name, row in rows.items():
        v = off["variants"][name]
        row["offline_images_per_s"] = {"median": v["median"], "min": v["min"], "max": v["max"]}
        row["speedup_vs_ort_fp32"] = M.ratio_stats(off_vals[name], off_vals["ort-fp32"]).to_dict()
        row["single_stream_p50_ms"] = ss["variants"][name]["median"]
        row["single_stream_p90_ms"] = ss["variants"][name]["p90_ms_median"]
        row["latency_speedup_vs_ort_fp32"] = M.ratio_stats(ss_vals["ort-fp32"], ss_vals[name]).to_dict()
        row["efficiency"] = M.efficiency(row["macs_per_image"], v["median"], ceiling[row["precision"]])
        row["top1_drop_pt_vs_ort_fp32"] = (base_top1 - row["top1"]) * 100
        if srv and name in srv["variants"]:
            row["server_qps"] = srv["variants"][name]["median"]
    checks = []
    for label, num, den, min_ratio, max_drop in TARGETS:
        num = num.replace("pruned50", f"pruned{pct}")
        ratio = M.ratio_stats(off_vals[num], off_vals[den])
        drop = (rows[den]["top1"] - rows[num]["top1"]) * 100
        ok = ratio.median >= min_ratio and (max_drop is None or drop <= max_drop)
        checks.append({
            "comparison": label, "ratio": ratio.to_dict(), "target_ratio": min_ratio,
            "top1_drop_pt": None if max_drop is None else drop, "target_max_drop_pt": max_drop, "met": ok,
        })
    for name in ("ort-fp32", "nncf-int8"):
        eff = rows[name]["efficiency"]
        checks.append({"comparison": f"efficiency {name} vs {rows[name]['precision']} GEMM ceiling",
                       "efficiency": eff, "target_min": MIN_EFFICIENCY, "met": eff >= MIN_EFFICIENCY})

    doc = {
        "model": card.ref,
        "arch": card.arch,
        "input_size": [h, w],
        "dataset": str(dataset),
        "holdout_n": int(len(hy)),
        "stress_holdout": None if args.stress_holdout is None else {
            "dataset": str(args.stress_holdout), "n": int(len(sy)),
            "params": json.loads((args.stress_holdout / "manifest.json").read_text()).get("params")},
        "parent_metrics": {k: v for k, v in card.metrics.items() if not isinstance(v, dict)},
        "threads": args.threads,
        "batch": args.batch,
        "rounds": args.rounds,
        "gemm_ceiling": {
            "fp32": {"best": ceiling["fp32"], "before": ceil_before["fp32"].to_dict(), "after": ceil_after["fp32"].to_dict()},
            "int8": {"best": ceiling["int8"], "before": ceil_before["int8"].to_dict(), "after": ceil_after["int8"].to_dict()},
        },
        "rows": list(rows.values()),
        "targets": checks,
        "build_steps": steps,
        "machine": {"start": machine_start, "end": M.machine_info(args.threads)},
        "wall_s": time.time() - t_start,
        "raw": {"offline": off, "single_stream": ss, "server": srv},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(doc, indent=2, default=str))
    M.plot_comparison(
        [{"name": n, "median": r["offline_images_per_s"]["median"], "min": r["offline_images_per_s"]["min"],
          "max": r["offline_images_per_s"]["max"], "unit": "images/s", "top1": r["top1"]} for n, r in rows.items()],
        f"{out}.png",
        title=f"{card.ref} Offline batch {args.batch}, {args.threads} threads",
    )
    print_tables(doc)
    log(f"wrote {out}.json and {out}.png")


def pruned_descendant(reg: Any, ref: str, parent: Any) -> tuple[Any, Path, Path, list[dict[str, Any]]]:
    """``(card, dir, onnx path, lineage steps)`` of a registered pruned FP32 model of ``parent``."""
    r = reg.resolve(ref)
    pc = reg.card(r.name, r.version)
    steps = list(pc.lineage.steps or [])
    if pc.lineage.parent != parent.ref:
        raise SystemExit(f"error: {pc.ref}'s parent is {pc.lineage.parent}; expected {parent.ref}")
    if pc.precision != "fp32" or not any(st.get("op") == "prune" for st in steps):
        raise SystemExit(f"error: {pc.ref} must be an FP32 model whose lineage has a prune step")
    d = reg.local_dir(r.name, r.version)
    return pc, d, d / pc.model_file, steps


def print_tables(doc: dict[str, Any]) -> None:
    c = doc["gemm_ceiling"]
    m = doc["machine"]["start"]
    print(f"\n{doc['model']} {doc['arch']} at {doc['input_size'][0]}px, batch {doc['batch']}, {doc['threads']} threads, "
          f"{doc['rounds']} alternating rounds; {m['cpu']}, {m['date']}, load {m['load_avg_1m']:.2f} -> "
          f"{doc['machine']['end']['load_avg_1m']:.2f}")
    print(f"GEMM ceiling: FP32 {c['fp32']['best']:.0f} GMAC/s, INT8 {c['int8']['best']:.0f} GMAC/s")
    hdr = f"{'variant':16} {'prec':5} {'img/s (min-max)':>22} {'vs ORT FP32':>22} {'p50/p90 ms':>14} " \
          f"{'top-1':>7} {'drop pt':>8} {'MB':>7} {'GMAC':>7} {'ceiling':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in doc["rows"]:
        o, sp = r["offline_images_per_s"], r["speedup_vs_ort_fp32"]
        print(f"{r['name']:16} {r['precision']:5} {o['median']:8.1f} ({o['min']:6.1f}-{o['max']:6.1f}) "
              f"{sp['median']:6.2f}x ({sp['min']:5.2f}-{sp['max']:5.2f}) "
              f"{r['single_stream_p50_ms']:6.2f}/{r['single_stream_p90_ms']:6.2f} {r['top1']:7.4f} "
              f"{r['top1_drop_pt_vs_ort_fp32']:+8.2f} {r['size_mb']:7.2f} {r['macs_per_image'] / 1e9:7.3f} "
              f"{r['efficiency']:8.0%}")
    if doc.get("stress_holdout"):
        sh = doc["stress_holdout"]
        print(f"\nstress holdout: {sh['n']} images of {Path(sh['dataset']).name} ({sh['params']})")
        for r in doc["rows"]:
            if "stress_top1" in r:
                print(f"  {r['name']:16} top-1 {r['stress_top1']:.4f}  drop {r['stress_drop_pt_vs_ort_fp32']:+.2f} pt")
    print()
    for t in doc["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        if "ratio" in t:
            rr = t["ratio"]
            drop = f", top-1 drop {t['top1_drop_pt']:+.2f} pt (<= {t['target_max_drop_pt']})" if t["top1_drop_pt"] is not None else ""
            print(f"  {t['comparison']}: {rr['median']:.2f}x ({rr['min']:.2f}-{rr['max']:.2f}) "
                  f"vs >= {t['target_ratio']}x{drop}: {verdict}")
        else:
            print(f"  {t['comparison']}: {t['efficiency']:.0%} vs >= {t['target_min']:.0%}: {verdict}")


if __name__ == "__main__":
    main()
