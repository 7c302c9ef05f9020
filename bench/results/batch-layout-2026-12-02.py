"""Which batcher in the replicas layout: ingress adaptive only, replica @serve.batch only, or both stacked.

Run from a checkout root with its venv: python /tmp/bl/batch_layout.py --home H --mode proxy
"""
import argparse, json, os, statistics, sys, time
from pathlib import Path
ROOT = Path.cwd()
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
from loadgen import closed_loop
ap = argparse.ArgumentParser(); ap.add_argument("--home", type=Path); ap.add_argument("--mode", default="proxy")
ap.add_argument("--rounds", type=int, default=5); ap.add_argument("--duration", type=float, default=6.0)
ap.add_argument("--out", type=Path)
args = ap.parse_args()
home = args.home.resolve(); os.environ["VISIONFLEET_HOME"] = str(home)
import serve_bench as sb
from cluster.local import free_port
from serve_apps.deploy import apply_batching
from serve_apps.config import ReplicaUserConfig
from visionfleet.registry import Registry
reg = Registry(home / "registry"); demo = str(reg.resolve("demo")); heavy = str(reg.resolve("heavy"))
ports = {k: free_port() for k in ("visionfleet", "fastapi", "fastapi_heavy", "bentoml", "bentoml_heavy")}
srv = sb.Servers(home, demo, heavy, ports, 2, args.mode, "replicas"); srv.start(False)
vf = f"http://127.0.0.1:{ports['visionfleet']}"; img = sb._image(64)
raw = lambda i: (img, {"Content-Type": "application/octet-stream"})
configs = {"ingress_only": (16, 1), "replica_only": (1, 16), "both": (16, 16)}
res = {k: [] for k in configs}
try:
    closed_loop(f"{vf}/v1/predict", raw, 4, 2.0, warmup=0.5)
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for k in order:
            ing, rep = configs[k]
            apply_batching(home, replica=ReplicaUserConfig(max_batch_size=rep, batch_wait_timeout_s=0.0),
                           ingress_max_batch_size=ing, ingress_batch_wait_timeout_s=0.0)
            time.sleep(1.0)
            res[k].append(closed_loop(f"{vf}/v1/predict", raw, 16, args.duration).throughput)
finally:
    srv.stop()
doc = {k: {"req_s": v, "median": statistics.median(v)} for k, v in res.items()}
doc["ratio_ingress_only_vs_replica_only"] = [a / b for a, b in zip(res["ingress_only"], res["replica_only"])]
doc["ratio_ingress_only_vs_both"] = [a / b for a, b in zip(res["ingress_only"], res["both"])]
print(json.dumps(doc, indent=1))
if args.out: args.out.write_text(json.dumps(doc, indent=1))
