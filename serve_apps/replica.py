"""ModelReplica: runs any registered version, multiplexed by ``NAME:VERSION``.

A thin shell (STYLE 4). The ingress's adaptive batcher (``serve_apps.batching``) forms
the batch, so one call here is one ONNX Runtime run: there is no second batcher
(``@serve.batch``) stacked behind the first, and no second concatenate/split round.
Measured on 2 cores, a batcher on each side of the hop was no faster than the
ingress's alone (docs/performance.md#one-batcher-per-layout-2026-12-02). Loading and running
live in ``serve_apps.runner``, shared with the ingress.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from serve_apps.config import AppConfig
from serve_apps.runner import ReplicaOutput, failure, load_version, run_batch
from visionfleet.inference import LoadedModel, RuntimeOptions
from visionfleet.registry import Registry
from visionfleet.settings import Settings

__all__ = ["ModelReplica", "ReplicaOutput"]


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, config: dict[str, Any]) -> None:
        self._cfg = AppConfig.model_validate(config)
        # The store and database of the settings (VISIONFLEET_STORE / VISIONFLEET_DB arrive in
        # the runtime_env); remote versions are cached on this node by content hash.
        self._registry = Registry.from_settings(Settings.from_env(self._cfg.home))
        self._runtime = RuntimeOptions(threads=self._cfg.replica.ort_threads)
        # ONNX Runtime releases the GIL: one worker thread runs sessions while the
        # event loop keeps accepting calls.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self._pool_alive = True
        # The LRU size comes from the config, so the multiplexed loader is made here (Ray
        # Serve detects a multiplexed instance attribute at run time). A plain function, not
        # a bound method: Serve keeps its model cache as an attribute of what it wraps.
        async def load(model_id: str) -> LoadedModel:
            model = await asyncio.get_running_loop().run_in_executor(
                None, load_version, self._registry, self._runtime, model_id)
            self._loads += 1
            return model

        self._get_model = serve.multiplexed(max_num_models_per_replica=self._cfg.replica.max_models_per_replica)(load)
        self._batches = 0
        self._images = 0
        self._loads = 0  # versions loaded (again after an LRU eviction)
        self._unhealthy: str | None = None
        from ray.serve import metrics

        self._m_images = metrics.Histogram(
            "vf_replica_batch_images",
            "Images per ONNX Runtime call in the model replica",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            tag_keys=("model",),
        )

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if self._unhealthy is not None:
            raise RuntimeError(f"replica marked unhealthy: {self._unhealthy}")
        if not self._pool_alive:
            raise RuntimeError("the ONNX Runtime worker thread is gone")

    async def mark_unhealthy(self, reason: str) -> dict[str, str]:
        """Ask Serve to replace this replica (operators: a corrupt cache, a stuck device)."""
        self._unhealthy = reason or "marked by an operator"
        return {"replica": serve.get_replica_context().replica_tag, "reason": self._unhealthy}

    async def predict(self, batch: np.ndarray) -> ReplicaOutput:
        """Run one batch the ingress formed (uint8 [k, H, W, 3] at the model's size)."""
        model_id = serve.get_multiplexed_model_id()
        try:
            model = await self._get_model(model_id)
        except Exception as exc:  # noqa: BLE001 - a load failure is this batch's error
            return failure(exc, model_id)
        try:
            out = await run_batch(model, model_id, batch, self._pool)
        except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
            self._pool_alive = False
            return ReplicaOutput(None, f"model replica cannot run models: {exc}", 503)
        if out.error is None:
            self._batches += 1
            self._images += len(batch)
            self._m_images.observe(len(batch), tags={"model": model_id})
        return out

    async def stats(self) -> dict[str, float]:
        """ONNX Runtime calls so far and the images they carried."""
        return {
            "batches": self._batches,
            "images": self._images,
            "avg_batch_images": self._images / self._batches if self._batches else 0.0,
            "loads": self._loads,
            "max_models": self._cfg.replica.max_models_per_replica,
        }
