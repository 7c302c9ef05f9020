"""ModelReplica: runs any registered version, multiplexed by ``NAME:VERSION``, batched.

A thin shell (STYLE 4): loading is ``visionfleet.inference.load_model_dir``, the batch
contract is list in / list out with errors kept per request (STYLE 6). Batches are
split by multiplexed model id by Serve itself, so one batch is one version.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from serve_apps.config import AppConfig, ReplicaUserConfig
from visionfleet.inference import LoadedModel, RuntimeOptions, load_model_dir
from visionfleet.registry import NotFound, Registry
from visionfleet.spec import Task

__all__ = ["ModelReplica", "ReplicaOutput", "ReplicaError"]


class ReplicaError(Exception):
    """An error that belongs to one request; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ReplicaOutput:
    """One request's result: the model outputs for its images, or its error."""

    outputs: list[np.ndarray] | None
    error: str | None = None
    status: int = 200
    batch_size: int = 0
    infer_ms: float = 0.0
    providers: tuple[str, ...] = ()


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
        name, _, version = model_id.partition(":")
        if not version.isdigit():
            raise ReplicaError(f"bad model id {model_id!r}; expected NAME:VERSION", 400)
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(None, self._registry.local_dir, name, int(version))
        model = await loop.run_in_executor(None, load_model_dir, path, self._runtime)
        if model.card.task is Task.DETECTION:
            from visionfleet.detection import DETECTION_OUTPUTS

            missing = set(DETECTION_OUTPUTS) - set(model.output_names)
            if missing:
                raise ReplicaError(f"detection model {model_id} lacks outputs {sorted(missing)}", 500)
            model.output_names = list(DETECTION_OUTPUTS)  # the order the ingress reads
        return model

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
        h, w = model.card.input_size
        good = [i for i, r in enumerate(requests) if _valid(r, h, w)]
        results: list[ReplicaOutput] = [
            ReplicaOutput(None, f"expected uint8 images [k, {h}, {w}, 3] for {model_id}", 400) for _ in requests
        ]
        if not good:
            return results
        batch = np.concatenate([requests[i] for i in good]) if len(good) > 1 else requests[good[0]]
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._pool, model.run, batch)
        infer_ms = (time.perf_counter() - t0) * 1000
        self._batches += 1
        self._batched_requests += len(good)
        self._batched_images += len(batch)
        self._m_batch.observe(len(good), tags={"model": model_id})
        self._m_images.observe(len(batch), tags={"model": model_id})
        providers = tuple(model.providers)
        start = 0
        for i in good:
            k = len(requests[i])
            results[i] = ReplicaOutput(
                [o[start : start + k] for o in outputs],
                batch_size=len(good),
                infer_ms=infer_ms,
                providers=providers,
            )
            start += k
        return results


def _valid(arr: object, h: int, w: int) -> bool:
    return (
        isinstance(arr, np.ndarray)
        and arr.dtype == np.uint8
        and arr.ndim == 4
        and arr.shape[0] >= 1
        and arr.shape[1:] == (h, w, 3)
    )
