"""Faults under load, run in a subprocess with its own Ray (tests and `make test-slow`).

    python tests/integration/fault_driver.py --home HOME --model tiny --scenarios kill-replica,unhealthy,overload
    python tests/integration/fault_driver.py --home HOME --model tiny --scenarios remove-node --seconds 60 --rate 20

Each scenario keeps an open-loop load running (``--rate`` requests per second) while a
fault happens, and reports sent / failed requests, status counts and the latency blip.
``remove-node`` builds a multi-node cluster with ``ray.cluster_utils.Cluster``; the
others use one local node, or that cluster too with ``--one-cluster`` (one Ray start and
one deploy for every scenario; remove-node runs last). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
_T0 = time.monotonic()


def _log(msg: str) -> None:
    """A timestamped progress line on stderr (seconds since the driver started)."""
    print(f"[fault_driver {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class Load:
    """Open-loop load at a fixed rate from a thread pool; records (t, status, ms)."""

    def __init__(self, url: str, body: bytes, rate: float, workers: int = 16) -> None:
        self.url, self.body, self.rate, self.workers = url, body, rate, workers
        self.records: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        import queue

        self._q: "queue.Queue[float | None]" = queue.Queue()
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.workers)]
        for t in self._threads:
            t.start()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        t0 = time.perf_counter()
        i = 0
        while not self._stop.is_set():
            i += 1
            delay = t0 + i / self.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self._q.put(time.perf_counter())

    def _worker(self) -> None:
        import httpx

        with httpx.Client(timeout=60) as c:
            while True:
                item = self._q.get()
                if item is None:
                    return
                t = time.perf_counter()
                try:
                    r = c.post(self.url, content=self.body, headers={"Content-Type": "image/png"})
                    status = r.status_code
                    if status >= 400:
                        try:
                            ok_json = isinstance(r.json().get("error"), str)
                        except ValueError:
                            ok_json = False
                        if not ok_json:
                            status = -status  # an error without our JSON body
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.records.append((t, status, (time.perf_counter() - t) * 1000))

    def stop(self) -> None:
        self._stop.set()
        self._ticker.join()
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout=90)

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
        with self._lock:
            rec = [r for r in self.records if since <= r[0] < until]
        statuses: dict[str, int] = {}
        for _, s, _ in rec:
            statuses[str(s)] = statuses.get(str(s), 0) + 1
        lat = np.array([ms for _, s, ms in rec if s == 200]) if rec else np.array([])
        pct = (lambda q: float(np.percentile(lat, q))) if lat.size else (lambda q: float("nan"))
        return {"sent": len(rec), "ok": int(lat.size), "failed": len(rec) - int(lat.size), "statuses": statuses,
                "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": float(lat.max()) if lat.size else float("nan")}


def _deploy(home: Path, model: str, replicas: int, per_node: int | None, port: int, health_check_period_s: float = 2.0) -> None:
    from ray import serve

    from serve_apps.config import AppConfig, IngressConfig, ReplicaConfig
    from serve_apps.deploy import deploy

    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 20})
    deploy(
        AppConfig(home=str(home), default_model=model, admin_token="faults",
                  ingress=IngressConfig(num_cpus=0.1, max_in_flight=64, request_timeout_s=10.0),
                  replica=ReplicaConfig(num_replicas=replicas, num_cpus=0.2, ort_threads=1, max_queued_requests=32,
                                        health_check_period_s=health_check_period_s, max_replicas_per_node=per_node)),
        http={"host": "127.0.0.1", "port": port},
    )


def _replica_pids() -> list[int]:
    """This driver's ModelReplica processes (descendants of this process: its own Ray, never
    another run's on the same machine)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ServeReplica:visionfleet:ModelReplica" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def _wait_replicas(n: int, timeout: float = 120.0) -> float:
    """Seconds until ``n`` ModelReplica replicas are RUNNING."""
    from ray import serve

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = serve.status().applications.get("visionfleet")
        if st is not None:
            dep = st.deployments.get("ModelReplica")
            running = (dep.replica_states or {}).get("RUNNING", 0) if dep is not None else 0
            if running >= n and str(st.status).endswith("RUNNING"):
                return time.monotonic() - t0
        time.sleep(0.5)
    raise TimeoutError(f"{n} replicas were not running after {timeout}s")


