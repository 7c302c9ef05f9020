"""`visionfleet fleet`: the devices (version, health, backlog), rollouts, and a fleet simulation."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, settings
from visionfleet.targets import Target

app = typer.Typer(help="The device fleet: status, rollouts, simulation.", no_args_is_help=True)


@app.command()
@cli_errors
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
    stale_after: Annotated[float, typer.Option(help="seconds without a sync before a device counts as offline")] = 300.0,
) -> None:
    """Devices with their model version, health, backlog and last sync; rollouts and their failures."""
    from visionfleet.fleet import FleetDB

    doc = FleetDB.from_settings(settings().ensure()).status(stale_after_s=stale_after)
    if as_json:
        print_json(doc)
        return
    from rich.table import Table

    t = doc["totals"]
    out.print(f"{t['devices']} devices, {t['online']} online, {t['unhealthy']} unhealthy · {t['records']} records "
              f"received, {t['duplicates_refused']} resent duplicates refused · backlog {t['backlog_records']} records")
    if doc["devices"]:
        dt = Table("device", "model", "bundle", "health", "backlog", "records", "last sync")
        for d in doc["devices"]:
            dt.add_row(d["device_id"], f"{d.get('model')}:{d.get('version')}", str(d.get("bundle_id") or "-"),
                       str(d.get("health")), str(d.get("backlog_records") or 0), str(d.get("records") or 0),
                       f"{d['last_seen_s_ago']:.0f}s ago" + ("" if d["online"] else " (offline)"))
        out.print(dt)
    if doc["rollouts"]:
        rt = Table("channel", "bundle", "rollout", "state", "devices on it", "tried", "failed", "reason")
        for r in doc["rollouts"]:
            rt.add_row(f"{r['model']}/{r['target']}", r["bundle_id"], f"{r['rollout']}%", r["status"],
                       str(r["devices_on"]), str(r["attempts"]), str(r["failures"]), str(r.get("reason") or ""))
        out.print(rt)
    if not doc["devices"] and not doc["rollouts"]:
        out.print("no devices have synced yet; see docs/edge.md to run `visionfleet-edge`")


def _pick_versions(model: str, update: Optional[str]) -> tuple[str, str]:
    from visionfleet.state import open_registry
    from visionfleet.spec import parse_ref

    reg = open_registry(settings())
    start = reg.resolve(model)
    if update is not None:
        return str(start), str(reg.resolve(update))
    newer = [v for v in reg.versions(start.name) if v > start.version]
    if not newer:
        raise ValueError(
            f"Got {model} ({start}) and no newer version of {parse_ref(model).name} to roll out mid-run; expected "
            f"--update NAME:VERSION, or make one (e.g. `visionfleet optimize {start} --quantize int8-static`)"
        )
    return str(start), f"{start.name}:{newer[-1]}"


def _fleet_sim() -> tuple[Any, Any]:
    """The simulation harness, ``bench/fleet_sim.py`` of a source checkout (it is a test
    harness, not part of the installed product)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "fleet_sim.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"Got no {path}; expected a source checkout of visionfleet (the fleet simulation is a harness in bench/)"
        )
    spec = importlib.util.spec_from_file_location("bench.fleet_sim", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    import sys

    sys.modules.setdefault("bench.fleet_sim", module)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.SimConfig, module.run_simulation


@app.command()
@cli_errors
def simulate(
    devices: Annotated[int, typer.Option(help="agent processes")] = 20,
    minutes: Annotated[float, typer.Option(help="scenario length")] = 3.0,
    outages: Annotated[int, typer.Option(help="network cuts")] = 3,
    outage_seconds: Annotated[float, typer.Option(help="length of each cut")] = 15.0,
    crashes: Annotated[int, typer.Option(help="agents SIGKILLed (and restarted) at random moments")] = 5,
    model: Annotated[str, typer.Option(help="start version (NAME[:VERSION|@ALIAS])")] = "demo@production",
    update: Annotated[Optional[str], typer.Option(help="the update published mid-run (default: the newest version)")] = None,
    target: Annotated[Target, typer.Option(help="device target of the bundles")] = Target.X86_CPU,
    fps: Annotated[float, typer.Option(help="frames per second per device")] = 1.0,
    bad_update: Annotated[bool, typer.Option(help="also publish a broken update that must halt by itself")] = True,
    seed: Annotated[int, typer.Option(help="random seed of the scenario")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Run N agents against an embedded server, cut the network, update mid-run; report what arrived."""
    import ray
    from ray import serve

    from cluster.local import free_port, init_embedded, wait_http
    from serve_apps.app import APP_NAME
    from serve_apps.config import AppConfig, ReplicaConfig
    from serve_apps.deploy import deploy
    SimConfig, run_simulation = _fleet_sim()

    start, upd = _pick_versions(model, update)
    cfg = SimConfig(model=start, update=upd, target=target.value, devices=devices, duration_s=minutes * 60,
                    outages=outages, outage_s=outage_seconds, crashes=crashes, fps=fps, bad_update=bad_update, seed=seed)
    s = settings().ensure()
    port = free_port()
    with err.status("starting an embedded local Ray and the Serve app"):
        init_embedded(s)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(AppConfig(home=str(s.home), default_model=start.split(":")[0], telemetry=False,
                         replica=ReplicaConfig(ort_threads=1, num_cpus=0.25)),
               http={"host": "127.0.0.1", "port": port})
        if not wait_http(f"http://127.0.0.1:{port}/healthz", timeout=120):
            raise TimeoutError("the Serve app did not become healthy")
    try:
        report = run_simulation(cfg, home=s.home, server_url=f"http://127.0.0.1:{port}",
                                on_event=lambda m: err.print(m, markup=False))
    finally:
        with err.status("shutting down Serve and Ray"):
            try:
                serve.delete(APP_NAME)
            finally:
                ray.shutdown()
    doc = report.to_dict()
    if as_json:
        print_json(doc)
    else:
        _print_report(doc)
    if not report.ok:
        err.print("[bold red]simulation found a problem[/] (see lost / duplicates / convergence above)")
        raise typer.Exit(1)


def _print_report(doc: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"fleet simulation — {doc['devices']} devices, {doc['duration_s']:.0f} s", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [
        ("network cuts (total seconds down)", f"{doc['outages']} ({doc['outage_seconds']:.0f} s)"),
        ("agents SIGKILLed and restarted", str(doc["crashes"])),
        ("records produced on devices", str(doc["records_produced"])),
        ("records received (unique, in the event lake)", str(doc["records_received"])),
        ("duplicates in the lake", str(doc["duplicates"])),
        ("lost", str(doc["lost"])),
        ("resent duplicates refused by the server", str(doc["duplicates_refused_by_server"])),
        ("broken update: devices that tried it", str(doc["bad_update_tried"])),
        ("broken update: rollout halted by itself", str(doc["bad_rollout_halted"])),
        ("health-check failures (rolled back)", str(doc["rollbacks"])),
        ("good update: convergence (s)", "-" if doc["convergence_s"] is None else f"{doc['convergence_s']:.1f}"),
        ("devices on the update at the end", f"{doc['converged_devices']} / {doc['devices']}"),
        ("drained", str(doc["drained"])),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
