"""The HTTP ingress deployment: a thin shell around the request path.

``Ingress.__init__`` builds the :class:`~serve_apps.pipeline.PredictionService` (the
one prediction step: route, decode, batch, predict, record) over a model runner — a
ModelReplica handle, or ONNX Runtime sessions in this process
(``IngressConfig.inference_in = "ingress"``) — and the telemetry client. Serve then
calls ``__serve_build_asgi_app__``, which builds the FastAPI app with every router
given what it needs (``serve_apps.api.build_api``). Experiments and batch knobs
arrive through ``reconfigure(user_config)``: no restart, no dropped request.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_apps.config import AppConfig, IngressUserConfig
from serve_apps.inputs import ApiError
from serve_apps.pipeline import PredictionService
from serve_apps.routing import compile_experiment
from serve_apps.runner import LocalModels, ReplicaOutput
from visionfleet.registry import Registry
from visionfleet.settings import Settings

__all__ = ["Ingress", "Actors"]

logger = logging.getLogger("ray.serve")


class Actors:
    """The helper actors the feedback and admin routes call: the sink and the coordinator."""

    def __init__(self, sink: Any, namespace: str | None) -> None:
        self._sink = sink
        self._namespace = namespace
        self._coordinator: Any = None

    def sink(self) -> Any:
        if self._sink is None:
            raise ApiError(503, "telemetry is disabled on this server; feedback and experiments need it")
        return self._sink

    def coordinator(self) -> Any:
        if self._coordinator is None:
            from serve_apps.experiments import get_coordinator

            self.sink()  # experiments read the sink's accumulators
            self._coordinator = get_coordinator(self._namespace)
            if self._coordinator is None:
                raise ApiError(503, "no experiment coordinator is running; deploy with `visionfleet serve up`")
        return self._coordinator


class _ReplicaRunner:
    """Runs a batch on a ModelReplica; retries a batch whose replica died on another one.

    Predictions are idempotent and telemetry is keyed by request id (recorded once, by
    the ingress, after the final outcome), so a retry never counts twice.
    """

    def __init__(self, handle: DeploymentHandle, cfg: AppConfig) -> None:
        self._handle = handle
        self._cfg = cfg
        from ray.serve import metrics

        self._retries = metrics.Counter("vf_replica_retries", "Predictions retried on another replica", tag_keys=("model",))
        self._rejected = metrics.Counter("vf_rejected", "Requests refused to protect the service",
                                         tag_keys=("model", "reason"))

    async def __call__(self, model_id: str, batch: np.ndarray) -> ReplicaOutput:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        retry_after = {"Retry-After": str(self._cfg.ingress.retry_after_s)}
        delays = self._cfg.ingress.retry_backoff_s
        for attempt in range(len(delays) + 1):
            try:
                return await self._handle.options(multiplexed_model_id=model_id).predict.remote(batch)
            except BackPressureError:
                self._rejected.inc(tags={"model": model_id, "reason": "replica_queue_full"})
                raise ApiError(503, "model replicas are at capacity; retry later", retry_after) from None
            except (RayActorError, DeploymentUnavailableError) as exc:
                if attempt == len(delays):
                    logger.warning("replica call failed after %d retries: %r", attempt, exc)
                    break
                self._retries.inc(tags={"model": model_id})
                await asyncio.sleep(delays[attempt])
            except Exception as exc:  # noqa: BLE001 - anything else: the caller's request still gets JSON
                logger.warning("replica call failed: %r", exc)
                break
        raise ApiError(503, "model replica unavailable; retry later", retry_after)

    async def stats(self) -> dict[str, Any]:
        try:
            return await self._handle.stats.remote()
        except Exception as exc:  # noqa: BLE001 - report, do not fail
            return {"error": repr(exc)}


class _LocalRunner:
    """Runs a batch on this process's sessions: one ONNX Runtime worker thread (it releases the GIL)."""

    def __init__(self, registry: Registry, cfg: AppConfig) -> None:
        from visionfleet.inference import RuntimeOptions

        self.models = LocalModels(registry, RuntimeOptions(threads=cfg.replica.ort_threads),
                                  cfg.replica.max_models_per_replica)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")

    async def __call__(self, model_id: str, batch: np.ndarray) -> ReplicaOutput:
        return await self.models.run(model_id, batch, self._pool)

    async def stats(self) -> dict[str, Any]:
        m = self.models
        return {"inference_in": "ingress", "batches": m.runs, "images": m.images,
                "avg_batch_images": m.images / m.runs if m.runs else 0.0,
                "loaded": m.loaded, "loads": m.loads, "evictions": m.evictions}


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, config: dict, replica: "DeploymentHandle | None") -> None:
        self.cfg = AppConfig.model_validate(config)
        registry = Registry.from_settings(Settings.from_env(self.cfg.home))  # store + database of the settings
        local = self.cfg.ingress.inference_in == "ingress"
        self.runner = _LocalRunner(registry, self.cfg) if local else _ReplicaRunner(replica, self.cfg)  # type: ignore[arg-type]
        self.sink = None
        telemetry = None
        if self.cfg.telemetry:
            from serve_apps.telemetry import TelemetryClient, get_or_create_sink

            self.sink = get_or_create_sink(self.cfg.home, self.cfg.ray_namespace)
            telemetry = TelemetryClient(self.sink)
            self.sink.configure.remote(self.cfg.monitoring.model_dump(), self.cfg.sampling.model_dump())
        self.actors = Actors(self.sink, self.cfg.ray_namespace)
        # one worker thread runs the local sessions: a second batch in flight would only
        # wait in its queue instead of growing in ours
        self.service = PredictionService(self.cfg, registry, self.runner, telemetry=telemetry,
                                         max_concurrent=1 if local else 2)

    def __serve_build_asgi_app__(self) -> Any:
        from serve_apps.api import build_api

        return build_api(self.service, self.actors, self.runner.stats)

    def reconfigure(self, user_config: dict) -> None:
        """Experiments and batch knobs, applied in place (Serve calls this, no restart)."""
        uc = IngressUserConfig.model_validate(user_config or {})
        compiled = {}
        for exp in uc.experiments:
            if exp.status != "running":
                continue
            if exp.model in compiled:
                raise ValueError(f"two running experiments on model {exp.model!r}")
            compiled[exp.model] = compile_experiment(exp)
        svc = self.service
        svc.experiments = compiled  # one atomic swap: a request sees the old or the new set
        svc.cards.forget_aliases()  # a stop may have moved @production
        running = [e for e in uc.experiments if e.status == "running"]
        if running and self.sink is not None:
            # Experiments given in a Serve config file (not started through the API) get
            # recorded so the coordinator watches them too; already-known ones are a no-op.
            from serve_apps.experiments import get_coordinator

            coordinator = get_coordinator(self.cfg.ray_namespace)
            if coordinator is not None:
                for exp in running:
                    coordinator.adopt.remote(exp.model_dump(mode="json"))
        if uc.telemetry is not None:
            svc.telemetry_on = uc.telemetry and svc.telemetry is not None
        b = svc.batcher
        if uc.max_batch_size is not None:
            b.set_max_batch_size(uc.max_batch_size)
        if uc.batch_wait_timeout_s is not None:
            b.set_batch_wait_timeout_s(uc.batch_wait_timeout_s)
        if uc.max_concurrent_batches is not None:
            b.set_max_concurrent(uc.max_concurrent_batches)
