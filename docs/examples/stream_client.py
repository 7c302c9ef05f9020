"""Stream frames over the WebSocket route and print the predictions in order.

Usage: python docs/examples/stream_client.py [ws://HOST:PORT] [MODEL]
"""

import json
import sys

from websockets.sync.client import connect

from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image

base = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8000"
model = sys.argv[2] if len(sys.argv) > 2 else "demo"
frames = [encode_image(render_sample(0, i, 64)[0], "jpeg") for i in range(10)]

with connect(f"{base}/v1/stream?model={model}&max_in_flight=4") as ws:
    ready = json.loads(ws.recv())  # {"type": "ready", "max_in_flight": 4, ...}
    window = ready["max_in_flight"]
    sent = received = 0
    while received < len(frames):
        while sent < len(frames) and sent - received < window:  # keep at most `window` unanswered
            ws.send(frames[sent])
            sent += 1
        answer = json.loads(ws.recv())
        received += 1
        print(answer["frame"], answer.get("label"), round(answer.get("score", 0), 3))
    ws.send(json.dumps({"type": "close"}))
    summary = json.loads(ws.recv())
    print("summary:", summary["frames"], "frames,", summary["ok"], "ok, p50", round(summary["latency_ms"]["p50"], 1), "ms")
