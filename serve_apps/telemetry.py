"""Telemetry: the ``TelemetrySink`` actor and the non-blocking client the ingress uses.

The sink does one job, events: it de-duplicates them by ``(request_id, role)``, joins
late labels from ``/v1/feedback``, keeps per-experiment per-variant accumulators (the
input of the A/B statistics, read by the ExperimentCoordinator actor in
``serve_apps.experiments``), keeps the per-version monitors, offers samples to the
labeling queue, and writes the Parquet event lake on the store area ``telemetry``
(``Settings.store_uri("telemetry")``: ``<home>/telemetry`` on one machine, an ``s3://``
prefix on a cluster), through :mod:`visionfleet.store`::

    events/date=YYYY-MM-DD/source=<source>/part-*.parquet
    feedback/date=YYYY-MM-DD/part-*.parquet

**What survives a restart.** Everything the sink knows is in the database
(``$VISIONFLEET_DB``; tables in :mod:`visionfleet.db.sink`):

* each accepted event, label and reset is journaled, one transaction per ``record`` /
  ``feedback`` call, before the call returns (the acknowledgement);
* each flush writes the lake parts, marks their journal rows ``in_lake``, and checkpoints
  what changed: per-experiment arm accumulators and shadow figures, per-version monitor
  windows (reference and current), pending label joins, the monitoring/sampling
  configuration, the counters, and the journal position the checkpoint includes;
* a new sink of the same lake (the actor restarted by Ray, a new process) loads the
  checkpoint, replays the journal entries after it, reloads the last ``_MAX_REMEMBERED``
  events as de-duplication keys and join partners, and re-queues rows not yet in the lake.
  So a replayed event is not counted twice, a label that came before its event still joins,
  and the A/B figures and drift windows come out as if the sink had never stopped.

Why the database and not the store: the checkpoint, the journal and the lake marks must
change together (accumulators at entry N plus the entries after N), which is one
transaction in a database and has no equivalent across objects in S3; the rows are small
and rewritten often (a PUT per document per flush); and the journal is what keeps
acknowledged rows while the store is away. The store holds the lake, the blobs.

**The store going away.** A flush that cannot write a part keeps its rows and retries at
the next flush; memory holds at most ``max_buffer_rows`` of them, the rest wait in the
journal (``lake_spilled``) and are read back when the store answers again. Rows are lost
(``lake_dropped``) only when the database is away too and the buffer overflows; the sampler's
rate limits (``visionfleet.sampling``) are not kept.

The client never blocks a request: events go to an in-memory buffer that a background
task ships in batches; when the sink is behind (too many batches in flight) new events
are counted as dropped instead of queued without bound.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from visionfleet.names import SINK_NAME
from visionfleet.telemetry import EVENT_FIELDS, ArmAccumulator, event_key

__all__ = ["TelemetrySink", "TelemetryClient", "SINK_NAME", "get_or_create_sink"]

logger = logging.getLogger("ray.serve")

_MAX_REMEMBERED = 200_000  # events kept (memory and journal) for joining labels and de-duplication
_MAX_PENDING_LABELS = 100_000
_MAX_BUFFER_ROWS = 100_000  # lake rows held in memory while the store is away; the rest wait in the journal
_RETRY_S = 1.0  # after a failed journal write or lake write, wait this long before the next try

_Emit = Callable[[str, dict], None] | None


def _date(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d")


class TelemetrySinkImpl:
    """The sink's logic, without Ray (the actor below is a thin shell around it).

    Args:
        home: this node's home; the settings come from ``Settings.from_env(home)`` unless given.
        flush_rows: flush as soon as this many rows wait for the lake.
        settings: where the lake (store area ``telemetry``) and the state (``db_url``) live.
        max_buffer_rows: lake rows kept in memory while the store is away.

    Raises:
        visionfleet.db.DatabaseError: the database cannot be opened.
        visionfleet.store.StoreError: the store URL cannot be used.
    """

    def __init__(self, home: str, *, flush_rows: int = 2000, settings: Any = None,
                 max_buffer_rows: int = _MAX_BUFFER_ROWS) -> None:
        from visionfleet.db import open_db
        from visionfleet.db.sink import SinkState
        from visionfleet.settings import Settings
        from visionfleet.store import open_store

        if max_buffer_rows < 1:
            raise ValueError(f"Got {max_buffer_rows} for max_buffer_rows; expected >= 1")
        self.settings = settings if settings is not None else Settings.from_env(home)
        self.home = Path(self.settings.home)
        self.store = open_store(self.settings.store_uri("telemetry"))
        self._db = open_db(self.settings.db_url)
        self._state = SinkState(self._db, self.store.uri)
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        # request id -> (label name or class index, ts): feedback whose event was not seen yet
        self._pending_labels: OrderedDict[str, tuple[str | int, float]] = OrderedDict()
        self._seq = 0  # the last journal entry
        self._lake: list = []  # JournalRow: rows not yet in the lake, in seq order
        self._unjournaled: list = []  # JournalRow: entries the database did not take yet
        self._written_unmarked: list[int] = []  # in the lake, not yet marked in the journal
        self._lake_spilled = False  # some unwritten rows are only in the journal
        self._journal_failed_at: float | None = None
        self._lake_failed_at: float | None = None
        self._dirty: set[tuple[str, str]] = set()  # checkpoint documents that changed
        self._meta_written: Any = None
        self._flush_rows = flush_rows
        self._max_buffer = max_buffer_rows
        self._arms: dict[str, dict[str, ArmAccumulator]] = {}
        self._shadow: dict[str, dict[str, float]] = {}
        self._label_cache: dict[tuple[str, int], list[str]] = {}
        self._monitors: dict[tuple[str, int], Any] = {}
        self._monitoring = None  # MonitoringConfig; set by configure()
        self._sampler = None  # ActiveSampler; set by configure()
        self._config_doc: dict[str, Any] = {"monitoring": None, "sampling": None}
        self._queue = None  # LabelingQueue, opened lazily
        self._registry = None
        self.counters = {"received": 0, "duplicates": 0, "written": 0, "labels": 0, "labels_late": 0,
                         "labels_refused_late": 0, "dropped_reported": 0,
                         "samples_offered": 0, "samples_kept": 0,
                         "lake_failures": 0, "lake_spilled": 0, "lake_dropped": 0,
                         "journal_failures": 0, "journal_dropped": 0, "checkpoint_failures": 0}
        self.restored: dict[str, int] = {}
        self._restore()

    # -------------------------------------------------------------- events
    def record(self, events: list[dict[str, Any]], dropped: int = 0, samples: list[dict[str, Any]] | None = None) -> int:
        """Accept events (de-duplicated), journal them, and return how many were new."""
        accepted = 0
        if samples:
            try:
                self.offer_samples(samples)
            except Exception:  # noqa: BLE001 - a labeling-queue problem must not lose the events
                logger.exception("offering samples failed")
        late: list[tuple[str, str]] = []
        with self._lock:
            self.counters["dropped_reported"] += int(dropped)
            entries: list = []
            emit = self._emitter(entries)
            for ev in events:
                if event_key(ev) in self._seen:
                    self.counters["duplicates"] += 1
                    continue
                emit("event", ev)  # encoded at insert time, so it carries the monitor's _seq
                accepted += 1
                joined = self._apply_event(ev, emit)
                if joined is not None:
                    late.append(joined)
            self._journal_locked(entries)
            due = len(self._lake) >= self._flush_rows and not self._recently(self._lake_failed_at)
        if due and self._flush_lock.acquire(blocking=False):
            try:
                self._flush_held()
            finally:
                self._flush_lock.release()
        if late:  # labels that arrived before their event reach the labeling queue now
            try:
                self.labeling_queue().add_labels(late, labeler="feedback")
            except Exception:  # noqa: BLE001
                logger.exception("labeling queue update failed")
        return accepted

    def _emitter(self, entries: list) -> Callable[[str, dict], None]:
        from visionfleet.db.sink import JournalRow

        def emit(kind: str, doc: dict) -> None:
            self._seq += 1
            entries.append(JournalRow(self._seq, kind, doc, in_lake=kind == "op"))
        return emit

    def _apply_event(self, ev: dict[str, Any], emit: _Emit) -> tuple[str, str] | None:
        """Count one new event; returns ``(request_id, label)`` when a pending label joined it."""
        self._remember(event_key(ev), ev)
        self.counters["received"] += 1
        self._aggregate(ev)
        self._monitor_event(ev)
        if ev.get("role") != "primary" or ev["request_id"] not in self._pending_labels:
            return None
        given, ts = self._pending_labels.pop(ev["request_id"])
        self._dirty.add(("pending", ""))
        try:
            label, class_id = self._resolve(ev, given)
        except ValueError as exc:  # e.g. a class index the model does not have: nobody to tell now
            self.counters["labels_refused_late"] += 1
            logger.warning("late label dropped: %s", exc)
            return None
        if isinstance(given, int) and emit is not None:  # the lake learns the name now
            emit("feedback", {"row": {"request_id": ev["request_id"], "label": label, "class_id": class_id,
                                      "ts": ts}, "op": None})
        self._apply_label(ev, label)
        return ev["request_id"], label

    def _remember(self, key: tuple[str, str], ev: dict[str, Any]) -> None:
        self._seen[key] = ev
        if len(self._seen) > _MAX_REMEMBERED:
            self._seen.popitem(last=False)

    def _aggregate(self, ev: dict[str, Any]) -> None:
        exp = ev.get("experiment")
        if not exp:
            return
        if ev.get("role") == "shadow":
            s = self._shadow_stats(exp)
            if ev.get("status") == 200:
                s["n"] += 1
                s["conf_sum"] += float(ev.get("confidence") or 0.0)
                s["lat_sum"] += float(ev.get("latency_ms") or 0.0)
            else:
                s["errors"] += 1
            primary = self._seen.get((ev["request_id"], "primary"))
            if primary is not None:
                self._shadow_pair(exp, primary, ev)
            return
        arms = self._arms.setdefault(exp, {})
        arm = arms.setdefault(ev["variant"], ArmAccumulator(ev["variant"]))
        arm.add_event(ev)
        self._dirty.add(("arms", exp))
        shadow = self._seen.get((ev["request_id"], "shadow"))
        if shadow is not None:
            self._shadow_pair(exp, ev, shadow)

    def _shadow_stats(self, exp: str) -> dict[str, float]:
        self._dirty.add(("shadow", exp))
        return self._shadow.setdefault(
            exp, {"n": 0, "errors": 0, "conf_sum": 0.0, "lat_sum": 0.0, "pairs": 0, "agree": 0, "primary_conf_sum": 0.0}
        )

    def _shadow_pair(self, exp: str, primary: dict, shadow: dict) -> None:
        """Compare a primary answer with its shadow (whichever event arrived second)."""
        if shadow.get("status") != 200 or primary.get("status") != 200:
            return
        s = self._shadow_stats(exp)
        s["pairs"] += 1
        s["agree"] += int(primary.get("label") == shadow.get("label"))
        s["primary_conf_sum"] += float(primary.get("confidence") or 0.0)

    # -------------------------------------------------------------- monitoring
    def configure(self, monitoring: dict[str, Any] | None = None, sampling: dict[str, Any] | None = None) -> None:
        """Monitoring windows and sampling limits (the ingress passes its AppConfig's); kept across restarts."""
        with self._lock:
            self._configure(monitoring, sampling)
            entries: list = []
            self._emitter(entries)("op", {"op": "configure", "monitoring": monitoring, "sampling": sampling})
            self._journal_locked(entries)

    def _configure(self, monitoring: dict[str, Any] | None, sampling: dict[str, Any] | None) -> None:
        from serve_apps.config import MonitoringConfig, SamplingConfig
        from visionfleet.sampling import ActiveSampler, SamplingPolicy

        if monitoring is not None:
            self._monitoring = MonitoringConfig.model_validate(monitoring)
            self._config_doc["monitoring"] = monitoring
        if sampling is not None:
            sc = SamplingConfig.model_validate(sampling)
            self._sampler = ActiveSampler(SamplingPolicy(
                low_confidence=sc.low_confidence, margin=sc.margin, random_share=sc.random_share,
                rate_per_s=sc.rate_per_s, burst=sc.burst, per_class_cap=sc.per_class_cap, period_s=sc.period_s,
            ))
            self._config_doc["sampling"] = sampling
        self._dirty.add(("config", ""))

    def _monitor_cfg(self):
        if self._monitoring is None:
            from serve_apps.config import MonitoringConfig

            self._monitoring = MonitoringConfig()
        return self._monitoring

    def _monitor_for(self, model: str, version: int):
        from visionfleet.monitoring import VersionMonitor

        key = (model, int(version))
        mon = self._monitors.get(key)
        if mon is None:
            cfg = self._monitor_cfg()
            mon = VersionMonitor(cfg.reference_size, cfg.window_size, cfg.low_confidence)
            self._monitors[key] = mon
        self._dirty.add(("monitor", f"{model}:{int(version)}"))
        return mon

    def _monitor_event(self, ev: dict[str, Any]) -> None:
        if ev.get("role") != "primary" or ev.get("status") != 200 or ev.get("version") is None or not ev.get("model"):
            return
        ev["_seq"] = self._monitor_for(str(ev["model"]), int(ev["version"])).add(ev)

    def monitor_snapshot(self, model: str | None = None) -> dict[str, Any]:
        """Window metrics and drift per ``model:version`` (what W&B, Prometheus and the policy read)."""
        from visionfleet.monitoring import DriftThresholds

        cfg = self._monitor_cfg()
        th = DriftThresholds(psi=cfg.psi, ks_alpha=cfg.ks_alpha, class_psi=cfg.psi, min_samples=cfg.min_samples)
        with self._lock:
            items = [(k, m) for k, m in self._monitors.items() if model is None or k[0] == model]
            return {f"{k[0]}:{k[1]}": m.snapshot(th) for k, m in items}

    def reset_reference(self, model: str, version: int) -> bool:
        with self._lock:
            if not self._apply_op({"op": "reset_reference", "model": model, "version": int(version)}):
                return False
            entries: list = []
            self._emitter(entries)("op", {"op": "reset_reference", "model": model, "version": int(version)})
            self._journal_locked(entries)
            return True

    def _apply_op(self, doc: dict[str, Any]) -> bool:
        op = doc.get("op")
        if op == "configure":
            self._configure(doc.get("monitoring"), doc.get("sampling"))
        elif op == "reset_reference":
            key = (doc["model"], int(doc["version"]))
            mon = self._monitors.get(key)
            if mon is None:
                return False
            mon.reset_reference()
            self._dirty.add(("monitor", f"{key[0]}:{key[1]}"))
        elif op == "reset_experiment":
            self._arms.pop(doc["name"], None)
            self._shadow.pop(doc["name"], None)
            self._dirty |= {("arms", doc["name"]), ("shadow", doc["name"])}
        else:
            raise ValueError(f"Got {op!r} for a journaled operation; expected configure, reset_reference or "
                             "reset_experiment")
        return True

    # -------------------------------------------------------------- active learning
    def offer_samples(self, samples: list[dict[str, Any]]) -> int:
        """Candidates from the ingress (with image bytes); the sampler keeps some for labeling."""
        import hashlib

        if not samples:
            return 0
        with self._lock:
            if self._sampler is None:
                self.configure(sampling={})
            kept = []
            for smp in samples:
                self.counters["samples_offered"] += 1
                digest = hashlib.sha1(smp["image"]).hexdigest()
                if self._sampler.keep(predicted=smp.get("predicted"), image_hash=digest):
                    kept.append(smp)
        if not kept:
            return 0
        n = self.labeling_queue().append(kept)
        with self._lock:
            self.counters["samples_kept"] += n
        return n

    def labeling_queue(self):
        if self._queue is None:
            from visionfleet.labeling import LabelingQueue

            # the database-backed queue when visionfleet.labeling offers it, else the home's
            opener = getattr(LabelingQueue, "from_settings", None)
            self._queue = opener(self.settings) if opener is not None else LabelingQueue(self.home)
        return self._queue

    def labeling_pending(self, limit: int = 1000) -> list[dict[str, Any]]:
        return self.labeling_queue().pending(limit)

    def labeling_counts(self) -> dict[str, int]:
        return self.labeling_queue().counts()

    # -------------------------------------------------------------- labels
    def feedback(self, request_id: str, label: str | int, ts: float | None = None) -> dict[str, Any]:
        """Ground truth for a past prediction: a label name (str) or a class index (int).

        Returns what was understood (``label``, ``class_id``, ``given``: ``name`` or
        ``class_index``) and, when the prediction is known, whether it was correct.
        A label that arrives before its prediction is kept (across restarts too) and
        joined when it comes.

        Raises:
            ValueError: a name or index the model that answered does not have.
        """
        ts = ts or time.time()
        with self._lock:
            entries: list = []
            result, joined = self._apply_feedback(request_id, label, ts, self._emitter(entries))
            self._journal_locked(entries)
        if joined is not None:  # a sampled request gets its label in the labeling queue too
            try:
                self.labeling_queue().add_labels([joined], labeler="feedback")
            except Exception:  # noqa: BLE001
                logger.exception("labeling queue update failed")
        return result

    def _apply_feedback(self, request_id: str, label: str | int, ts: float,
                        emit: _Emit) -> tuple[dict[str, Any], tuple[str, str] | None]:
        given = "class_index" if isinstance(label, int) else "name"
        ev = self._seen.get((request_id, "primary"))
        if ev is None:
            self._pending_labels.pop(request_id, None)
            self._pending_labels[request_id] = (label, ts)
            self._dirty.add(("pending", ""))
            self.counters["labels"] += 1
            self.counters["labels_late"] += 1
            if len(self._pending_labels) > _MAX_PENDING_LABELS:
                self._pending_labels.popitem(last=False)
            name = label if isinstance(label, str) else None
            if emit is not None:
                emit("feedback", {"row": {"request_id": request_id, "label": name, "class_id": None, "ts": ts},
                                  "op": label})
            return {"matched": False, "given": given, "label": name,
                    "class_id": label if isinstance(label, int) else None}, None
        name, class_id = self._resolve(ev, label)
        self.counters["labels"] += 1
        if emit is not None:
            emit("feedback", {"row": {"request_id": request_id, "label": name, "class_id": class_id, "ts": ts},
                              "op": label})
        self._apply_label(ev, name)
        return {"matched": True, "given": given, "label": name, "class_id": class_id, "model": ev.get("model"),
                "version": ev.get("version"), "correct": ev.get("label") == name}, (request_id, name)

    def _resolve(self, ev: dict[str, Any], label: str | int) -> tuple[str, int | None]:
        """``(name, class index)`` of a label given as either, for the model that answered ``ev``."""
        model, version = ev.get("model"), ev.get("version")
        labels = self._labels(str(model), int(version)) if model and version is not None else None
        if isinstance(label, int):
            if labels is None:
                raise ValueError(f"Got class index {label} for a prediction whose model's labels are unknown; "
                                 "expected a label name")
            if not 0 <= label < len(labels):
                raise ValueError(f"Got class index {label}; model {model}:{version} has classes 0..{len(labels) - 1}")
            return labels[label], label
        if labels is None:
            return label, None
        if label not in labels:
            raise ValueError(f"Got label {label!r}; model {model}:{version} knows {labels[:20]} "
                             f"(or send the class index 0..{len(labels) - 1})")
        return label, labels.index(label)

    def _labels(self, model: str, version: int) -> list[str] | None:
        key = (model, version)
        if key not in self._label_cache:
            from visionfleet.registry import NotFound, Registry
            from visionfleet.store import StoreError

            try:
                if self._registry is None:
                    self._registry = Registry.from_settings(self.settings)
                self._label_cache[key] = self._registry.card(model, version).labels
            except (NotFound, OSError, ValueError, StoreError):
                return None
        return self._label_cache[key]

    def _apply_label(self, ev: dict[str, Any], label: str) -> None:
        if ev.get("status") == 200 and ev.get("_seq") is not None:
            self._monitor_for(str(ev["model"]), int(ev["version"])).add_outcome(
                float(ev.get("confidence") or 0.0), ev.get("label") == label, int(ev["_seq"])
            )
        exp = ev.get("experiment")
        if exp and ev.get("status") == 200:
            arm = self._arms.setdefault(exp, {}).setdefault(ev["variant"], ArmAccumulator(ev["variant"]))
            arm.add_label(ev.get("label") == label)
            self._dirty.add(("arms", exp))

    # -------------------------------------------------------------- queries
    def experiment_summary(self, name: str) -> dict[str, Any]:
        with self._lock:
            arms = {k: a.summary() for k, a in self._arms.get(name, {}).items()}
            sh = dict(self._shadow.get(name, {}))
        if sh:
            sh["agreement"] = sh["agree"] / sh["pairs"] if sh.get("pairs") else float("nan")
            sh["conf_mean"] = sh["conf_sum"] / sh["n"] if sh.get("n") else float("nan")
            sh["latency_mean_ms"] = sh["lat_sum"] / sh["n"] if sh.get("n") else float("nan")
        return {"experiment": name, "arms": arms, "shadow": sh or None, "at": time.time()}

    def arm_summaries(self, name: str, sticky: bool, arms: list[str]) -> dict[str, Any]:
        """Per-arm :class:`ArmSummary` of an experiment, computed under the lock."""
        with self._lock:
            accs = self._arms.get(name, {})
            return {a: (accs.get(a) or ArmAccumulator(a)).arm_summary(sticky=sticky) for a in arms}

    def reset_experiment(self, name: str) -> None:
        with self._lock:
            doc = {"op": "reset_experiment", "name": name}
            self._apply_op(doc)
            entries: list = []
            self._emitter(entries)("op", doc)
            self._journal_locked(entries)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "buffered": len(self._lake), "unjournaled": len(self._unjournaled),
                    "remembered": len(self._seen), "pending_labels": len(self._pending_labels),
                    "spilled": self._lake_spilled, "restored": dict(self.restored)}

    # -------------------------------------------------------------- journal and checkpoint
    @staticmethod
    def _recently(at: float | None) -> bool:
        return at is not None and time.monotonic() - at < _RETRY_S

    def _journal_locked(self, entries: list) -> None:
        """Journal new entries now (the acknowledgement), or keep them for the next flush."""
        if not entries:
            return
        self._lake.extend(r for r in entries if not r.in_lake)
        if self._unjournaled or self._recently(self._journal_failed_at):
            self._unjournaled.extend(entries)  # the database was away: the next flush retries, in order
        else:
            try:
                self._state.append(entries)
            except Exception:  # noqa: BLE001 - database away: keep serving, retry at the flush
                logger.warning("telemetry journal write failed; keeping %d entries for the next flush",
                               len(entries), exc_info=True)
                self.counters["journal_failures"] += 1
                self._journal_failed_at = time.monotonic()
                self._unjournaled.extend(entries)
        self._bound_locked()

    def _bound_locked(self) -> None:
        """At most ``max_buffer_rows`` lake rows and as many unjournaled entries in memory."""
        over = len(self._lake) - self._max_buffer
        if over > 0:
            # rows the journal has (or will have) can be read back from it later
            del self._lake[:over]
            self._lake_spilled = True
            self.counters["lake_spilled"] += over
        over = len(self._unjournaled) - self._max_buffer
        if over > 0:
            in_memory = {r.seq for r in self._lake}
            lost = sum(1 for r in self._unjournaled[:over] if not r.in_lake and r.seq not in in_memory)
            del self._unjournaled[:over]
            self.counters["journal_dropped"] += over
            self.counters["lake_dropped"] += lost

    def _restore(self) -> None:
        """Load the checkpoint, replay the journal after it, re-queue rows not in the lake."""
        from visionfleet.monitoring import VersionMonitor

        t0 = time.perf_counter()
        docs, rows = self._state.load()
        with self._lock:
            meta = docs.pop(("meta", ""), None) or {"applied_seq": 0, "counters": {}}
            applied = int(meta["applied_seq"])
            self.counters.update(meta["counters"])
            cfg = docs.pop(("config", ""), None)
            if cfg:
                self._configure(cfg.get("monitoring"), cfg.get("sampling"))
            for (kind, key), doc in docs.items():
                if kind == "arms":
                    self._arms[key] = {a: ArmAccumulator.from_dict(d) for a, d in doc.items()}
                elif kind == "shadow":
                    self._shadow[key] = dict(doc)
                elif kind == "monitor":
                    model, _, version = key.rpartition(":")
                    self._monitors[(model, int(version))] = VersionMonitor.from_dict(doc)
                elif kind == "pending":
                    self._pending_labels = OrderedDict((rid, (label, ts)) for rid, label, ts in doc)
            replayed = 0
            for r in rows:
                self._seq = max(self._seq, r.seq)
                if not r.in_lake:
                    self._lake.append(r)
                if r.seq <= applied:
                    if r.kind == "event":
                        self._remember(event_key(r.doc), r.doc)
                    continue
                replayed += 1
                if r.kind == "event":
                    self._apply_event(r.doc, None)
                elif r.kind == "feedback" and r.doc.get("op") is not None:
                    row = r.doc["row"]
                    try:
                        self._apply_feedback(row["request_id"], r.doc["op"], row["ts"], None)
                    except ValueError as exc:
                        logger.warning("journaled label not applied on restore: %s", exc)
                elif r.kind == "op":
                    self._apply_op(r.doc)
            self._seq = max(self._seq, applied)
            self._dirty.clear()
            if replayed:  # what the replay changed goes into the next checkpoint
                self._dirty |= {("arms", k) for k in self._arms} | {("shadow", k) for k in self._shadow}
                self._dirty |= {("monitor", f"{m}:{v}") for m, v in self._monitors} | {("pending", "")}
            self._bound_locked()
            self.restored = {"checkpoint_seq": applied, "replayed": replayed, "remembered": len(self._seen),
                             "unwritten": len(self._lake), "ms": int((time.perf_counter() - t0) * 1000)}
        if applied or rows:
            logger.info("telemetry sink restored: %s", self.restored)

    def _checkpoint_docs_locked(self) -> dict[tuple[str, str], Any]:
        docs: dict[tuple[str, str], Any] = {}
        for kind, key in self._dirty:
            if kind == "arms":
                arms = self._arms.get(key)
                docs[(kind, key)] = None if arms is None else {a: acc.to_dict() for a, acc in arms.items()}
            elif kind == "shadow":
                docs[(kind, key)] = self._shadow.get(key)
            elif kind == "monitor":
                model, _, version = key.rpartition(":")
                mon = self._monitors.get((model, int(version)))
                docs[(kind, key)] = None if mon is None else mon.to_dict()
            elif kind == "pending":
                docs[(kind, key)] = [[rid, label, ts] for rid, (label, ts) in self._pending_labels.items()]
            elif kind == "config":
                docs[(kind, key)] = dict(self._config_doc)
        self._dirty = set()
        meta = {"applied_seq": self._seq, "counters": dict(self.counters)}
        if meta != self._meta_written:
            docs[("meta", "")] = meta
        return docs

    # -------------------------------------------------------------- Parquet
    def flush(self) -> int:
        """Write waiting rows to the lake and checkpoint; returns the events written."""
        with self._flush_lock:
            return self._flush_held()

    def _flush_held(self) -> int:
        with self._lock:
            rows = self._rows_to_write_locked()
        written, n_events = self._write_lake(rows) if rows else ([], 0)  # the store is slow or away: not under the lock
        with self._lock:
            done = set(written)
            self._lake = [r for r in self._lake if r.seq not in done]
            self.counters["written"] += n_events
            marks = self._written_unmarked + written
            journal = list(self._unjournaled)
            docs = self._checkpoint_docs_locked()
            applied = self._seq
        try:
            self._state.checkpoint(docs=docs, journal=journal, written=marks, applied_seq=applied,
                                   keep_events_after=applied - _MAX_REMEMBERED)
        except Exception:  # noqa: BLE001 - database away: everything stays in memory for the next flush
            logger.warning("telemetry checkpoint failed; retrying at the next flush", exc_info=True)
            with self._lock:
                self.counters["checkpoint_failures"] += 1
                self._dirty |= {k for k in docs if k != ("meta", "")}
                self._written_unmarked = marks
                self._journal_failed_at = time.monotonic()
            return n_events
        with self._lock:
            self._written_unmarked = []
            if "meta" in {k for k, _ in docs}:
                self._meta_written = docs[("meta", "")]
            if journal:
                taken = {r.seq for r in journal}
                self._unjournaled = [r for r in self._unjournaled if r.seq not in taken]
                self._journal_failed_at = None
        return n_events

    def _rows_to_write_locked(self) -> list:
        """The rows this flush writes: memory's, or, after an overflow, the oldest the journal holds."""
        if not self._lake_spilled:
            return list(self._lake)
        try:
            stored = self._state.unwritten(self._max_buffer + len(self._written_unmarked))
        except Exception:  # noqa: BLE001 - the database is away too: write what memory holds
            logger.warning("reading spilled telemetry rows failed", exc_info=True)
            return list(self._lake)
        unmarked = set(self._written_unmarked)
        merged = {r.seq: r for r in stored if r.seq not in unmarked}
        if len(stored) < self._max_buffer + len(unmarked):  # all of them fit: memory holds the rest again
            merged.update({r.seq: r for r in self._lake})
            self._lake = [merged[s] for s in sorted(merged)]
            self._lake_spilled = False
            return list(self._lake)
        return [merged[s] for s in sorted(merged)]  # the oldest first; memory keeps the newest

    def _write_lake(self, rows: list) -> tuple[list[int], int]:
        """Write rows as Parquet parts; returns the seqs written and the number of events."""
        from visionfleet.store import StoreError

        groups: dict[tuple[str, str], list] = {}
        for r in rows:
            if r.kind == "event":
                key = f"events/date={_date(r.doc['ts'])}/source={str(r.doc.get('source') or 'server').replace('/', '_')}"
            else:
                key = f"feedback/date={_date(r.doc['row']['ts'])}"
            groups.setdefault((r.kind, key), []).append(r)
        written: list[int] = []
        n_events = 0
        for (kind, prefix), items in groups.items():
            if kind == "event":
                table = [{k: r.doc.get(k) for k in EVENT_FIELDS} for r in items]
            else:
                table = [r.doc["row"] for r in items]
            try:
                self.store.write_bytes(f"{prefix}/part-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet",
                                       _parquet(table, _event_schema() if kind == "event" else _feedback_schema()))
            except StoreError as exc:  # kept; the next flush retries (each part is written whole or not at all)
                self.counters["lake_failures"] += 1
                self._lake_failed_at = time.monotonic()
                logger.warning("telemetry lake write failed (%d rows kept for the next flush): %s",
                               sum(len(v) for v in groups.values()) - len(written), exc)
                break
            written.extend(r.seq for r in items)
            n_events += len(items) if kind == "event" else 0
        return written, n_events


