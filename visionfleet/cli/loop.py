"""The closed loop from the terminal: `visionfleet monitor`, `label`, `retrain`, `report`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, settings

monitor_app = typer.Typer()
label_app = typer.Typer(help="The labeling queue: status, pending samples, label files.", no_args_is_help=True)
retrain_app = typer.Typer(help="The retraining controller: status, trigger, configure.", no_args_is_help=True)
report_app = typer.Typer()


def _default_url() -> str:
    from visionfleet.cli.ab import _default_url as url

    return url()


def _get(url: str, path: str) -> Any:
    from visionfleet.cli.ab import _call

    return _call("GET", url, path)


def _monitor_table(doc: dict[str, Any]):
    from rich.table import Table

    t = Table(title="visionfleet monitor — current window vs reference, per version")
    for c in ("version", "seen", "conf now", "conf ref", "low-rate now", "low-rate ref", "labeled acc", "drift"):
        t.add_column(c, justify="left" if c in ("version", "drift") else "right")
    for key, v in sorted(doc["versions"].items()):
        cur, ref = v["current"], v["reference"]
        drift = v.get("drift")
        if drift is None:
            dtxt = "reference filling" if ref.get("n", 0) < 1 or v["seen"] < 300 else "-"
        elif drift["drifted"]:
            dtxt = "[red]DRIFT[/] " + ", ".join(drift["drifted_signals"])
        else:
            dtxt = "[green]stable[/] " + " ".join(f"{s['signal']}={s['psi']:.2f}" for s in drift["signals"][:2])
        f = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
        t.add_row(key, str(v["seen"]), f(cur, "confidence/mean"), f(ref, "confidence/mean"),
                  f(cur, "confidence/low_rate"), f(ref, "confidence/low_rate"), f(cur, "labeled/accuracy"), dtxt)
    return t


@monitor_app.command()
@cli_errors
def monitor(
    model: Annotated[Optional[str], typer.Option(help="only this model")] = None,
    url: Annotated[Optional[str], typer.Option(help="server URL (default: the local head's)")] = None,
    interval: Annotated[float, typer.Option(help="refresh every N seconds")] = 2.0,
    once: Annotated[bool, typer.Option(help="print one table and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one snapshot as JSON")] = False,
) -> None:
    """Live per-version confidence, low-confidence rate, accuracy where labeled, and drift."""
    base = url or _default_url()
    path = "/v1/monitor" + (f"?model={model}" if model else "")
    if as_json:
        print_json(_get(base, path))
        return
    if once:
        out.print(_monitor_table(_get(base, path)))
        return
    from rich.live import Live

    with Live(_monitor_table(_get(base, path)), console=err, refresh_per_second=2) as live:
        while True:
            time.sleep(interval)
            live.update(_monitor_table(_get(base, path)))


@label_app.command("status")
@cli_errors
def label_status(as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """How many samples wait for a label, and how many have one."""
    from visionfleet.labeling import LabelingQueue

    counts = LabelingQueue.from_settings(settings()).counts()
    if as_json:
        print_json(counts)
    else:
        out.print(f"labeling queue: {counts['pending']} pending, {counts['labeled']} labeled, {counts['samples']} in all")


@label_app.command("export")
@cli_errors
def label_export(
    out_dir: Annotated[Path, typer.Argument(help="folder to write the pending images and pending.csv into")],
    limit: Annotated[int, typer.Option(help="at most this many samples")] = 1000,
) -> None:
    """Write pending samples as image files plus a CSV to fill in (sample_id,label)."""
    import csv

    from visionfleet.imaging import sniff_format
    from visionfleet.labeling import LabelingQueue

    q = LabelingQueue.from_settings(settings())
    pending = {p["sample_id"] for p in q.pending(limit)}
    t = q.samples()
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out_dir / "pending.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample_id", "label", "predicted", "confidence", "file"])
        for row in t.to_pylist():
            if row["sample_id"] not in pending:
                continue
            fmt = sniff_format(row["image"])
            name = f"{row['sample_id'].replace('/', '_')}.{fmt.value if fmt else 'bin'}"
            (out_dir / name).write_bytes(row["image"])
            w.writerow([row["sample_id"], "", row["predicted"], row["confidence"], name])
            n += 1
    out.print(f"wrote {n} pending samples to {out_dir} (fill the label column of pending.csv, then `visionfleet label import`)")


@label_app.command("import")
@cli_errors
def label_import(
    csv_path: Annotated[Path, typer.Argument(help="CSV with a header and columns sample_id,label")],
    labeler: Annotated[str, typer.Option(help="who labeled them, for the record")] = "file",
    as_json: Annotated[bool, typer.Option("--json", help="print the counts as JSON")] = False,
) -> None:
    """Attach labels from a file to queued samples (rows without a label are skipped)."""
    import csv

    from visionfleet.labeling import LabelingQueue

    if not csv_path.is_file():
        raise FileNotFoundError(f"no such file: {csv_path}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"sample_id", "label"} <= set(reader.fieldnames):
            raise ValueError(f"Got columns {reader.fieldnames} in {csv_path}; expected a header with sample_id,label")
        pairs = [(r["sample_id"].strip(), r["label"].strip()) for r in reader if (r.get("label") or "").strip()]
    res = LabelingQueue.from_settings(settings()).add_labels(pairs, labeler=labeler)
    if as_json:
        print_json(res)
    else:
        out.print(f"labeled {res['labeled']} samples ({res['unknown']} unknown ids)")


def _controller(model: str):
    import ray

    from cluster.local import RAY_NAMESPACE, connect
    from train.controller import controller_name

    connect(settings())
    try:
        return ray.get_actor(controller_name(model), namespace=RAY_NAMESPACE)
    except ValueError:
        raise RuntimeError(f"no retraining controller for {model!r} is running (it starts with `visionfleet serve up`)") from None


@retrain_app.command("status")
@cli_errors
def retrain_status(
    model: Annotated[str, typer.Option(help="model name")] = "demo",
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """What the controller sees now and what it last did."""
    import ray

    from train.controller import read_timeline

    st = ray.get(_controller(model).status.remote(), timeout=30)
    events = [e for e in read_timeline(settings().home) if e.get("model") == model][-10:]
    if as_json:
        print_json({"status": st, "recent": events})
        return
    out.print(f"{model}: stage {st['stage']}, degraded streak {st['streak']}, retrains {st['retrains']}")
    d = (st.get("last_look") or {}).get("decision")
    if d:
        out.print(f"last look: degraded={d['degraded']} fire={d['fire']} {d['reasons']} {d.get('waiting_for') or ''}")
    for e in events:
        out.print(f"  {time.strftime('%H:%M:%S', time.localtime(e['at']))} {e['kind']}")


@retrain_app.command("now")
@cli_errors
def retrain_now(
    model: Annotated[str, typer.Option(help="model name")] = "demo",
    reason: Annotated[str, typer.Option(help="why, for the record")] = "manual",
) -> None:
    """Start a retrain now (same pipeline: gate, compression, canary)."""
    import ray

    res = ray.get(_controller(model).retrain_now.remote(reason), timeout=30)
    out.print("retrain started" if res["started"] else f"busy: {res['stage']}")


@report_app.command()
@cli_errors
def report(
    out_path: Annotated[Optional[Path], typer.Option("--out", help="HTML file (default: <state>/report.html)")] = None,
    model: Annotated[Optional[str], typer.Option(help="only this model")] = None,
    window: Annotated[int, typer.Option(help="predictions per rolling point")] = 50,
) -> None:
    """HTML report: confidence and accuracy per version with drift, retrain and promotion markers."""
    from visionfleet.report import write_loop_report

    s = settings()
    path = write_loop_report(s.home, out_path or s.home / "report.html", model=model, window=window)
    out.print(f"report written to {path}")
