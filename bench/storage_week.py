"""A week of telemetry in simulated time: files, bytes and the cost of a look stay flat (issue 15).

    .venv/bin/python bench/storage_week.py                        # 7 days at 50 req/s, local store
    .venv/bin/python bench/storage_week.py --days 2 --store s3://bucket/prefix   # AWS_* env set

Events are generated directly (not served) and written the way the sink writes them: one
Parquet part per (date, source) partition per 2 s flush, plus a feedback part per flush that
has labels, through ``visionfleet.store`` (a local directory or S3). Time is simulated: every
flush and every maintenance run gets the simulated ``now``; nothing waits. The sink's hook,
``visionfleet.lake.Maintenance(store).maybe_run(now)``, runs after every flush (it acts at most
every ``--compact-every`` seconds), so compaction and retention happen as in the sink.

At the end of every simulated day it measures the lake (files, bytes) and a controller
"look": the last ``--window`` seconds of events read from the lake plus the labels counted in
the same window of the feedback lake (median of three). It reports after the maintenance run at
midnight (runs fall on multiples of the interval). For comparison it reports what the
store would hold without compaction (every part the sink wrote; and with the same retention
but no compaction), and it keeps an uncompacted copy of the first ``--baseline-days`` days
to time the same look on it.

Progress goes to stderr, the table to stdout, the figures to
``bench/results/storage-week-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from visionfleet.lake import CompactionPolicy, Maintenance, lake_stats, parse_retention, read_events, read_feedback  # noqa: E402
from visionfleet.store import Store, open_store  # noqa: E402

__all__ = ["WeekConfig", "simulate", "main"]

DAY = 86400.0
_LABELS = [f"class_{i}" for i in range(10)]


@dataclass(frozen=True)
class WeekConfig:
    days: float = 7.0
    rate: float = 50.0  # requests per second
    feedback_rate: float = 0.1  # labels per second (8,640 a day: 0.2 % of the requests)
    flush_s: float = 2.0  # the sink's flush interval
    compact_every_s: float = 600.0  # Maintenance.interval_s
    grace_s: float = 300.0
    target_mb: float = 64.0
    retention: str = "1d"
    window_s: float = 3600.0  # what a look reads
    baseline_days: float = 1.0  # uncompacted copy kept (and looked at) for this many days
    start: str = "2026-11-02"  # a Monday, 00:00 UTC
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("days", "rate", "flush_s", "compact_every_s", "target_mb", "window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Got {getattr(self, name)} for {name}; expected > 0")
        if self.feedback_rate < 0 or self.baseline_days < 0 or self.grace_s < 0:
            raise ValueError("Got a negative feedback_rate, baseline_days or grace_s; expected >= 0")
        parse_retention(self.retention)


# ---------------------------------------------------------------------- the traffic


class _Traffic:
    """Events and labels in columns, generated an hour at a time (fast enough for a week)."""

    def __init__(self, cfg: WeekConfig) -> None:
        import pyarrow as pa

        from serve_apps.telemetry import _event_schema, _feedback_schema

        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.schema: pa.Schema = _event_schema()
        self.fb_schema: pa.Schema = _feedback_schema()
        self.recent_ids: list[str] = []

    def _ids(self, n: int) -> list[str]:
        h = self.rng.bytes(16 * n).hex()
        return [h[i:i + 32] for i in range(0, 32 * n, 32)]

    def events(self, t0: float, t1: float):
        """A table of the requests in [t0, t1)."""
        import pyarrow as pa

        rng, n = self.rng, int(self.rng.poisson(self.cfg.rate * (t1 - t0)))
        ts = np.sort(rng.uniform(t0, t1, n))
        ok = rng.random(n) > 0.005
        cls = rng.integers(0, len(_LABELS), n)
        conf = rng.beta(8, 2, n)
        ids = self._ids(n)
        self.recent_ids = ids[-2000:]
        cols: dict[str, Any] = {
            "request_id": ids, "role": ["primary"] * n, "ts": ts, "source": ["server"] * n,
            "model": ["demo"] * n, "version": np.full(n, 3), "variant": ["default"] * n,
            "experiment": [None] * n, "client_key": [None] * n,
            "status": np.where(ok, 200, 500), "error": [None if o else "RuntimeError: boom" for o in ok],
            "latency_ms": rng.gamma(4.0, 3.0, n), "task": ["classify"] * n,
            "label": [_LABELS[c] for c in cls], "class_id": cls, "confidence": conf,
            "margin": conf * rng.random(n), "entropy": rng.random(n) * 2.3, "detections": [None] * n,
            "width": np.full(n, 640), "height": np.full(n, 480), "input_size": ["96x96"] * n,
            "brightness": rng.normal(120, 20, n), "contrast": rng.normal(50, 8, n), "blur": rng.gamma(2, 200, n),
        }
        return pa.Table.from_pydict(cols, schema=self.schema)

    def feedback(self, t0: float, t1: float, ids: list[str]):
        import pyarrow as pa

        n = min(len(ids), int(self.rng.poisson(self.cfg.feedback_rate * (t1 - t0))))
        if n == 0:
            return None
        pick = self.rng.choice(len(ids), n, replace=False)
        cls = self.rng.integers(0, len(_LABELS), n)
        return pa.Table.from_pydict({"request_id": [ids[i] for i in pick], "label": [_LABELS[c] for c in cls],
                                     "class_id": cls, "ts": np.sort(self.rng.uniform(t0, t1, n))},
                                    schema=self.fb_schema)


def _parquet(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)  # the sink's defaults
    return buf.getvalue().to_pybytes()


def _date(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d")


# ---------------------------------------------------------------------- measuring


def _look(store: Store, now: float, window_s: float, repeat: int = 3) -> dict[str, Any]:
    """The last window of events (primary, answered) plus the labels counted in it."""
    import pyarrow.compute as pc

    from visionfleet.lake import _window_files

    secs, rows, labels = [], 0, 0
    read_events(store, since=now - window_s, until=now, columns=["ts"])  # warm: imports, first listing
    for _ in range(repeat):
        t0 = time.perf_counter()
        ev = read_events(store, since=now - window_s, until=now,
                         columns=["ts", "model", "version", "status", "confidence", "label", "role"])
        ev = ev.filter(pc.and_(pc.equal(ev.column("role"), "primary"), pc.equal(ev.column("status"), 200)))
        fb = read_feedback(store, since=now - window_s, until=now, columns=["request_id", "label"])
        labels = len(set(fb.column("request_id").to_pylist())) if fb.num_rows else 0
        secs.append(time.perf_counter() - t0)
        rows = ev.num_rows
    files = len(_window_files(store, "events", now - window_s, now)) + \
        len(_window_files(store, "feedback", now - window_s, now))
    return {"seconds": statistics.median(secs), "events": rows, "labels": labels, "files_read": files}


def _stats(store: Store) -> dict[str, int]:
    ev, fb = lake_stats(store, "events"), lake_stats(store, "feedback")
    return {"files": ev["files"] + fb["files"], "bytes": ev["bytes"] + fb["bytes"],
            "event_files": ev["files"], "feedback_files": fb["files"]}


# ---------------------------------------------------------------------- the week


def simulate(cfg: WeekConfig, store: Store, progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Run the simulated traffic into ``store``; returns the per-day figures."""
    traffic = _Traffic(cfg)
    start = _dt.datetime.strptime(cfg.start, "%Y-%m-%d").replace(tzinfo=_dt.timezone.utc).timestamp()
    end = start + cfg.days * DAY
    keep_s = parse_retention(cfg.retention)
    lake = store.child("lake")
    maint = Maintenance(lake, retention={"telemetry": keep_s},
                        policy=CompactionPolicy(target_bytes=int(cfg.target_mb * 1024 * 1024), grace_s=cfg.grace_s),
                        interval_s=cfg.compact_every_s)
    baseline = store.child("baseline-uncompacted") if cfg.baseline_days > 0 else None
    written_per_day: dict[str, list[int]] = {}  # date -> [files, bytes] the sink wrote (uncompacted)
    compaction = {"runs": 0, "seconds": 0.0, "max_seconds": 0.0, "inputs": 0, "outputs": 0}
    days: list[dict[str, Any]] = []
    baseline_look: dict[str, Any] | None = None
    write_s = 0.0
    hour_events = None
    hour_t0 = start
    t = start
    next_day = start + DAY
    while t < end - 1e-9:
        if hour_events is None or t >= hour_t0 + 3600:
            hour_t0 = t
            hour_events = traffic.events(hour_t0, hour_t0 + 3600)
            hour_ts = hour_events.column("ts").to_numpy()
        t1 = t + cfg.flush_s
        lo, hi = np.searchsorted(hour_ts, [t, t1])
        batch = hour_events.slice(int(lo), int(hi - lo))
        flush_ms = int(t1 * 1000)
        w0 = time.perf_counter()
        files: list[tuple[str, bytes]] = []
        if batch.num_rows:  # one partition: date of the events (a flush never spans midnight here)
            files.append((f"events/date={_date(t)}/source=server/part-{flush_ms}-{uuid.uuid4().hex[:8]}.parquet",
                          _parquet(batch)))
        fb = traffic.feedback(t, t1, batch.column("request_id").to_pylist() if batch.num_rows else [])
        if fb is not None:
            files.append((f"feedback/date={_date(t)}/part-{flush_ms}-{uuid.uuid4().hex[:8]}.parquet", _parquet(fb)))
        for key, data in files:
            lake.write_bytes(key, data)
            if baseline is not None and t < start + cfg.baseline_days * DAY:
                baseline.write_bytes(key, data)
            w = written_per_day.setdefault(_date(t), [0, 0])
            w[0] += 1
            w[1] += len(data)
        write_s += time.perf_counter() - w0
        t = t1
        rep = maint.maybe_run(t)
        if rep is not None:
            compaction["runs"] += 1
            compaction["seconds"] += rep["seconds"]
            compaction["max_seconds"] = max(compaction["max_seconds"], rep["seconds"])
            for p in maint.prefixes:
                compaction["inputs"] += rep[p]["inputs"]
                compaction["outputs"] += rep[p]["outputs"]
        if progress is not None:
            progress(t - start)
        if t >= next_day - 1e-9:
            day = round((t - start) / DAY)
            figures = {"day": day, "at": _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(),
                       **_stats(lake), "look": _look(lake, t, cfg.window_s)}
            kept_dates = [d for d in written_per_day
                          if keep_s is None or _dt.datetime.strptime(d, "%Y-%m-%d").replace(
                              tzinfo=_dt.timezone.utc).timestamp() + DAY > t - keep_s]
            figures["uncompacted"] = {
                "files": sum(v[0] for v in written_per_day.values()),
                "bytes": sum(v[1] for v in written_per_day.values()),
                "files_same_retention": sum(written_per_day[d][0] for d in kept_dates),
                "bytes_same_retention": sum(written_per_day[d][1] for d in kept_dates),
            }
            if baseline is not None and baseline_look is None and t >= start + cfg.baseline_days * DAY - 1e-9:
                baseline_look = {"day": day, **_stats(baseline), "look": _look(baseline, t, cfg.window_s)}
                figures["uncompacted"]["look"] = baseline_look["look"]
                baseline.delete("")  # measured: free the disk
            days.append(figures)
            next_day += DAY
    return {"config": asdict(cfg), "store": store.uri, "days": days, "baseline": baseline_look,
            "compaction": compaction, "write_seconds": write_s,
            "written": {"files": sum(v[0] for v in written_per_day.values()),
                        "bytes": sum(v[1] for v in written_per_day.values())}}