def _parquet(rows: list[dict[str, Any]], schema) -> bytes:  # noqa: ANN001 - pyarrow schema
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue().to_pybytes()


def _feedback_schema():
    import pyarrow as pa

    return pa.schema([("request_id", pa.string()), ("label", pa.string()), ("class_id", pa.int64()),
                      ("ts", pa.float64())])


def _event_schema():
    import pyarrow as pa

    types = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64()}
    return pa.schema([pa.field(k, types[t]) for k, t in EVENT_FIELDS.items()])


class TelemetrySink(TelemetrySinkImpl):
    """The Ray actor: a thin shell that flushes Parquet and publishes the monitor windows.

    A threaded actor (``max_concurrency`` > 1) so that a slow export never stalls
    ``record``; a background thread flushes (and checkpoints), exports, and runs the lake's
    compaction and retention (``visionfleet.lake.Maintenance``) every ``flush_interval_s``.
    Ray restarts it when it dies (``max_restarts=-1``); the new one restores from the database.
    """

    def __init__(self, home: str, flush_interval_s: float = 2.0) -> None:
        super().__init__(home)
        from serve_apps.exporters import MonitorExporter

        self._exporter = MonitorExporter(self.home)
        self._maintenance = _maintenance(self.settings)
        self._stop = threading.Event()
        self._interval = flush_interval_s
        self._thread = threading.Thread(target=self._loop, name="vf-sink-loop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep the sink alive; the next flush retries
                logger.exception("telemetry flush failed")
            try:
                self.export_monitoring()
            except Exception:  # noqa: BLE001
                logger.exception("monitoring export failed")
            if self._maintenance is not None:
                self._maintenance.maybe_run()  # logs and retries later on failure

    def export_monitoring(self) -> dict[str, Any]:
        """Publish the window metrics (Prometheus gauges, one W&B run per version).

        These are the numbers the retraining policy reads (``monitor_snapshot``), so
        what a dashboard shows is what triggers a retrain.
        """
        snap = self.monitor_snapshot()
        cfg = self._monitor_cfg()
        self._exporter.publish(snap, self.labeling_counts(), self.counters["dropped_reported"], wandb=cfg.wandb,
                               run_config=cfg.model_dump())
        return snap

    def finish_wandb(self) -> int:
        """Close the monitor runs (their summaries are written at finish)."""
        return self._exporter.wandb.finish_all()

    def ping(self) -> str:
        return "ok"

    def shutdown(self) -> int:
        self._stop.set()
        return self.flush()


def _maintenance(settings: Any) -> Any:
    """The lake's compaction and retention (``visionfleet.lake``), when that module is there."""
    try:
        from visionfleet.lake import Maintenance
    except ImportError:
        return None
    return Maintenance.from_settings(settings)


def get_or_create_sink(home: str, namespace: str | None = None):
    """The detached, named sink actor of this cluster (created on first use).

    Its runtime environment carries this process's settings (``Settings.runtime_env_vars``:
    home, store, database, per-area overrides), so the actor writes the same lake and state.
    """
    import ray

    from visionfleet.settings import Settings

    actor_cls = ray.remote(TelemetrySink)
    return actor_cls.options(
        name=SINK_NAME,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=8,
        max_restarts=-1,
        runtime_env={"env_vars": Settings.from_env(home).runtime_env_vars()},
    ).remote(home)


class TelemetryClient:
    """Buffers events in the ingress and ships them to the sink without ever blocking.

    ``add`` is O(1). A background task sends a batch every ``interval_s`` (or when
    ``batch_size`` events are waiting). When ``max_in_flight`` batches are
    unacknowledged, or the buffer holds ``max_buffer`` events, new events are dropped
    and counted; the count travels with the next batch.
    """

    def __init__(
        self,
        sink: Any,
        *,
        interval_s: float = 0.2,
        batch_size: int = 256,
        max_in_flight: int = 4,
        max_buffer: int = 20_000,
    ) -> None:
        self._sink = sink
        self._interval = interval_s
        self._batch = batch_size
        self._max_in_flight = max_in_flight
        self._max_buffer = max_buffer
        self._buf: list[dict[str, Any]] = []
        self._samples: list[dict[str, Any]] = []
        self._max_samples = 256
        self.samples_dropped = 0
        self._in_flight: set[Any] = set()
        self.dropped = 0
        self._dropped_unreported = 0
        self.sent = 0
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    def add(self, event: dict[str, Any]) -> None:
        if len(self._buf) >= self._max_buffer:
            self.dropped += 1
            self._dropped_unreported += 1
            return
        self._buf.append(event)
        if self._task is None:
            self._start()
        elif len(self._buf) >= self._batch and self._wake is not None:
            self._wake.set()

    def add_sample(self, sample: dict[str, Any]) -> None:
        """A labeling candidate (with image bytes); bounded, dropped when the sink is behind."""
        if len(self._samples) >= self._max_samples:
            self.samples_dropped += 1
            return
        self._samples.append(sample)
        if self._task is None:
            self._start()

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)  # type: ignore[union-attr]
            except asyncio.TimeoutError:
                pass
            self._wake.clear()  # type: ignore[union-attr]
            await self.ship()

    async def ship(self) -> None:
        # Drop acknowledged batches; ObjectRefs are awaitable.
        done = {r for r in self._in_flight if _is_ready(r)}
        self._in_flight -= done
        while self._buf or self._samples:
            if len(self._in_flight) >= self._max_in_flight:
                # The sink is behind: shed what would otherwise pile up.
                overflow = max(0, len(self._buf) - self._max_buffer // 2)
                if overflow:
                    del self._buf[:overflow]
                    self.dropped += overflow
                    self._dropped_unreported += overflow
                return
            batch, self._buf = self._buf[: self._batch], self._buf[self._batch :]
            samples, self._samples = self._samples, []
            try:
                ref = self._sink.record.remote(batch, self._dropped_unreported, samples)
                self._dropped_unreported = 0
                self._in_flight.add(ref)
                self.sent += len(batch)
            except Exception:  # noqa: BLE001 - sink unreachable: count, never raise into a request
                self.dropped += len(batch)
                self._dropped_unreported += len(batch)


def _is_ready(ref: Any) -> bool:
    import ray

    ready, _ = ray.wait([ref], timeout=0, fetch_local=False)
    return bool(ready)
