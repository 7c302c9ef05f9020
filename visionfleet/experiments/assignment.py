"""Weighted, sticky traffic assignment with minimal movement when weights change.

An :class:`Allocation` partitions the unit interval [0, 1) into segments, each owned by
one arm; an arm's weight is the total length of its segments. A sticky client is hashed
(with the experiment's salt) to a fixed point of the interval, so it sees the arm that
owns that point. Re-weighting moves only the parts of the interval released by
shrinking arms to growing arms: a client whose arm did not shrink never moves, and a
client of a shrinking arm moves only if its point lies in the released part. This is
the "consistent" bucketing used by experimentation platforms, made exact.

Segments are stored in integer ticks of ``1 / RESOLUTION`` so that shipping an
allocation as JSON (in a Serve ``user_config``) and re-weighting it many times never
accumulates rounding error: every ingress replica computes the same arm for the same
point, bit for bit.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["RESOLUTION", "Segment", "Allocation", "initial_allocation", "reweight", "bucket", "assign"]

# 2**32 ticks: weights are exact to 2.3e-10, and a tick boundary divided by RESOLUTION is
# an exact float, so comparing it with a 53-bit bucket (below) is exact too.
RESOLUTION = 2**32


class _Uniform(Protocol):
    def random(self) -> float: ...


@dataclass(frozen=True)
class Segment:
    """The half-open tick range [start, end) of the unit interval, owned by ``arm``."""

    start: int
    end: int
    arm: str

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Allocation:
    """A partition of [0, 1) into segments owned by arms (build it with :func:`initial_allocation`).

    ``arms`` lists every arm of the experiment in a fixed order, including arms whose
    weight is currently zero; ``segments`` are sorted, contiguous and cover
    ``[0, RESOLUTION)`` exactly. The value is frozen and JSON-serializable through
    :meth:`to_dict` / :meth:`from_dict`.
    """

    arms: tuple[str, ...]
    segments: tuple[Segment, ...]
    _ends: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_partition(self.arms, self.segments)
        # Precomputed once: assign() is on the request path and must be a bisect, not a scan.
        object.__setattr__(self, "_ends", tuple(s.end / RESOLUTION for s in self.segments))

    def ticks(self) -> dict[str, int]:
        """Ticks owned by each arm (every arm present, zero allowed); they sum to RESOLUTION."""
        out = {a: 0 for a in self.arms}
        for s in self.segments:
            out[s.arm] += s.length
        return out

    def weights(self) -> dict[str, float]:
        """The share of the interval owned by each arm (sums to 1)."""
        return {a: t / RESOLUTION for a, t in self.ticks().items()}

    def arm_at(self, point: float) -> str:
        """The arm owning ``point`` in [0, 1)."""
        if not 0.0 <= point < 1.0:
            raise ValueError(f"Got {point!r} for point; expected a float in [0, 1)")
        return self.segments[bisect.bisect_right(self._ends, point)].arm

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (integers and strings only), the inverse of :meth:`from_dict`."""
        return {
            "resolution": RESOLUTION,
            "arms": list(self.arms),
            "segments": [[s.start, s.end, s.arm] for s in self.segments],
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Allocation:
        """Parse :meth:`to_dict` output, validating it (a ``user_config`` is untrusted input)."""
        if not isinstance(doc, Mapping) or set(doc) != {"resolution", "arms", "segments"}:
            got = sorted(doc) if isinstance(doc, Mapping) else type(doc).__name__
            raise ValueError(f"Got {got} for allocation; expected keys ['arms', 'resolution', 'segments']")
        if doc["resolution"] != RESOLUTION:
            raise ValueError(f"Got {doc['resolution']!r} for allocation resolution; expected {RESOLUTION}")
        arms = doc["arms"]
        if not isinstance(arms, list) or not all(isinstance(a, str) for a in arms):
            raise ValueError(f"Got {arms!r} for allocation arms; expected a list of names")
        segs = []
        for raw in doc["segments"]:
            ok = (
                isinstance(raw, (list, tuple))
                and len(raw) == 3
                and all(isinstance(x, int) and not isinstance(x, bool) for x in raw[:2])
                and isinstance(raw[2], str)
            )
            if not ok:
                raise ValueError(f"Got {raw!r} for an allocation segment; expected [start, end, arm]")
            segs.append(Segment(raw[0], raw[1], raw[2]))
        return cls(tuple(arms), tuple(segs))


def _check_partition(arms: tuple[str, ...], segments: tuple[Segment, ...]) -> None:
    if not arms:
        raise ValueError("Got no arms for allocation; expected at least one")
    if len(set(arms)) != len(arms):
        raise ValueError(f"Got duplicate arms {list(arms)} for allocation; expected unique names")
    pos = 0
    for s in segments:
        if s.arm not in arms:
            raise ValueError(f"Got segment arm {s.arm!r}; expected one of {list(arms)}")
        if s.start != pos or s.end <= s.start:
            raise ValueError(f"Got segment [{s.start}, {s.end}) after tick {pos}; expected contiguous, non-empty segments")
        pos = s.end
    if pos != RESOLUTION:
        raise ValueError(f"Got segments covering [0, {pos}); expected [0, {RESOLUTION})")


def _validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"Got {weights!r} for weights; expected a non-empty mapping of arm name to weight")
    out: dict[str, float] = {}
    for arm, w in weights.items():
        if not isinstance(arm, str) or not arm:
            raise ValueError(f"Got {arm!r} for an arm name; expected a non-empty string")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"Got {w!r} for the weight of {arm!r}; expected a finite number >= 0")
        out[arm] = float(w)
    if sum(out.values()) <= 0:
        raise ValueError(f"Got weights {out} summing to 0; expected a positive sum")
    return out


