"""`visionfleet bench`: registered versions side by side in one MLPerf-style scenario."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, progress, settings

app = typer.Typer()


@app.command()
@cli_errors
def bench(
    refs: Annotated[list[str], typer.Argument(help="model versions NAME[:VERSION|@ALIAS]; the first is the baseline")],
    scenario: Annotated[str, typer.Option(help="offline|single-stream|server")] = "offline",
    target: Annotated[
        Optional[str], typer.Option(help="x86-cpu|arm64-cpu|android|ios|jetson: threads and budgets to check")
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime threads (default: the target's, else 2)")] = None,
    batch: Annotated[int, typer.Option(help="Offline batch size")] = 8,
    rounds: Annotated[int, typer.Option(help="alternating rounds (ratios are their median)")] = 5,
    queries: Annotated[int, typer.Option(help="SingleStream queries per round")] = 50,
    p99_bound: Annotated[float, typer.Option(help="Server: p99 latency bound in ms")] = 100.0,
    trial_seconds: Annotated[float, typer.Option(help="Server: seconds of arrivals per tried rate")] = 2.0,
    data: Annotated[Optional[str], typer.Option(help="dataset for images and top-1 (default: each card's lineage)")] = None,
    holdout_limit: Annotated[Optional[int], typer.Option(help="top-1 (mAP) on the first N holdout images")] = None,
    annotations: Annotated[
        Optional[Path],
        typer.Option("--annotations", "--labels", help="detectors: COCO annotations.json of a labeled holdout (mAP)"),
    ] = None,
    images_dir: Annotated[
        Optional[Path], typer.Option("--images", help="folder the annotations' file_name entries are relative to")
    ] = None,
    ceiling: Annotated[bool, typer.Option(help="measure the GEMM ceiling and each model's share of it")] = True,
    gemm_sizes: Annotated[str, typer.Option(help="square GEMM sizes tried for the ceiling")] = "512,1024,2048,4096",
    plot: Annotated[Optional[Path], typer.Option(help="write a PNG chart here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
) -> None:
    """Benchmark versions side by side: the scenario's numbers, speed-ups, top-1 or mAP, size and efficiency.

    Detectors are scored with COCO mAP@0.5 and mAP@0.5:0.95 (pycocotools) on --annotations, or on the
    holdout of a detection dataset (--data, else the card's lineage); the card records the result.

    Runs every version in this process, alternating round by round on the same threads;
    each speed-up is the median of the per-round ratios against the first version, with
    min–max. Efficiency is MACs x images/s against a GEMM measured now on the same threads.
    """
    import numpy as np

    from edge_export import measure as M
    from visionfleet.datasets.store import load_arrays, resolve_dataset
    from visionfleet.state import open_registry
    from visionfleet.spec import Task
    from visionfleet.targets import check_budgets, profile

    s = settings().ensure()
    if len(refs) < 1:
        raise ValueError("Got no model references; expected at least one NAME:VERSION")
    sc = M.Scenario(_choice(scenario, "--scenario", tuple(x.value for x in M.Scenario)))
    prof = profile(target) if target else None
    n_threads = threads or (prof.threads if prof else 2)
    if n_threads < 1 or batch < 1 or rounds < 1:
        raise ValueError(f"Got threads {n_threads}, batch {batch}, rounds {rounds}; expected each >= 1")
    try:
        sizes = tuple(int(v) for v in gemm_sizes.split(","))
    except ValueError:
        raise ValueError(f"Got {gemm_sizes!r} for --gemm-sizes; expected comma-separated integers") from None
    if not sizes or min(sizes) < 16:
        raise ValueError(f"Got {gemm_sizes!r} for --gemm-sizes; expected sizes >= 16")
    reg = open_registry(s)
    cards = [reg.card_for(r) for r in refs]
    names = [c.ref for c in cards]
    if len(set(names)) != len(names):
        raise ValueError(f"Got the same version twice in {refs}; expected distinct versions")

    holdouts: dict[str, tuple[Any, Any]] = {}
    runners = []
    info: dict[str, dict[str, Any]] = {}
    with progress() as p:
        t = p.add_task("loading", total=len(cards), info="")
        for card in cards:
            p.update(t, info=card.ref)
            if card.task is Task.DETECTION:
                path = reg.local_dir(card.name, card.version) / card.model_file  # type: ignore[arg-type]
                r = M.OrtRunner(path, n_threads, name=card.ref)
                runners.append(r)
                info[card.ref] = _detector_info(card, r, path, reg, s, annotations, images_dir, data, holdout_limit)
                p.advance(t)
                continue
            ds_ref = data or card.lineage.dataset
            if not ds_ref:
                raise ValueError(f"Got no dataset for {card.ref} (no lineage.dataset); expected --data DATASET")
            ds = resolve_dataset(ds_ref, s.datasets_dir)
            key = (str(ds), tuple(card.input_size), card.resize.value)
            if key not in holdouts:
                holdouts[key] = load_arrays(ds, "holdout", card.input_size, card.resize.value, limit=holdout_limit)
            hx, hy = holdouts[key]
            path = reg.local_dir(card.name, card.version) / card.model_file  # type: ignore[arg-type]
            r = M.OrtRunner(path, n_threads, name=card.ref)
            runners.append(r)
            info[card.ref] = {
                "images": hx,
                "top1": M.holdout_top1(r, hx, hy),
                "holdout_n": int(len(hy)),
                "size_mb": M.file_mb(path),
                "macs_per_image": M.count_macs(path),
                "precision": card.precision,
                "input_size": list(card.input_size),
                "path": str(path),
            }
            p.advance(t)
        t = p.add_task(f"{sc.value} rounds", total=rounds, info=f"{n_threads} threads")
        result = M.compare(
            runners,
            {n: info[n]["images"] for n in info},
            sc,
            rounds=rounds,
            batch=batch,
            queries=queries,
            p99_bound_ms=p99_bound,
            trial_seconds=trial_seconds,
            on_round=lambda k: p.update(t, completed=k),
        )
        ceilings: dict[str, Any] = {}
        if ceiling and sc is M.Scenario.OFFLINE:
            t = p.add_task("GEMM ceiling", total=2, info=f"{n_threads} threads")
            for prec in ("fp32", "int8"):
                ceilings[prec] = M.gemm_ceiling(prec, n_threads, sizes)
                p.advance(t)

    rows = []
    for name in names:
        v = result["variants"][name]
        i = info[name]
        row: dict[str, Any] = {
            "name": name,
            "precision": i["precision"],
            "median": v["median"],
            "min": v["min"],
            "max": v["max"],
            "unit": result["unit"],
            "speedup": v.get("speedup_vs_baseline"),
            "top1": i["top1"],
            "holdout_n": i["holdout_n"],
            **({k: i[k] for k in ("map50", "map50_95", "map_on")} if "map50" in i else {}),
            "size_mb": i["size_mb"],
            "macs_per_image": i["macs_per_image"],
            "path": i["path"],
        }
        if "p90_ms_median" in v:
            row["p90_ms"] = v["p90_ms_median"]
        c = ceilings.get(i["precision"])
        if c is not None:
            row["efficiency"] = M.efficiency(i["macs_per_image"], v["median"], c.gmacs)
        if prof is not None:
            p95 = None
            if sc is M.Scenario.SINGLE_STREAM:
                p95 = float(np.median([d["p95_ms"] for d in result["details"][name]]))
            checks = check_budgets(
                prof,
                model_mb=i["size_mb"],
                peak_memory_mb=M.peak_memory_mb(i["path"], threads=n_threads),
                p95_ms=p95,
                input_size=tuple(i["input_size"]),  # type: ignore[arg-type]
                precision=i["precision"],
                threads=n_threads,
            )
            row["budgets"] = [b.to_dict() | {"message": b.message()} for b in checks]
        rows.append(row)
    doc = {
        "scenario": sc.value,
        "threads": n_threads,
        "rounds": rounds,
        "settings": result["settings"],
        "target": prof.to_dict() if prof else None,
        "rows": rows,
        "gemm_ceiling": {k: c.to_dict() for k, c in ceilings.items()},
        "machine": M.machine_info(n_threads),
        "raw": {k: v for k, v in result.items() if k != "variants"} | {"variants": result["variants"]},
    }
    if plot is not None:
        M.plot_comparison(rows, plot, title=f"{sc.value} ({result['unit']}), {n_threads} threads")
        doc["plot"] = str(plot)
    if as_json:
        print_json(doc)
    else:
        _print(doc)
    for row in rows:
        for b in row.get("budgets", []):
            if b["ok"] is False:
                err.print(f"[bold yellow]budget exceeded[/] ({target}) {row['name']}: {b['message']}")


def _detector_info(card, runner, path: Path, reg, s, annotations, images_dir, data, limit) -> dict[str, Any]:
    """mAP of a detector on its labeled split (recorded in its card), and images for the timing rounds."""
    import datetime as _dt

    import numpy as np

    from edge_export import measure as M
    from visionfleet.datasets.detect import coco_split, is_detection_dataset, read_coco
    from visionfleet.datasets.store import resolve_dataset
    from visionfleet.evaluation import evaluate_detector
    from visionfleet.imaging import load_for_model
    from visionfleet.names import DETECTION_OUTPUTS, INPUT_NAME

    if annotations is not None:
        split = read_coco(annotations, images_dir)
    else:
        ds_ref = data or card.lineage.dataset
        ds = resolve_dataset(ds_ref, s.datasets_dir) if ds_ref else None
        if ds is None or not is_detection_dataset(ds):
            raise ValueError(
                f"Got no labeled boxes for the detector {card.ref} ({'dataset ' + str(ds) if ds else 'no dataset'}); "
                "expected --annotations annotations.json (COCO) or --data DETECTION_DATASET"
            )
        split = coco_split(ds, "holdout")
    m = evaluate_detector(
        lambda x: runner.session.run(list(DETECTION_OUTPUTS), {INPUT_NAME: x}), card, split, limit=limit
    )
    record = {
        "map50": m.map50, "map50_95": m.map50_95, "map75": m.map75, "images": m.images, "gt_boxes": m.gt_boxes,
        "annotations": str(split.path), "evaluator": m.evaluator,
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    reg.update_metrics(card.name, card.version, {"map": record})
    ims = split.doc["images"][: min(len(split.doc["images"]), 64)]
    images = np.stack([load_for_model(split.image_path(im).read_bytes(), card.input_size, card.resize)[0] for im in ims])
    return {
        "images": images, "top1": None, "holdout_n": m.images, "map50": m.map50, "map50_95": m.map50_95,
        "map_on": str(split.path), "size_mb": M.file_mb(path), "macs_per_image": M.count_macs(path),
        "precision": card.precision, "input_size": list(card.input_size), "path": str(path),
    }


def _choice(value: str, flag: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"Got {value!r} for {flag}; expected one of {', '.join(allowed)}")
    return value


def _print(doc: dict[str, Any]) -> None:
    from rich.table import Table

    unit = doc["rows"][0]["unit"] if doc["rows"] else ""
    t = Table(title=f"{doc['scenario']} — {doc['threads']} threads, {doc['rounds']} alternating rounds")
    acc = "top-1" if all(r["top1"] is not None for r in doc["rows"]) else "top-1 / mAP50, mAP50:95"
    for col in ("version", "precision", f"{unit} median (min–max)", "speed-up vs first", acc, "MB", "GMAC/img", "of ceiling"):
        t.add_column(col, justify="left" if col in ("version", "precision") else "right")
    for r in doc["rows"]:
        sp = r.get("speedup")
        t.add_row(
            r["name"],
            r["precision"],
            f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})",
            f"{sp['median']:.2f}x ({sp['min']:.2f}–{sp['max']:.2f})" if sp else "baseline",
            f"{r['top1']:.4f} (n={r['holdout_n']})" if r["top1"] is not None
            else f"{r['map50']:.4f}, {r['map50_95']:.4f} (n={r['holdout_n']})",
            f"{r['size_mb']:.2f}",
            f"{r['macs_per_image'] / 1e9:.3f}",
            f"{r['efficiency']:.0%}" if "efficiency" in r else "-",
        )
    # Not a terminal (a pipe, a log): do not squeeze the table into 80 columns.
    out.print(t, width=None if out.is_terminal else 150)
    for r in doc["rows"]:
        if r.get("map_on"):
            out.print(f"{r['name']}: COCO mAP (pycocotools) on {r['map_on']}, recorded in its card")
    for prec, c in doc["gemm_ceiling"].items():
        out.print(f"GEMM ceiling {prec}: {c['gmacs']:.0f} GMAC/s (n={c['best_size']})")
    m = doc["machine"]
    out.print(f"measured on {m['cpu']} ({m['cores']} cores, load {m['load_avg_1m']:.2f}), {m['date']}")
    if doc["target"]:
        out.print(f"target {doc['target']['target']}: budgets checked against numbers measured on this host")
        for r in doc["rows"]:
            for b in r.get("budgets", []):
                out.print(f" {'!' if b['ok'] is False else ' '} {r['name']}: {b['message']}")
    if "plot" in doc:
        out.print(f"chart: {doc['plot']}")
