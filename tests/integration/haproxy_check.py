"""Exercise the app in the `haproxy` ingress mode (Serve direct ingress behind HAProxy).

Run in a subprocess with its own Ray: python tests/integration/haproxy_check.py HOME MODEL
Prints one JSON document with what each check saw.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    home, model = Path(sys.argv[1]).resolve(), sys.argv[2]
    os.environ["VISIONFLEET_HOME"] = str(home)
    import httpx
    import numpy as np
    import ray
    from ray import serve
    from websockets.sync.client import connect

    from cluster.local import free_port, init_embedded, wait_http
    from serve_apps.config import AppConfig, IngressConfig
    from serve_apps.deploy import deploy
    from visionfleet.datasets.synth import render_sample
    from visionfleet.imaging import encode_image
    from visionfleet.settings import Settings

    init_embedded(Settings.from_env(home), num_cpus=2, ingress_mode="haproxy")
    port = free_port()
    out: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(AppConfig(home=str(home), default_model=model, admin_token="hp"), http={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        out["healthy"] = wait_http(f"{url}/healthz", timeout=180)
        img = encode_image(render_sample(4, 4, 48)[0], "png")
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/predict", content=img, headers={"Content-Type": "image/png"})
            out["predict"] = [r.status_code, r.json().get("label")]
            r = c.post("/v1/predict", content=b"junk", headers={"Content-Type": "image/png"})
            out["bad_input"] = [r.status_code, r.json()]
            x = np.zeros((1, 8, 8, 3), np.uint8)
            body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "UINT8", "data": x.flatten().tolist()}]})
            r = c.post(f"/v2/models/{model}/infer", content=body, headers={"Content-Type": "application/json"})
            out["v2"] = [r.status_code, r.json()["outputs"][0]["shape"]]
            versions = c.get(f"/v1/models/{model}").json()
            v = versions["version"]
            spec = {"name": "hp-exp", "model": model, "sticky": True,
                    "arms": [{"name": "control", "model": f"{model}:{v}", "weight": 1}, {"name": "treatment", "model": f"{model}:{v}", "weight": 1}]}
            r = c.post("/v1/experiments", json=spec, headers={"Authorization": "Bearer hp"})
            out["same_version_refused"] = r.status_code
            out["stats"] = c.get("/v1/stats").json()["ingress"]["max_batch_size"]
        with connect(url.replace("http://", "ws://") + f"/v1/stream?model={model}&max_in_flight=2") as ws:
            ready = json.loads(ws.recv(timeout=60))
            ws.send(img)
            answer = json.loads(ws.recv(timeout=60))
            ws.send(json.dumps({"type": "close"}))
            summary = json.loads(ws.recv(timeout=60))
            out["stream"] = [ready["type"], answer["type"], summary["frames"]]
        # the fastest layout: the same app redeployed with the models inside the ingress
        deploy(AppConfig(home=str(home), default_model=model, admin_token="hp", ingress=IngressConfig(inference_in="ingress")),
               http={"host": "127.0.0.1", "port": port})
        with httpx.Client(base_url=url, timeout=60) as c:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the old ingress replica drains, the new one takes over
                stats = c.get("/v1/stats")
                if stats.status_code == 200 and stats.json()["ingress"].get("inference_in") == "ingress":
                    break
                time.sleep(0.5)
            r = c.post("/v1/predict", content=img, headers={"Content-Type": "image/png"})
            r2 = c.post(f"/v2/models/{model}/infer", content=body, headers={"Content-Type": "application/json"})
            stats = c.get("/v1/stats").json()
            out["in_ingress"] = {"predict": [r.status_code, r.json().get("label")], "v2": r2.status_code,
                                 "inference_in": stats["ingress"]["inference_in"], "loaded": stats["replica"].get("loaded"),
                                 "deployments": sorted(serve.status().applications["visionfleet"].deployments)}
        import psutil

        # this Ray's processes only (started by this driver), not other Rays on the machine
        ours = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
        out["ray_processes"] = len(ours)
        out["haproxy"] = any("/haproxy " in c or c.endswith("/haproxy") for c in ours)
        out["haproxy_manager"] = any("HAProxyManager" in c for c in ours)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