# ---------------------------------------------------------------------- the CLI


def _machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = WeekConfig()
    ap.add_argument("--days", type=float, default=d.days)
    ap.add_argument("--rate", type=float, default=d.rate, help="requests per second")
    ap.add_argument("--feedback-rate", type=float, default=d.feedback_rate, help="labels per second")
    ap.add_argument("--flush-s", type=float, default=d.flush_s)
    ap.add_argument("--compact-every", type=float, default=d.compact_every_s, help="maintenance interval (s)")
    ap.add_argument("--grace", type=float, default=d.grace_s, help="a part is merged once this old (s)")
    ap.add_argument("--target-mb", type=float, default=d.target_mb)
    ap.add_argument("--retention", default=d.retention, help="of events and feedback: 1d, 7d, forever")
    ap.add_argument("--window", type=float, default=d.window_s, help="what a look reads (s)")
    ap.add_argument("--baseline-days", type=float, default=d.baseline_days)
    ap.add_argument("--store", default="", help="a local dir or s3://bucket/prefix (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the simulated lake")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results" / f"storage-week-{_dt.date.today()}.json")
    args = ap.parse_args(argv)
    try:
        cfg = WeekConfig(days=args.days, rate=args.rate, feedback_rate=args.feedback_rate, flush_s=args.flush_s,
                         compact_every_s=args.compact_every, grace_s=args.grace, target_mb=args.target_mb,
                         retention=args.retention, window_s=args.window, baseline_days=args.baseline_days)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    tmp = None
    if args.store:
        root = open_store(args.store)
    else:
        tmp = tempfile.mkdtemp(prefix="vf-storage-week-")
        root = open_store(tmp)
    store = root.child(f"storage-week-{uuid.uuid4().hex[:8]}")
    store.check()
    err = Console(stderr=True)
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]simulated[/] {task.fields[day]}"), BarColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err) as prog:
        task = prog.add_task("week", total=cfg.days * DAY, day="day 0")
        last = [0.0]

        def progress(elapsed: float) -> None:
            if elapsed - last[0] >= 600 or elapsed >= cfg.days * DAY:
                last[0] = elapsed
                prog.update(task, completed=elapsed, day=f"day {elapsed / DAY:.2f}")
        result = simulate(cfg, store, progress)
    result["wall_seconds"] = time.perf_counter() - t0
    result["machine"] = _machine()
    result["measured_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if not args.keep:
        store.delete("")
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    out = Console()
    table = Table(title=f"storage week: {cfg.rate:g} req/s, flush every {cfg.flush_s:g} s, retention {cfg.retention}, "
                        f"look = last {cfg.window_s:g} s ({store.uri.split('://')[0] if '://' in store.uri else 'local'})")
    for col in ("day", "files", "MB", "look s", "look files", "look events", "labels",
                "uncompacted files", "uncompacted MB", "same retention files", "uncompacted look s"):
        table.add_column(col, justify="right")
    for day in result["days"]:
        u = day["uncompacted"]
        table.add_row(str(day["day"]), f"{day['files']:,}", _mb(day["bytes"]), f"{day['look']['seconds']:.3f}",
                      str(day["look"]["files_read"]), f"{day['look']['events']:,}", str(day["look"]["labels"]),
                      f"{u['files']:,}", _mb(u["bytes"]), f"{u['files_same_retention']:,}",
                      f"{u['look']['seconds']:.3f}" if "look" in u else "")
    out.print(table)
    c = result["compaction"]
    out.print(f"maintenance: {c['runs']} runs, {c['seconds']:.1f} s in all (longest {c['max_seconds']:.2f} s), "
              f"{c['inputs']:,} files merged into {c['outputs']:,}; writing parts took {result['write_seconds']:.1f} s; "
              f"wall {result['wall_seconds']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    err.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
