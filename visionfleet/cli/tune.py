"""`visionfleet tune`: compression sweeps under a latency budget (run, report, list).

`tune run` is `python -m tune.sweep` on an embedded Ray (or the cluster in
``$RAY_ADDRESS`` / ``--address``); the sweep's code lives in ``tune/``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any, Callable, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, progress, settings

app = typer.Typer(help="Search pruning x quantization x input size under a latency budget (Ray Tune + Optuna).",
                  no_args_is_help=True)


class _WithSweepFlags:
    """``fn`` as a typer callback with one option per sweep flag (``tune.sweep.SWEEP_FLAGS``) before its own.

    Type, default and help come from the sweep's pydantic fields, the same source as
    ``python -m tune.sweep``'s parser, so the two cannot drift apart (tests/unit/test_cli.py).
    ``fn`` takes the flags as ``**flags``. Typer reads ``__signature__`` when it builds the
    command, so ``tune`` is imported then, not when this module is.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        functools.update_wrapper(self, fn)
        self.__annotations__ = {}  # typer takes every type from __signature__ (Annotated)

    def __call__(self, **kwargs: Any) -> Any:
        return self.__wrapped__(**kwargs)

    @functools.cached_property
    def __signature__(self) -> inspect.Signature:
        from tune.sweep import SWEEP_FLAGS

        flags = []
        for f in SWEEP_FLAGS:
            decls = (f"{f.option}/--no-{f.option[2:]}",) if f.type is bool else (f.option, *f.aliases)
            kind = f.type if f.required or f.type is bool else Optional[f.type]
            option = typer.Option(*decls, help=f.help, show_default=f.type is bool)
            flags.append(inspect.Parameter(f.key, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option],
                                           default=inspect.Parameter.empty if f.required else f.default))
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(self.__wrapped__, eval_str=True).parameters.values()
               if p.kind is not p.VAR_KEYWORD]
        return inspect.Signature([*flags, *own])


@app.command("run")
@_WithSweepFlags
@cli_errors
def run(
    *,
    address: Annotated[Optional[str], typer.Option(help="Ray address (default: $RAY_ADDRESS, else embedded)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the sweep summary as JSON")] = False,
    **flags: Any,
) -> None:
    """Run a sweep: every trial builds a variant, measures p95 latency and holdout top-1; over budget never wins.

    Writes the Pareto front (table, PNG, JSON) under <state>/tune/SWEEP_ID/, registers
    the best feasible config as a new @candidate version and writes
    <state>/tune/best/MODEL--TARGET.json for the retraining pipeline. Exits 3 when no
    config met the budget. Every option but --address and --json is also an option of
    `python -m tune.sweep` (the `ray job submit` entrypoint).
    """
    from tune.sweep import NO_FEASIBLE_EXIT, config_from_flags, connect_ray, prepare, run_sweep

    s = settings().ensure()
    cfg = config_from_flags(flags)
    plan = prepare(cfg, s)  # unknown model/version, bad space: refused before Ray starts
    err.print(f"sweep [bold]{plan.sweep_id}[/]: {plan.parent_ref}, {len(plan.space)} configs, "
              f"{min(cfg.trials, len(plan.space))} trials, target {cfg.target}")
    with err.status("starting Ray"):
        connect_ray(s, address, join_head=False)
    with progress() as p:
        task = p.add_task("trials", total=min(cfg.trials, len(plan.space)), info="")

        def on_event(stage: str, message: str) -> None:
            if stage == "trial-done":
                p.advance(task)
                p.console.print(f"  {message}")
            elif stage == "trial":
                p.update(task, info=message[:70])
            else:
                p.console.print(f"[bold]{stage}[/] {message}")

        result = run_sweep(plan, on_event=on_event)
    if as_json:
        print_json(result.to_dict())
    else:
        _print_summary(result.summary, result.files, table=_table(result.trials, result.constraints, result.best))
    if not result.feasible:
        err.print(f"[bold red]no feasible config:[/] {result.summary['no_feasible_reason']}")
        raise typer.Exit(NO_FEASIBLE_EXIT)


