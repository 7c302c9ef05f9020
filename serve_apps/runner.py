"""Running a registered version for serving: load it by model id, run one batch through it.

Shared by the model replica (``serve_apps.replica``, where ``@serve.multiplexed`` keeps
the loaded versions) and by the ingress when it runs models itself
(``IngressConfig.inference_in = "ingress"``, where :class:`LocalModels` keeps them).
Loading is :func:`visionfleet.inference.load_model_dir`, the one loader of every room.
The ingress's adaptive batcher has already formed the batch: a call here is one
ONNX Runtime run, and its error belongs to that call (STYLE 6).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from visionfleet.inference import LoadedModel, RuntimeOptions, load_model_dir
from visionfleet.registry import NotFound, Registry
from visionfleet.store import StoreError

__all__ = ["ReplicaOutput", "load_version", "run_batch", "failure", "LocalModels", "store_unavailable_message"]


@dataclass(frozen=True)
class ReplicaOutput:
    """One batch's model outputs (first dimension = image), or its error and HTTP status."""

    outputs: list[np.ndarray] | None
    error: str | None = None
    status: int = 200


def load_version(registry: Registry, runtime: RuntimeOptions, model_id: str) -> LoadedModel:
    """Load ``NAME:VERSION`` from the registry (blocking: call it in an executor).

    Raises:
        ValueError: a malformed id, or a model the loader refuses.
        NotFound, FileNotFoundError: no such version, or its files are missing.
    """
    name, _, version = model_id.partition(":")
    if not name or not version.isdigit():
        raise ValueError(f"Got model id {model_id!r}; expected NAME:VERSION")
    return load_model_dir(registry.local_dir(name, int(version)), runtime)


def failure(exc: BaseException, model_id: str) -> ReplicaOutput:
    """A load failure as the output of the batch that needed the model."""
    if isinstance(exc, (NotFound, FileNotFoundError)):
        return ReplicaOutput(None, str(exc), 404)
    if isinstance(exc, ValueError) and str(exc).startswith("Got model id"):
        return ReplicaOutput(None, str(exc), 400)
    if isinstance(exc, StoreError):  # the store or database is down: retry later (not cached: the next load tries)
        return ReplicaOutput(None, store_unavailable_message(exc), 503)
    # A registered version that does not load is the server's problem, not the client's.
    return ReplicaOutput(None, f"model {model_id} could not be loaded: {exc}", 500)


def store_unavailable_message(exc: BaseException) -> str:
    """The 503 text of a request that needed the model store (or the database) while it was down."""
    return f"model store unavailable: {exc}; retry later"


def _valid_images(arr: object, sizes: tuple[tuple[int, int], ...]) -> bool:
    return (
        isinstance(arr, np.ndarray)
        and arr.dtype == np.uint8
        and arr.ndim == 4
        and arr.shape[0] >= 1
        and arr.shape[3:] == (3,)
        and arr.shape[1:3] in sizes
    )


async def run_batch(model: LoadedModel, model_id: str, batch: np.ndarray, pool: Executor) -> ReplicaOutput:
    """One ONNX Runtime call on ``pool`` for uint8 ``[k, H, W, 3]`` images at one of the model's sizes."""
    sizes = model.card.sizes
    if not _valid_images(batch, sizes):
        got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, np.ndarray) else type(batch).__name__
        want = " or ".join(f"[k, {h}, {w}, 3]" for h, w in sizes)
        return ReplicaOutput(None, f"Got images {got} for {model_id}; expected uint8 {want}", 400)
    outputs = await asyncio.get_running_loop().run_in_executor(pool, model.run, batch)
    return ReplicaOutput(list(outputs))


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
            model = await loop.run_in_executor(None, load_version, self._registry, self._runtime, model_id)
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
        """One batch the ingress formed, on this process's session of ``model_id``."""
        try:
            model = await self.get(model_id)
        except Exception as exc:  # noqa: BLE001 - every load failure becomes this batch's error
            return failure(exc, model_id)
        out = await run_batch(model, model_id, batch, pool)
        if out.error is None:
            self.runs += 1
            self.images += len(batch)
        return out
