"""Where a Ray Train / Tune run runs and where it keeps its state: pure functions, no Ray import.

* :func:`decide_workers`: GPU workers when the cluster has enough GPUs for all of them (or when
  asked to), CPU workers otherwise, and the resources each worker reserves. It reads a
  ``ray.cluster_resources()`` dict, so it is tested with plain dicts.
* :func:`ray_storage`: the ``storage_path`` / ``storage_filesystem`` pair of a ``RunConfig``
  for a store area (``Settings.store_uri("runs")`` or ``"tune"``): a local directory as is, an
  ``s3://bucket/prefix`` URI as ``bucket/prefix`` on the ``pyarrow.fs.S3FileSystem`` that
  :mod:`visionfleet.store` builds from the ``AWS_*`` variables (``AWS_ENDPOINT_URL`` for a
  non-AWS server). Ray asks for the prefix stripped when a filesystem is given:
  https://docs.ray.io/en/latest/train/api/doc/ray.train.RunConfig.html
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["WorkerPlan", "decide_workers", "ray_storage", "parse_gpu_setting", "ENV_TRAIN_GPU"]

# auto (default) | on | off: the setting behind `visionfleet train --gpu/--no-gpu`.
ENV_TRAIN_GPU = "VISIONFLEET_TRAIN_GPU"


@dataclass(frozen=True)
class WorkerPlan:
    """What each Ray Train worker gets, and why."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    why: str = ""


def parse_gpu_setting(raw: str | None) -> bool | None:
    """``auto``/empty -> None (decide from the cluster), ``on``/``off`` (and true/false, 1/0) -> a bool."""
    value = (raw or "auto").strip().lower()
    if value in ("auto", ""):
        return None
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"Got {raw!r} for ${ENV_TRAIN_GPU}; expected auto, on or off")


def decide_workers(
    cluster: Mapping[str, float],
    *,
    num_workers: int,
    cpus_per_worker: float,
    gpu: bool | None = None,
    gpus_per_worker: float = 1.0,
) -> WorkerPlan:
    """GPU workers when ``cluster["GPU"] >= num_workers * gpus_per_worker`` (``gpu=None``), or as told.

    Args:
        cluster: ``ray.cluster_resources()`` (``{"CPU": 16.0, "GPU": 2.0, ...}``).
        gpu: None decides from ``cluster``; True asks for GPU workers (refused when the cluster
            has too few GPUs: Ray would wait for them forever); False keeps CPU workers.

    Raises:
        ValueError: a bad worker count or share, or ``gpu=True`` on a cluster without enough GPUs.
    """
    if num_workers < 1:
        raise ValueError(f"Got {num_workers} for num_workers; expected >= 1")
    if cpus_per_worker <= 0:
        raise ValueError(f"Got {cpus_per_worker} for cpus_per_worker; expected > 0")
    if gpus_per_worker <= 0:
        raise ValueError(f"Got {gpus_per_worker} for gpus_per_worker; expected > 0")
    have = float(cluster.get("GPU", 0) or 0)
    need = num_workers * gpus_per_worker
    enough = have >= need
    if gpu is True and not enough:
        raise ValueError(f"Got --gpu with {have:g} GPU(s) in the cluster; expected at least {need:g} "
                         f"({num_workers} workers x {gpus_per_worker:g})")
    use = enough if gpu is None else gpu
    if use:
        why = (f"{have:g} GPU(s) in the cluster cover {num_workers} worker(s) x {gpus_per_worker:g}"
               + (" (asked for)" if gpu else ""))
        return WorkerPlan(num_workers, True, {"CPU": cpus_per_worker, "GPU": gpus_per_worker}, why)
    why = ("CPU workers (asked for)" if gpu is False
           else f"CPU workers: {have:g} GPU(s) in the cluster, {need:g} needed")
    return WorkerPlan(num_workers, False, {"CPU": cpus_per_worker}, why)


def ray_storage(uri: str | os.PathLike[str]) -> tuple[str, Any | None]:
    """``(storage_path, storage_filesystem)`` for a Ray ``RunConfig`` from a store location.

    A local path comes back absolute with no filesystem (Ray's default, as before); an
    ``s3://bucket/prefix`` URI comes back as ``bucket/prefix`` and the S3 filesystem of
    :func:`visionfleet.store.open_store` (same credentials, endpoint and timeouts as every
    other area). Raises :class:`visionfleet.store.StoreError` for a URI it cannot use.
    """
    raw = os.fspath(uri)
    if "://" not in raw:
        return str(Path(raw).expanduser().resolve()), None
    from visionfleet.store import open_store

    store = open_store(raw)
    if store.local:  # file:///x
        return store.root, None
    return store.root, store.fs