def kill_replica(url: str, body: bytes, seconds: float, rate: float) -> dict[str, Any]:
    """SIGKILL one ModelReplica process while the load runs."""
    _wait_replicas(2)
    load = Load(url, body, rate)
    load.start()
    time.sleep(seconds / 3)
    pids = _replica_pids()
    t_kill = time.perf_counter()
    os.kill(pids[0], signal.SIGKILL)
    recovered = _wait_replicas(2)
    _log(f"killed replica back after {recovered:.1f}s")
    time.sleep(max(0.0, seconds * 2 / 3 - recovered))
    load.stop()
    return {"scenario": "kill-replica", "killed_pid": pids[0], "replicas_back_s": recovered,
            "before": load.summary(until=t_kill), "after_kill": load.summary(since=t_kill), "all": load.summary()}


def unhealthy(url: str, body: bytes, seconds: float, rate: float) -> dict[str, Any]:
    """A replica whose check_health fails is replaced while the load runs."""
    from ray import serve

    _wait_replicas(2)
    before = set(_replica_pids())
    load = Load(url, body, rate)
    load.start()
    time.sleep(seconds / 3)
    handle = serve.get_deployment_handle("ModelReplica", "visionfleet")
    marked = handle.mark_unhealthy.remote("fault test").result(timeout_s=30)
    t_mark = time.perf_counter()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and before <= set(_replica_pids()):
        time.sleep(0.5)
    replaced = not before <= set(_replica_pids())
    _log(f"unhealthy replica replaced={replaced} {time.perf_counter() - t_mark:.1f}s after the mark")
    back = _wait_replicas(2)
    time.sleep(max(0.0, seconds * 2 / 3 - back))
    load.stop()
    return {"scenario": "unhealthy", "marked": marked, "replaced": replaced, "replicas_back_s": back,
            "after_mark": load.summary(since=t_mark), "all": load.summary()}


def overload(url: str, body: bytes, seconds: float) -> dict[str, Any]:
    """Capacity, then open-loop arrivals at 2x and 5x it, then recovery at half of it."""
    sys.path.insert(0, str(ROOT / "bench"))
    from loadgen import closed_loop, open_loop

    # A camera-sized frame (decoded and resized by the ingress) keeps capacity within what
    # one Python load generator on the same cores can offer at 5x.
    from visionfleet.datasets.synth import render_sample
    from visionfleet.imaging import encode_image

    frame = encode_image(render_sample(2, 2, 320)[0], "jpeg")
    make = lambda i: (frame, {"Content-Type": "image/jpeg"})  # noqa: E731
    cap = closed_loop(url, make, 16, seconds, warmup=1.0).throughput
    _log(f"capacity {cap:.1f} req/s")
    # Open-loop phases last at most 15 s: with adaptive batching the capacity here is
    # ~150 req/s, and 5x that from one Python client on the same 2 cores is more than
    # client and server together can parse; the unsent backlog of a 60 s phase then
    # took over 10 minutes to drain (measured 2026-11-27: ~50 req/s answered under the
    # flood, the same as before adaptive batching at its lower 5x rate).
    phase = min(seconds, 15.0)
    out: dict[str, Any] = {"scenario": "overload", "capacity_req_s": cap, "body_bytes": len(frame), "phase_s": phase}
    for factor in (2, 5):
        r = open_loop(url, make, cap * factor, phase, max_connections=128)
        out[f"x{factor}"] = {**r.__dict__, "offered_req_s": cap * factor}
        _log(f"x{factor} phase done")
    r = open_loop(url, make, max(1.0, cap * 0.5), phase, max_connections=128)
    out["recovery_x0.5"] = r.__dict__
    return out


def remove_node(cluster: Any, node: Any, url: str, body: bytes, seconds: float, rate: float) -> dict[str, Any]:
    """One of the two worker nodes (one replica each) is removed under load."""
    _wait_replicas(2)
    load = Load(url, body, rate)
    load.start()
    time.sleep(seconds / 3)
    t_cut = time.perf_counter()
    cluster.remove_node(node)
    back = _wait_replicas(2, timeout=120)
    t_back = time.perf_counter()
    _log(f"node removed; 2 replicas back after {back:.1f}s")
    time.sleep(max(0.0, seconds * 2 / 3 - back))
    load.stop()
    _log("load stopped")
    return {"scenario": "remove-node", "replicas_back_s": back, "before": load.summary(until=t_cut),
            "during": load.summary(since=t_cut, until=t_back), "after": load.summary(since=t_back), "all": load.summary()}


