"""ModelReplica: runs any registered version, multiplexed by ``NAME:VERSION``, batched.

A thin shell (STYLE 4): loading and the batch contract (list in / list out, errors kept
per request, STYLE 6) live in ``serve_apps.runner``, shared with the ingress. Batches are
split by multiplexed model id by Serve itself, so one batch is one version.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from serve_apps.config import AppConfig, ReplicaUserConfig
from serve_apps.runner import ReplicaError, ReplicaOutput, load_for_serving, run_requests
from visionfleet.inference import LoadedModel, RuntimeOptions
from visionfleet.registry import NotFound, Registry

__all__ = ["ModelReplica", "ReplicaOutput", "ReplicaError"]


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, config: dict[str, Any]) -> None:
        self._cfg = AppConfig.model_validate(config)
        self._registry = Registry(f"{self._cfg.home}/registry", cache_dir=f"{self._cfg.home}/cache/registry")
        self._runtime = RuntimeOptions(threads=self._cfg.replica.ort_threads)
        # ONNX Runtime releases the GIL: one worker thread runs sessions while the
        # event loop keeps accepting requests, so the next batch fills meanwhile.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self._infer.set_max_batch_size(self._cfg.replica.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self._cfg.replica.batch_wait_timeout_s)
        self._batches = 0
        self._batched_requests = 0
        self._batched_images = 0
        self._unhealthy: str | None = None
        from ray.serve import metrics

        self._m_batch = metrics.Histogram(
            "vf_replica_batch_size",
            "Requests per ONNX Runtime call in the model replica",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=("model",),
        )
        self._m_images = metrics.Histogram(
            "vf_replica_batch_images",
            "Images per ONNX Runtime call in the model replica",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            tag_keys=("model",),
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Runtime knobs without a restart: ``max_batch_size``, ``batch_wait_timeout_s``."""
        uc = ReplicaUserConfig.model_validate(user_config or {})
        if uc.max_batch_size is not None:
            self._infer.set_max_batch_size(uc.max_batch_size)
        if uc.batch_wait_timeout_s is not None:
            self._infer.set_batch_wait_timeout_s(uc.batch_wait_timeout_s)

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if self._unhealthy is not None:
            raise RuntimeError(f"replica marked unhealthy: {self._unhealthy}")
        if self._pool._shutdown:  # the ONNX Runtime worker thread is gone
            raise RuntimeError("inference thread pool is shut down")

    async def mark_unhealthy(self, reason: str) -> dict[str, str]:
        """Ask Serve to replace this replica (operators: a corrupt cache, a stuck device)."""
        self._unhealthy = reason or "marked by an operator"
        return {"replica": serve.get_replica_context().replica_tag, "reason": self._unhealthy}

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_model(self, model_id: str) -> LoadedModel:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, load_for_serving, self._registry, self._runtime, model_id)

    async def predict(self, images: np.ndarray) -> ReplicaOutput:
        """Run one request's images (uint8 [k, H, W, 3] at the model's size)."""
        return await self._infer(images)

    async def stats(self) -> dict[str, float]:
        """Batches formed so far: the average batch size says whether batching works."""
        return {
            "batches": self._batches,
            "requests": self._batched_requests,
            "images": self._batched_images,
            "avg_batch_size": self._batched_requests / self._batches if self._batches else 0.0,
            "avg_batch_images": self._batched_images / self._batches if self._batches else 0.0,
            "max_batch_size": self._infer._get_max_batch_size(),
            "batch_wait_timeout_s": self._infer._get_batch_wait_timeout_s(),
        }

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # both set from the config in __init__
    async def _infer(self, requests: list[np.ndarray]) -> list[ReplicaOutput]:
        model_id = serve.get_multiplexed_model_id()  # one id per batch: Serve splits batches by id
        try:
            model = await self.get_model(model_id)
        except (NotFound, FileNotFoundError) as exc:
            return [ReplicaOutput(None, str(exc), 404) for _ in requests]
        except ReplicaError as exc:
            return [ReplicaOutput(None, str(exc), exc.status) for _ in requests]
        results, images = await run_requests(model, model_id, requests, self._pool)
        if images:
            good = sum(1 for r in results if r.error is None)
            self._batches += 1
            self._batched_requests += good
            self._batched_images += images
            self._m_batch.observe(good, tags={"model": model_id})
            self._m_images.observe(images, tags={"model": model_id})
        return results
