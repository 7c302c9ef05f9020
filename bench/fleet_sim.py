"""Fleet simulation: N real agent processes against a real server, with the network cut.

``run_simulation`` drives a scenario against a running visionfleet server (the CLI
``visionfleet fleet simulate`` starts one in-process, like ``visionfleet demo``):

1. export and publish a start bundle (TUF-signed, rollout 100%);
2. start N ``visionfleet-edge run`` processes, each behind one TCP proxy to the
   server, each watching its own frame folder that a producer fills at ``fps``;
3. cut the proxy ``outages`` times (connections refused and live ones reset), SIGKILL
   and restart random agents ``crashes`` times (mid-inference, mid-sync, mid-install);
4. publish a *broken* update (signed, but its golden outputs do not match: a bad model
   as a device sees it) to half the fleet: devices refuse it on their health check,
   keep their model and report; the server halts the rollout by itself;
5. publish the good update to everyone and time how long the fleet takes to converge;
6. stop producing, let the fleet drain, and count what the server's event lake holds
   against what the devices were given: records produced vs received, duplicates, lost.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["SimConfig", "SimReport", "TcpProxy", "run_simulation", "make_broken_bundle", "lake_counts"]

Event = Callable[[str], None]


@dataclass(frozen=True)
class SimConfig:
    """A simulation scenario."""

    model: str  # the start version, NAME:VERSION or NAME@ALIAS
    update: str  # the update, a newer version
    target: str = "x86-cpu"
    devices: int = 20
    duration_s: float = 180.0
    outages: int = 3
    outage_s: float = 15.0
    crashes: int = 5
    fps: float = 1.0
    bad_update: bool = True
    sync_interval_s: float = 2.0
    ota_interval_s: float = 6.0
    drain_timeout_s: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 200:
            raise ValueError(f"Got {self.devices} for --devices; expected 1..200")
        if self.duration_s < 10:
            raise ValueError(f"Got {self.duration_s} s for the duration; expected >= 10 s")
        if self.outages < 0 or self.crashes < 0:
            raise ValueError("Got a negative number of outages or crashes; expected >= 0")
        if self.outages and self.outage_s * self.outages >= self.duration_s * 0.6:
            raise ValueError(f"Got {self.outages} outages of {self.outage_s} s in {self.duration_s} s; expected the "
                             "network up at least 40% of the time")
        if not 0 < self.fps <= 20:
            raise ValueError(f"Got {self.fps} for --fps; expected 0 < fps <= 20")


@dataclass
class SimReport:
    """What happened, measured on both sides."""

    devices: int
    duration_s: float
    outages: int
    outage_seconds: float
    crashes: int
    records_produced: int
    records_received: int
    duplicates: int
    lost: int
    unexpected: int
    duplicates_refused_by_server: int
    start_bundle: str
    update_bundle: str
    bad_bundle: str | None
    bad_rollout_halted: bool | None
    bad_update_tried: int
    rollbacks: int
    convergence_s: float | None
    converged_devices: int
    final_versions: dict[str, int]
    drained: bool
    sync_failures_seen: int
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.unexpected == 0 and self.drained and (
            self.converged_devices == self.devices) and (self.bad_rollout_halted in (None, True))


# ---------------------------------------------------------------------- the network


class TcpProxy:
    """A TCP relay the simulator can cut (refuse and reset everything) and restore."""

    def __init__(self, upstream: tuple[str, int], port: int | None = None) -> None:
        self.upstream = upstream
        self.port = port or 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "TcpProxy":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for attempt in range(50):  # the old listener may take a moment to go
            try:
                s.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if attempt == 49:
                    s.close()
                    raise
                time.sleep(0.1)
        s.listen(256)
        self.port = s.getsockname()[1]
        self._listener = s
        self.up = True
        threading.Thread(target=self._accept, args=(s,), name="vf-proxy-accept", daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self.up:
                    client.close()
                    server.close()
                    continue
                self._conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def cut(self) -> None:
        """The network goes away: new connections are refused, open ones are reset."""
        with self._lock:
            self.up = False
            if self._listener is not None:
                try:
                    # Wakes the thread blocked in accept(); close() alone leaves the port listening.
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.start()

    def close(self) -> None:
        self.cut()


# ---------------------------------------------------------------------- bundles


def make_broken_bundle(src: Path, dst_parent: Path) -> Path:
    """A copy of a bundle whose golden outputs are wrong: what a device sees of a bad model.

    It is a complete, consistent bundle (every hash matches its manifest) that TUF will
    sign and deliver; only the device's health check can catch it.
    """
    from edge_agent.bundle import GOLDEN, BundleFile, file_digest, read_manifest

    m = read_manifest(src)
    bid = f"{m.bundle_id}-broken"
    dst = dst_parent / bid
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    doc = json.loads((dst / GOLDEN).read_text())
    for s in doc["samples"]:
        for k, v in s["outputs"].items():
            s["outputs"][k] = list(reversed(v)) if isinstance(v, list) else v  # the wrong class wins
    (dst / GOLDEN).write_text(json.dumps(doc))
    files = dict(m.files)
    digest, size = file_digest(dst / GOLDEN)
    files[GOLDEN] = BundleFile(sha256=digest, bytes=size)
    (dst / "bundle.json").write_text(m.model_copy(update={"bundle_id": bid, "files": files}).model_dump_json(indent=2))
    return dst


# ---------------------------------------------------------------------- the lake


def lake_counts(home: Path, device_prefix: str) -> dict[str, dict[str, int]]:
    """Rows and unique request ids per device in the event lake, for devices with this prefix."""
    import pyarrow.parquet as pq

    out: dict[str, dict[str, Any]] = {}
    root = home / "telemetry" / "events"
    for part in root.glob(f"date=*/source=edge_{device_prefix}*/part-*.parquet"):
        device = part.parent.name[len("source=edge_"):]
        ids = pq.read_table(part, columns=["request_id"]).column("request_id").to_pylist()
        d = out.setdefault(device, {"rows": 0, "ids": set()})
        d["rows"] += len(ids)
        d["ids"].update(ids)
    return {k: {"rows": v["rows"], "unique": len(v["ids"]), "ids": v["ids"]} for k, v in out.items()}  # type: ignore[misc]


# ---------------------------------------------------------------------- the scenario


class _Fleet:
    """The agent processes and their frame folders."""

    def __init__(self, work: Path, cfg: SimConfig, server: str, root: Path, model: str, prefix: str) -> None:
        self.work, self.cfg, self.server, self.root, self.model = work, cfg, server, root, model
        self.ids = [f"{prefix}-{i:02d}" for i in range(cfg.devices)]
        self.procs: dict[str, subprocess.Popen] = {}
        self.produced: dict[str, int] = {d: 0 for d in self.ids}
        self.frame_ids: dict[str, list[str]] = {d: [] for d in self.ids}
        for d in self.ids:
            (work / d / "frames").mkdir(parents=True, exist_ok=True)

    def start(self, device: str) -> None:
        d = self.work / device
        cmd = [
            sys.executable, "-m", "edge_agent.cli", "run", "--device-id", device, "--server", self.server,
            "--source", str(d / "frames"), "--home", str(d / "home"), "--root", str(self.root),
            "--model", self.model, "--target", self.cfg.target, "--threads", "1", "--sync-interval",
            str(self.cfg.sync_interval_s), "--ota-interval", str(self.cfg.ota_interval_s), "--poll", "0.5",
            "--timeout", "5",
        ]
        log = open(d / "agent.log", "ab")  # noqa: SIM115 - the process owns it
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs[device] = subprocess.Popen(cmd, stdout=log, stderr=log, env=env,
                                              cwd=str(Path(__file__).resolve().parents[1]))

    def kill(self, device: str) -> None:
        p = self.procs.get(device)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def write_frame(self, device: str, data: bytes) -> None:
        n = self.produced[device]
        folder = self.work / device / "frames"
        name = f"f{n:06d}.png"
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)  # the agent ignores hidden files: it never reads half a frame
        self.produced[device] = n + 1


def run_simulation(cfg: SimConfig, *, home: Path, server_url: str, work: Path | None = None,
                   on_event: Event = lambda m: None) -> SimReport:
    """Run the scenario against ``server_url`` (which serves ``home``); returns the report.

    Raises:
        LookupError: unknown model versions.
        ValueError: the update is not newer than the start version.
    """
    from urllib.parse import urlparse

    from edge_agent.rollout import cohort_bucket
    from edge_export.bundle import export_bundle
    from edge_export.tuf_repo import TufRepository, publish_bundle
    from visionfleet.datasets.synth import render_sample
    from visionfleet.fleet import FleetDB
    from visionfleet.imaging import encode_image
    from visionfleet.registry import Registry
    from visionfleet.settings import Settings

    rng = random.Random(cfg.seed)
    home = Path(home)
    reg = Registry.from_settings(Settings.from_env(home))
    start, update = reg.resolve(cfg.model), reg.resolve(cfg.update)
    if start.name != update.name or update.version <= start.version:
        raise ValueError(f"Got start {start} and update {update}; expected a newer version of the same model")
    run_id = uuid.uuid4().hex[:4]
    prefix = f"sim{run_id}"
    work = Path(work) if work else home / "edge" / "simulations" / prefix
    work.mkdir(parents=True, exist_ok=True)
    bundles = home / "edge" / "bundles"
    timeline: list[dict[str, Any]] = []
    t0 = time.monotonic()

    def mark(what: str, **extra: Any) -> None:
        timeline.append({"t": round(time.monotonic() - t0, 2), "event": what, **extra})
        on_event(f"[{time.monotonic() - t0:6.1f}s] {what} {extra if extra else ''}")

    # 1. bundles and the first publish ------------------------------------------------
    on_event(f"exporting {start} and {update} for {cfg.target}")
    b_start = export_bundle(reg, str(start), cfg.target, out_dir=bundles, datasets_dir=home / "datasets")
    b_update = export_bundle(reg, str(update), cfg.target, out_dir=bundles, datasets_dir=home / "datasets")
    b_bad = make_broken_bundle(b_update, bundles) if cfg.bad_update else None
    repo = TufRepository(home)
    repo.init()
    fleet_db = FleetDB(home)
    root_file = work / "root.json"
    root_file.write_bytes(repo.root_bytes())

    def publish(bundle: Path, rollout: int) -> dict[str, Any]:
        doc = publish_bundle(repo, bundle, rollout=rollout, allow_downgrade=True)
        fleet_db.record_rollout(doc["model"], doc["target"], doc["bundle_id"], doc["version"], doc["rollout"])
        mark("published", bundle=doc["bundle_id"], rollout=rollout)
        return doc

    start_doc = publish(b_start, 100)

    # 2. the network and the fleet -----------------------------------------------------
    u = urlparse(server_url)
    proxy = TcpProxy((u.hostname or "127.0.0.1", u.port or 80)).start()
    fleet = _Fleet(work, cfg, proxy.url, root_file, start.name, prefix)
    pool = [encode_image(render_sample(cfg.seed + 11, i, 48)[0]) for i in range(64)]
    stop_producing = threading.Event()

    def producer() -> None:
        period = 1.0 / cfg.fps
        nxt = time.monotonic()
        while not stop_producing.is_set():
            for d in fleet.ids:
                fleet.write_frame(d, pool[rng.randrange(len(pool))])
            nxt += period
            stop_producing.wait(max(0.0, nxt - time.monotonic()))

    for d in fleet.ids:
        fleet.start(d)
    mark("agents started", devices=cfg.devices)
    prod = threading.Thread(target=producer, name="vf-sim-frames", daemon=True)
    prod.start()

    # 3. the timeline ------------------------------------------------------------------
    D = cfg.duration_s
    events: list[tuple[float, str, Any]] = []
    for k in range(cfg.outages):
        at = D * (k + 1) / (cfg.outages + 1) - cfg.outage_s / 2
        events += [(at, "cut", None), (at + cfg.outage_s, "restore", None)]
    for _ in range(cfg.crashes):
        events.append((rng.uniform(0.1 * D, 0.85 * D), "crash", rng.choice(fleet.ids)))
    if b_bad is not None:
        events.append((0.2 * D, "bad", None))
    events.append((0.45 * D, "good", None))
    events.sort(key=lambda e: e[0])
    # The broken update goes to a canary cohort: about a third of the fleet, and at
    # least two devices (one failure alone never halts a rollout).
    buckets = sorted(cohort_bucket(d, start.name) for d in fleet.ids)
    bad_pct = min(100, max(30, int(buckets[min(1, len(buckets) - 1)]) + 1))
    restarts: list[tuple[float, str]] = []
    good_at = None
    update_id: str | None = None
    convergence = None
    outage_seconds = 0.0
    cut_at = None
    try:
        for at, what, arg in events:
            while time.monotonic() - t0 < at:
                now = time.monotonic() - t0
                for r in [r for r in restarts if r[0] <= now]:
                    restarts.remove(r)
                    fleet.start(r[1])
                    mark("agent restarted", device=r[1])
                if good_at is not None and convergence is None:
                    convergence = _converged(fleet_db, fleet.ids, update_id, good_at)
                time.sleep(0.2)
            if what == "cut":
                proxy.cut()
                cut_at = time.monotonic()
                mark("network cut")
            elif what == "restore":
                proxy.restore()
                outage_seconds += time.monotonic() - (cut_at or time.monotonic())
                mark("network restored")
            elif what == "crash":
                fleet.kill(arg)
                mark("agent SIGKILLed", device=arg)
                restarts.append((time.monotonic() - t0 + rng.uniform(1.0, 3.0), arg))
            elif what == "bad":
                publish(b_bad, bad_pct)
            elif what == "good":
                update_doc = publish(b_update, 100)
                update_id = update_doc["bundle_id"]
                good_at = time.monotonic()
        while time.monotonic() - t0 < D:
            now = time.monotonic() - t0
            for r in [r for r in restarts if r[0] <= now]:
                restarts.remove(r)
                fleet.start(r[1])
                mark("agent restarted", device=r[1])
            if convergence is None:
                convergence = _converged(fleet_db, fleet.ids, update_id, good_at)
            time.sleep(0.2)
        for _, d in restarts:
            fleet.start(d)
        if not proxy.up:
            proxy.restore()

        # 4. drain -------------------------------------------------------------------------
        stop_producing.set()
        prod.join()
        mark("producer stopped", frames=sum(fleet.produced.values()))
        deadline = time.monotonic() + cfg.drain_timeout_s
        drained = False
        while time.monotonic() < deadline:
            if convergence is None:
                convergence = _converged(fleet_db, fleet.ids, update_id, good_at)
            received = _server_records(fleet_db, fleet.ids)
            if all(received.get(d, 0) >= fleet.produced[d] for d in fleet.ids) and convergence is not None:
                drained = True
                break
            time.sleep(1.0)
        mark("drained" if drained else "drain timed out")
    finally:
        stop_producing.set()
        fleet.stop_all()
        proxy.close()

    # 5. count -------------------------------------------------------------------------------
    fleet_db.flush_pending()
    lake = lake_counts(home, prefix)
    produced = sum(fleet.produced.values())
    received = sum(v["unique"] for v in lake.values())
    rows = sum(v["rows"] for v in lake.values())
    lost = unexpected = 0
    for d in fleet.ids:
        got = lake.get(d, {"unique": 0})["unique"]
        lost += max(0, fleet.produced[d] - got)
        unexpected += max(0, got - fleet.produced[d])
    devices = {x["device_id"]: x for x in fleet_db.devices() if x["device_id"] in fleet.ids}
    versions: dict[str, int] = {}
    for d in fleet.ids:
        key = str(devices.get(d, {}).get("bundle_id"))
        versions[key] = versions.get(key, 0) + 1
    ups = [x for x in fleet_db.updates(limit=100000) if x["device_id"] in fleet.ids]
    bad_rows = [x for x in ups if b_bad is not None and x["bundle_id"] == _bundle_id(b_bad)]
    rollbacks = sum(1 for x in ups if x["outcome"] in ("health_failed", "rolled_back"))
    halted = None
    if b_bad is not None:
        halted = any(r["bundle_id"] == _bundle_id(b_bad) and r["status"] == "halted" for r in fleet_db.rollouts())
    sync_failures = 0
    for d in fleet.ids:
        log = work / d / "agent.log"
        if log.exists():
            sync_failures += log.read_text(errors="replace").count("sync failed")
    return SimReport(
        devices=cfg.devices, duration_s=round(time.monotonic() - t0, 1), outages=cfg.outages,
        outage_seconds=round(outage_seconds, 1), crashes=cfg.crashes, records_produced=produced,
        records_received=received, duplicates=rows - received, lost=lost, unexpected=unexpected,
        duplicates_refused_by_server=sum(int(devices.get(d, {}).get("duplicates") or 0) for d in fleet.ids),
        start_bundle=start_doc["bundle_id"], update_bundle=_bundle_id(b_update),
        bad_bundle=_bundle_id(b_bad) if b_bad is not None else None, bad_rollout_halted=halted,
        bad_update_tried=len({x["device_id"] for x in bad_rows}), rollbacks=rollbacks,
        convergence_s=round(convergence, 1) if convergence is not None else None,
        converged_devices=sum(1 for d in fleet.ids if devices.get(d, {}).get("bundle_id") == _bundle_id(b_update)),
        final_versions=versions, drained=drained, sync_failures_seen=sync_failures, timeline=timeline,
    )


def _bundle_id(bundle: Path) -> str:
    from edge_agent.bundle import read_manifest

    return read_manifest(bundle).bundle_id


def _server_records(fleet_db: Any, ids: list[str]) -> dict[str, int]:
    return {d["device_id"]: int(d.get("records") or 0) for d in fleet_db.devices() if d["device_id"] in ids}


def _converged(fleet_db: Any, ids: list[str], bundle_id: str | None, since: float | None) -> float | None:
    """Seconds from the publish to the moment every device reported running ``bundle_id``."""
    if bundle_id is None or since is None:
        return None
    on = {d["device_id"] for d in fleet_db.devices() if d.get("bundle_id") == bundle_id}
    return time.monotonic() - since if set(ids) <= on else None
