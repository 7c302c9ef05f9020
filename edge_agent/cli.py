"""`visionfleet-edge`: the device-side command (light install: no torch, ray or pyarrow)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="visionfleet-edge",
    help="Run visionfleet models on a device, offline: bundles in, predictions out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(code)


@app.command()
def info(model_dir: Annotated[Path, typer.Argument(help="a model folder: card.json + model file")]) -> None:
    """Print a model folder's card as JSON."""
    from visionfleet.spec import ModelCard

    card_path = model_dir / "card.json"
    if not card_path.is_file():
        _fail(f"no card.json in {model_dir}")
    try:
        card = ModelCard.model_validate_json(card_path.read_text())
    except ValueError as exc:
        _fail(f"invalid card.json: {exc}")
    sys.stdout.write(card.model_dump_json(indent=2) + "\n")


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="a model folder: card.json + model file")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads")] = 1,
    top_k: Annotated[int, typer.Option(help="classes per result")] = 3,
) -> None:
    """Run a local model folder on images offline (classification or detection); one JSON line per image."""
    from edge_agent.predict import predict_bytes
    from visionfleet.imaging import ImageError
    from visionfleet.inference import RuntimeOptions, load_model_dir

    try:
        model = load_model_dir(model_dir, RuntimeOptions(threads=threads))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    failures = 0
    for path in images:
        try:
            pred = predict_bytes(model, path.read_bytes(), top_k)
        except (OSError, ImageError) as exc:
            failures += 1
            sys.stdout.write(json.dumps({"image": str(path), "error": str(exc)}) + "\n")
            continue
        res = {**pred.result, "image": str(path), "model": model.card.name, "version": model.card.version,
               "latency_ms": round(pred.latency_ms, 3)}
        sys.stdout.write(json.dumps(res) + "\n")
    if failures:
        raise typer.Exit(1)


HomeOpt = Annotated[
    Path,
    typer.Option("--home", envvar="VISIONFLEET_EDGE_HOME", help="the agent's state folder (models, outbox, TUF metadata)"),
]


def _err(message: str) -> None:
    sys.stderr.write(time.strftime("%H:%M:%S ") + message + "\n")
    sys.stderr.flush()


