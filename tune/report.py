"""A sweep's report on disk: summary, every trial, the Pareto front as JSON, a table and a PNG plot.

Files under ``<state>/tune/<sweep_id>/``:

* ``summary.json``: the sweep (model, target, budget and how it was set, the baseline,
  space size, trial counts, wall time, the best feasible config and what was registered);
* ``trials.json``: every trial record (config, status, top-1, p95, size, …);
* ``front.json``: the Pareto front (accuracy vs p95 latency) with feasibility;
* ``front.md``: the front and the best config as a Markdown table;
* ``front.png``: every trial as a point, the front as a line, the budget as a vertical
  line, the best feasible trial starred;
* ``trials/<trial_id>.json`` (written by the trials), ``ray/`` (Ray Tune's own files).

:func:`load_report` reads them back; :func:`list_sweeps` lists the sweeps of a state dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from tune.pareto import COMPLETE, Constraints, TrialRecord, checks, is_feasible, pareto_front

__all__ = ["write_report", "load_report", "list_sweeps", "front_table", "plot_front", "sweeps_dir", "SweepReport"]


def sweeps_dir(home: str | os.PathLike[str]) -> Path:
    return Path(home) / "tune"


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def front_table(rows: Sequence[TrialRecord], c: Constraints, best_key: str | None = None) -> str:
    """A Markdown table of trials: config, top-1, p95, size, feasible (the best marked)."""
    lines = [
        "| | prune | quantize | size px | threads | top-1 | p95 ms | p50 ms | MB | feasible |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in rows:
        cfg = t.config
        mark = "**best**" if t.key == best_key else ""
        if t.status != COMPLETE:
            verdict = t.status + (f" ({t.error})" if t.error else "")
        else:
            failed = [x.name for x in checks(t, c) if x.ok is False]
            verdict = "yes" if is_feasible(t, c) else "no: " + ", ".join(failed)
        lines.append(
            f"| {mark} | {cfg['prune']:g} | {cfg['quantize']} | {cfg['input_size']} | {cfg['threads']} | "
            f"{_fmt(None if t.top1 is None else 100 * t.top1, '.2f')} | {_fmt(t.p95_ms, '.3f')} | "
            f"{_fmt(t.p50_ms, '.3f')} | {_fmt(t.size_mb, '.2f')} | {verdict} |"
        )
    return "\n".join(lines)


def plot_front(
    trials: Sequence[TrialRecord], c: Constraints, path: str | os.PathLike[str], *, title: str, best_key: str | None
) -> Path:
    """Top-1 vs p95 latency: all measured trials, the front, the budget line, the best starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t.status == COMPLETE and t.top1 is not None and t.p95_ms is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ok = [t for t in done if is_feasible(t, c)]
    bad = [t for t in done if not is_feasible(t, c)]
    if ok:
        ax.scatter([t.p95_ms for t in ok], [100 * t.top1 for t in ok], s=22, color="#4C72B0", label="feasible")
    if bad:
        ax.scatter([t.p95_ms for t in bad], [100 * t.top1 for t in bad], s=22, color="#C44E52", marker="x",
                   label="infeasible")
    front = pareto_front(done)
    if front:
        ax.step([t.p95_ms for t in front], [100 * t.top1 for t in front], where="post", color="#55A868",
                label="Pareto front")
    ax.axvline(c.latency_ms, color="gray", linestyle="--", label=f"budget {c.latency_ms:.3g} ms")
    best = next((t for t in done if t.key == best_key), None)
    if best is not None:
        ax.scatter([best.p95_ms], [100 * best.top1], s=180, marker="*", color="#DD8452", zorder=5,
                   label="best feasible")
    ax.set_xlabel("p95 latency, batch 1 (ms)")
    ax.set_ylabel("holdout top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    out_dir: str | os.PathLike[str],
    summary: Mapping[str, Any],
    trials: Sequence[TrialRecord],
    c: Constraints,
    best: TrialRecord | None,
) -> dict[str, str]:
    """Write summary, trials, front (JSON, Markdown, PNG); returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best_key = best.key if best else None
    front = pareto_front(trials)
    front_doc = [{**t.to_dict(), "feasible": is_feasible(t, c)} for t in front]
    paths = {
        "summary": out / "summary.json",
        "trials": out / "trials.json",
        "front_json": out / "front.json",
        "front_md": out / "front.md",
        "front_png": out / "front.png",
    }
    _write_json(paths["trials"], [{**t.to_dict(), "feasible": is_feasible(t, c)} for t in trials])
    _write_json(paths["front_json"], {"constraints": c.to_dict(), "best": best_key, "front": front_doc})
    head = [f"# Sweep {summary.get('sweep')}", ""]
    head.append(
        f"{summary.get('model')} on {summary.get('target')}: budget p95 <= {c.latency_ms:.3g} ms "
        f"({summary.get('budget_source')}); {summary.get('trials')} trials, "
        f"{summary.get('unique_configs')} distinct configs of {summary.get('space_points')}; "
        f"{summary.get('wall_s', 0):.0f} s."
    )
    head.append("")
    if best is not None:
        head.append(f"Best feasible: `{best.key}`: top-1 {100 * best.top1:.2f}%, p95 {best.p95_ms:.3f} ms.")  # type: ignore[operator]
    else:
        head.append(f"No feasible config: no trial met every constraint ({summary.get('no_feasible_reason', '')}).")
    text = "\n".join([
        *head, "", "## Pareto front (accuracy vs p95 latency)", "", front_table(front, c, best_key), "",
        "## All trials", "", front_table(sorted(trials, key=_order), c, best_key), "",
    ])
    paths["front_md"].write_text(text)
    plot_front(trials, c, paths["front_png"], title=f"{summary.get('model')} on {summary.get('target')}", best_key=best_key)
    _write_json(paths["summary"], {**summary, "files": {k: str(v) for k, v in paths.items()}})
    return {k: str(v) for k, v in paths.items()}


def _order(t: TrialRecord) -> tuple:
    return (t.status != COMPLETE, -(t.top1 or 0.0), t.p95_ms or 0.0)


class SweepReport:
    """A sweep read back from disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.summary: dict[str, Any] = json.loads((folder / "summary.json").read_text())
        self.trials = [TrialRecord.from_dict(d) for d in json.loads((folder / "trials.json").read_text())]
        self.constraints = Constraints(**self.summary["constraints"])

    @property
    def best(self) -> TrialRecord | None:
        key = (self.summary.get("best") or {}).get("key")
        return next((t for t in self.trials if t.key == key), None)

    @property
    def front(self) -> list[TrialRecord]:
        return pareto_front(self.trials)

    def table(self) -> str:
        return front_table(self.front, self.constraints, self.best.key if self.best else None)

    def to_dict(self) -> dict[str, Any]:
        c = self.constraints
        return {
            "summary": self.summary,
            "front": [{**t.to_dict(), "feasible": is_feasible(t, c)} for t in self.front],
            "trials": [{**t.to_dict(), "feasible": is_feasible(t, c)} for t in self.trials],
        }


