"""`visionfleet edge`: bundles for device targets, the TUF repository, publishing and rollouts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, settings
from visionfleet.targets import Target

app = typer.Typer(help="Edge: export bundles for device targets, sign and publish them over the air (TUF).",
                  no_args_is_help=True)

TargetOpt = Annotated[Target, typer.Option("--target", help="device target profile")]


def _registry():
    from visionfleet.state import open_registry

    return open_registry(settings())


def _repo(create: bool = True):
    from edge_export.tuf_repo import TufRepository

    repo = TufRepository.from_settings(settings().ensure())  # <home>/tuf, or the shared store area tuf
    if create and repo.init():
        root = repo.metadata_dir / "root.json" if repo.metadata_dir else "`visionfleet edge keys --export-root FILE`"
        err.print(f"[green]✓[/] created the TUF repository and its keys in {repo.location} "
                  f"(keys: {repo.keys_dir}; give devices {root} as their --root)")
    return repo


def _export(ref: str, target: Target, out_dir: Optional[Path], data: Optional[str], golden: int, calibration: int) -> Path:
    from edge_export.bundle import export_bundle

    s = settings().ensure()
    with err.status(f"exporting {ref} for {target.value}") as status:
        path = export_bundle(
            _registry(), ref, target, out_dir=out_dir or s.home / "edge" / "bundles", dataset=data,
            datasets_dir=s.datasets_dir, golden=golden, calibration=calibration,
            on_event=lambda stage, info: status.update(f"{ref} → {target.value}: {stage}: {info}"),
        )
    return path


def _summary(path: Path) -> dict:
    from edge_agent.bundle import read_manifest

    m = read_manifest(path)
    g = m.checks.get("export_golden") or {}
    return {
        "bundle": str(path), "bundle_id": m.bundle_id, "model": m.model, "version": m.version, "target": m.target,
        "format": m.format, "precision": m.precision, "model_file": m.model_file,
        "model_mb": m.checks.get("model_mb"), "max_model_mb": m.checks.get("max_model_mb"),
        "golden": {"samples": m.golden.samples, "reproduced": g.get("ok"), "max_abs_diff": g.get("max_abs_diff"),
                   "device_atol": m.golden.atol},
        "reference_top1_agreement": m.checks.get("reference_top1_agreement"),
        "files": sorted(m.files),
    }


@app.command()
@cli_errors
def export(
    ref: Annotated[str, typer.Argument(help="NAME[:VERSION|@ALIAS]")],
    target: TargetOpt,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="parent folder (default <state>/edge/bundles)")] = None,
    data: Annotated[Optional[str], typer.Option(help="dataset for golden samples and INT8 calibration (default: the card's)")] = None,
    golden: Annotated[int, typer.Option(help="golden samples")] = 16,
    calibration: Annotated[int, typer.Option(help="INT8 calibration images")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Build a bundle for a device target; it is loaded back and must reproduce its golden outputs."""
    path = _export(ref, target, out_dir, data, golden, calibration)
    doc = _summary(path)
    if as_json:
        print_json(doc)
        return
    out.print(f"[green]✓[/] {doc['bundle_id']}: {doc['format']} {doc['precision']}, {doc['model_mb']:.2f} MB "
              f"(budget {doc['max_model_mb']} MB), golden outputs reproduced on {doc['golden']['samples']} samples "
              f"(max |diff| {doc['golden']['max_abs_diff']:.1e}), top-1 agreement with FP32 "
              f"{doc['reference_top1_agreement'] if doc['reference_top1_agreement'] is not None else '-'}")
    out.print(str(path))


