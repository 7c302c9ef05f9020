"""`visionfleet models`: list, show and promote registered versions."""

from __future__ import annotations

from typing import Annotated

import typer

from visionfleet.cli._common import cli_errors, out, print_json, settings

app = typer.Typer(help="The model registry: versions, cards, aliases.", no_args_is_help=True)


def _registry():
    from visionfleet.registry import Registry

    return Registry(settings().ensure().registry_dir)


@app.command("list")
@cli_errors
def list_(as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """List models with their versions, aliases and headline metrics."""
    from rich.table import Table

    reg = _registry()
    rows = []
    for name in reg.list_models():
        aliases = reg.aliases(name)
        for v in reg.versions(name):
            card = reg.card(name, v)
            rows.append(
                {
                    "model": name,
                    "version": v,
                    "aliases": sorted(a for a, av in aliases.items() if av == v),
                    "task": card.task.value,
                    "precision": card.precision,
                    "input_size": list(card.input_size),
                    "holdout_top1": card.metrics.get("holdout_top1"),
                    "created_at": card.created_at,
                }
            )
    if as_json:
        print_json({"models": rows})
        return
    if not rows:
        out.print("no models registered yet; try `visionfleet train` or `visionfleet demo`")
        return
    table = Table("model", "version", "aliases", "task", "precision", "input", "holdout top-1", "created")
    for r in rows:
        top1 = r["holdout_top1"]
        table.add_row(
            r["model"],
            str(r["version"]),
            ",".join(r["aliases"]),
            r["task"],
            r["precision"],
            "x".join(map(str, r["input_size"])),
            f"{top1:.4f}" if isinstance(top1, (int, float)) else "-",
            r["created_at"][:19],
        )
    out.print(table)


@app.command()
@cli_errors
def show(
    ref: Annotated[str, typer.Argument(help="NAME[:VERSION|@ALIAS]")],
    as_json: Annotated[bool, typer.Option("--json", help="print the card as JSON")] = False,
) -> None:
    """Show a version's card."""
    card = _registry().card_for(ref)
    doc = card.model_dump(mode="json")
    if as_json:
        print_json(doc)
        return
    out.print(f"[bold]{card.ref}[/]  {card.task.value}, {len(card.labels)} classes, input {card.input_size[0]}x{card.input_size[1]} ({card.resize.value}), {card.precision}")
    out.print(f"labels: {', '.join(card.labels[:20])}{' …' if len(card.labels) > 20 else ''}")
    out.print(f"files: " + ", ".join(f"{f.name} ({f.bytes / 1e6:.2f} MB)" for f in card.files))
    out.print("metrics: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in card.metrics.items() if not isinstance(v, dict)))
    out.print(f"lineage: parent={card.lineage.parent} dataset={card.lineage.dataset} run={card.lineage.run}")
    for step in card.lineage.steps:
        out.print(f"  - {step}")


@app.command()
@cli_errors
def promote(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION to point the alias at")],
    alias: Annotated[str, typer.Option(help="alias to move")] = "production",
) -> None:
    """Point an alias (default: production) at a version, atomically."""
    from visionfleet.spec import parse_ref

    r = parse_ref(ref)
    if r.version is None:
        raise ValueError(f"Got {ref!r}; expected NAME:VERSION")
    previous = _registry().set_alias(r.name, alias, r.version, reason="cli promote")
    out.print(f"{r.name}@{alias}: {previous} -> {r.version}")
