"""Telemetry: the ``TelemetrySink`` actor and the non-blocking client the ingress uses.

The sink does one job, events: it de-duplicates them by ``(request_id, role)``, joins
late labels from ``/v1/feedback``, keeps per-experiment per-variant accumulators (the
input of the A/B statistics, read by the ExperimentCoordinator actor in
``serve_apps.experiments``), keeps the per-version monitors, offers samples to the
labeling queue, and writes the Parquet event lake::

    <state>/telemetry/events/date=YYYY-MM-DD/source=<source>/part-*.parquet
    <state>/telemetry/feedback/date=YYYY-MM-DD/part-*.parquet

The client never blocks a request: events go to an in-memory buffer that a background
task ships in batches; when the sink is behind (too many batches in flight) new events
are counted as dropped instead of queued without bound.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from visionfleet.names import SINK_NAME
from visionfleet.telemetry import EVENT_FIELDS, ArmAccumulator, event_key

__all__ = ["TelemetrySink", "TelemetryClient", "SINK_NAME", "get_or_create_sink"]

logger = logging.getLogger("ray.serve")

_MAX_REMEMBERED = 200_000  # events kept in memory for joining labels and de-duplication
_MAX_PENDING_LABELS = 100_000


def _date(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d")


class TelemetrySinkImpl:
    """The sink's logic, without Ray (the actor below is a thin shell around it)."""

    def __init__(self, home: str, *, flush_rows: int = 2000) -> None:
        self.home = Path(home)
        self.events_dir = self.home / "telemetry" / "events"
        self.feedback_dir = self.home / "telemetry" / "feedback"
        self._lock = threading.RLock()
        self._seen: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._pending_labels: OrderedDict[str, str | int] = OrderedDict()  # name or class index, event not seen yet
        self._buffer: list[dict[str, Any]] = []
        self._feedback_buffer: list[dict[str, Any]] = []
        self._flush_rows = flush_rows
        self._arms: dict[str, dict[str, ArmAccumulator]] = {}
        self._shadow: dict[str, dict[str, float]] = {}
        self._label_cache: dict[tuple[str, int], list[str]] = {}
        self._monitors: dict[tuple[str, int], Any] = {}
        self._monitoring = None  # MonitoringConfig; set by configure()
        self._sampler = None  # ActiveSampler; set by configure()
        self._queue = None  # LabelingQueue, opened lazily
        self.counters = {"received": 0, "duplicates": 0, "written": 0, "labels": 0, "labels_late": 0,
                         "labels_refused_late": 0, "dropped_reported": 0,
                         "samples_offered": 0, "samples_kept": 0}

    # -------------------------------------------------------------- events
    def record(self, events: list[dict[str, Any]], dropped: int = 0, samples: list[dict[str, Any]] | None = None) -> int:
        accepted = 0
        if samples:
            try:
                self.offer_samples(samples)
            except Exception:  # noqa: BLE001 - a labeling-queue problem must not lose the events
                logger.exception("offering samples failed")
        late: list[tuple[str, str]] = []
        with self._lock:
            self.counters["dropped_reported"] += int(dropped)
            for ev in events:
                key = event_key(ev)
                if key in self._seen:
                    self.counters["duplicates"] += 1
                    continue
                self._remember(key, ev)
                self._buffer.append(ev)
                accepted += 1
                self._aggregate(ev)
                self._monitor_event(ev)
                given = self._pending_labels.pop(ev["request_id"], None) if ev.get("role") == "primary" else None
                if given is not None:
                    try:
                        label, class_id = self._resolve(ev, given)
                    except ValueError as exc:  # e.g. a class index the model does not have: nobody to tell now
                        self.counters["labels_refused_late"] += 1
                        logger.warning("late label dropped: %s", exc)
                        continue
                    if isinstance(given, int):  # the lake learns the name now
                        self._feedback_buffer.append({"request_id": ev["request_id"], "label": label,
                                                      "class_id": class_id, "ts": time.time()})
                    self._apply_label(ev, label)
                    late.append((ev["request_id"], label))
            self.counters["received"] += accepted
            if len(self._buffer) >= self._flush_rows:
                self._flush_locked()
        if late:  # labels that arrived before their event reach the labeling queue now
            try:
                self.labeling_queue().add_labels(late, labeler="feedback")
            except Exception:  # noqa: BLE001
                logger.exception("labeling queue update failed")
        return accepted

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
        shadow = self._seen.get((ev["request_id"], "shadow"))
        if shadow is not None:
            self._shadow_pair(exp, ev, shadow)

    def _shadow_stats(self, exp: str) -> dict[str, float]:
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
        """Monitoring windows and sampling limits (the ingress passes its AppConfig's)."""
        from serve_apps.config import MonitoringConfig, SamplingConfig
        from visionfleet.sampling import ActiveSampler, SamplingPolicy

        with self._lock:
            if monitoring is not None:
                self._monitoring = MonitoringConfig.model_validate(monitoring)
            if sampling is not None:
                sc = SamplingConfig.model_validate(sampling)
                self._sampler = ActiveSampler(SamplingPolicy(
                    low_confidence=sc.low_confidence, margin=sc.margin, random_share=sc.random_share,
                    rate_per_s=sc.rate_per_s, burst=sc.burst, per_class_cap=sc.per_class_cap, period_s=sc.period_s,
                ))

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
            mon = self._monitors.get((model, int(version)))
            if mon is None:
                return False
            mon.reset_reference()
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

            self._queue = LabelingQueue(self.home)
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
        A label that arrives before its prediction is kept and joined when it comes.

        Raises:
            ValueError: a name or index the model that answered does not have.
        """
        ts = ts or time.time()
        given = "class_index" if isinstance(label, int) else "name"
        with self._lock:
            ev = self._seen.get((request_id, "primary"))
            if ev is None:
                self._pending_labels[request_id] = label
                self.counters["labels"] += 1
                self.counters["labels_late"] += 1
                if len(self._pending_labels) > _MAX_PENDING_LABELS:
                    self._pending_labels.popitem(last=False)
                name = label if isinstance(label, str) else None
                self._feedback_buffer.append({"request_id": request_id, "label": name, "class_id": None, "ts": ts})
                return {"matched": False, "given": given, "label": name,
                        "class_id": label if isinstance(label, int) else None}
            name, class_id = self._resolve(ev, label)
            self.counters["labels"] += 1
            self._feedback_buffer.append({"request_id": request_id, "label": name, "class_id": class_id, "ts": ts})
            self._apply_label(ev, name)
            result = {"matched": True, "given": given, "label": name, "class_id": class_id, "model": ev.get("model"),
                      "version": ev.get("version"), "correct": ev.get("label") == name}
        try:  # a sampled request gets its label in the labeling queue too
            self.labeling_queue().add_labels([(request_id, name)], labeler="feedback")
        except Exception:  # noqa: BLE001
            logger.exception("labeling queue update failed")
        return result

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

            try:
                self._label_cache[key] = Registry(self.home / "registry").card(model, version).labels
            except (NotFound, OSError, ValueError):
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
            self._arms.pop(name, None)
            self._shadow.pop(name, None)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "buffered": len(self._buffer), "remembered": len(self._seen)}

    # -------------------------------------------------------------- Parquet
    def flush(self) -> int:
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        written = 0
        if self._buffer:
            rows, self._buffer = self._buffer, []
            groups: dict[tuple[str, str], list[dict]] = {}
            for r in rows:
                groups.setdefault((_date(r["ts"]), str(r.get("source") or "server")), []).append(r)
            schema = _event_schema()
            for (date, source), items in groups.items():
                d = self.events_dir / f"date={date}" / f"source={source.replace('/', '_')}"
                d.mkdir(parents=True, exist_ok=True)
                table = pa.Table.from_pylist([{k: r.get(k) for k in EVENT_FIELDS} for r in items], schema=schema)
                tmp = d / f".part-{uuid.uuid4().hex}.parquet"
                pq.write_table(table, tmp)
                tmp.rename(d / f"part-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet")
                written += len(items)
            self.counters["written"] += written
        if self._feedback_buffer:
            fb, self._feedback_buffer = self._feedback_buffer, []
            by_date: dict[str, list[dict]] = {}
            for r in fb:
                by_date.setdefault(_date(r["ts"]), []).append(r)
            for date, items in by_date.items():
                d = self.feedback_dir / f"date={date}"
                d.mkdir(parents=True, exist_ok=True)
                tmp = d / f".part-{uuid.uuid4().hex}.parquet"
                pq.write_table(pa.Table.from_pylist(items, schema=_feedback_schema()), tmp)
                tmp.rename(d / f"part-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet")
        return written


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
    ``record``; a background thread flushes and exports every ``flush_interval_s``.
    """

    def __init__(self, home: str, flush_interval_s: float = 2.0) -> None:
        super().__init__(home)
        from serve_apps.exporters import MonitorExporter

        self._exporter = MonitorExporter(home)
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


def get_or_create_sink(home: str, namespace: str | None = None):
    """The detached, named sink actor of this cluster (created on first use)."""
    import ray

    actor_cls = ray.remote(TelemetrySink)
    return actor_cls.options(
        name=SINK_NAME,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=8,
        max_restarts=-1,
        runtime_env={"env_vars": {"VISIONFLEET_HOME": home}},
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
