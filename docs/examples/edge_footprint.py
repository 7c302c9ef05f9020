"""What a bundle costs on this machine: agent memory, and single-thread latency per frame.

Usage: python docs/examples/edge_footprint.py BUNDLE [BUNDLE ...] [--rounds 7] [--frames 40]

* RSS: a real `visionfleet-edge run --once` process installs the bundle (health check
  included), predicts every frame of a folder and exits; its peak resident memory comes
  from os.wait4.
* latency: in this process, one ONNX Runtime thread, the agent's own path per frame
  (decode a 640x480 JPEG, resize as the card says, run). Bundles are measured in
  alternating rounds; the median over rounds is printed with the min-max.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_agent.bundle import load_bundle, read_manifest
from edge_agent.predict import predict_bytes, run_model
from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import ImageFormat, encode_image, load_for_model

parser = argparse.ArgumentParser()
parser.add_argument("bundles", nargs="+", type=Path)
parser.add_argument("--rounds", type=int, default=7)
parser.add_argument("--frames", type=int, default=40)
args = parser.parse_args()

work = Path(tempfile.mkdtemp(prefix="vf-footprint-"))
frames = work / "frames"
frames.mkdir()
jpegs = []
for i in range(args.frames):
    img, _ = render_sample(1, i, 480)
    img = img.repeat(2, axis=1)[:, :640]  # a 640x480 camera-sized frame
    jpegs.append(encode_image(img, ImageFormat.JPEG, quality=90))
    (frames / f"f{i:04d}.jpg").write_bytes(jpegs[-1])


# A child's ru_maxrss starts at its parent's at fork time, so the agent is started by a
# small launcher process, not by this one (which holds every model).
LAUNCH = "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); " \
         "_, status, ru = os.wait4(p.pid, 0); print(ru.ru_maxrss if status == 0 else -1)"


def peak_rss_mb(bundle: Path) -> float:
    cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--device-id", "footprint", "--home",
           str(work / f"home-{bundle.name}"), "--source", str(frames), "--bundle", str(bundle), "--once",
           "--threads", "1", "--quiet"]
    kib = int(subprocess.run([sys.executable, "-c", LAUNCH, *cmd], capture_output=True, text=True).stdout)
    if kib < 0:
        raise SystemExit(f"the agent failed on {bundle}")
    return kib / 1024  # ru_maxrss is in KiB on Linux


rss = {b: peak_rss_mb(b) for b in args.bundles}  # before this process loads any model


models = {b: load_bundle(b, threads=1) for b in args.bundles}
for m in models.values():  # warm-up: first runs allocate
    for data in jpegs[:5]:
        predict_bytes(m, data)
per_frame = {b: [] for b in args.bundles}
model_only = {b: [] for b in args.bundles}
for _ in range(args.rounds):
    for b, m in models.items():
        t0 = time.perf_counter()
        for data in jpegs:
            predict_bytes(m, data)
        per_frame[b].append((time.perf_counter() - t0) * 1000 / len(jpegs))
        img, _ = load_for_model(jpegs[0], tuple(m.card.input_size), m.card.resize)
        t0 = time.perf_counter()
        for _ in jpegs:
            run_model(m, img)
        model_only[b].append((time.perf_counter() - t0) * 1000 / len(jpegs))

for b in args.bundles:
    man = read_manifest(b)
    print(json.dumps({
        "bundle": man.bundle_id,
        "precision": man.precision,
        "model_mb": round((b / man.model_file).stat().st_size / 1e6, 3),
        "input": list(man.input_size),
        "frame_ms_median": round(statistics.median(per_frame[b]), 3),
        "frame_ms_min_max": [round(min(per_frame[b]), 3), round(max(per_frame[b]), 3)],
        "model_ms_median": round(statistics.median(model_only[b]), 3),
        "model_ms_min_max": [round(min(model_only[b]), 3), round(max(model_only[b]), 3)],
        "agent_peak_rss_mb": round(rss[b], 1),
    }))
