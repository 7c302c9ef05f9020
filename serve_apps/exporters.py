"""Exporters: what the sink and the coordinator publish for people to look at.

* :class:`WandbRuns` — the one W&B run helper: a run per key (a model version's
  monitor, an experiment), created on its first row, offline unless ``WANDB_MODE`` /
  ``WANDB_API_KEY`` say otherwise. W&B is a view: a failure is logged, never raised.
* :class:`MonitorExporter` — the monitor windows as Prometheus gauges
  (``ray.util.metrics``) and W&B rows; the numbers the retraining policy reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["WandbRuns", "MonitorExporter"]

logger = logging.getLogger("ray.serve")


class WandbRuns:
    """W&B runs by key, under ``<home>/wandb``, resumed when they exist."""

    def __init__(self, home: str | Path, project: str = "visionfleet") -> None:
        self._dir = str(Path(home) / "wandb")
        self._project = project
        self._runs: dict[str, Any] = {}

    def log(self, key: str, row: dict[str, Any], **init: Any) -> None:
        """Log ``row`` to the run of ``key``; ``init`` (group, name, id, config, job_type) creates it."""
        try:
            run = self._runs.get(key)
            if run is None:
                import wandb

                run = wandb.init(project=self._project, dir=self._dir, resume="allow", reinit="create_new", **init)
                self._runs[key] = run
            run.log(row)
        except Exception:  # noqa: BLE001 - W&B is a view; it never stops the work it watches
            logger.exception("W&B logging failed for %s", key)

    def finish(self, key: str, summary: dict[str, Any] | None = None) -> bool:
        """Close one run (its summary is written at finish); False when it had none."""
        run = self._runs.pop(key, None)
        if run is None:
            return False
        try:
            if summary:
                run.summary.update(summary)
            run.finish()
        except Exception:  # noqa: BLE001
            logger.exception("W&B finish failed for %s", key)
        return True

    def finish_all(self) -> int:
        return sum(self.finish(k) for k in list(self._runs))


class MonitorExporter:
    """Publishes ``monitor_snapshot`` documents: Prometheus gauges and one W&B run per version."""

    def __init__(self, home: str | Path) -> None:
        self.wandb = WandbRuns(home)
        self._gauges: dict[str, Any] | None = None
        self._last_logged: dict[str, float] = {}

    def publish(self, snapshot: dict[str, Any], queue_counts: dict[str, int], dropped: int, *,
                wandb: bool, run_config: dict[str, Any]) -> None:
        g = self._prometheus()
        for key, doc in snapshot.items():
            model, _, version = key.rpartition(":")
            tags = {"model": model, "model_version": version}
            cur = doc["current"]
            if "confidence/mean" in cur:
                g["conf_mean"].set(cur["confidence/mean"], tags=tags)
                g["low_rate"].set(cur["confidence/low_rate"], tags=tags)
            g["window_n"].set(cur.get("n", 0.0), tags=tags)
            if "labeled/accuracy" in cur:
                g["accuracy"].set(cur["labeled/accuracy"], tags=tags)
            drift = doc.get("drift")
            g["drift"].set(1.0 if drift and drift["drifted"] else 0.0, tags=tags)
            for sig in (drift or {}).get("signals", []):
                g["psi"].set(sig["psi"], tags={**tags, "signal": sig["signal"]})
            if wandb:
                self._log_wandb(model, version, doc, run_config)
        g["queue"].set(queue_counts["pending"], tags={"state": "pending"})
        g["queue"].set(queue_counts["labeled"], tags={"state": "labeled"})
        g["dropped"].set(dropped, tags={})

    def _prometheus(self) -> dict[str, Any]:
        if self._gauges is None:
            from ray.util.metrics import Gauge

            vt = ("model", "model_version")
            self._gauges = {
                "conf_mean": Gauge("vf_confidence_mean", "confidence/mean of the current window", tag_keys=vt),
                "low_rate": Gauge("vf_confidence_low_rate", "confidence/low_rate of the current window", tag_keys=vt),
                "window_n": Gauge("vf_window_predictions", "predictions in the current window", tag_keys=vt),
                "accuracy": Gauge("vf_labeled_accuracy", "accuracy of labeled predictions in the window", tag_keys=vt),
                "drift": Gauge("vf_drift_detected", "1 when the current window drifted from the reference", tag_keys=vt),
                "psi": Gauge("vf_drift_psi", "PSI of a signal against the reference", tag_keys=vt + ("signal",)),
                "queue": Gauge("vf_labeling_queue", "samples in the labeling queue", tag_keys=("state",)),
                "dropped": Gauge("vf_telemetry_dropped_total", "events the ingress dropped because the sink was behind"),
            }
        return self._gauges

    def _log_wandb(self, model: str, version: str, doc: dict[str, Any], run_config: dict[str, Any]) -> None:
        """One W&B run per version (group ``monitor:<model>``), keys ``confidence/mean`` etc."""
        key = f"{model}:{version}"
        cur = dict(doc["current"])
        if doc.get("drift"):
            cur["drift/detected"] = float(doc["drift"]["drifted"])
            for sig in doc["drift"]["signals"]:
                cur[f"drift/psi/{sig['signal']}"] = sig["psi"]
        stamp = cur.get("n", 0.0) + 1e-6 * hash(tuple(sorted(cur.items())))
        if self._last_logged.get(key) == stamp:
            return  # nothing new since the last look
        self._last_logged[key] = stamp
        self.wandb.log(key, cur, group=f"monitor:{model}", name=f"monitor-{model}-{version}",
                       id=f"monitor-{model}-{version}", config={"model": model, "version": version, **run_config})
