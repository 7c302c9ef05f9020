"""Build the Serve config and a KubeRay RayService for visionfleet from Python.

Usage: python docs/examples/serve_config.py [OUT_DIR]   (writes serve.yaml and rayservice.yaml)
"""

import sys
from pathlib import Path

from cluster.kuberay import RayServiceOptions, manifest_yaml, rayservice_manifest, serve_config_of
from cluster.serve_config import ServeConfigOptions, app_config_from_serve_config, serve_config, to_yaml
from serve_apps.config import AppConfig, ArmConfig, ExperimentConfig, IngressUserConfig, ReplicaConfig

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")

# The app, as every replica will see it: the state dir is the volume mounted in the pods.
# Four replicas, at most two per node: Serve spreads them over at least two nodes.
replica = ReplicaConfig(num_replicas=4, num_cpus=1, max_replicas_per_node=2)
app = AppConfig(home="/srv/visionfleet", default_model="demo", replica=replica)
# An A/B test that starts with the deployment (re-applying the file only reconfigures).
experiment = ExperimentConfig(
    name="int8-vs-fp32",
    model="demo",
    arms=[ArmConfig(name="control", model="demo:1", weight=90), ArmConfig(name="treatment", model="demo:2", weight=10)],
)
doc = serve_config(app, ServeConfigOptions(host="0.0.0.0", port=8000), user=IngressUserConfig(experiments=[experiment]))
assert app_config_from_serve_config(doc) == app  # `args` parse back to the same AppConfig
(out / "serve.yaml").write_text(to_yaml(doc))

manifest = rayservice_manifest(doc, RayServiceOptions(image="registry.example.com/visionfleet:0.1.0", workers=2,
                                                      max_workers=4, worker_cpus=4, worker_memory="8Gi"))
assert serve_config_of(manifest) == doc  # spec.serveConfigV2 is the same document
(out / "rayservice.yaml").write_text(manifest_yaml(manifest))

workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
print("deployments:", [(d["name"], d["num_replicas"]) for d in doc["applications"][0]["deployments"]])
print("experiments:", [e["name"] for e in doc["applications"][0]["deployments"][0]["user_config"]["experiments"]])
print("RayService:", manifest["metadata"]["name"], "workers", workers["minReplicas"], "to", workers["maxReplicas"])
print("wrote", out / "serve.yaml", "and", out / "rayservice.yaml")
