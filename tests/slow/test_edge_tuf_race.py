"""Two publisher *processes* (two nodes: own homes, nothing shared but S3, PostgreSQL and the key
folder) sign into one TUF repository at once; every publish lands, no version is signed twice."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_UNIT = str(Path(__file__).resolve().parents[1] / "unit")


def _node(store: str, db: str, keys: str, home: str, name: str, n: int, env: dict, q) -> None:  # noqa: ANN001
    os.environ.update(env)
    sys.path.insert(0, _UNIT)
    from test_edge_tuf_shared import publish_many

    publish_many(store, db, keys, home, name, n)
    q.put(name)


def test_two_publisher_processes_both_land(s3_env: str, pg_url: str, tmp_path: Path) -> None:
    sys.path.insert(0, _UNIT)
    from test_edge_tuf_shared import check_both_landed

    from edge_export.tuf_repo import TufRepository

    keys = tmp_path / "keys"
    repo = TufRepository(store=f"{s3_env}/tuf", db=pg_url, keys_dir=keys, work_dir=tmp_path / "n0")
    repo.init()
    n = 6
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_node, args=(f"{s3_env}/tuf", pg_url, str(keys), str(tmp_path / name), name, n, env, q))
             for name in ("alpha", "beta")]
    for p in procs:
        p.start()
    done = {q.get(timeout=300), q.get(timeout=300)}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert done == {"alpha", "beta"}
    check_both_landed(repo, ["alpha", "beta"], n, tmp_path / "client")
