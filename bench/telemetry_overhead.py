"""Telemetry's cost to serving throughput: sink on vs off, alternating pairs (issue 7).

    .venv/bin/python bench/telemetry_overhead.py --home .visionfleet --pairs 5 --duration 8

Telemetry is paused and resumed through ``reconfigure`` (no restart), so both sides run
on the same replicas; each side is a closed loop at concurrency 16 on the demo model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import closed_loop  # noqa: E402


def _server_cpu_s() -> float:
    """User + system CPU seconds of this process's descendants (the embedded Ray's processes)."""
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=Path(".visionfleet"))
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results" / f"telemetry_overhead-{_dt.date.today()}.json")
    args = ap.parse_args()
    home = args.home.resolve()
    os.environ["VISIONFLEET_HOME"] = str(home)

    import ray
    from ray import serve

    from cluster.local import free_port, init_embedded, wait_http
    from serve_apps.config import AppConfig
    from serve_apps.deploy import apply_telemetry, deploy
    from visionfleet.datasets.synth import render_sample
    from visionfleet.imaging import encode_image
    from visionfleet.registry import Registry
    from visionfleet.settings import Settings

    demo = str(Registry.from_settings(Settings.from_env(home)).resolve("demo"))
    init_embedded(Settings.from_env(home))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(AppConfig(home=str(home), default_model="demo", admin_token="bench"), http={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    assert wait_http(f"{url}/healthz")
    img = encode_image(render_sample(3, 3, 64)[0], "png")
    make = lambda i: (img, {"Content-Type": "image/png"})  # noqa: E731
    closed_loop(f"{url}/v1/predict", make, 8, 3.0, warmup=1.0)
    on, off, ratios = [], [], []
    cpu_on, cpu_off, cpu_ratios = [], [], []
    try:
        for i in range(args.pairs):
            order = (True, False) if i % 2 == 0 else (False, True)
            got, cpu = {}, {}
            for flag in order:
                apply_telemetry(home, flag)
                c0 = _server_cpu_s()
                r = closed_loop(f"{url}/v1/predict", make, args.concurrency, args.duration)
                # CPU seconds of every process of this Ray (proxy, ingress, replicas, sink,
                # raylet, GCS) per answered request: what telemetry costs, whatever else
                # runs on the shared machine (the load generator is this process: excluded)
                cpu[flag] = (_server_cpu_s() - c0) * 1000 / max(r.ok, 1)
                got[flag] = r.throughput
            on.append(got[True])
            off.append(got[False])
            ratios.append(got[True] / got[False])
            cpu_on.append(cpu[True])
            cpu_off.append(cpu[False])
            cpu_ratios.append(cpu[True] / cpu[False])
            print(f"pair {i + 1}: on {got[True]:.1f} req/s, off {got[False]:.1f} req/s, ratio {ratios[-1]:.3f}; "
                  f"server CPU {cpu[True]:.2f} vs {cpu[False]:.2f} ms/request", flush=True)
    finally:
        apply_telemetry(home, True)
        serve.shutdown()
        ray.shutdown()
    doc = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.uname()._asdict(),
        "cpus": os.cpu_count(),
        "model": demo,
        "concurrency": args.concurrency,
        "on_req_s": on,
        "off_req_s": off,
        "ratio_on_off": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)},
        "cost_pct": round((1 - statistics.median(ratios)) * 100, 2),
        "server_cpu_ms_per_request_on": cpu_on,
        "server_cpu_ms_per_request_off": cpu_off,
        "cpu_ratio_on_off": {"median": statistics.median(cpu_ratios), "min": min(cpu_ratios), "max": max(cpu_ratios),
                             "n": len(cpu_ratios)},
        "cpu_cost_pct": round((statistics.median(cpu_ratios) - 1) * 100, 2),
        "load_avg_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    r = doc["ratio_on_off"]
    c = doc["cpu_ratio_on_off"]
    print(f"server CPU per request on / off: median {c['median']:.3f} (min {c['min']:.3f}, max {c['max']:.3f}) "
          f"-> telemetry costs {doc['cpu_cost_pct']}% more CPU per request")
    print(f"\ntelemetry on / off: median {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}) over {r['n']} pairs "
          f"-> cost {doc['cost_pct']}% of throughput; json: {args.out}")


if __name__ == "__main__":
    main()