def _to_ticks(weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of normalized weights to ticks summing to RESOLUTION exactly."""
    total = sum(weights.values())
    exact = {a: w / total * RESOLUTION for a, w in weights.items()}
    ticks = {a: math.floor(x) for a, x in exact.items()}
    short = RESOLUTION - sum(ticks.values())
    # Ties broken by arm order, so every replica rounds the same way.
    for a in sorted(exact, key=lambda a: ticks[a] - exact[a])[:short]:
        ticks[a] += 1
    return ticks


def _merge(segments: list[Segment]) -> tuple[Segment, ...]:
    out: list[Segment] = []
    for s in sorted((s for s in segments if s.length > 0), key=lambda s: s.start):
        if out and out[-1].arm == s.arm and out[-1].end == s.start:
            out[-1] = Segment(out[-1].start, s.end, s.arm)
        else:
            out.append(s)
    return tuple(out)


def initial_allocation(weights: Mapping[str, float]) -> Allocation:
    """Lay the arms out as one contiguous segment each, in the mapping's order.

    Args:
        weights: arm name -> non-negative weight (normalized here; e.g. ``{"control": 90,
            "treatment": 10}``). A zero weight keeps the arm known but gives it no traffic.

    Raises:
        ValueError: empty mapping, a negative or non-finite weight, or a zero sum.
    """
    w = _validate_weights(weights)
    ticks = _to_ticks(w)
    segs, pos = [], 0
    for arm in w:
        segs.append(Segment(pos, pos + ticks[arm], arm))
        pos += ticks[arm]
    return Allocation(tuple(w), _merge(segs))


def reweight(alloc: Allocation, new_weights: Mapping[str, float]) -> Allocation:
    """Move interval mass only from shrinking arms to growing arms.

    Every existing arm must appear in ``new_weights`` (give it 0 to stop its traffic),
    so a misspelled name is an error rather than a silent new arm; a name not yet in
    the allocation adds an arm. Arms whose share is unchanged keep every point; a
    shrinking arm gives up exactly ``old - new`` of the interval and keeps the rest;
    a growing arm keeps all of its points and receives exactly ``new - old``.

    To keep the partition from fragmenting over many (bandit) updates, mass is first
    moved across a boundary between a shrinking and a growing arm (this shifts the
    boundary and creates no segment); only what remains is cut from the end of a
    shrinking arm's segments and handed to growing arms.

    Raises:
        ValueError: invalid weights, or an existing arm missing from ``new_weights``.
    """
    w = _validate_weights(new_weights)
    missing = [a for a in alloc.arms if a not in w]
    if missing:
        raise ValueError(
            f"Got weights without arms {missing}; expected every arm of the allocation "
            f"{list(alloc.arms)} (give weight 0 to stop an arm's traffic)"
        )
    arms = alloc.arms + tuple(a for a in w if a not in alloc.arms)
    have = {a: 0 for a in arms} | alloc.ticks()
    target = _to_ticks(w)
    release = {a: have[a] - target[a] for a in arms if have[a] > target[a]}
    need = {a: target[a] - have[a] for a in arms if target[a] > have[a]}

    segs = [[s.start, s.end, s.arm] for s in alloc.segments]
    # Pass 1: shift boundaries between a shrinking segment and an adjacent growing one.
    # Each step exhausts a segment, a release or a need, so the loop is bounded.
    moved = True
    while moved and release:
        moved = False
        for i in range(len(segs) - 1):
            left, right = segs[i], segs[i + 1]
            if left[2] in release and right[2] in need:  # the boundary moves left
                src, dst, k = left[2], right[2], min(release[left[2]], need[right[2]], left[1] - left[0])
                left[1] -= k
                right[0] -= k
            elif left[2] in need and right[2] in release:  # the boundary moves right
                src, dst, k = right[2], left[2], min(release[right[2]], need[left[2]], right[1] - right[0])
                left[1] += k
                right[0] += k
            else:
                continue
            _spend(release, src, k)
            _spend(need, dst, k)
            segs = [s for s in segs if s[1] > s[0]]
            moved = True
            break
    # Pass 2: cut what is left from the end of the shrinking arms' largest segments.
    freed: list[list[int]] = []
    for arm in [a for a in arms if a in release]:
        for s in sorted((s for s in segs if s[2] == arm), key=lambda s: s[0] - s[1]):
            k = min(release.get(arm, 0), s[1] - s[0])
            if k:
                freed.append([s[1] - k, s[1]])
                s[1] -= k
                _spend(release, arm, k)
    freed.sort()
    for arm in [a for a in arms if a in need]:
        while need.get(arm, 0):
            gap = freed[0]
            k = min(need[arm], gap[1] - gap[0])
            segs.append([gap[0], gap[0] + k, arm])
            gap[0] += k
            _spend(need, arm, k)
            if gap[0] == gap[1]:
                freed.pop(0)
    return Allocation(arms, _merge([Segment(a, b, arm) for a, b, arm in segs]))


def _spend(pool: dict[str, int], arm: str, k: int) -> None:
    pool[arm] -= k
    if pool[arm] == 0:
        del pool[arm]


def bucket(client_key: str, salt: str) -> float:
    """A stable point in [0, 1) for a client: the same key and salt give the same point everywhere.

    blake2b, not Python's ``hash``: the latter is randomized per process, and every
    ingress replica (and every restart) must agree. The point has 53 random bits, so it
    is an exact float strictly below 1.
    """
    if not isinstance(client_key, str) or not client_key:
        raise ValueError(f"Got {client_key!r} for client key; expected a non-empty string (or None for a per-request draw)")
    if not isinstance(salt, str):
        raise ValueError(f"Got {salt!r} for salt; expected a string")
    # Length-prefixing the salt keeps (salt, key) pairs from colliding by concatenation.
    message = f"{len(salt)}:{salt}{client_key}".encode()
    digest = hashlib.blake2b(message, digest_size=8, person=b"vf-ab").digest()
    return (int.from_bytes(digest, "big") >> 11) / 2**53


def assign(alloc: Allocation, client_key: str | None, salt: str, rng: _Uniform) -> str:
    """The arm for one request: sticky by ``client_key``, or a fresh draw from ``rng`` without one.

    Args:
        alloc: the experiment's allocation.
        client_key: e.g. the ``X-Client-Id`` header; ``None`` draws per request.
        salt: the experiment's salt (a new experiment gets a new salt, so clients are
            reshuffled between experiments but not within one).
        rng: anything with ``random() -> float`` in [0, 1) (``random.Random``,
            ``numpy.random.Generator``).
    """
    point = rng.random() if client_key is None else bucket(client_key, salt)
    return alloc.arm_at(point)
