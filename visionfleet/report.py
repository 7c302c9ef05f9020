"""`visionfleet report`: one HTML page that shows what the closed loop did and why.

Plots (PNG, embedded): confidence per version over time with drift, retrain and
promotion markers; accuracy of labeled predictions per version over time; plus the
timeline of the retraining controller and the experiments' decisions as tables.
Reads only the state dir (event lake, feedback, retraining timeline, experiments).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_events", "write_loop_report", "confusion_png", "model_quality_html", "write_model_report"]

_MARKERS = {
    "degraded": ("#d62728", "drift / degradation detected"),
    "triggered": ("#ff7f0e", "retrain triggered"),
    "candidate": ("#9467bd", "candidate registered"),
    "canary_started": ("#8c564b", "canary started"),
    "promoted": ("#2ca02c", "promoted"),
    "rolled_back": ("#7f7f7f", "rolled back"),
    "retrain_failed": ("#000000", "retrain failed"),
}


def load_events(home: Path) -> dict[str, np.ndarray]:
    """Primary, successful events of the lake as columns (ts, model, version, confidence, request_id)."""
    from visionfleet.lake import read_events
    from visionfleet.store import open_store

    cols = ["request_id", "role", "ts", "model", "version", "status", "confidence", "label", "source"]
    # small parts and compacted files alike, each (request_id, role) once (visionfleet.lake)
    table = read_events(open_store(Path(home) / "telemetry"), columns=cols)
    if table.num_rows == 0:
        return {c: np.array([]) for c in cols}
    d = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in cols}
    keep = (d["role"] == "primary") & (d["status"] == 200)
    out = {c: v[keep] for c, v in d.items()}
    order = np.argsort(out["ts"].astype(float))
    return {c: v[order] for c, v in out.items()}


def _feedback(home: Path) -> dict[str, str]:
    from visionfleet.lake import read_feedback
    from visionfleet.store import open_store

    labels: dict[str, str] = {}
    t = read_feedback(open_store(Path(home) / "telemetry"))
    if t.num_rows:
        t = t.sort_by("ts")  # the latest label of a request wins
        # a class index sent before its prediction has no name yet (null); its resolved row follows
        labels.update((r, lab) for r, lab in zip(t.column("request_id").to_pylist(), t.column("label").to_pylist())
                      if lab is not None)
    return labels


def _rolling(values: np.ndarray, k: int) -> np.ndarray:
    if len(values) == 0:
        return values
    k = max(1, min(k, len(values)))
    c = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    out = np.empty(len(values))
    for i in range(len(values)):
        lo = max(0, i + 1 - k)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def confusion_png(labels: list[str], matrix: list[list[int]], title: str = "") -> str:
    """The confusion matrix (rows: true label, columns: predicted) as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=float)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    k = len(labels)
    side = min(9.0, 2.2 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    ax.set_title(title or "held-out confusion matrix (counts; colour: share of the true label)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    out = _png(fig)
    plt.close(fig)
    return out


def model_quality_html(cards: list[Any]) -> str:
    """Per-class accuracy and the confusion matrix of each card that has them (trained here)."""
    parts = []
    for card in cards:
        metrics = card.metrics or {}
        cm = metrics.get("confusion_matrix")
        per_class = metrics.get("per_class_top1") or {}
        if not cm and not per_class:
            continue
        ref = f"{card.name}:{card.version}"
        head = (f"<h3>{html.escape(ref)}</h3><p>holdout top-1 {metrics.get('holdout_top1', float('nan')):.4f}"
                + (f", balanced {metrics['balanced_top1']:.4f}" if metrics.get("balanced_top1") is not None else "")
                + f" on {metrics.get('holdout_n', '?')} images</p>")
        rows = "".join(f"<tr><td>{html.escape(str(lab))}</td><td>{'-' if acc is None else f'{acc:.4f}'}</td></tr>"
                       for lab, acc in per_class.items())
        table = f"<table><tr><th>class</th><th>accuracy</th></tr>{rows}</table>" if rows else ""
        img = (f'<img src="data:image/png;base64,{confusion_png(cm["labels"], cm["matrix"], f"{ref}: held-out confusion matrix")}" '
               f'alt="confusion matrix of {html.escape(ref)}" style="max-width:560px">') if cm else ""
        parts.append(head + f'<div style="display:flex;gap:2em;align-items:flex-start">{table}{img}</div>')
    return "".join(parts)


def write_model_report(card: Any, out: Path) -> Path:
    """One HTML page for a trained version: its training choices, per-class accuracy, confusion matrix."""
    steps = [s for s in (card.lineage.steps or []) if s.get("op") == "train"]
    plan = (steps[0].get("training") or {}) if steps else {}
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td><td>{html.escape(str(plan.get('why', {}).get(k, '')))}</td></tr>"
                   for k, v in (plan.get("chosen") or {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(card.name)}:{card.version}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
table{{border-collapse:collapse;margin:1em 0}}</style></head><body>
<h1>{html.escape(card.name)}:{card.version}</h1>
{model_quality_html([card]) or '<p>no per-class figures in this card</p>'}
<h2>Training settings</h2><table><tr><th>setting</th><th>value</th><th>why</th></tr>{rows or '<tr><td colspan=3>not recorded</td></tr>'}</table>
</body></html>"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def _timeline(home: Path) -> list[dict[str, Any]]:
    p = Path(home) / "retraining" / "timeline.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _experiments(home: Path) -> list[dict[str, Any]]:
    from visionfleet.db.experiments import open_experiments
    from visionfleet.settings import Settings

    return [e.doc for e in open_experiments(Settings.from_env(home)).all()]


def _ts(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%H:%M:%S")


def write_loop_report(home: Path, out: Path, *, model: str | None = None, window: int = 50,
                      extra: dict[str, Any] | None = None) -> Path:
    """Write the closed-loop report to ``out`` (HTML) and return its path.

    Args:
        home: the state dir.
        out: the HTML file to write.
        model: only this model (default: every model in the event lake).
        window: predictions per rolling point in the plots.
        extra: figures to show in a table at the top (e.g. the drift scenario's).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    home = Path(home)
    ev = load_events(home)
    if model is not None:
        keep = ev["model"] == model
        ev = {k: v[keep] for k, v in ev.items()}
    timeline = [e for e in _timeline(home) if model is None or e.get("model") == model]
    experiments = [e for e in _experiments(home) if model is None or e.get("model") == model]
    fb = _feedback(home)
    if len(ev["ts"]) == 0 and not timeline:
        raise ValueError(f"nothing to report in {home}: no prediction events and no retraining timeline")
    t0 = float(min([*ev["ts"].astype(float), *[e["at"] for e in timeline]]))
    versions = sorted({(m, int(v)) for m, v in zip(ev["model"], ev["version"])})

    fig, axes = plt.subplots(2, 1, figsize=(13, 7.5), sharex=True)
    for m, v in versions:
        sel = (ev["model"] == m) & (ev["version"].astype(int) == v)
        t = ev["ts"][sel].astype(float) - t0
        axes[0].plot(t, _rolling(ev["confidence"][sel].astype(float), window), label=f"{m}:{v}")
        ids = ev["request_id"][sel]
        lab = np.array([fb.get(r) for r in ids], dtype=object)
        has = np.array([x is not None for x in lab])
        if has.any():
            correct = (lab[has] == ev["label"][sel][has]).astype(float)
            axes[1].plot(t[has], _rolling(correct, window), label=f"{m}:{v} ({int(has.sum())} labeled)")
    for ax in axes:
        for e in timeline:
            if e["kind"] in _MARKERS:
                color, _ = _MARKERS[e["kind"]]
                ax.axvline(e["at"] - t0, color=color, linestyle="--", linewidth=1)
    handles = [plt.Line2D([], [], color=c, linestyle="--", label=lbl) for c, lbl in _MARKERS.values()]
    axes[0].set_ylabel(f"confidence (rolling {window})")
    axes[0].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    axes[1].set_ylabel(f"accuracy of labeled (rolling {window})")
    axes[1].set_xlabel("seconds")
    axes[1].legend(handles=axes[1].get_legend_handles_labels()[0] + handles, loc="center left",
                   bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.suptitle("Confidence and accuracy per version, with drift, retrain and promotion markers")
    plot = _png(fig)
    plt.close(fig)

    rows = []
    for e in timeline:
        info = {k: v for k, v in e.items() if k not in ("at", "model", "kind", "config", "trace", "run")}
        rows.append(f"<tr><td>{_ts(e['at'])}</td><td>+{e['at'] - t0:.0f}s</td><td>{html.escape(e['kind'])}</td>"
                    f"<td><code>{html.escape(json.dumps(info, default=str)[:600])}</code></td></tr>")
    exp_rows = []
    for x in experiments:
        d = x.get("decision") or {}
        arms = ", ".join(f"{a['name']}={a['model']} ({a['weight']:.0%})" for a in x["arms"])
        exp_rows.append(f"<tr><td>{html.escape(x['name'])}</td><td>{html.escape(arms)}</td><td>{x['status']}</td>"
                        f"<td>{html.escape(str(d.get('reason', '')))}</td></tr>")
    per_version = []
    for m, v in versions:
        sel = (ev["model"] == m) & (ev["version"].astype(int) == v)
        ids = ev["request_id"][sel]
        lab = [(fb.get(r), p) for r, p in zip(ids, ev["label"][sel]) if fb.get(r) is not None]
        acc = np.mean([a == b for a, b in lab]) if lab else float("nan")
        per_version.append(f"<tr><td>{m}:{v}</td><td>{int(sel.sum())}</td><td>{ev['confidence'][sel].astype(float).mean():.4f}</td>"
                           f"<td>{len(lab)}</td><td>{'-' if np.isnan(acc) else f'{acc:.4f}'}</td></tr>")
    quality = ""
    try:  # the held-out quality of each version seen, from its card (trained versions have it)
        from visionfleet.registry import Registry
        from visionfleet.settings import Settings

        reg = Registry.from_settings(Settings.from_env(home))
        cards = []
        for m, v in versions:
            try:
                cards.append(reg.card(m, v))
            except Exception:  # noqa: BLE001 - a version without a readable card just has no section
                continue
        quality = model_quality_html(cards)
    except (OSError, RuntimeError):  # no registry here, or its store / database is down: no section
        quality = ""
    extra_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in (extra or {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>visionfleet closed loop</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
table{{border-collapse:collapse;margin:1em 0}}code{{font-size:11px}}</style></head><body>
<h1>visionfleet — the closed loop{' for ' + html.escape(model) if model else ''}</h1>
<p>State dir <code>{html.escape(str(home))}</code>, {len(ev['ts'])} predictions, {len(fb)} labels, generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}.</p>
{'<h2>Figures</h2><table>' + extra_rows + '</table>' if extra_rows else ''}
<img src="data:image/png;base64,{plot}" alt="confidence and accuracy per version" style="max-width:100%">
<h2>Per version</h2><table><tr><th>version</th><th>predictions</th><th>mean confidence</th><th>labeled</th><th>accuracy (labeled)</th></tr>{''.join(per_version)}</table>
{'<h2>Held-out quality per version</h2>' + quality if quality else ''}
<h2>Timeline of the retraining controller</h2><table><tr><th>time</th><th>since start</th><th>event</th><th>details</th></tr>{''.join(rows) or '<tr><td colspan=4>no events</td></tr>'}</table>
<h2>Experiments</h2><table><tr><th>name</th><th>arms</th><th>status</th><th>decision</th></tr>{''.join(exp_rows) or '<tr><td colspan=4>none</td></tr>'}</table>
</body></html>"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
