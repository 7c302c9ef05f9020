"""The retraining controller: a detached actor that closes the loop for one model.

Every ``interval_s`` it reads the production version's window metrics and drift
report from the TelemetrySink (the same numbers exported to Prometheus and W&B),
applies the :class:`visionfleet.monitoring.RetrainPolicy`, and when the policy fires
runs :func:`train.retrain.retrain` (Ray Train fine-tune, gate, compression), then
starts a canary experiment with automatic decision; the experiment's winner becomes
``@production``. Every step goes to ``<state>/retraining/timeline.jsonl``; a failed
step leaves production untouched and says why.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ControllerConfig", "RetrainingController", "get_or_create_controller", "controller_name", "read_timeline"]

logger = logging.getLogger("ray.serve")


class ControllerConfig(BaseModel):
    """What the controller watches and how it retrains (parsed at the edge)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model name whose @production is watched")
    enabled: bool = True
    interval_s: float = Field(default=5.0, gt=0, description="seconds between looks")
    max_confidence_drop: float = Field(default=0.08, gt=0, le=1)
    max_low_rate_increase: float = Field(default=0.10, gt=0, le=1)
    on_drift: bool = True
    min_samples: int = Field(default=200, ge=10, description="predictions in the window before judging")
    debounce: int = Field(default=3, ge=1, description="consecutive degraded looks before acting")
    cooldown_s: float = Field(default=600.0, ge=0)
    min_labels: int = Field(default=200, ge=1, description="new labeled samples needed to retrain")
    epochs: int = Field(default=5, ge=1)
    lr: float = Field(default=0.05, gt=0)
    batch_size: int = Field(default=128, ge=1, le=4096, description="retraining batch size (global)")
    new_data_share: float = Field(default=0.4, gt=0, lt=1, description="share of each retraining epoch from new labels")
    base_limit: Optional[int] = Field(default=None, ge=1, description="use only the first N base training images")
    max_base_drop: float = Field(default=0.01, ge=0, le=1, description="top-1 the candidate may lose on the base holdout")
    compress: bool = True
    target: str = "x86-cpu"
    canary_share: float = Field(default=0.2, gt=0, lt=1, description="traffic share of the candidate in the canary")
    canary_min_samples: int = Field(default=100, ge=1, description="labeled predictions per arm before deciding")
    canary_timeout_s: float = Field(default=3600.0, gt=0)
    wandb: bool = True


def controller_name(model: str) -> str:
    return f"visionfleet-retrainer-{model}"


