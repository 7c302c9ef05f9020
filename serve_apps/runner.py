"""Loading a version for serving and running one batch of requests through it.

Shared by the model replica (``serve_apps.replica``, where ``@serve.multiplexed`` keeps
the loaded versions) and by the ingress when it runs models itself
(``IngressConfig.inference_in = "ingress"``, where :class:`LocalModels` keeps them).
The batch contract is list in / list out with errors kept per request (STYLE 6).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from visionfleet.inference import LoadedModel, RuntimeOptions, load_model_dir
from visionfleet.registry import NotFound, Registry
from visionfleet.spec import Task

__all__ = ["ReplicaOutput", "ReplicaError", "load_for_serving", "run_requests", "LocalModels", "valid_images"]


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


def load_for_serving(registry: Registry, runtime: RuntimeOptions, model_id: str) -> LoadedModel:
    """Load ``NAME:VERSION`` from the registry (blocking: call it in an executor)."""
    name, _, version = model_id.partition(":")
    if not version.isdigit():
        raise ReplicaError(f"bad model id {model_id!r}; expected NAME:VERSION", 400)
    model = load_model_dir(registry.local_dir(name, int(version)), runtime)
    if model.card.task is Task.DETECTION:
        from visionfleet.detection import DETECTION_OUTPUTS

        missing = set(DETECTION_OUTPUTS) - set(model.output_names)
        if missing:
            raise ReplicaError(f"detection model {model_id} lacks outputs {sorted(missing)}", 500)
        model.output_names = list(DETECTION_OUTPUTS)  # the order the ingress reads
    return model


def valid_images(arr: object, h: int, w: int) -> bool:
    return (
        isinstance(arr, np.ndarray)
        and arr.dtype == np.uint8
        and arr.ndim == 4
        and arr.shape[0] >= 1
        and arr.shape[1:] == (h, w, 3)
    )


async def run_requests(model: LoadedModel, model_id: str, requests: list[np.ndarray], pool: Executor) -> tuple[list[ReplicaOutput], int]:
    """Run the valid requests as one ONNX Runtime call on ``pool``.

    Returns one output per request (a per-request error for a malformed one) and the
    number of images run (0 when none was valid).
    """
    h, w = model.card.input_size
    good = [i for i, r in enumerate(requests) if valid_images(r, h, w)]
    results = [ReplicaOutput(None, f"expected uint8 images [k, {h}, {w}, 3] for {model_id}", 400) for _ in requests]
    if not good:
        return results, 0
    batch = np.concatenate([requests[i] for i in good]) if len(good) > 1 else requests[good[0]]
    t0 = time.perf_counter()
    outputs = await asyncio.get_running_loop().run_in_executor(pool, model.run, batch)
    infer_ms = (time.perf_counter() - t0) * 1000
    providers = tuple(model.providers)
    start = 0
    for i in good:
        k = len(requests[i])
        results[i] = ReplicaOutput([o[start : start + k] for o in outputs], batch_size=len(good),
                                   infer_ms=infer_ms, providers=providers)
        start += k
    return results, len(batch)


class LocalModels:
    """Versions loaded in this process: an LRU of ``capacity`` sessions, loaded once each.

    Concurrent requests for a version that is loading wait for the one load; a failed
    load is not cached (the next request tries again).
    """

    def __init__(self, registry: Registry, runtime: RuntimeOptions, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError(f"Got {capacity} for capacity; expected >= 1")
        self._registry, self._runtime, self.capacity = registry, runtime, capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self.loads = 0
        self.evictions = 0
        self.runs = 0  # successful ONNX Runtime calls
        self.images = 0  # images they carried

    @property
    def loaded(self) -> list[str]:
        return list(self._models)

    async def get(self, model_id: str) -> LoadedModel:
        model = self._models.get(model_id)
        if model is not None:
            self._models.move_to_end(model_id)
            return model
        pending = self._loading.get(model_id)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._loading[model_id] = fut
        try:
            model = await loop.run_in_executor(None, load_for_serving, self._registry, self._runtime, model_id)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._loading.pop(model_id, None)
        fut.set_result(model)
        self._models[model_id] = model
        self.loads += 1
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)
            self.evictions += 1
        return model

    async def run(self, model_id: str, batch: np.ndarray, pool: Executor) -> ReplicaOutput:
        """One request-sized call (the ingress already formed the batch)."""
        try:
            model = await self.get(model_id)
        except (NotFound, FileNotFoundError) as exc:
            return ReplicaOutput(None, str(exc), 404)
        except ReplicaError as exc:
            return ReplicaOutput(None, str(exc), exc.status)
        (out,), images = await run_requests(model, model_id, [batch], pool)
        if images:
            self.runs += 1
            self.images += images
        return out
