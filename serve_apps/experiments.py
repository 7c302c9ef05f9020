"""The experiment coordinator: start, re-weight, decide and stop A/B experiments.

:class:`ExperimentCoordinator` is the logic (tested without Ray);
:class:`CoordinatorActor` is its Ray actor, a detached named actor of its own that
reads the per-variant accumulators from the TelemetrySink by name. State changes
reach every ingress replica through the ``apply`` callback it is given — the app's
composition root (``serve_apps.deploy``) passes one that reconfigures the running
app — so all replicas route alike and nothing restarts, and nothing here imports
the deployment code. Experiments live in the shared database (``$VISIONFLEET_DB``,
:mod:`visionfleet.db.experiments`): config, status, decision and the timeline of cumulative
per-variant snapshots (the input of the report), so every ingress replica and a coordinator
restarted on another node see the same state. Each state change is a compare-and-set on the
experiment's revision: of two coordinators deciding at once, one applies the decision and the
other gets :class:`Conflict`. A home's older ``experiments/<name>/experiment.json`` +
``timeline.jsonl`` are imported on first open.

A tick (every few seconds) snapshots the running experiments, updates bandit weights,
and — with ``auto_decide`` — promotes or rolls back by itself: promotion moves
``@production`` to the treatment's version, rollback moves it to the control's.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serve_apps.config import ExperimentConfig, IngressUserConfig
from visionfleet.registry import NotFound, Registry
from visionfleet.settings import Settings
from visionfleet.spec import parse_ref

__all__ = ["ExperimentCoordinator", "CoordinatorActor", "Conflict", "get_or_create_coordinator", "get_coordinator"]

logger = logging.getLogger("ray.serve")
_CAS_TRIES = 5  # re-reads after losing a compare-and-set to a concurrent change


class Conflict(RuntimeError):
    """The request clashes with the current state (name taken, model busy, already stopped)."""


def _policy(cfg: ExperimentConfig):
    from visionfleet.experiments import DecisionPolicy

    g = cfg.guardrails
    return DecisionPolicy(
        metric=cfg.metric,
        alpha=cfg.alpha,
        min_samples=cfg.min_samples,
        latency_max_increase=g.latency_max_increase,
        latency_min_increase_ms=g.latency_min_increase_ms,
        latency_min_samples=g.latency_min_samples,
        error_max_increase=g.error_max_increase,
        error_min_samples=g.error_min_samples,
    )


class ExperimentCoordinator:
    """Experiment lifecycle over the database, a registry and the sink's accumulators.

    Args:
        home: the state dir (settings come from ``Settings.from_env(home)`` unless given).
        summaries: ``(name, sticky, arms) -> {arm: ArmSummary}`` (the sink's, under its lock).
        reset: forget an experiment's accumulators (on start).
        apply: push a new ingress user config to the running app.
        settings: the database, store and cache to use.
    """

    def __init__(
        self,
        home: str,
        summaries: Callable[[str, bool, list[str]], dict[str, Any]],
        reset: Callable[[str], None],
        apply: Callable[[IngressUserConfig], None],
        *,
        bandit_interval_s: float = 10.0,
        settings: Settings | None = None,
    ) -> None:
        self.home = Path(home)
        self.settings = settings or Settings.from_env(home)
        self.dir = self.home / "experiments"  # legacy files, imported once
        self.registry = Registry.from_settings(self.settings)
        from visionfleet.db.experiments import open_experiments  # SQLAlchemy only where the state is

        self.store = open_experiments(self.settings)
        self._summaries = summaries
        self._reset = reset
        self._apply = apply
        self._lock = threading.RLock()
        self._previous: dict[str, Any] = {}  # name -> last Decision (carries the running p-value)
        self._last_reweight: dict[str, float] = {}
        self._share_time: dict[str, dict[str, float]] = {}  # time-weighted shares for SRM under a bandit
        self._last_tick: dict[str, float] = {}
        self._bandit_interval = bandit_interval_s
        self._rng = np.random.default_rng()
        from serve_apps.exporters import WandbRuns

        self._wandb = WandbRuns(self.home)

    # ------------------------------------------------------------------ store
    def _load(self, name: str) -> tuple[ExperimentConfig, int]:
        got = self.store.get(name)
        if got is None:
            raise NotFound(f"no experiment named {name!r}")
        return ExperimentConfig.model_validate(got.doc), got.rev

    def _dump(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return cfg.model_dump(mode="json")

    def load(self, name: str) -> ExperimentConfig:
        return self._load(name)[0]

    def names(self) -> list[str]:
        return self.store.names()

    def running(self) -> list[ExperimentConfig]:
        return [ExperimentConfig.model_validate(e.doc) for e in self.store.all(status="running")]

    def _user_config(self) -> IngressUserConfig:
        return IngressUserConfig(experiments=self.running())

    def timeline(self, name: str) -> list[dict[str, Any]]:
        return self.store.timeline(name)

    # ------------------------------------------------------------------ lifecycle
    def start(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Validate, resolve arm refs to concrete versions, and route traffic."""
        from visionfleet.experiments import initial_allocation

        cfg = ExperimentConfig.model_validate(spec)
        with self._lock:
            if self.store.get(cfg.name) is not None:
                raise Conflict(f"an experiment named {cfg.name!r} already exists; choose another name")
            if any(r.model == cfg.model for r in self.running()):
                raise Conflict(f"model {cfg.model!r} already has a running experiment; stop it first")
            arms = []
            for arm in cfg.arms:
                resolved = self.registry.resolve(arm.model)  # NotFound -> 404
                if resolved.name != cfg.model:
                    raise ValueError(f"arm {arm.name} serves {resolved.name!r}; the experiment is on model {cfg.model!r}")
                arms.append(arm.model_copy(update={"model": str(resolved)}))
            shadow = cfg.shadow
            if shadow is not None:
                r = self.registry.resolve(shadow.model)
                if r.name != cfg.model:
                    raise ValueError(f"the shadow serves {r.name!r}; the experiment is on model {cfg.model!r}")
                shadow = shadow.model_copy(update={"model": str(r)})
            versions = [parse_ref(a.model).version for a in arms]
            if len(set(versions)) != len(versions):
                raise ValueError(f"control and treatment are the same version ({arms[0].model})")
            cfg = cfg.model_copy(
                update={
                    "arms": arms,
                    "shadow": shadow,
                    "allocation": initial_allocation(cfg.weights()).to_dict(),
                    "status": "running",
                    "started_at": time.time(),
                    "decision": None,
                }
            )
            if not self.store.create(self._dump(cfg)):  # another coordinator got there first
                if self.store.get(cfg.name) is not None:
                    raise Conflict(f"an experiment named {cfg.name!r} already exists; choose another name")
                raise Conflict(f"model {cfg.model!r} already has a running experiment; stop it first")
            self._reset(cfg.name)
            self._previous.pop(cfg.name, None)
            self._share_time[cfg.name] = {a.name: 0.0 for a in cfg.arms}
            self._last_tick[cfg.name] = time.time()
            try:
                self._apply(self._user_config())
            except Exception:
                self.store.delete(cfg.name, 1)
                raise
            logger.info("experiment %s started: %s", cfg.name, [a.model for a in cfg.arms])
            return cfg.model_dump(mode="json")

    def adopt(self, spec: dict[str, Any]) -> bool:
        """Record a running experiment that arrived in a Serve config file (not via start).

        Returns True when it was new to the store. Nothing is redeployed: the config
        that carried it is already live.
        """
        from visionfleet.experiments import initial_allocation

        cfg = ExperimentConfig.model_validate(spec)
        with self._lock:
            if self.store.get(cfg.name) is not None:
                return False
            update: dict[str, Any] = {"started_at": cfg.started_at or time.time()}
            if cfg.allocation is None:
                update["allocation"] = initial_allocation(cfg.weights()).to_dict()
            cfg = cfg.model_copy(update=update)
            if not self.store.create(self._dump(cfg)):
                return False
            self._reset(cfg.name)
            self._share_time[cfg.name] = {a.name: 0.0 for a in cfg.arms}
            self._last_tick[cfg.name] = time.time()
            return True

    def reweight(self, name: str, weights: dict[str, float], *, reason: str = "manual") -> dict[str, Any]:
        from visionfleet.experiments import Allocation, reweight

        with self._lock:
            for _ in range(_CAS_TRIES):
                cfg, rev = self._load(name)
                if cfg.status != "running":
                    raise Conflict(f"experiment {name!r} is {cfg.status}")
                unknown = set(weights) - {a.name for a in cfg.arms}
                if unknown:
                    raise ValueError(f"Got unknown arms {sorted(unknown)}; expected {[a.name for a in cfg.arms]}")
                full = {a.name: float(weights.get(a.name, 0.0)) for a in cfg.arms}
                alloc = reweight(Allocation.from_dict(cfg.allocation), full)
                total = sum(full.values())
                arms = [a.model_copy(update={"weight": full[a.name] / total}) for a in cfg.arms]
                cfg = cfg.model_copy(update={"allocation": alloc.to_dict(), "arms": arms})
                if self.store.update(self._dump(cfg), rev):
                    break
            else:
                raise Conflict(f"experiment {name!r} kept changing under this re-weight; try again")
            self._apply(self._user_config())
            self._last_reweight[name] = time.time()
            logger.info("experiment %s re-weighted (%s): %s", name, reason, full)
            return cfg.model_dump(mode="json")

    def stop(self, name: str, action: str = "none", reason: str = "stopped by an operator", decision: dict | None = None) -> dict[str, Any]:
        """End an experiment; ``promote`` moves @production to the treatment, ``rollback`` to the control."""
        if action not in ("promote", "rollback", "none"):
            raise ValueError(f"Got {action!r} for action; expected promote, rollback or none")
        status = {"promote": "promoted", "rollback": "rolled_back", "none": "stopped"}[action]
        with self._lock:
            for _ in range(_CAS_TRIES):
                before, rev = self._load(name)
                if before.status != "running":
                    raise Conflict(f"experiment {name!r} is already {before.status}")
                cfg = before.model_copy(
                    update={
                        "status": status,
                        "decision": {"action": action, "reason": reason, "at": time.time(), **(decision or {})},
                    }
                )
                # Claim the decision first: of two coordinators only one update matches the revision.
                if self.store.update(self._dump(cfg), rev):
                    break
            else:
                raise Conflict(f"experiment {name!r} kept changing under this stop; try again")
            target = {"promote": before.treatment, "rollback": before.control}.get(action)
            if target is not None:
                r = parse_ref(target.model)
                try:
                    self.registry.set_alias(r.name, "production", r.version, reason=f"experiment {name}: {action}: {reason}")  # type: ignore[arg-type]
                except Exception:
                    self.store.update(self._dump(before), rev + 1)  # still running: the alias did not move
                    raise
            self.snapshot(before)
            self._apply(self._user_config())
            self._finish_wandb(name, cfg.decision or {})
            logger.info("experiment %s %s: %s", name, status, reason)
            return cfg.model_dump(mode="json")

    # ------------------------------------------------------------------ looks
    def arm_summaries(self, cfg: ExperimentConfig):
        return self._summaries(cfg.name, cfg.sticky, [a.name for a in cfg.arms])

    def expected_share(self, cfg: ExperimentConfig) -> dict[str, float]:
        if cfg.bandit:
            st = self._share_time.get(cfg.name) or {}
            total = sum(st.values())
            if total > 0:
                return {k: v / total for k, v in st.items()}
        return cfg.weights()

    def evaluate(self, cfg: ExperimentConfig):
        """The decision the statistics give right now (does not act)."""
        from visionfleet.experiments import decide

        s = self.arm_summaries(cfg)
        return decide(
            s[cfg.control.name],
            s[cfg.treatment.name],
            _policy(cfg),
            expected_share=self.expected_share(cfg),
            previous=self._previous.get(cfg.name),
        )

    def snapshot(self, cfg: ExperimentConfig) -> dict[str, Any]:
        s = self.arm_summaries(cfg)
        row = {
            "t": time.time() - (cfg.started_at or time.time()),
            "at": time.time(),
            "weights": cfg.weights(),
            **{"control" if a.name == cfg.control.name else "treatment": s[a.name].to_dict() for a in cfg.arms},
        }
        self.store.append(cfg.name, row)
        self._log_wandb(cfg, s)
        return row

    def _log_wandb(self, cfg: ExperimentConfig, summaries: dict[str, Any]) -> None:
        """One W&B run per experiment (group ``experiment:<name>``), offline by default."""
        row: dict[str, Any] = {}
        for a in cfg.arms:
            v = summaries[a.name]
            row[f"{a.name}/requests"] = v.requests
            row[f"{a.name}/errors"] = v.errors
            row[f"{a.name}/weight"] = cfg.weights()[a.name]
            if v.n:
                row[f"{a.name}/confidence"] = v.conf_mean
            if v.labeled:
                row[f"{a.name}/accuracy"] = v.accuracy
            if v.p95_latency_ms is not None:
                row[f"{a.name}/p95_latency_ms"] = v.p95_latency_ms
        self._wandb.log(cfg.name, row, group=f"experiment:{cfg.name}", name=f"experiment-{cfg.name}",
                        id=f"exp-{cfg.name}", config=cfg.model_dump(mode="json", exclude={"allocation"}))

    def _finish_wandb(self, name: str, decision: dict[str, Any]) -> None:
        self._wandb.finish(name, {"decision": decision.get("action"), "reason": decision.get("reason")})

    def status(self, name: str) -> dict[str, Any]:
        cfg = self.load(name)
        doc: dict[str, Any] = {"experiment": cfg.model_dump(mode="json")}
        s = self.arm_summaries(cfg) if cfg.status == "running" else None
        if s is not None:
            doc["arms"] = {k: v.to_dict() | {"accuracy": v.accuracy if v.labeled else None, "conf_mean": v.conf_mean if v.n else None} for k, v in s.items()}
            try:
                doc["now"] = self.evaluate(cfg).to_dict()
            except ValueError as exc:
                doc["now"] = {"action": "continue", "reason": f"not enough data: {exc}"}
        else:
            tl = self.timeline(name)
            if tl:
                doc["arms"] = {k: tl[-1][k] for k in ("control", "treatment") if k in tl[-1]}
        return doc

    def tick(self) -> list[dict[str, Any]]:
        """Snapshot, bandit re-weighting and automatic decisions for running experiments."""
        from visionfleet.experiments import Action, Metric, thompson_weights

        actions = []
        for cfg in self.running():
            now = time.time()
            last = self._last_tick.get(cfg.name, now)
            st = self._share_time.setdefault(cfg.name, {a.name: 0.0 for a in cfg.arms})
            for arm, w in cfg.weights().items():
                st[arm] = st.get(arm, 0.0) + w * max(0.0, now - last)
            self._last_tick[cfg.name] = now
            try:
                self.snapshot(cfg)
                if cfg.bandit and now - self._last_reweight.get(cfg.name, cfg.started_at or 0) >= self._bandit_interval:
                    s = self.arm_summaries(cfg)
                    metric = Metric(cfg.metric)
                    stats = {k: v.metric_stats(metric) for k, v in s.items()}
                    weights = thompson_weights(stats, metric=metric, rng=self._rng)
                    self.reweight(cfg.name, weights, reason="bandit")
                    actions.append({"experiment": cfg.name, "action": "reweight", "weights": weights})
                if cfg.auto_decide:
                    d = self.evaluate(cfg)
                    self._previous[cfg.name] = d
                    if d.action is not Action.CONTINUE:
                        self.stop(cfg.name, d.action.value, d.reason, decision=d.to_dict())
                        actions.append({"experiment": cfg.name, "action": d.action.value, "reason": d.reason})
            except Conflict as exc:  # another coordinator changed it first; the next look re-reads
                logger.info("experiment %s: %s", cfg.name, exc)
            except Exception:  # noqa: BLE001 - one bad experiment must not stop the others' looks
                logger.exception("experiment tick failed for %s", cfg.name)
        return actions

    def list(self) -> list[dict[str, Any]]:
        out = []
        for e in self.store.all():
            cfg, name = ExperimentConfig.model_validate(e.doc), e.name
            out.append({"name": name, "model": cfg.model, "status": cfg.status, "arms": [a.model_dump() for a in cfg.arms],
                        "started_at": cfg.started_at, "decision": cfg.decision})
        return out


class CoordinatorActor:
    """The Ray actor around :class:`ExperimentCoordinator`: its own thread ticks the experiments.

    Args:
        home: the state dir.
        apply: pushes a new ingress user config to the running app (given by the
            composition root, ``serve_apps.deploy``).
        namespace: where the TelemetrySink actor lives.
        tick_interval_s: seconds between looks.
    """

    def __init__(self, home: str, apply: Callable[[IngressUserConfig], None], namespace: str | None = None,
                 tick_interval_s: float = 2.0) -> None:
        self._namespace = namespace
        self._sink_handle: Any = None
        self.coordinator = ExperimentCoordinator(home, summaries=self._summaries, reset=self._reset, apply=apply)
        self._stop = threading.Event()
        self._interval = tick_interval_s
        self._thread = threading.Thread(target=self._loop, name="vf-coordinator-loop", daemon=True)
        self._thread.start()

    def _sink(self) -> Any:
        if self._sink_handle is None:
            import ray

            from visionfleet.names import SINK_NAME

            self._sink_handle = ray.get_actor(SINK_NAME, namespace=self._namespace)
        return self._sink_handle

    def _summaries(self, name: str, sticky: bool, arms: list[str]) -> dict[str, Any]:
        import ray

        return ray.get(self._sink().arm_summaries.remote(name, sticky, arms), timeout=60)

    def _reset(self, name: str) -> None:
        import ray

        ray.get(self._sink().reset_experiment.remote(name), timeout=60)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.coordinator.tick()
            except Exception:  # noqa: BLE001 - keep looking; the next tick retries
                logger.exception("experiment tick failed")

    def start(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.coordinator.start(spec)

    def stop(self, name: str, action: str = "none", reason: str = "stopped by an operator") -> dict[str, Any]:
        return self.coordinator.stop(name, action, reason)

    def reweight(self, name: str, weights: dict[str, float]) -> dict[str, Any]:
        return self.coordinator.reweight(name, weights)

    def status(self, name: str) -> dict[str, Any]:
        import ray

        doc = self.coordinator.status(name)
        doc["shadow"] = ray.get(self._sink().experiment_summary.remote(name), timeout=60).get("shadow")
        return doc

    def list(self) -> list[dict[str, Any]]:
        return self.coordinator.list()

    def adopt(self, spec: dict[str, Any]) -> bool:
        return self.coordinator.adopt(spec)

    def tick(self) -> list[dict[str, Any]]:
        return self.coordinator.tick()

    def ping(self) -> str:
        return "ok"


def get_or_create_coordinator(home: str, apply: Callable[[IngressUserConfig], None], namespace: str | None = None):
    """The detached, named coordinator actor of this cluster (created on first use with ``apply``)."""
    import ray

    from visionfleet.names import COORDINATOR_NAME

    return ray.remote(CoordinatorActor).options(
        name=COORDINATOR_NAME,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=8,  # a slow redeploy in one call must not stall status calls
        max_restarts=-1,
        runtime_env={"env_vars": Settings.from_env(home).runtime_env_vars()},
    ).remote(home, apply, namespace)


def get_coordinator(namespace: str | None = None) -> Any:
    """The running coordinator actor, or None when the app was deployed without one."""
    import ray

    from visionfleet.names import COORDINATOR_NAME

    try:
        return ray.get_actor(COORDINATOR_NAME, namespace=namespace)
    except ValueError:
        return None