def read_timeline(home: str | Path) -> list[dict[str, Any]]:
    p = Path(home) / "retraining" / "timeline.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class RetrainingController:
    """Thin shell: the policy is pure (visionfleet.monitoring), the pipeline is train.retrain."""

    def __init__(self, home: str, config: dict[str, Any], namespace: str = "visionfleet") -> None:
        from visionfleet.monitoring import PolicyState, RetrainPolicy
        from visionfleet.settings import Settings

        self.cfg = ControllerConfig.model_validate(config)
        self.settings = Settings.from_env(home)
        self.namespace = namespace
        self.policy = RetrainPolicy(
            max_confidence_drop=self.cfg.max_confidence_drop,
            max_low_rate_increase=self.cfg.max_low_rate_increase,
            on_drift=self.cfg.on_drift,
            min_samples=self.cfg.min_samples,
            debounce=self.cfg.debounce,
            cooldown_s=self.cfg.cooldown_s,
            min_labels=self.cfg.min_labels,
        )
        self.state = PolicyState()
        self._labels_since = time.time()
        self._busy = threading.Lock()
        self._stage = "watching"
        self._last: dict[str, Any] = {}
        self._was_degraded = False
        self._stop = threading.Event()
        self._timeline = self.settings.home / "retraining" / "timeline.jsonl"
        self._timeline.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="vf-retrainer", daemon=True)
        self._thread.start()
        self._event("controller_started", config=self.cfg.model_dump())

    # ------------------------------------------------------------------ plumbing
    def _event(self, kind: str, **info: Any) -> None:
        entry = {"at": time.time(), "model": self.cfg.model, "kind": kind, **info}
        with open(self._timeline, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        logger.info("retrainer %s: %s %s", self.cfg.model, kind, {k: v for k, v in info.items() if k != "config"})

    def _sink(self):
        import ray

        from visionfleet.names import SINK_NAME

        return ray.get_actor(SINK_NAME, namespace=self.namespace)

    def _coordinator(self):
        import ray

        from visionfleet.names import COORDINATOR_NAME

        return ray.get_actor(COORDINATOR_NAME, namespace=self.namespace)

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            if not self.cfg.enabled:
                continue
            try:
                self.look()
            except Exception:  # noqa: BLE001 - keep watching; the next look retries
                logger.exception("retrainer look failed")

    def _labels_available(self) -> int:
        from visionfleet.labeling import LabelingQueue

        # A SQL COUNT on the queue's rows: a look never reads the sample images. One queue
        # (one engine) for the controller's life, not one per look.
        if getattr(self, "_queue", None) is None:
            self._queue = LabelingQueue.from_settings(self.settings)
        return self._queue.count_labeled(model=self.cfg.model, since=self._labels_since)

    # ------------------------------------------------------------------ looks
    def look(self) -> dict[str, Any]:
        """One look at the production version; may start a retrain in the background."""
        import ray

        from visionfleet.monitoring import drift_from_dict, evaluate_policy
        from visionfleet.registry import NotFound, Registry

        if self._busy.locked():
            return {"stage": self._stage}
        try:
            prod = Registry.from_settings(self.settings).resolve(f"{self.cfg.model}@production")
        except NotFound:
            return {"stage": "no production version"}
        snap = ray.get(self._sink().monitor_snapshot.remote(self.cfg.model), timeout=30).get(str(prod))
        if snap is None:
            return {"stage": "no traffic yet", "production": str(prod)}
        labels = self._labels_available()
        d = evaluate_policy(
            self.policy, self.state, current=snap["current"], reference=snap["reference"],
            drift=drift_from_dict(snap["drift"]), labels_available=labels, now=time.time(),
        )
        self.state = d.state
        self._last = {"production": str(prod), "seen": snap["seen"], "current": snap["current"],
                      "reference": snap["reference"], "drift": snap["drift"], "decision": d.to_dict(), "labels": labels}
        if d.degraded and not self._was_degraded:
            self._event("degraded", production=str(prod), seen=snap["seen"], reasons=list(d.reasons),
                        current=snap["current"], reference=snap["reference"])
        if not d.degraded and self._was_degraded:
            self._event("recovered", production=str(prod), seen=snap["seen"], current=snap["current"])
        self._was_degraded = d.degraded
        if d.fire:
            self._event("triggered", production=str(prod), seen=snap["seen"], reasons=list(d.reasons), labels=labels)
            self._start_retrain("; ".join(d.reasons))
        return {"stage": self._stage, **self._last}

    def retrain_now(self, reason: str = "manual") -> dict[str, Any]:
        if self._busy.locked():
            return {"started": False, "stage": self._stage}
        self._event("triggered", reason=reason, manual=True)
        self._start_retrain(reason)
        return {"started": True}

    def _start_retrain(self, reason: str) -> None:
        threading.Thread(target=self._run, args=(reason,), name="vf-retrain-run", daemon=True).start()

    def _run(self, reason: str) -> None:
        from train.retrain import RetrainConfig, RetrainFailed, retrain

        if not self._busy.acquire(blocking=False):
            return
        try:
            self._stage = "retraining"
            started = time.time()
            cfg = RetrainConfig(model=self.cfg.model, epochs=self.cfg.epochs, lr=self.cfg.lr, batch_size=self.cfg.batch_size,
                                compress=self.cfg.compress,
                                target=self.cfg.target, min_new_labels=min(self.cfg.min_labels, 100), wandb=self.cfg.wandb,
                                new_data_share=self.cfg.new_data_share, base_limit=self.cfg.base_limit,
                                max_base_drop=self.cfg.max_base_drop)
            self._event("retrain_started", reason=reason)
            try:
                res = retrain(self.settings, cfg, reason=reason, log=lambda step, e: self._event(f"step:{step}", **e))
            except RetrainFailed as exc:
                self._event("retrain_failed", step=exc.step, reason=exc.reason, production_untouched=True)
                return
            self._labels_since = started
            self._event("candidate", candidate=res.candidate, fp32=res.fp32, production=res.production,
                        seconds=round(res.seconds, 1), metrics=res.metrics)
            self._stage = "canary"
            self._canary(res.production, res.candidate, res.run_id)
        except Exception as exc:  # noqa: BLE001 - record it; production stays as it was
            self._event("retrain_failed", step="unexpected", reason=f"{type(exc).__name__}: {exc}",
                        trace=traceback.format_exc()[-2000:], production_untouched=True)
        finally:
            self._stage = "watching"
            self._was_degraded = False
            self._busy.release()

    def _canary(self, production: str, candidate: str, run_id: str) -> None:
        import ray

        name = f"canary-{run_id}"
        spec = {
            "name": name,
            "model": self.cfg.model,
            "arms": [
                {"name": "control", "model": production, "weight": 1 - self.cfg.canary_share},
                {"name": "treatment", "model": candidate, "weight": self.cfg.canary_share},
            ],
            "sticky": False,
            "metric": "accuracy",
            "auto_decide": True,
            "min_samples": self.cfg.canary_min_samples,
        }
        coordinator = self._coordinator()
        ray.get(coordinator.start.remote(spec), timeout=120)
        self._event("canary_started", experiment=name, control=production, treatment=candidate, share=self.cfg.canary_share)
        deadline = time.time() + self.cfg.canary_timeout_s
        while time.time() < deadline and not self._stop.is_set():
            doc = ray.get(coordinator.status.remote(name), timeout=60)
            exp = doc["experiment"]
            if exp["status"] != "running":
                arms = doc.get("arms") or {}
                self._event(
                    {"promoted": "promoted", "rolled_back": "rolled_back"}.get(exp["status"], "canary_stopped"),
                    experiment=name, candidate=candidate, production_before=production,
                    decision=exp.get("decision"), samples={k: {"n": v.get("n"), "labeled": v.get("labeled"),
                                                               "correct": v.get("correct")} for k, v in arms.items()},
                )
                return
            time.sleep(2.0)
        ray.get(coordinator.stop.remote(name, "rollback", "canary timed out"), timeout=120)
        self._event("rolled_back", experiment=name, candidate=candidate, reason="canary timed out")

    # ------------------------------------------------------------------ queries
    def status(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "stage": self._stage, "enabled": self.cfg.enabled,
                "streak": self.state.streak, "retrains": self.state.fired, "last_look": self._last}

    def configure(self, config: dict[str, Any]) -> dict[str, Any]:
        self.cfg = ControllerConfig.model_validate({**self.cfg.model_dump(), **config})
        return self.cfg.model_dump()

    def stop(self) -> None:
        self._stop.set()


def get_or_create_controller(home: str, config: ControllerConfig, namespace: str = "visionfleet"):
    """The detached controller actor of ``config.model`` (created on first use)."""
    import ray

    return ray.remote(RetrainingController).options(
        name=controller_name(config.model),
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=4,
        runtime_env={"env_vars": {"VISIONFLEET_HOME": home}},
    ).remote(home, config.model_dump(), namespace)
