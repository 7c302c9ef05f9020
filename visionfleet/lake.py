"""The telemetry lake kept bounded: compaction, retention, and reads that never double count.

The sink writes one small Parquet part per partition per flush (every 2 s: about 43k files a
day per source) under the store area ``telemetry``::

    events/date=YYYY-MM-DD/source=<source>/part-<flush ms>-<id>.parquet
    feedback/date=YYYY-MM-DD/part-<flush ms>-<id>.parquet

:func:`compact` merges a partition's small parts into large files beside them::

    .../compact-<min ts ms>-<max ts ms>-<group>-<i>of<n>.parquet

rows sorted by ``ts``, de-duplicated, in row groups a reader can skip by their ``ts``
statistics. :func:`apply_retention` deletes whole date partitions older than the retention.
:class:`Maintenance` is the hook the sink's background loop calls (at most every
``interval_s``). Everything goes through :class:`visionfleet.store.Store`: a local directory
and an S3 bucket behave the same.

**What a reader sees, and why nothing is lost or doubled.** A compaction writes its outputs
first (each one atomic: a rename locally, a single PUT on S3), then deletes its inputs. A
reader that lists in between sees rows twice, so readers (:func:`read_lake`,
:func:`read_events`) de-duplicate by the lake's key — ``(request_id, role)`` for events, the
whole row for feedback — the same key the sink already de-duplicates by; it also covers an
edge part rewritten after a crash (``visionfleet.fleet``). A reader whose input disappears
under it (compacted meanwhile) lists again. A compaction that is killed:

* before its outputs are all written leaves an incomplete group (``<i>of<n>`` with a chunk
  missing) beside its untouched inputs: the next run deletes the incomplete chunks;
* after, leaves some inputs beside a complete group: every chunk's footer names the inputs
  (``visionfleet.compacted_from``), and the next run deletes those leftovers before choosing
  what to merge, so a row is never merged twice.

So :func:`compact` is idempotent: run it again and it finishes what was interrupted or does
nothing. It assumes one compactor per lake at a time (the sink is one detached actor).

**Which parts are merged.** A part is merged once it is ``grace_s`` old (the hot partition of
the current day included), together with the partition's not-yet-full compacted files once
``fanout`` of them exist (size-tiered, so a day's rows are rewritten about twice, not at every
run); a day that is over is merged down to files of about ``target_bytes``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import logging
import re
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from visionfleet.store import Store, StoreError

__all__ = [
    "CompactionPolicy",
    "CompactionReport",
    "Maintenance",
    "RETENTION_DEFAULTS",
    "RETENTION_AREAS",
    "parse_retention",
    "compact",
    "apply_retention",
    "read_lake",
    "read_events",
    "read_feedback",
    "lake_stats",
    "expired_samples",
    "EVENT_KEY",
    "FEEDBACK_KEY",
]

logger = logging.getLogger(__name__)

# The key a row is unique by, per lake prefix (what readers and compaction de-duplicate on).
EVENT_KEY = ("request_id", "role")
FEEDBACK_KEY = ("request_id", "label", "class_id", "ts")
_KEYS = {"events": EVENT_KEY, "feedback": FEEDBACK_KEY}

# Areas with a retention: the telemetry lake (raw events and feedback) and the unlabeled
# labeling samples (a labeled sample is ground truth: kept whatever the setting). Every other
# area (registry, datasets, runs, ...) is kept forever: setting a retention for it is refused.
RETENTION_AREAS = ("telemetry", "samples")
RETENTION_DEFAULTS = {"telemetry": "7d", "samples": "30d"}

_PART = re.compile(r"^part-(\d+)-[^/]*\.parquet$")
_COMPACT = re.compile(r"^compact-(\d+)-(\d+)-([0-9a-f]+)-(\d+)of(\d+)\.parquet$")
_DATE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_META = b"visionfleet.compacted_from"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Edge parts are named by their commit time on the server; a device clock that runs ahead can
# stamp events a little later than that, so name-based pruning of parts keeps this much slack.
_PART_PRUNE_SLACK_S = 3600.0


def parse_retention(text: str) -> float | None:
    """Seconds to keep (``None``: forever) from ``7d``, ``12h``, ``90m``, ``2w`` or ``forever``.

    Raises:
        ValueError: anything else (``Got ...; expected ...``).
    """
    raw = str(text).strip().lower()
    if raw in ("forever", "inf", "never"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", raw)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"Got {text!r} for a retention; expected a positive duration like 7d, 12h, 90m, 2w "
                         f"or 'forever'")
    return float(m.group(1)) * _UNITS[m.group(2)]


# ---------------------------------------------------------------------- listing


@dataclass(frozen=True)
class _File:
    key: str  # relative to the store root
    name: str
    size: int
    kind: str  # "part" | "compact"
    lo_ms: int  # part: flush time; compact: min ts
    hi_ms: int  # part: flush time; compact: max ts
    group: str = ""
    chunk: int = 0
    chunks: int = 1


def _parse(key: str, size: int) -> _File | None:
    name = key.rsplit("/", 1)[-1]
    m = _PART.match(name)
    if m:
        ms = int(m.group(1))
        return _File(key, name, size, "part", ms, ms)
    m = _COMPACT.match(name)
    if m:
        return _File(key, name, size, "compact", int(m.group(1)), int(m.group(2)), m.group(3),
                     int(m.group(4)), int(m.group(5)))
    return None  # temp files of writers in progress, anything else


def _partition_date(key: str) -> str | None:
    for comp in key.split("/"):
        m = _DATE.match(comp)
        if m:
            return m.group(1)
    return None


def _day_start(date: str) -> float:
    return _dt.datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=_dt.timezone.utc).timestamp()


def _date_of(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d")


def _partitions(store: Store, prefix: str, dates: Iterable[str] | None = None) -> dict[str, list[_File]]:
    """Data files per partition directory (key of the directory -> files)."""
    out: dict[str, list[_File]] = {}
    if dates is None:
        listings = [store.list(prefix, recursive=True)]
    else:
        listings = [store.list(f"{prefix}/date={d}", recursive=True) for d in dates]
    for listing in listings:
        for key, size, is_dir in listing:
            if is_dir:
                continue
            f = _parse(key, size)
            if f is not None:
                out.setdefault(key.rsplit("/", 1)[0], []).append(f)
    return out


def _dates(store: Store, prefix: str) -> list[str]:
    return sorted(m.group(1) for key, _, is_dir in store.list(prefix) if is_dir
                  for m in [_DATE.match(key.rsplit("/", 1)[-1])] if m)


def lake_stats(store: Store, prefix: str = "") -> dict[str, int]:
    """Files and bytes under a prefix (every file, temp files included: what the store holds)."""
    files = size = 0
    for _, n, is_dir in store.list(prefix, recursive=True):
        if not is_dir:
            files += 1
            size += n
    return {"files": files, "bytes": size}


# ---------------------------------------------------------------------- compaction


@dataclass(frozen=True)
class CompactionPolicy:
    """When parts are merged, and how large the merged files get."""

    target_bytes: int = 64 * 1024 * 1024  # a merged file is about this large (a closed day: chunks of it)
    grace_s: float = 300.0  # a part is merged once this old: the sink and late readers are done with it
    fanout: int = 8  # merge a partition's not-yet-full compacted files once this many exist
    row_group_rows: int = 65_536  # readers skip row groups by their ts statistics
    # An incomplete group (a compaction killed while writing) is removed once this old by the
    # wall clock, so that a group still being written is never taken for a dead one.
    abandon_s: float = 600.0

    def __post_init__(self) -> None:
        if self.target_bytes < 1024:
            raise ValueError(f"Got {self.target_bytes} for target_bytes; expected >= 1024")
        if self.grace_s < 0:
            raise ValueError(f"Got {self.grace_s} for grace_s; expected >= 0")
        if self.fanout < 2:
            raise ValueError(f"Got {self.fanout} for fanout; expected >= 2")
        if self.row_group_rows < 1:
            raise ValueError(f"Got {self.row_group_rows} for row_group_rows; expected >= 1")

    def full(self, f: _File) -> bool:
        # Chunks of a closed day are >= target/2 by construction (n equal chunks of > (n-1)*target).
        return f.kind == "compact" and f.size >= self.target_bytes // 2


@dataclass
class CompactionReport:
    partitions: int = 0  # partitions merged
    inputs: int = 0  # files merged (and deleted)
    outputs: int = 0  # files written
    rows: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    recovered: int = 0  # leftovers of an interrupted run deleted
    seconds: float = 0.0

    def add(self, other: "CompactionReport") -> None:
        for k in ("partitions", "inputs", "outputs", "rows", "bytes_in", "bytes_out", "recovered"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _encode_meta(doc: dict[str, Any]) -> bytes:
    return base64.b64encode(zlib.compress(json.dumps(doc, separators=(",", ":")).encode()))


def _decode_meta(raw: bytes) -> dict[str, Any]:
    return json.loads(zlib.decompress(base64.b64decode(raw)))


def _read_footer_inputs(store: Store, f: _File) -> set[str]:
    import pyarrow.parquet as pq

    meta = store._call(f"read footer {store.uri}/{f.key}", pq.read_metadata, store.path(f.key), None, None,
                       store.fs)
    raw = (meta.metadata or {}).get(_META)
    return set(_decode_meta(raw)["inputs"]) if raw else set()


def _new_group() -> str:
    return f"{int(time.time() * 1000):011x}{uuid.uuid4().hex[:6]}"  # wall-clock ms first: its age


def _group_age_s(group: str) -> float:
    try:
        return time.time() - int(group[:11], 16) / 1000
    except ValueError:
        return float("inf")


def _recover(store: Store, files: list[_File], policy: CompactionPolicy) -> tuple[list[_File], list[_File], int]:
    """Finish an interrupted compaction in one partition.

    Returns the files left, the chunks of groups still being written (not to be merged), and
    how many files were deleted.
    """
    groups: dict[str, list[_File]] = {}
    for f in files:
        if f.kind == "compact":
            groups.setdefault(f.group, []).append(f)
    gone: set[str] = set()
    busy: list[_File] = []
    for g, members in groups.items():
        if len({m.chunk for m in members}) < members[0].chunks:  # killed while writing: inputs untouched
            if _group_age_s(g) >= policy.abandon_s:
                gone.update(m.key for m in members)
            else:
                busy.extend(members)
    parts = {f.name: f for f in files if f.kind == "part"}
    if parts:
        for members in groups.values():
            if members[0].key in gone or members[0] in busy:
                continue
            for name in _read_footer_inputs(store, members[0]) & parts.keys():
                gone.add(parts[name].key)  # already merged: killed before its delete
    for key in sorted(gone):
        store.delete(key)
    return [f for f in files if f.key not in gone and f not in busy], busy, len(gone)


def _read_files(store: Store, files: Sequence[_File], columns: Sequence[str] | None = None, filt=None):
    import pyarrow.dataset as pads

    ds = pads.dataset([store.path(f.key) for f in files], filesystem=store.fs, format="parquet")
    return store._call(f"read {len(files)} files under {store.uri}", ds.to_table, columns, filt)


def _dedupe(table, key: Sequence[str]):
    """The first row of each key (rows whose key columns are all equal)."""
    import numpy as np
    import pyarrow as pa

    if table.num_rows == 0:
        return table
    key = [k for k in key if k in table.column_names] or list(table.column_names)
    idx = table.select(key).append_column("_i", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    first = idx.group_by(key, use_threads=False).aggregate([("_i", "min")]).column("_i_min")
    if len(first) == table.num_rows:
        return table
    return table.take(pa.array(np.sort(first.to_numpy())))


def _merge_partition(store: Store, directory: str, inputs: list[_File], key: Sequence[str],
                     policy: CompactionPolicy) -> CompactionReport:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rep = CompactionReport(partitions=1, inputs=len(inputs), bytes_in=sum(f.size for f in inputs))
    table = _dedupe(_read_files(store, inputs), key)
    if "ts" in table.column_names:
        table = table.sort_by("ts")
    total_bytes = sum(f.size for f in inputs)
    n = max(1, -(-total_bytes // policy.target_bytes))  # ceil
    n = min(n, max(1, table.num_rows))
    group = _new_group()
    meta = _encode_meta({"inputs": sorted(f.name for f in inputs), "group": group, "chunks": n})
    bounds = [round(i * table.num_rows / n) for i in range(n + 1)]
    written: list[str] = []
    for i in range(n):
        chunk = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        if "ts" in chunk.column_names and chunk.num_rows:
            lo, hi = pc.min(chunk.column("ts")).as_py(), pc.max(chunk.column("ts")).as_py()
            lo_ms, hi_ms = int((lo or 0) * 1000), int(-(-(hi or 0) * 1000 // 1))
        else:
            lo_ms = hi_ms = 0
        chunk = chunk.replace_schema_metadata({**(chunk.schema.metadata or {}), _META: meta})
        buf = pa.BufferOutputStream()
        pq.write_table(chunk, buf, row_group_size=policy.row_group_rows, compression="zstd")
        data = buf.getvalue().to_pybytes()
        name = f"compact-{lo_ms}-{hi_ms}-{group}-{i}of{n}.parquet"
        store.write_bytes(f"{directory}/{name}", data)
        written.append(name)
        rep.bytes_out += len(data)
    # Every output is in place: only now do the inputs go (a reader may see both for a moment).
    for f in inputs:
        store.delete(f.key)
    rep.outputs, rep.rows = len(written), table.num_rows
    return rep


def compact(store: Store, prefix: str, now: float | None = None, policy: CompactionPolicy = CompactionPolicy(),
            key: Sequence[str] | None = None, dates: Iterable[str] | None = None) -> CompactionReport:
    """Merge the small parts of every partition under ``prefix`` (``events`` or ``feedback``).

    Args:
        store: the telemetry area (``open_store(settings.store_uri("telemetry"))``).
        prefix: the lake under it; rows are de-duplicated by :data:`EVENT_KEY` for ``events``,
            :data:`FEEDBACK_KEY` for ``feedback`` (``key`` overrides; ``()``: whole rows).
        now: the clock (unix seconds; a simulation passes its own).
        dates: only these date partitions (default: all).

    Returns:
        What was merged. Idempotent and safe to kill at any point (see the module docstring).
    """
    t0 = time.perf_counter()
    now = time.time() if now is None else now
    key = tuple(key) if key is not None else _KEYS.get(prefix.strip("/").rsplit("/", 1)[-1], ())
    cutoff_ms = int((now - policy.grace_s) * 1000)
    open_day = _date_of(now - policy.grace_s)  # partitions of this day (and later) may still get parts
    total = CompactionReport()
    for directory, files in sorted(_partitions(store, prefix, dates).items()):
        files, busy, recovered = _recover(store, files, policy)
        total.recovered += recovered
        if busy:  # another compaction is writing here right now: leave the partition to it
            continue
        ripe = [f for f in files if f.kind == "part" and f.lo_ms <= cutoff_ms]
        young = [f for f in files if f.kind == "part" and f.lo_ms > cutoff_ms]
        growing = [f for f in files if f.kind == "compact" and not policy.full(f)]
        date = _partition_date(directory)
        closed = date is not None and date < open_day and not young
        if closed:
            inputs = ripe + growing if (ripe or len(growing) > 1) else []
        else:
            inputs = ripe + (growing if len(growing) >= policy.fanout else [])
        if not inputs:
            continue
        total.add(_merge_partition(store, directory, inputs, key, policy))
    total.seconds = time.perf_counter() - t0
    return total


# ---------------------------------------------------------------------- retention


def apply_retention(store: Store, prefix: str, keep: str | float | None, now: float | None = None) -> list[str]:
    """Delete the date partitions under ``prefix`` whose whole day is older than ``keep``.

    Args:
        keep: seconds, a duration string (``7d``) or ``None``/``"forever"`` (nothing deleted).

    Returns:
        The dates deleted.
    """
    keep_s = parse_retention(keep) if isinstance(keep, str) else keep
    if keep_s is None:
        return []
    now = time.time() if now is None else now
    deleted = []
    for date in _dates(store, prefix):
        if _day_start(date) + 86400 <= now - keep_s:
            store.delete(f"{prefix}/date={date}")
            deleted.append(date)
    return deleted


def expired_samples(samples: Iterable[tuple[str, float, bool]], keep: str | float | None,
                    now: float | None = None) -> list[str]:
    """The sample ids whose image may be deleted: unlabeled and older than ``keep``.

    A labeled sample is ground truth (a retrain reads it) and is always kept. The labeling
    queue calls this with ``(sample_id, ts, labeled)`` rows and deletes the images and rows it
    returns.
    """
    keep_s = parse_retention(keep) if isinstance(keep, str) else keep
    if keep_s is None:
        return []
    now = time.time() if now is None else now
    return [sid for sid, ts, labeled in samples if not labeled and float(ts) < now - keep_s]


# ---------------------------------------------------------------------- reading


def _window_files(store: Store, prefix: str, since: float | None, until: float | None) -> list[_File]:
    dates = None
    if since is not None:
        dates = [d for d in _dates(store, prefix) if _day_start(d) + 86400 > since
                 and (until is None or _day_start(d) <= until)]
    files = [f for fs in _partitions(store, prefix, dates).values() for f in fs]
    out = []
    for f in files:
        if f.kind == "compact":
            if since is not None and f.hi_ms < since * 1000:
                continue
            if until is not None and f.lo_ms > until * 1000:
                continue
        elif since is not None and f.lo_ms < (since - _PART_PRUNE_SLACK_S) * 1000:
            continue  # flushed before the window opened: holds only older rows
        out.append(f)
    return out


def read_lake(store: Store, prefix: str, since: float | None = None, until: float | None = None,
              columns: Sequence[str] | None = None, key: Sequence[str] | None = None, *, attempts: int = 5):
    """Rows under ``prefix`` with ``since <= ts < until``, compacted and small parts alike, each once.

    Args:
        columns: the columns to return (default: all).
        key: what a row is unique by (default per prefix: :data:`EVENT_KEY`, :data:`FEEDBACK_KEY`).

    Returns:
        A ``pyarrow.Table`` (empty, no columns, when the lake has no file).

    Raises:
        StoreError: the store could not be read (``StoreUnavailable`` when it did not answer).
    """
    import pyarrow as pa
    import pyarrow.dataset as pads

    key = tuple(key) if key is not None else _KEYS.get(prefix.strip("/").rsplit("/", 1)[-1], ())
    for attempt in range(attempts):
        files = _window_files(store, prefix, since, until)
        if not files:
            return pa.table({c: pa.array([], pa.null()) for c in (columns or [])})
        filt = None
        if since is not None:
            filt = pads.field("ts") >= since
        if until is not None:
            filt = (pads.field("ts") < until) if filt is None else filt & (pads.field("ts") < until)
        want = None if columns is None else list(dict.fromkeys([*columns, *key]))
        try:
            table = _read_files(store, files, want, filt)
        except StoreError:
            # A file listed a moment ago may have been merged and deleted since: list again.
            listed = {f.key for f in _window_files(store, prefix, since, until)}
            if attempt == attempts - 1 or {f.key for f in files} <= listed:
                raise
            continue
        table = _dedupe(table, key)
        return table if columns is None else table.select(list(columns))
    raise AssertionError("unreachable")


def read_events(store: Store, since: float | None = None, until: float | None = None,
                columns: Sequence[str] | None = None):
    """The event lake (``events/``) in a window, one row per ``(request_id, role)``."""
    return read_lake(store, "events", since, until, columns)


def read_feedback(store: Store, since: float | None = None, until: float | None = None,
                  columns: Sequence[str] | None = None):
    """The label lake (``feedback/``) in a window, each row once."""
    return read_lake(store, "feedback", since, until, columns)


# ---------------------------------------------------------------------- the sink's hook


@dataclass
class Maintenance:
    """Compaction and retention of the telemetry area, run from the sink's background loop.

    ``maybe_run(now)`` runs once per ``interval_s`` slot of the clock (the first call runs), and
    applies the telemetry retention and compacts ``events`` and ``feedback`` and applies the telemetry retention. Failures are
    logged and retried at the next interval: maintenance never takes the sink down.
    """

    store: Store
    retention: dict[str, float | None] = field(default_factory=lambda: {
        a: parse_retention(v) for a, v in RETENTION_DEFAULTS.items()})
    policy: CompactionPolicy = field(default_factory=CompactionPolicy)
    interval_s: float = 600.0
    prefixes: tuple[str, ...] = ("events", "feedback")
    last_run: float | None = None
    last_report: dict[str, Any] | None = None

    @classmethod
    def from_settings(cls, settings: Any, **kw: Any) -> "Maintenance":
        """Over ``settings.store_uri("telemetry")`` with ``settings.retention``."""
        from visionfleet.store import open_store

        return cls(open_store(settings.store_uri("telemetry")), retention=settings.retention_seconds(), **kw)

    def maybe_run(self, now: float | None = None) -> dict[str, Any] | None:
        """Run if due; returns what was done (or ``None`` when not due or when it failed)."""
        now = time.time() if now is None else now
        # On the clock's multiples of the interval (every 10 min on :00, :10, ...): a run lands on
        # midnight, when a day's partition closes and one leaves the retention.
        if self.last_run is not None and now // self.interval_s <= self.last_run // self.interval_s:
            return None
        self.last_run = now
        try:
            return self.run(now)
        except Exception:  # noqa: BLE001 - the next interval retries; the sink keeps flushing
            logger.exception("telemetry maintenance failed")
            return None

    def run(self, now: float | None = None) -> dict[str, Any]:
        """Compact and apply retention now (raises what the store raises)."""
        now = time.time() if now is None else now
        t0 = time.perf_counter()
        keep = self.retention.get("telemetry")
        report: dict[str, Any] = {"at": now}
        for prefix in self.prefixes:
            deleted = apply_retention(self.store, prefix, keep, now)
            rep = compact(self.store, prefix, now, self.policy)
            report[prefix] = {"retention_deleted": deleted, **rep.to_dict()}
        report["seconds"] = time.perf_counter() - t0
        self.last_report = report
        return report
