"""The experiment report: one self-contained HTML page with embedded PNG plots.

The page recomputes every number from the arm summaries with the same functions the
ingress uses (``decide`` chained over the snapshots), so the report and the live
decision cannot disagree about the statistics.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visionfleet.experiments.decision import Action, ArmSummary, Decision, DecisionPolicy, decide
from visionfleet.experiments.stats import Metric, mean_interval, sequential_path

__all__ = ["write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.action { font-size: 1.4em; font-weight: bold; }
.promote { color: #1a7f37; } .rollback { color: #cf222e; } .continue { color: #555; }
.breach { color: #cf222e; font-weight: bold; } .note { color: #555; font-size: 0.9em; }
img { max-width: 100%; }
"""


def _summary(x: ArmSummary | Mapping[str, Any], where: str) -> ArmSummary:
    if isinstance(x, ArmSummary):
        return x
    if isinstance(x, Mapping):
        return ArmSummary.from_dict(x)
    raise ValueError(f"Got {type(x).__name__} for {where}; expected an ArmSummary or its dict")


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_report(path: str | Path, experiment: Mapping[str, Any], series: Sequence[Mapping[str, Any]]) -> Path:
    """Write the HTML report of an experiment and return its path.

    Args:
        path: the ``.html`` file to write (parent folders are created).
        experiment: ``name``, ``metric`` (``accuracy`` | ``confidence``), ``control`` and
            ``treatment`` (final :class:`ArmSummary` or its dict); optional ``models``
            (arm name -> model ref), ``expected_share`` (arm name -> share, for SRM),
            ``policy`` (:class:`DecisionPolicy` or its dict, with the same metric),
            ``decision`` (a :class:`Decision` actually taken, shown instead of
            the recomputed one) and ``notes`` (free text).
        series: cumulative snapshots in time order, each ``{"control": ..., "treatment":
            ..., "t": seconds since start (optional)}``; the x axis is requests unless
            every snapshot has ``t``.

    Raises:
        ValueError: a missing key, an unknown metric, or inconsistent arm names.
    """
    missing = [k for k in ("name", "metric", "control", "treatment") if k not in experiment]
    if missing:
        raise ValueError(f"Got experiment without {missing}; expected keys name, metric, control, treatment")
    metric = Metric(experiment["metric"])
    control = _summary(experiment["control"], "experiment['control']")
    treatment = _summary(experiment["treatment"], "experiment['treatment']")
    pol = experiment.get("policy")
    policy_doc = pol.to_dict() if isinstance(pol, DecisionPolicy) else dict(pol or {})
    if "metric" in policy_doc and Metric(policy_doc["metric"]) is not metric:
        raise ValueError(f"Got policy metric {policy_doc['metric']!r} and experiment metric {metric.value!r}; expected the same")
    policy = DecisionPolicy(**{**policy_doc, "metric": metric})
    share = experiment.get("expected_share")
    models = dict(experiment.get("models") or {})

    snaps = []
    for i, s in enumerate(series):
        c, t = _summary(s["control"], f"series[{i}]['control']"), _summary(s["treatment"], f"series[{i}]['treatment']")
        if (c.name, t.name) != (control.name, treatment.name):
            raise ValueError(f"Got arms {(c.name, t.name)} in series[{i}]; expected {(control.name, treatment.name)}")
        snaps.append((c, t, s.get("t")))
    if not snaps or snaps[-1][:2] != (control, treatment):
        snaps.append((control, treatment, None if not snaps else snaps[-1][2]))

    # The decision at every look, chained as the ingress chains them.
    decision: Decision | None = None
    first_action: dict[Action, int] = {}
    for i, (c, t, _) in enumerate(snaps):
        decision = decide(c, t, policy, expected_share=share, previous=decision)
        first_action.setdefault(decision.action, i)
    assert decision is not None
    taken = experiment.get("decision")
    if isinstance(taken, Decision):
        action, reason = taken.action.value, taken.reason
    elif isinstance(taken, Mapping):
        action, reason = str(taken["action"]), str(taken["reason"])
    else:
        action, reason = decision.action.value, decision.reason

    use_t = all(t is not None for _, _, t in snaps)
    x = np.array([t if use_t else c.requests + tr.requests for c, tr, t in snaps], dtype=float)
    xlabel = "seconds since start" if use_t else "requests (both arms)"
    plots = _plots(snaps, x, xlabel, metric, policy, first_action)

    tau, alpha = policy.tau, policy.alpha
    total_req = control.requests + treatment.requests
    rows = []
    for arm in (control, treatment):
        acc_ci = mean_interval(arm.accuracy_stats(), alpha=alpha, mixture_sd=tau)
        conf_ci = mean_interval(arm.confidence_stats(), alpha=alpha, mixture_sd=tau)
        det = arm.detection_stats()
        cells = [
            html.escape(arm.name),
            html.escape(str(models.get(arm.name, "–"))),
            f"{arm.requests}",
            f"{arm.requests / total_req:.1%}" if total_req else "–",
            f"{arm.errors} ({_fmt(arm.error_rate, '.2%')})",
            _fmt(arm.p95_latency_ms, ".1f"),
            f"{arm.labeled}",
            f"{_fmt(arm.accuracy)} [{_fmt(acc_ci[0])}, {_fmt(acc_ci[1])}]" if arm.labeled else "–",
            f"{_fmt(arm.conf_mean)} [{_fmt(conf_ci[0])}, {_fmt(conf_ci[1])}]" if arm.n else "–",
        ]
        if control.det_sum is not None or treatment.det_sum is not None:
            cells.append(_fmt(det.mean if det is not None else None, ".2f"))
        rows.append("<tr>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
    head = ["variant", "model", "requests", "share", "errors", "p95 ms", "labeled", "accuracy [CI]", "mean confidence [CI]"]
    if control.det_sum is not None or treatment.det_sum is not None:
        head.append("detections / image")

    test = decision.test
    what = "accuracy" if metric is Metric.ACCURACY else "mean confidence"
    srm = decision.srm
    if srm is None:
        srm_html = "<p>No expected split given: SRM not checked.</p>"
    else:
        srm_rows = "".join(
            f"<tr><td>{html.escape(a)}</td><td>{srm.observed[a]}</td><td>{srm.expected[a]:.1f}</td></tr>" for a in srm.observed
        )
        verdict = '<span class="breach">FLAGGED</span>' if srm.flagged else "not flagged"
        srm_html = (
            f"<table><tr><th>variant</th><th>observed</th><th>expected</th></tr>{srm_rows}</table>"
            f"<p>chi-square {srm.chi2:.2f}, p = {srm.p_value:.3g} (flag below {srm.threshold}): {verdict}.</p>"
        )
    guard_rows = "".join(
        f"<tr><td>{html.escape(g.name)}</td><td class=\"{'breach' if g.breached else ''}\">{g.status.value}</td>"
        f"<td>{_fmt(g.control, '.4g')}</td><td>{_fmt(g.treatment, '.4g')}</td><td>{_fmt(g.limit, '.4g')}</td>"
        f"<td style=\"text-align:left\">{html.escape(g.reason)}</td></tr>"
        for g in decision.guardrails
    )
    notes = f"<p>{html.escape(str(experiment['notes']))}</p>" if experiment.get("notes") else ""
    name = html.escape(str(experiment["name"]))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Experiment {name}</title><style>{_CSS}</style></head>
<body>
<h1>Experiment {name}</h1>
{notes}
<p class="action {html.escape(action)}">Decision: {html.escape(action)}</p>
<p>{html.escape(reason)}</p>
<h2>Variants</h2>
<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(rows)}</table>
<p class="note">Intervals are always-valid {1 - alpha:.0%} confidence sequences (normal mixture, tau = {tau:g}):
they hold at every look at once, so reading this page early does not inflate errors.</p>
<h2>Primary metric: {what}</h2>
<table>
<tr><th>difference (treatment − control)</th><td>{_fmt(test.estimate, '+.4f')}</td></tr>
<tr><th>always-valid {1 - alpha:.0%} interval</th><td>[{_fmt(test.ci_low, '+.4f')}, {_fmt(test.ci_high, '+.4f')}]</td></tr>
<tr><th>always-valid p-value</th><td>{test.p_value:.4g}</td></tr>
<tr><th>alpha / minimum samples per arm</th><td>{alpha:g} / {policy.min_samples}</td></tr>
</table>
<img alt="{what} per variant over time" src="data:image/png;base64,{plots['metric']}">
<img alt="difference over time with its always-valid interval" src="data:image/png;base64,{plots['difference']}">
<img alt="always-valid p-value over time" src="data:image/png;base64,{plots['p_value']}">
<h2>Sample ratio</h2>
{srm_html}
<h2>Guardrails</h2>
<table><tr><th>guardrail</th><th>status</th><th>control</th><th>treatment</th><th>limit</th><th>why</th></tr>{guard_rows}</table>
</body></html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _plots(
    snaps: list[tuple[ArmSummary, ArmSummary, float | None]],
    x: np.ndarray,
    xlabel: str,
    metric: Metric,
    policy: DecisionPolicy,
    first_action: Mapping[Action, int],
) -> dict[str, str]:
    # Figure objects, not pyplot: no global state, no GUI backend, safe in a server thread.
    from matplotlib.figure import Figure

    tau, alpha = policy.tau, policy.alpha
    what = "accuracy" if metric is Metric.ACCURACY else "mean confidence"
    stats = [(c.metric_stats(metric), t.metric_stats(metric)) for c, t, _ in snaps]
    path = sequential_path(
        [c.n for c, _ in stats], [c.total for c, _ in stats], [c.total_sq for c, _ in stats],
        [t.n for _, t in stats], [t.total for _, t in stats], [t.total_sq for _, t in stats],
        alpha=alpha, mixture_sd=tau,
    )
    out = {}

    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    for j, (arm, color) in enumerate(((snaps[-1][0].name, "tab:blue"), (snaps[-1][1].name, "tab:orange"))):
        m = np.array([s[j].mean for s in stats])
        band = np.array([mean_interval(s[j], alpha=alpha, mixture_sd=tau) for s in stats])
        ax.plot(x, m, color=color, label=arm)
        ax.fill_between(x, band[:, 0], band[:, 1], color=color, alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=what, title=f"{what} per variant (always-valid {1 - alpha:.0%} bands)")
    ax.legend(loc="best")
    out["metric"] = _png(fig)

    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    ax.plot(x, path.estimate, color="black", label="treatment − control")
    ax.fill_between(x, path.ci_low, path.ci_high, color="tab:purple", alpha=0.25, label="always-valid interval")
    ax.axhline(0.0, color="grey", lw=0.8)
    for action, color in ((Action.PROMOTE, "tab:green"), (Action.ROLLBACK, "tab:red")):
        if action in first_action:
            ax.axvline(x[first_action[action]], color=color, ls="--", label=f"first {action.value}")
    ax.set(xlabel=xlabel, ylabel=f"Δ {what}", title="difference over time")
    ax.legend(loc="best")
    out["difference"] = _png(fig)

    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    ax.semilogy(x, np.maximum(path.p_value, 1e-12), color="black", label="always-valid p-value")
    ax.axhline(alpha, color="tab:red", ls="--", label=f"alpha = {alpha:g}")
    ax.set(xlabel=xlabel, ylabel="p-value", title="always-valid p-value (running minimum)")
    ax.legend(loc="best")
    out["p_value"] = _png(fig)
    return out