def load_report(home: str | os.PathLike[str], sweep_id: str) -> SweepReport:
    """Read ``<home>/tune/<sweep_id>``.

    Raises:
        FileNotFoundError: no finished sweep of that id.
    """
    if not sweep_id or "/" in sweep_id or sweep_id.startswith("."):
        raise ValueError(f"Got {sweep_id!r} for a sweep id; expected a name listed by `visionfleet tune list`")
    folder = sweeps_dir(home) / sweep_id
    if not (folder / "summary.json").is_file():
        known = [s["sweep"] for s in list_sweeps(home)]
        raise FileNotFoundError(f"Got sweep {sweep_id!r}, which has no report under {folder.parent}; expected one of {known}")
    return SweepReport(folder)


def list_sweeps(home: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every finished sweep of a state dir, oldest first: id, model, target, budget, best."""
    root = sweeps_dir(home)
    out = []
    for p in sorted(root.glob("*/summary.json")) if root.is_dir() else []:
        s = json.loads(p.read_text())
        best = s.get("best") or {}
        out.append({
            "sweep": s.get("sweep"), "model": s.get("model"), "target": s.get("target"),
            "budget_ms": (s.get("constraints") or {}).get("latency_ms"), "trials": s.get("trials"),
            "best": best.get("key"), "top1": best.get("top1"), "p95_ms": best.get("p95_ms"),
            "registered": s.get("registered"), "started_at": s.get("started_at"), "wall_s": s.get("wall_s"),
        })
    return sorted(out, key=lambda d: d.get("started_at") or "")
