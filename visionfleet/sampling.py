"""Active learning: which predictions are worth a label, with rate limits and caps.

A prediction is a candidate when the model was unsure (top-1 confidence below
``low_confidence``, or the margin to the runner-up below ``margin``) or by a small
uniform random share (so the labeled set also estimates accuracy without bias). A
candidate is kept unless the global token bucket is empty, its predicted class has hit
its cap for the current period, or the same image was kept recently.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["SamplingPolicy", "ActiveSampler", "is_candidate"]


@dataclass(frozen=True)
class SamplingPolicy:
    low_confidence: float = 0.6
    margin: float = 0.15
    random_share: float = 0.02
    rate_per_s: float = 20.0
    burst: int = 200
    per_class_cap: int = 500
    period_s: float = 3600.0
    dedupe_size: int = 100_000

    def __post_init__(self) -> None:
        if not 0 <= self.low_confidence <= 1 or not 0 <= self.margin <= 1 or not 0 <= self.random_share <= 1:
            raise ValueError(f"Got {self}; expected thresholds and random_share in [0, 1]")
        if self.rate_per_s <= 0 or self.burst < 1 or self.per_class_cap < 1 or self.period_s <= 0:
            raise ValueError(f"Got {self}; expected positive rate, burst, cap and period")


def is_candidate(policy: SamplingPolicy, confidence: float, margin: float | None, u: float) -> str | None:
    """Why this prediction deserves a label (``u`` is a uniform draw), or None."""
    if confidence < policy.low_confidence:
        return "low_confidence"
    if margin is not None and margin < policy.margin:
        return "near_threshold"
    if u < policy.random_share:
        return "random"
    return None


@dataclass
class ActiveSampler:
    """Stateful filter after :func:`is_candidate`: token bucket, per-class caps, dedupe."""

    policy: SamplingPolicy = field(default_factory=SamplingPolicy)
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._tokens = float(self.policy.burst)
        self._last = self.clock()
        self._period_start = self._last
        self._per_class: dict[str, int] = {}
        self._hashes: OrderedDict[str, None] = OrderedDict()
        self.counts = {"considered": 0, "kept": 0, "rate_limited": 0, "capped": 0, "duplicate": 0}

    def keep(self, *, predicted: str | None, image_hash: str) -> bool:
        """Apply the limits to a candidate; True when it goes to the labeling queue."""
        now = self.clock()
        self.counts["considered"] += 1
        if now - self._period_start >= self.policy.period_s:
            self._period_start, self._per_class = now, {}
        self._tokens = min(float(self.policy.burst), self._tokens + (now - self._last) * self.policy.rate_per_s)
        self._last = now
        if image_hash in self._hashes:
            self.counts["duplicate"] += 1
            return False
        cls = predicted or "?"
        if self._per_class.get(cls, 0) >= self.policy.per_class_cap:
            self.counts["capped"] += 1
            return False
        if self._tokens < 1.0:
            self.counts["rate_limited"] += 1
            return False
        self._tokens -= 1.0
        self._per_class[cls] = self._per_class.get(cls, 0) + 1
        self._hashes[image_hash] = None
        if len(self._hashes) > self.policy.dedupe_size:
            self._hashes.popitem(last=False)
        self.counts["kept"] += 1
        return True