@app.command()
def run(
    device_id: Annotated[str, typer.Option("--device-id", help="this device's id (letters, digits, _ . -)")],
    server: Annotated[Optional[str], typer.Option(help="the visionfleet server URL (sync and updates); none: offline")] = None,
    source: Annotated[Optional[str], typer.Option(help="a folder of images (watched), a video file, or camera:N")] = None,
    home: HomeOpt = Path(".visionfleet-edge"),
    root: Annotated[Optional[Path], typer.Option(help="TUF root.json to trust (first run; `visionfleet edge keys --export-root`)")] = None,
    model: Annotated[Optional[str], typer.Option(help="model name to follow (default: the installed bundle's)")] = None,
    target: Annotated[Optional[str], typer.Option(help="device target (default: the installed bundle's, else this machine's)")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="install this bundle (folder or .tar) first when none is installed")] = None,
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime threads (default: the target profile's)")] = None,
    sample_below: Annotated[float, typer.Option(help="sample images whose confidence is below this for labeling")] = 0.5,
    sample_rate: Annotated[float, typer.Option(help="share of those low-confidence images to keep")] = 1.0,
    sync_interval: Annotated[float, typer.Option(help="seconds between uploads")] = 10.0,
    sync_batch: Annotated[int, typer.Option(help="records per upload request")] = 256,
    ota_interval: Annotated[float, typer.Option(help="seconds between update checks (jittered +-20%)")] = 300.0,
    poll: Annotated[float, typer.Option(help="seconds between looks at a watched folder")] = 1.0,
    stride: Annotated[int, typer.Option(help="video/camera: use every N-th frame")] = 1,
    watch: Annotated[bool, typer.Option("--watch/--once", help="keep watching the folder, or process what is there, sync and exit")] = True,
    max_frames: Annotated[Optional[int], typer.Option(help="stop after this many frames")] = None,
    timeout: Annotated[float, typer.Option(help="network timeout in seconds")] = 15.0,
    outbox_max_mb: Annotated[int, typer.Option(help="cap of the outbox on disk, MiB; when full, acknowledged rows, "
                                               "then the oldest unsent images, then the oldest unsent records go (counted)")] = 256,
    outbox_retention: Annotated[float, typer.Option(help="seconds acknowledged rows stay in the outbox")] = 3600.0,
    quiet: Annotated[bool, typer.Option(help="no log lines on stderr")] = False,
) -> None:
    """Infer offline on a folder, video or camera; sync results and take verified updates when online."""
    import signal

    from edge_agent.agent import Agent, AgentConfig
    from edge_agent.store import ModelStore

    try:
        cfg = AgentConfig(
            device_id=device_id, home=home.expanduser().resolve(), source=source, server=server, model=model,
            target=target, threads=threads, sample_below=sample_below, sample_rate=sample_rate,
            sync_interval_s=sync_interval, sync_batch=sync_batch, ota_interval_s=ota_interval, poll_s=poll, stride=stride, watch=watch,
            max_frames=max_frames, timeout_s=timeout, outbox_max_bytes=outbox_max_mb * 1024 * 1024,
            outbox_retention_s=outbox_retention,
        )
    except ValueError as exc:
        _fail(str(exc))
    if source is None and server is None:
        _fail("nothing to do: give --source (offline inference) and/or --server (sync and updates)")
    if source is not None and not source.startswith("camera:") and not Path(source).expanduser().exists():
        _fail(f"Got {source!r} for --source; expected a folder of images, a video file or camera:N")
    root_bytes = None
    if root is not None:
        if not root.is_file():
            _fail(f"no such file: {root}")
        root_bytes = root.read_bytes()
    log = (lambda m: None) if quiet else _err
    store = ModelStore(cfg.home, threads=threads)
    if bundle is not None and store.current_id() is None:
        res = _install(store, bundle)
        log(f"install {bundle}: {res.outcome}" + (f" ({res.error})" if res.error else ""))
        if not res.ok:
            raise typer.Exit(1)
    agent = Agent(cfg, root=root_bytes, log=log)
    if root_bytes is not None and server is None:
        from edge_agent.ota import OtaClient

        try:  # store the anchor now, so a later online run needs no --root
            OtaClient(cfg.home, "http://localhost", model=model or "unset", target=target or "x86-cpu",
                      device_id=device_id, root=root_bytes)
        except ValueError as exc:
            _fail(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    try:
        summary = agent.run()
    except KeyboardInterrupt:
        agent.stop()
        raise typer.Exit(130) from None
    except ValueError as exc:
        _fail(str(exc))
    sys.stdout.write(json.dumps(summary) + "\n")


def _install(store, bundle: Path):
    from edge_agent.bundle import BundleError

    if bundle.is_dir():
        try:
            return store.install_folder(bundle)
        except BundleError as exc:
            _fail(str(exc))
    if bundle.is_file():
        return store.install_archive(bundle)
    _fail(f"no such bundle: {bundle}")


@app.command()
def install(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder or .tar archive")],
    home: HomeOpt = Path(".visionfleet-edge"),
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime threads for the health check")] = None,
) -> None:
    """Install a local bundle: verify, health-check on its golden samples, swap atomically."""
    from edge_agent.store import ModelStore

    store = ModelStore(home.expanduser().resolve(), threads=threads)
    store.recover()
    res = _install(store, bundle)
    sys.stdout.write(json.dumps(res.to_dict()) + "\n")
    if not res.ok:
        raise typer.Exit(1)


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder")],
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime threads")] = None,
) -> None:
    """Health-check a bundle folder: file hashes, load in ONNX Runtime, golden outputs."""
    from edge_agent.bundle import health_check

    if not bundle.is_dir():
        _fail(f"no such bundle folder: {bundle}")
    report = health_check(bundle, threads=threads)
    sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def status(
    home: HomeOpt = Path(".visionfleet-edge"),
    check: Annotated[bool, typer.Option("--verify", help="recover, verify and health-check the current model, as a start would")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The installed models (current, last good), recent events and the outbox backlog."""
    from edge_agent.outbox import Outbox
    from edge_agent.store import ModelStore

    home = home.expanduser().resolve()
    if not home.is_dir():
        _fail(f"no agent home at {home}")
    store = ModelStore(home)
    doc: dict = {"home": str(home)}
    if check:
        active = store.open()
        doc["serving"] = active.bundle_id if active else None
        doc["health"] = active.health.to_dict() if active and active.health else None
        doc["notes"] = active.notes if active else []
    st = store.state()
    doc.update(current=st.get("current"), previous=st.get("previous"), events=st.get("events", [])[-5:])
    if (home / "outbox.sqlite").exists():
        with Outbox(home / "outbox.sqlite") as ob:
            doc["backlog"] = ob.backlog()
            doc["totals"] = ob.totals()
            doc["outbox"] = {k: v for k, v in ob.stats().items() if k != "max_bytes"}  # the cap is the agent's
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    for key in ("current", "previous", "serving", "backlog", "totals", "outbox"):
        if key in doc:
            sys.stdout.write(f"{key:9} {doc[key]}\n")
    for ev in doc["events"]:
        sys.stdout.write(f"event     {ev}\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
