"""Compression sweeps with Ray Tune: prune x quantization x input size under a latency budget.

``python -m tune.sweep`` is the ``ray job submit`` entrypoint (``visionfleet tune run``
runs the same on an embedded Ray); ``bench/tune_grid.py`` enumerates the same space
exhaustively. The light modules (space, feasibility, Pareto front) are re-exported
here; ``tune.trial``, ``tune.sweep`` and ``tune.report`` import Ray, torch and
matplotlib only inside the functions that need them.
"""

from tune.pareto import Constraints, TrialRecord, best_feasible, is_feasible, pareto_front, score
from tune.space import Point, Scheme, Space, SpaceConfig, parse_scheme

__all__ = [
    "Constraints",
    "TrialRecord",
    "best_feasible",
    "is_feasible",
    "pareto_front",
    "score",
    "Point",
    "Scheme",
    "Space",
    "SpaceConfig",
    "parse_scheme",
]