@app.command()
@cli_errors
def publish(
    ref: Annotated[str, typer.Argument(help="NAME[:VERSION|@ALIAS]")],
    target: TargetOpt,
    rollout: Annotated[int, typer.Option(help="percentage of devices (by stable cohort) that take it, 0..100")] = 100,
    bundle: Annotated[Optional[Path], typer.Option(help="an already exported bundle folder (default: export now)")] = None,
    data: Annotated[Optional[str], typer.Option(help="dataset for golden samples and calibration when exporting")] = None,
    allow_downgrade: Annotated[bool, typer.Option(help="allow an older version than the channel serves")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the channel as JSON")] = False,
) -> None:
    """Export (or take) a verified bundle and publish it as a signed TUF target with a rollout percentage."""
    from edge_agent.bundle import health_check, read_manifest
    from edge_export.tuf_repo import publish_bundle
    from visionfleet.fleet import FleetDB

    if not 0 <= rollout <= 100:
        raise ValueError(f"Got {rollout} for --rollout; expected 0..100")
    if bundle is None:
        bundle = _export(ref, target, None, data, 16, 200)
    else:
        m = read_manifest(bundle)
        resolved = _registry().resolve(ref)
        if (m.model, m.version, m.target) != (resolved.name, resolved.version, target.value):
            raise ValueError(f"Got bundle {m.bundle_id} for {ref} --target {target.value}; expected "
                             f"{resolved.name}:{resolved.version} for {target.value}")
        report = health_check(bundle, threads=1, atol=1e-3, min_agreement=1.0)
        if not report.ok:
            raise ValueError(f"bundle {bundle} failed its check: {report.error}")
    repo = _repo()
    with err.status("signing and publishing"):
        doc = publish_bundle(repo, bundle, rollout=rollout, allow_downgrade=allow_downgrade)
    FleetDB.from_settings(settings()).record_rollout(doc["model"], doc["target"], doc["bundle_id"], doc["version"], doc["rollout"])
    if as_json:
        print_json(doc)
        return
    out.print(f"[green]✓[/] published {doc['bundle_id']} on {doc['path']} at {doc['rollout']}% "
              f"(sha256 {doc['sha256'][:12]}…, {doc['length']} bytes)")


@app.command()
@cli_errors
def rollout(
    model: Annotated[str, typer.Argument(help="model name")],
    target: TargetOpt,
    set_: Annotated[Optional[int], typer.Option("--set", help="new rollout percentage 0..100")] = None,
    halt: Annotated[Optional[bool], typer.Option("--halt/--resume", help="halt or resume the rollout")] = None,
    reason: Annotated[Optional[str], typer.Option(help="why (recorded with a halt)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the channel as JSON")] = False,
) -> None:
    """Widen, narrow, halt or resume a published rollout (re-signed; devices see it on their next check)."""
    from edge_export.tuf_repo import set_rollout
    from visionfleet.fleet import FleetDB

    doc = set_rollout(_repo(create=False), model, target.value, rollout=set_, halted=halt,
                      reason=reason or ("halted by an operator" if halt else None))
    FleetDB.from_settings(settings()).set_rollout_status(model, target.value, doc["bundle_id"],
                                                "halted" if doc.get("halted") else "rolling", doc.get("halt_reason"),
                                                doc.get("rollout"))
    if as_json:
        print_json(doc)
        return
    state = "halted" if doc.get("halted") else "rolling"
    out.print(f"{doc['path']}: {doc['bundle_id']} at {doc['rollout']}% ({state})")


@app.command()
@cli_errors
def keys(
    export_root: Annotated[Optional[Path], typer.Option(help="write the trusted root.json for devices here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """Create the TUF repository and keys (once), show roles, versions and expiry dates."""
    repo = _repo()
    if export_root is not None:
        export_root.parent.mkdir(parents=True, exist_ok=True)
        export_root.write_bytes(repo.root_bytes())
        err.print(f"[green]✓[/] wrote the trusted root to {export_root}")
    doc = repo.describe()
    if as_json:
        print_json(doc)
        return
    from rich.table import Table

    t = Table("role", "version", "expires", "key ids")
    for role, r in doc["roles"].items():
        t.add_row(role, str(r["version"]), r["expires"], ", ".join(k[:12] for k in r["keyids"]))
    out.print(t)
    out.print(f"keys: {repo.keys_dir} (mode 0600) · metadata: {repo.metadata_dir or repo.location + '/repo/metadata'}")


@app.command()
@cli_errors
def refresh(
    min_remaining: Annotated[float, typer.Option(help="re-sign roles with less than this share of their lifetime left")] = 0.5,
) -> None:
    """Re-sign timestamp (and snapshot/targets) before they expire; run it from cron on a server without traffic."""
    done = _repo(create=False).refresh(min_remaining)
    out.print(f"re-signed: {', '.join(done)}" if done else "nothing to re-sign")


@app.command("channels")
@cli_errors
def channels_(as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """Published channels: which bundle each model/target serves, at which rollout."""
    from edge_export.tuf_repo import channels

    repo = _repo(create=False)
    repo.require()
    rows = channels(repo)
    if as_json:
        print_json({"channels": rows})
        return
    from rich.table import Table

    t = Table("channel", "bundle", "version", "rollout", "state", "published")
    for c in rows:
        t.add_row(c["path"], c.get("bundle_id", "-"), str(c.get("version")), f"{c.get('rollout')}%",
                  "halted" if c.get("halted") else "rolling", str(c.get("published_at", ""))[:19])
    out.print(t)
