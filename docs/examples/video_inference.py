"""Per-frame predictions for a video from Python, two frames per second, then the label segments.

Usage: python docs/examples/video_inference.py VIDEO MODEL OUT.jsonl
"""

import json
import sys

from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.registry import Registry
from visionfleet.settings import Settings
from visionfleet.video import Sampling, infer_video, probe_video

video, model_ref, out = sys.argv[1:4]

info = probe_video(video)  # raises NotAVideo for anything that is not a video container
print(f"{info.container.value} {info.codec} {info.width}x{info.height} @ {info.fps:g} fps, {info.frame_count} frames")

registry = Registry(Settings.from_env().registry_dir)
resolved = registry.resolve(model_ref)  # NAME[:VERSION|@ALIAS] -> one concrete version
model = load_model_dir(registry.local_dir(resolved.name, resolved.version), RuntimeOptions(threads=1))

summary = infer_video(video, model, out, sampling=Sampling(fps=2.0), batch_size=16, overwrite=True)
print(f"{summary.frames_inferred} of {summary.frames_seen} frames -> {summary.out}", end=" ")
print(f"({summary.frames_per_s:.0f} frames/s)")

# Collapse the per-frame labels into segments: [start_ms, label].
segments: list[tuple[float, str]] = []
with open(out) as fh:
    for line in fh:
        row = json.loads(line)
        if not segments or segments[-1][1] != row["label"]:
            segments.append((row["timestamp_ms"], row["label"]))
for start_ms, label in segments[:10]:
    print(f"{start_ms / 1000:7.2f} s  {label}")
