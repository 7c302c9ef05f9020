"""The GEMM ceiling of this machine through ONNX Runtime: FP32 MatMul and INT8 MatMulInteger.

    .venv/bin/python bench/gemm.py --threads 2

Square GEMMs from 512 to 4096 with a constant (pre-packed) right operand, as model
weights are; each size keeps its fastest run. The best size is the ceiling that
``visionfleet bench`` and ``bench/optimization.py`` divide a model's MACs x images/s by.
Writes ``bench/results/gemm-<threads>t.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="512,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from edge_export.measure import gemm_ceiling, machine_info

    sizes = tuple(int(v) for v in args.sizes.split(","))
    doc = {"machine": machine_info(args.threads), "ceilings": {}}
    print(f"{'size':>6} {'FP32 GMAC/s':>12} {'INT8 GMAC/s':>12}")
    res = {p: gemm_ceiling(p, args.threads, sizes, repeats=args.repeats) for p in ("fp32", "int8")}
    for n in sizes:
        print(f"{n:6d} {res['fp32'].by_size[n]:12.1f} {res['int8'].by_size[n]:12.1f}")
    for p, c in res.items():
        print(f"ceiling {p}: {c.gmacs:.1f} GMAC/s at n={c.best_size}")
        doc["ceilings"][p] = c.to_dict()
    out = REPO / "bench" / "results" / f"gemm-{args.threads}t.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