@app.command("report")
@cli_errors
def report(
    sweep_id: Annotated[str, typer.Argument(help="a sweep id (see `visionfleet tune list`)")],
    all_trials: Annotated[bool, typer.Option("--all", help="every trial, not only the Pareto front")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="summary, front and trials as JSON")] = False,
) -> None:
    """Show a sweep: budget, trial counts, the Pareto front (accuracy vs p95) and the best feasible config."""
    from tune.report import load_report

    r = load_report(settings().home, sweep_id)
    if as_json:
        print_json(r.to_dict())
        return
    best = r.best
    rows = r.trials if all_trials else r.front
    _print_summary(r.summary, r.summary.get("files", {}), table=_table(rows, r.constraints, best, sort=True))


@app.command("list")
@cli_errors
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="print the sweeps as JSON")] = False,
) -> None:
    """List the sweeps of this state dir, oldest first, with their best feasible config."""
    from rich.table import Table

    from tune.report import list_sweeps

    sweeps = list_sweeps(settings().home)
    if as_json:
        print_json(sweeps)
        return
    if not sweeps:
        err.print("no sweeps yet: run `visionfleet tune run --model NAME:VERSION ...`")
        return
    t = Table("sweep", "model", "target", "budget ms", "trials", "best", "top-1", "p95 ms", "registered")
    for s in sweeps:
        t.add_row(
            s["sweep"], s["model"], s["target"], _num(s["budget_ms"], ".3g"), str(s["trials"]), s["best"] or "none feasible",
            _num(None if s["top1"] is None else 100 * s["top1"], ".2f"), _num(s["p95_ms"], ".3f"), s.get("registered") or "-",
        )
    out.print(t)


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(rows: list, constraints: Any, best: Any, sort: bool = False):
    from rich.table import Table

    from tune.pareto import checks, is_feasible, pareto_front

    if not sort:
        rows = pareto_front(rows)
    else:
        rows = sorted(rows, key=lambda t: (t.p95_ms is None, t.p95_ms or 0.0))
    t = Table("", "prune", "quantize", "px", "threads", "top-1 %", "p95 ms", "p50 ms", "MB", "feasible")
    for r in rows:
        c = r.config
        if r.status != "complete":
            verdict = r.status
        else:
            failed = [x.name for x in checks(r, constraints) if x.ok is False]
            verdict = "yes" if is_feasible(r, constraints) else "no: " + ", ".join(failed)
        t.add_row(
            "best" if best is not None and r.key == best.key else "", f"{c['prune']:g}", c["quantize"],
            str(c["input_size"]), str(c["threads"]), _num(None if r.top1 is None else 100 * r.top1, ".2f"),
            _num(r.p95_ms, ".3f"), _num(r.p50_ms, ".3f"), _num(r.size_mb, ".2f"), verdict,
        )
    return t


def _print_summary(s: dict, files: dict, *, table: Any) -> None:
    c = s.get("constraints", {})
    b = s.get("baseline", {})
    out.print(f"sweep [bold]{s.get('sweep')}[/]: {s.get('model')} on {s.get('target')}, "
              f"budget p95 <= {c.get('latency_ms', float('nan')):.3g} ms ({s.get('budget_source')})")
    if b:
        out.print(f"parent (FP32, {b.get('input_size')} px): top-1 {100 * b.get('top1', 0):.2f}%, "
                  f"p95 {b.get('p95_ms', float('nan')):.3f} ms")
    out.print(f"{s.get('trials')} trials ({s.get('unique_configs')} distinct of {s.get('space_points')} configs): "
              f"{s.get('complete')} measured, {s.get('stopped_early')} stopped early, {s.get('errors')} failed, "
              f"{s.get('feasible')} feasible; {s.get('wall_s', 0):.0f} s")
    out.print(table)
    best = s.get("best")
    if best:
        out.print(f"best feasible: [bold]{best['key']}[/]: top-1 {100 * best['top1']:.2f}%, p95 {best['p95_ms']:.3f} ms, "
                  f"{best['size_mb']:.2f} MB")
        if s.get("registered"):
            out.print(f"registered as {s['registered']} (@candidate)")
        if s.get("best_file"):
            out.print(f"best config for retraining: {s['best_file']}")
    else:
        out.print(f"no feasible config: {s.get('no_feasible_reason')}")
    for name in ("front_png", "front_md", "front_json"):
        if name in files:
            out.print(f"{name.replace('_', ' ')}: {files[name]}")
