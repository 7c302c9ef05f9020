"""Read a finished sweep back: its budget, the Pareto front, the best feasible config.

Usage: python docs/examples/tune_front.py SWEEP_ID   (with VISIONFLEET_HOME as for the sweep)

Every trial's measurements are kept, so the front can be judged again under another
budget without running anything: here, what would have won with half the budget.
"""

import sys
from dataclasses import replace

from tune import best_feasible, is_feasible, pareto_front
from tune.report import load_report
from visionfleet.settings import Settings

report = load_report(Settings.from_env().home, sys.argv[1])
budget = report.constraints
s = report.summary
print(f"{s['model']} on {s['target']}: p95 budget {budget.latency_ms:.3f} ms ({s['budget_source']})")
print(f"{s['trials']} trials of {s['space_points']} configs, {s['feasible']} feasible, {s['wall_s']:.0f} s")

print("Pareto front (accuracy vs p95 latency):")
for t in pareto_front(report.trials):
    verdict = "feasible" if is_feasible(t, budget) else "over budget"
    print(f"  {t.key:55s} top-1 {100 * t.top1:6.2f}%  p95 {t.p95_ms:.3f} ms  {t.size_mb:.2f} MB  {verdict}")

best = report.best
print(f"best feasible: {best.key}" if best else "best feasible: none")
if best:
    print(f"  registered as {s.get('registered')}; config for retraining: {s['best']['config']}")

half = replace(budget, latency_ms=budget.latency_ms / 2)
other = best_feasible(report.trials, half)
print(f"with half the budget ({half.latency_ms:.3f} ms): {other.key if other else 'nothing measured fits'}")