def single_node_scenarios(url: str, body: bytes, wanted: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """kill-replica, unhealthy and overload, in that order, on the deployed app at ``url``."""
    import urllib.request

    results: dict[str, Any] = {}
    for _ in range(5):  # warm both replicas
        urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"}), timeout=60).read()
    _log("deployed and warm")
    if "kill-replica" in wanted:
        results["kill-replica"] = kill_replica(url, body, args.seconds, args.rate)
        _log("kill-replica done")
    if "unhealthy" in wanted:
        results["unhealthy"] = unhealthy(url, body, args.seconds, args.rate)
        _log("unhealthy done")
    if "overload" in wanted:
        results["overload"] = overload(url, body, args.overload_seconds or max(5.0, args.seconds / 2))
        _log("overload done")
    return results


def on_multinode(home: Path, args: argparse.Namespace, body: bytes, wanted: list[str]) -> dict[str, Any]:
    """A head and two worker nodes (``ray.cluster_utils.Cluster``), one replica per worker;
    the single-node scenarios first (when asked for), remove-node last."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.local import free_port, runtime_env
    from visionfleet.settings import Settings

    s = Settings.from_env(home)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    _log("3-node cluster up")
    ray.init(address=cluster.address, runtime_env=runtime_env(s), logging_level="WARNING")
    port = free_port()
    try:
        _deploy(home, args.model, replicas=2, per_node=1, port=port, health_check_period_s=args.health_check_period)
        url = f"http://127.0.0.1:{port}/v1/predict"
        _wait_replicas(2)
        _log("deployed on 2 workers")
        results = single_node_scenarios(url, body, [w for w in wanted if w != "remove-node"], args)
        if "remove-node" in wanted:
            results["remove-node"] = remove_node(cluster, workers[0], url, body, args.seconds, args.rate)
        return results
    finally:
        # the driver exits next: shutting Ray down stops Serve with it (no graceful drain needed)
        ray.shutdown()
        cluster.shutdown()
        _log("cluster down")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--scenarios", default="kill-replica,unhealthy,overload")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--health-check-period", type=float, default=2.0,
                    help="the replicas' Serve health-check period (s): how soon an unhealthy one is noticed")
    ap.add_argument("--overload-seconds", type=float, default=None,
                    help="length of the capacity, 2x, 5x and recovery phases (default: max(5, --seconds / 2), at most 15)")
    ap.add_argument("--one-cluster", action="store_true",
                    help="run every scenario on the multi-node cluster (one Ray, one deploy; remove-node last)")
    args = ap.parse_args()
    home = args.home.resolve()
    os.environ["VISIONFLEET_HOME"] = str(home)
    from visionfleet.datasets.synth import render_sample
    from visionfleet.imaging import encode_image

    body = encode_image(render_sample(1, 1, 48)[0], "png")
    wanted = args.scenarios.split(",")
    if args.one_cluster or "remove-node" in wanted and len(wanted) == 1:
        results = on_multinode(home, args, body, wanted)
    else:
        results = {}
        if "remove-node" in wanted:
            results.update(on_multinode(home, args, body, ["remove-node"]))
        single = [w for w in wanted if w != "remove-node"]
        if single:
            import ray

            from cluster.local import free_port, init_embedded
            from visionfleet.settings import Settings

            _log("starting Ray")
            init_embedded(Settings.from_env(home), num_cpus=2)
            _log("Ray up; deploying")
            port = free_port()
            try:
                _deploy(home, args.model, replicas=2, per_node=None, port=port, health_check_period_s=args.health_check_period)
                results.update(single_node_scenarios(f"http://127.0.0.1:{port}/v1/predict", body, single, args))
            finally:
                ray.shutdown()  # stops Serve with it; the driver exits next
                _log("Ray down")
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
