"""Feasibility, score, Pareto front and best feasible config: pure functions over trial records.

A trial is *feasible* when it was measured to the end and every constraint holds: the
p95 latency budget (the sweep's budget, and the target profile's own p95 budget when it
is tighter), the target's model-size and peak-memory budgets, its largest input size and,
when the sweep asks for it, its precision. An infeasible trial can never be the best,
whatever its accuracy.

The searcher needs one number per trial, and that number steers the search; it never
picks the winner (:func:`best_feasible` does, among feasible trials only). :func:`score`
is the holdout top-1 for a feasible trial and, for an infeasible one, its top-1 minus a
penalty proportional to the worst relative overrun. A constant "infeasible is worse than
anything feasible" would give TPE no reason to approach the budget from the accurate
side: on the demo model, the 32 px variants fit and reach ~50% while 48 px ones reach
~85% at 1.4x the budget, and the best feasible config lies between them (more pruning at
48 px). With the penalty, an accurate config slightly over budget ranks above a weak
feasible one, so TPE explores its neighbourhood.

The Pareto front is taken over accuracy (higher is better) and p95 latency (lower is
better) among fully measured trials; :func:`best_feasible` picks the most accurate
feasible trial, ties broken by lower latency, then smaller file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from visionfleet.targets import TargetProfile

__all__ = [
    "Constraints",
    "TrialRecord",
    "Check",
    "checks",
    "is_feasible",
    "score",
    "pareto_front",
    "best_feasible",
    "COMPLETE",
    "STOPPED",
    "ERROR",
]

COMPLETE = "complete"  # measured to the end
STOPPED = "stopped"  # stopped early as hopeless (even the fastest probe query was over budget)
ERROR = "error"  # the build or a measurement failed

_STATUSES = (COMPLETE, STOPPED, ERROR)
# Penalty for a failed requirement that has no ratio (precision, input size, an error).
_HARD_PENALTY = 10.0


@dataclass(frozen=True)
class Constraints:
    """What a feasible trial must satisfy.

    Args:
        latency_ms: the p95 latency budget at batch 1 (already the tighter of the
            sweep's and the target's).
        max_model_mb, max_peak_memory_mb: the target's budgets (None: no limit).
        max_input_size: the largest square side the target's pipeline feeds (None: any).
        precision: a required precision (fp32, fp16, int8), or None for any.
    """

    latency_ms: float
    max_model_mb: float | None = None
    max_peak_memory_mb: float | None = None
    max_input_size: int | None = None
    precision: str | None = None

    def __post_init__(self) -> None:
        if not (self.latency_ms > 0 and math.isfinite(self.latency_ms)):
            raise ValueError(f"Got {self.latency_ms} for the latency budget; expected a positive number of ms")
        for name in ("max_model_mb", "max_peak_memory_mb", "max_input_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"Got {v} for {name}; expected > 0 or None")

    @classmethod
    def for_target(
        cls, profile: TargetProfile, latency_ms: float | None, *, require_precision: bool = False
    ) -> "Constraints":
        """The sweep's latency budget combined with a target profile's budgets.

        ``latency_ms`` None means the target's own p95 budget.
        """
        budget = profile.max_p95_ms if latency_ms is None else min(float(latency_ms), profile.max_p95_ms)
        return cls(
            latency_ms=budget,
            max_model_mb=profile.max_model_mb,
            max_peak_memory_mb=profile.max_peak_memory_mb,
            max_input_size=min(profile.input_size),
            precision=profile.precision.value if require_precision else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrialRecord:
    """What one trial measured (the trial module fills it; the report reads it)."""

    key: str
    config: dict[str, Any]
    status: str
    top1: float | None = None
    p95_ms: float | None = None
    p50_ms: float | None = None
    size_mb: float | None = None
    peak_memory_mb: float | None = None
    precision: str | None = None
    input_size: int | None = None
    probe_min_ms: float | None = None  # the fastest query of the latency probe: a lower bound of any p95
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"Got {self.status!r} for a trial status; expected one of {_STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrialRecord":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Check:
    """One constraint against one trial: ok is None when it was not measured."""

    name: str
    limit: float | int | str
    measured: float | int | str | None
    ok: bool | None

    @property
    def overrun(self) -> float:
        """measured / limit for a failed numeric check (how far over), else 0."""
        if self.ok is not False:
            return 0.0
        if isinstance(self.limit, (int, float)) and isinstance(self.measured, (int, float)) and self.limit > 0:
            return float(self.measured) / float(self.limit)
        return _HARD_PENALTY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _max_check(name: str, limit: float | None, measured: float | None) -> Check | None:
    if limit is None:
        return None
    if measured is None:
        return Check(name, limit, None, None)
    return Check(name, limit, measured, float(measured) <= float(limit))


def checks(trial: TrialRecord, c: Constraints) -> list[Check]:
    """Every constraint of ``c`` against ``trial`` (latency first)."""
    latency = trial.p95_ms
    if latency is None and trial.status == STOPPED:
        latency = trial.probe_min_ms  # stopped on its probe: p95 >= its fastest query > budget
    out = [
        _max_check("p95 latency (ms)", c.latency_ms, latency),
        _max_check("model size (MB)", c.max_model_mb, trial.size_mb),
        _max_check("peak memory (MB)", c.max_peak_memory_mb, trial.peak_memory_mb),
        _max_check("input size (px)", c.max_input_size, trial.input_size),
    ]
    if c.precision is not None:
        out.append(Check("precision", c.precision, trial.precision, None if trial.precision is None else trial.precision == c.precision))
    return [x for x in out if x is not None]


def is_feasible(trial: TrialRecord, c: Constraints) -> bool:
    """Measured to the end, accuracy known, latency within budget, and no constraint failed.

    A budget that was not measured (peak memory when a sweep skips it) does not count
    against a trial; latency and accuracy must be measured.
    """
    if trial.status != COMPLETE or trial.top1 is None or trial.p95_ms is None:
        return False
    return all(x.ok is not False for x in checks(trial, c))


def score(trial: TrialRecord, c: Constraints, *, penalty: float = 0.5) -> float:
    """The searcher's objective (maximized); it steers TPE, :func:`best_feasible` picks the winner.

    Feasible: top-1. Infeasible: top-1 (0 when not measured) minus ``penalty`` x the worst
    relative overrun (``measured / limit - 1``; a failed precision or input-size
    requirement counts as 9). A failed trial scores -10.
    """
    if is_feasible(trial, c):
        return float(trial.top1)  # type: ignore[arg-type]
    if trial.status == ERROR:
        return -_HARD_PENALTY
    worst = max((x.overrun for x in checks(trial, c)), default=0.0)
    return float(trial.top1 or 0.0) - penalty * max(0.0, worst - 1.0)


def _dominates(a: TrialRecord, b: TrialRecord) -> bool:
    """a is at least as good on both axes and strictly better on one."""
    at, al, bt, bl = a.top1, a.p95_ms, b.top1, b.p95_ms
    return at >= bt and al <= bl and (at > bt or al < bl)  # type: ignore[operator]


def pareto_front(trials: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The non-dominated fully measured trials (higher top-1, lower p95), fastest first.

    Trials with the same top-1 and latency are both kept (neither dominates).
    """
    done = [t for t in trials if t.status == COMPLETE and t.top1 is not None and t.p95_ms is not None]
    front = [t for t in done if not any(_dominates(o, t) for o in done if o is not t)]
    return sorted(front, key=lambda t: (t.p95_ms, -t.top1))  # type: ignore[operator]


def best_feasible(trials: Sequence[TrialRecord], c: Constraints) -> TrialRecord | None:
    """The most accurate feasible trial (ties: lower p95, then smaller file, then key), or None."""
    ok = [t for t in trials if is_feasible(t, c)]
    if not ok:
        return None
    return min(ok, key=lambda t: (-t.top1, t.p95_ms, t.size_mb if t.size_mb is not None else math.inf, t.key))  # type: ignore[operator]
