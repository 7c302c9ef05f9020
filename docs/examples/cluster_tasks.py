"""Drive the local multi-node cluster from Python: connect (token auth included), use every node.

Usage: visionfleet cluster up --workers 2 && python docs/examples/cluster_tasks.py
"""

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.multinode import ROLE_LABEL, connect_cluster
from visionfleet.settings import Settings

# Sets RAY_AUTH_MODE=token and the cluster's token file for this process, then ray.init.
info = connect_cluster(Settings.from_env())
print("connected to", info.gcs_address)


@ray.remote(num_cpus=0.1)
def where() -> str:
    return ray.get_runtime_context().get_node_id()


nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
for node_id, node in sorted(nodes.items(), key=lambda kv: kv[1]["NodeName"]):
    pinned = where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    ran_on = ray.get(pinned.remote(), timeout=120)
    role = node["Labels"].get(ROLE_LABEL)
    print(f"{node['NodeName']}: role={role} CPU={node['Resources'].get('CPU', 0):g} ran_here={ran_on == node_id}")

# Node labels select by role: this task may only run on a worker node.
on_worker = ray.get(where.options(label_selector={ROLE_LABEL: "worker"}).remote(), timeout=120)
print("worker-only task ran on", nodes[on_worker]["NodeName"])
