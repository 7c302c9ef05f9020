"""Names shared across rooms: Ray actor and app names, the artifact contract's tensor names.

One place, so that a room never imports another room only to learn a name (``train``
looks up the telemetry sink by name without importing ``serve_apps``; ``cluster``
writes the Serve config without importing Ray Serve's runtime).
"""

from __future__ import annotations

__all__ = [
    "RAY_NAMESPACE",
    "APP_NAME",
    "SINK_NAME",
    "COORDINATOR_NAME",
    "INGRESS_DEPLOYMENT",
    "REPLICA_DEPLOYMENT",
    "APP_IMPORT_PATH",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "DETECTION_OUTPUTS",
]

RAY_NAMESPACE = "visionfleet"
APP_NAME = "visionfleet"  # the Serve application
SINK_NAME = "visionfleet-telemetry"  # the TelemetrySink actor (detached, named)
COORDINATOR_NAME = "visionfleet-experiments"  # the ExperimentCoordinator actor (detached, named)
INGRESS_DEPLOYMENT = "Ingress"
REPLICA_DEPLOYMENT = "ModelReplica"
APP_IMPORT_PATH = "serve_apps.app:app_builder"

# The artifact contract (docs/architecture.md): a model takes uint8 NHWC `images` and
# returns `probs` (classification) or `boxes`, `scores`, `classes` (detection), in this order.
INPUT_NAME = "images"
OUTPUT_NAME = "probs"
DETECTION_OUTPUTS = ("boxes", "scores", "classes")
