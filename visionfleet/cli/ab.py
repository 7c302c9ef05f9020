"""`visionfleet ab`: start, watch, stop and report A/B experiments.

start/status/stop/weights talk to the running server's admin routes (bearer token from
``$VISIONFLEET_ADMIN_TOKEN`` or ``<state>/admin_token``); ``report`` reads the
experiment's files in the state dir and needs no server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from visionfleet.cli._common import cli_errors, err, http_json, out, print_json, settings

app = typer.Typer(help="A/B experiments: split traffic, watch the statistics, promote or roll back.", no_args_is_help=True)


def _default_url() -> str:
    from visionfleet.settings import Settings

    head = settings().ray_dir / "head.json"
    if head.is_file():
        doc = json.loads(head.read_text())
        if doc.get("http_port"):
            return f"http://{doc.get('http_host') or '127.0.0.1'}:{doc['http_port']}"
    return "http://127.0.0.1:8000"


def _call(method: str, url: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
    from visionfleet.auth import admin_token

    token = admin_token(settings())
    if not token:
        raise ValueError("no admin token: set $VISIONFLEET_ADMIN_TOKEN or run `visionfleet serve up` (it creates <state>/admin_token)")
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", **({"Content-Type": "application/json"} if data else {})}
    return http_json(method, url.rstrip("/") + path, data=data, headers=headers, timeout=timeout)


def _split(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"Got {text!r} for --split; expected CONTROL/TREATMENT like 90/10") from None
    if a < 0 or b < 0 or a + b <= 0:
        raise ValueError(f"Got {text!r} for --split; expected non-negative weights, not both 0")
    return a, b


@app.command()
@cli_errors
def start(
    name: Annotated[str, typer.Option(help="experiment name")],
    control: Annotated[str, typer.Option(help="NAME:VERSION serving the control arm")],
    treatment: Annotated[str, typer.Option(help="NAME:VERSION serving the treatment arm")],
    split: Annotated[str, typer.Option(help="traffic split CONTROL/TREATMENT")] = "50/50",
    sticky: Annotated[bool, typer.Option(help="same X-Client-Id, same variant")] = True,
    shadow: Annotated[Optional[str], typer.Option(help="NAME:VERSION mirrored in the background")] = None,
    shadow_share: Annotated[float, typer.Option(help="share of requests mirrored to --shadow")] = 1.0,
    metric: Annotated[str, typer.Option(help="accuracy|confidence")] = "accuracy",
    auto_decide: Annotated[bool, typer.Option(help="promote or roll back automatically")] = False,
    bandit: Annotated[bool, typer.Option(help="Thompson-sampling weights instead of a fixed split")] = False,
    alpha: Annotated[float, typer.Option(help="false-positive rate of the sequential test")] = 0.05,
    min_samples: Annotated[int, typer.Option(help="samples per arm before any decision")] = 200,
    url: Annotated[Optional[str], typer.Option(help="server URL (default: the local head's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the started experiment as JSON")] = False,
) -> None:
    """Start an experiment on the running server (no restart, no dropped request)."""
    from visionfleet.spec import parse_ref

    c, t = parse_ref(control), parse_ref(treatment)
    if c.name != t.name:
        raise ValueError(f"Got {control} and {treatment}; both arms must be versions of the same model")
    wc, wt = _split(split)
    spec: dict[str, Any] = {
        "name": name,
        "model": c.name,
        "arms": [{"name": "control", "model": control, "weight": wc}, {"name": "treatment", "model": treatment, "weight": wt}],
        "sticky": sticky,
        "metric": metric,
        "auto_decide": auto_decide,
        "bandit": bandit,
        "alpha": alpha,
        "min_samples": min_samples,
    }
    if shadow:
        spec["shadow"] = {"model": shadow, "share": shadow_share}
    doc = _call("POST", url or _default_url(), "/v1/experiments", spec)
    if as_json:
        print_json(doc)
        return
    arms = ", ".join(f"{a['name']}={a['model']} ({a['weight']:.0%})" for a in doc["arms"])
    out.print(f"experiment {doc['name']} running on {doc['model']}: {arms}")


def _table(doc: dict[str, Any]) -> None:
    from rich.table import Table

    exp = doc["experiment"]
    t = Table(title=f"{exp['name']} — {exp['status']} — metric {exp['metric']}")
    for col in ("variant", "model", "weight", "requests", "errors", "labeled", "accuracy", "confidence", "p95 ms"):
        t.add_column(col, justify="left" if col in ("variant", "model") else "right")
    arms = doc.get("arms") or {}
    for a in exp["arms"]:
        key = a["name"] if a["name"] in arms else ("control" if a is exp["arms"][0] else "treatment")
        s = arms.get(key) or {}
        n = s.get("n", 0)
        acc = s["correct"] / s["labeled"] if s.get("labeled") else None
        conf = s["conf_sum"] / n if n else None
        t.add_row(
            a["name"], a["model"], f"{a['weight']:.0%}", str(n + s.get("errors", 0)), str(s.get("errors", 0)),
            str(s.get("labeled", 0)), "-" if acc is None else f"{acc:.4f}", "-" if conf is None else f"{conf:.4f}",
            "-" if s.get("p95_latency_ms") is None else f"{s['p95_latency_ms']:.1f}",
        )
    out.print(t)
    now = doc.get("now") or exp.get("decision")
    if now:
        out.print(f"[bold]{now.get('action')}[/]: {now.get('reason')}")
    if doc.get("shadow"):
        sh = doc["shadow"]
        out.print(f"shadow: {sh.get('n', 0)} answers, agreement {sh.get('agreement', float('nan')):.3f}, "
                  f"mean confidence {sh.get('conf_mean', float('nan')):.3f}, mean latency {sh.get('latency_mean_ms', float('nan')):.1f} ms")


@app.command()
@cli_errors
def status(
    name: Annotated[Optional[str], typer.Argument(help="experiment (default: every running one)")] = None,
    url: Annotated[Optional[str], typer.Option(help="server URL")] = None,
    watch: Annotated[float, typer.Option(help="refresh every N seconds (0: once)")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """Live per-variant table: traffic, errors, accuracy, confidence, latency, and the decision now."""
    base = url or _default_url()
    while True:
        names = [name] if name else [e["name"] for e in _call("GET", base, "/v1/experiments")["experiments"] if e["status"] == "running"]
        docs = [_call("GET", base, f"/v1/experiments/{n}") for n in names]
        if as_json:
            print_json({"experiments": docs})
        else:
            if not docs:
                out.print("no running experiments")
            for d in docs:
                _table(d)
        if watch <= 0:
            return
        time.sleep(watch)


@app.command()
@cli_errors
def stop(
    name: Annotated[str, typer.Argument(help="experiment name")],
    promote: Annotated[bool, typer.Option("--promote", help="make the treatment production")] = False,
    rollback: Annotated[bool, typer.Option("--rollback", help="keep (or put back) the control as production")] = False,
    reason: Annotated[str, typer.Option(help="why, for the record")] = "stopped by an operator",
    url: Annotated[Optional[str], typer.Option(help="server URL")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """Stop an experiment, optionally promoting the treatment or rolling back to the control."""
    if promote and rollback:
        raise ValueError("Got both --promote and --rollback; expected at most one")
    action = "promote" if promote else "rollback" if rollback else "none"
    doc = _call("POST", url or _default_url(), f"/v1/experiments/{name}/stop", {"action": action, "reason": reason})
    if as_json:
        print_json(doc)
    else:
        out.print(f"experiment {name}: {doc['status']}")


@app.command()
@cli_errors
def weights(
    name: Annotated[str, typer.Argument(help="experiment name")],
    split: Annotated[str, typer.Option(help="new split CONTROL/TREATMENT")],
    url: Annotated[Optional[str], typer.Option(help="server URL")] = None,
) -> None:
    """Re-weight a running experiment (only clients of the shrinking arm move)."""
    c, t = _split(split)
    doc = _call("POST", url or _default_url(), f"/v1/experiments/{name}/weights", {"weights": {"control": c, "treatment": t}})
    out.print(f"experiment {name}: " + ", ".join(f"{a['name']} {a['weight']:.0%}" for a in doc["arms"]))


@app.command()
@cli_errors
def report(
    name: Annotated[str, typer.Argument(help="experiment name")],
    out_path: Annotated[Optional[Path], typer.Option("--out", help="HTML file (default: <state>/experiments/NAME/report.html)")] = None,
) -> None:
    """Write the HTML report (per-variant table with intervals, metric over time, decision)."""
    from serve_apps.config import ExperimentConfig
    from visionfleet.experiments import ArmSummary, DecisionPolicy, write_report

    from visionfleet.db.experiments import open_experiments

    s = settings()
    folder = s.home / "experiments" / name
    store = open_experiments(s)
    got = store.get(name)
    if got is None:
        raise FileNotFoundError(f"no experiment named {name!r} in the database ($VISIONFLEET_DB)")
    cfg = ExperimentConfig.model_validate(got.doc)
    series = store.timeline(name)
    if not series:
        raise ValueError(f"experiment {name!r} has no recorded snapshots yet")
    last = series[-1]
    g = cfg.guardrails
    policy = DecisionPolicy(metric=cfg.metric, alpha=cfg.alpha, min_samples=cfg.min_samples,
                            latency_max_increase=g.latency_max_increase, latency_min_increase_ms=g.latency_min_increase_ms,
                            latency_min_samples=g.latency_min_samples, error_max_increase=g.error_max_increase,
                            error_min_samples=g.error_min_samples)
    experiment: dict[str, Any] = {
        "name": cfg.name,
        "metric": cfg.metric,
        "control": ArmSummary.from_dict(last["control"]),
        "treatment": ArmSummary.from_dict(last["treatment"]),
        "models": {a.name: a.model for a in cfg.arms},
        "expected_share": cfg.weights(),
        "policy": policy,
        "notes": f"status: {cfg.status}" + (f"; decision: {cfg.decision.get('action')} — {cfg.decision.get('reason')}" if cfg.decision else ""),
    }
    path = write_report(out_path or folder / "report.html", experiment, [{k: r[k] for k in ("control", "treatment", "t")} for r in series])
    out.print(f"report written to {path}")
    err.print(f"{len(series)} snapshots; status {cfg.status}")
