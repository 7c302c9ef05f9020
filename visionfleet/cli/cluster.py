"""`visionfleet cluster`: a local multi-node Ray cluster (head + workers) for this state dir."""

from __future__ import annotations

from typing import Annotated

import typer

from visionfleet.cli._common import cli_errors, err, out, print_json, settings

app = typer.Typer(help="A local multi-node Ray cluster: a head and worker nodes, each its own `ray start`.",
                  no_args_is_help=True)


def _print_env(env: dict[str, str]) -> None:
    # RAY_AUTH_TOKEN in the caller's shell would win over the token file.
    out.print("unset RAY_AUTH_TOKEN", markup=False)
    for k, v in env.items():
        out.print(f"export {k}={v}", markup=False)


@app.command()
@cli_errors
def up(
    workers: Annotated[int, typer.Option(help="worker nodes besides the head")] = 2,
    worker_cpus: Annotated[float, typer.Option(help="CPUs each worker offers (whole: Ray node resources are)")] = 1,
    head_cpus: Annotated[float, typer.Option(help="CPUs the head offers (0: the head runs no replicas or tasks)")] = 1,
    object_store_mb: Annotated[int, typer.Option(help="object store per node, MiB")] = 256,
    timeout: Annotated[float, typer.Option(help="seconds each node may take to start")] = 240.0,
    own_disks: Annotated[bool, typer.Option(
        "--own-disks", help="nodes share no disk: each gets its own home, working dir and TMPDIR; the shared state "
        "must be on $VISIONFLEET_STORE (s3://...) and $VISIONFLEET_DB (PostgreSQL)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the cluster record as JSON")] = False,
) -> None:
    """Start a head and worker nodes (free ports, a private temp dir, token auth) and record them."""
    from cluster.multinode import ClusterSpec, client_env, start_cluster

    spec = ClusterSpec(workers=workers, worker_cpus=worker_cpus, head_cpus=head_cpus, object_store_mb=object_store_mb,
                       own_disks=own_disks)
    s = settings().ensure()
    with err.status("starting the cluster") as st:
        info = start_cluster(s, spec, timeout=timeout, on_step=lambda msg: st.update(f"starting the cluster: {msg}"))
    if as_json:
        print_json({**info.to_dict(), "env": client_env(info)})
        return
    cpus = sum(n.num_cpus for n in info.nodes)
    out.print(f"cluster {info.name}: {len(info.nodes)} nodes, {cpus} CPUs; GCS {info.gcs_address}, "
              f"dashboard {info.dashboard_url}")
    err.print("clients need its token: `eval \"$(visionfleet cluster env)\"`, then `serve deploy FILE`, "
              "`ray job submit -- …` or `ray status`; stop with `visionfleet cluster down`")


@app.command()
@cli_errors
def down() -> None:
    """Stop exactly the processes of this state dir's cluster (never `ray stop`)."""
    from cluster.multinode import read_cluster, stop_cluster

    s = settings()
    if read_cluster(s) is None:
        out.print("nothing to stop: no cluster is recorded for this state dir")
        return
    with err.status("stopping the cluster"):
        n = stop_cluster(s)
    out.print(f"stopped the cluster ({n} processes)" if n else "the cluster was not running; removed its record")


@app.command()
@cli_errors
def status(as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """Show the recorded cluster and its nodes as the GCS sees them (alive, resources)."""
    from cluster.multinode import cluster_status

    doc = cluster_status(settings())
    if as_json:
        print_json(doc)
        return
    info = doc["cluster"]
    if info is None:
        out.print("no cluster (start one with `visionfleet cluster up`)")
        raise typer.Exit(1)
    out.print(f"cluster {info['name']}: GCS {info['gcs_address']} "
              f"{'reachable' if doc['alive'] else 'NOT reachable'}, dashboard {info['dashboard_url']}")
    if doc.get("error"):
        err.print(f"[yellow]{doc['error']}[/]")
    for n in doc["nodes"]:
        res = n["resources"]
        used = f" used={n['cpu_used']:g}" if n.get("cpu_used") is not None else ""
        out.print(f"  {n['name']:<14} {n['role']:<7} {'alive' if n['alive'] else 'DEAD':<6} "
                  f"CPU={res.get('CPU', 0):g}{used} memory={res.get('memory', 0) / 2**30:.1f}GiB "
                  f"object_store={res.get('object_store_memory', 0) / 2**20:.0f}MiB"
                  + (f" home={n['home']}" if n.get("home") else ""))
    if not doc["alive"]:
        raise typer.Exit(1)


@app.command()
@cli_errors
def env() -> None:
    """Print shell exports for clients of the cluster: `eval "$(visionfleet cluster env)"`."""
    from cluster.multinode import client_env, gcs_reachable, read_cluster

    info = read_cluster(settings())
    if info is None or not gcs_reachable(info):
        raise RuntimeError("no local cluster is running for this state dir; start one with `visionfleet cluster up`")
    _print_env(client_env(info))
