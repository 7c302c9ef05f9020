"""edge_agent: the device runtime of visionfleet (light install: no torch, ray or pyarrow).

Modules, each imported where it is needed so ``visionfleet-edge --help`` starts fast:

* ``agent``   — :class:`~edge_agent.agent.Agent`: offline inference loop + network loop
* ``bundle``  — read, verify, load and health-check a bundle folder
* ``store``   — install next to the current model, health check, atomic swap, rollback
* ``outbox``  — the durable SQLite outbox (WAL, synchronous=FULL)
* ``ota``     — TUF-verified updates (``tuf.ngclient``) and the cohort decision
* ``net``     — urllib JSON posts, a urllib fetcher for ``tuf.ngclient``, jittered backoff
* ``predict`` — one frame through the server's own preprocessing and output decoding
* ``sources`` — folders (watched), video files, cameras
* ``durable`` — write, fsync, rename, fsync the directory
* ``rollout`` — stable device cohorts
"""

__all__: list[str] = []
