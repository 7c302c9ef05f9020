"""Staged rollouts by device cohort: a pure function of the device id and the percentage.

A device's bucket is a stable hash of ``<model>:<device id>`` mapped to [0, 100); it
takes a rollout when its bucket is below the percentage. Raising the percentage from 10
to 50 keeps the first 10% in and adds 40% more (nobody flips back and forth), and the
same devices are the canaries of every release of a model. The server uses the same
function to show which devices a rollout covers.
"""

from __future__ import annotations

import hashlib

__all__ = ["cohort_bucket", "in_rollout"]


def cohort_bucket(device_id: str, model: str) -> float:
    """The device's stable position in [0, 100) for rollouts of ``model``."""
    digest = hashlib.sha256(f"{model}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def in_rollout(device_id: str, model: str, percent: float) -> bool:
    """Whether a rollout of ``model`` at ``percent`` (0..100) covers this device.

    Raises:
        ValueError: percent outside 0..100.
    """
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"Got {percent} for rollout percent; expected 0..100")
    return cohort_bucket(device_id, model) < percent
