"""The registry with a database: versions allocated by INSERT, aliases as transactions."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from test_registry import _card, _tiny_onnx  # noqa: E402  (tests/unit is on sys.path under pytest)
from visionfleet.db import DatabaseError, open_db
from visionfleet.registry import Registry


def _worker(root: str, db_url: str, model: str, n: int, env: dict, q) -> None:  # noqa: ANN001
    import os

    os.environ.update(env)
    reg = Registry(root, db=db_url)
    d = Path(os.environ["VF_TMP"]) / f"w{os.getpid()}"
    d.mkdir()
    src = _tiny_onnx(d / "model.onnx")
    q.put([reg.register(_card(model), {"model": src}).version for _ in range(n)])


def _race(root: str, db_url: str, tmp_path: Path, env: dict) -> list[int]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    env = {**env, "VF_TMP": str(tmp_path)}
    procs = [ctx.Process(target=_worker, args=(root, db_url, "m", 10, env, q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = q.get(timeout=60) + q.get(timeout=60)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return got


def test_s3_store_and_sqlite_db_register_alias_visible_elsewhere(s3_env: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    reg = Registry(f"{s3_env}/registry", cache_dir=tmp_path / "cache", db=url)
    src = _tiny_onnx(tmp_path / "model.onnx")
    assert reg.register(_card(), {"model": src}).version == 1
    assert reg.register(_card(), {"model": src}).version == 2
    assert reg.versions("m") == [1, 2] and reg.list_models() == ["m"]
    assert reg.aliases("m") == {"production": 1}
    other = Registry(f"{s3_env}/registry", cache_dir=tmp_path / "cache2", db=url)
    assert reg.set_alias("m", "production", 2, reason="promote") == 1
    assert other.aliases("m") == {"production": 2}
    assert [h["to"] for h in other.alias_history("m")] == [1, 2]
    assert other.card("m", 2).version == 2
    assert (other.local_dir("m", 2) / "card.json").exists()
    assert other.remove_alias("m", "production") == 2 and other.aliases("m") == {}


def test_postgres_register_and_alias(pg_url: str, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", db=pg_url)
    src = _tiny_onnx(tmp_path / "model.onnx")
    assert [reg.register(_card(), {"model": src}).version for _ in range(3)] == [1, 2, 3]
    reg.set_alias("m", "candidate", 3)
    assert Registry(tmp_path / "reg", db=pg_url).aliases("m") == {"production": 1, "candidate": 3}


def test_two_processes_race_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    open_db(url).dispose()
    got = _race(str(tmp_path / "reg"), url, tmp_path, {})
    assert sorted(got) == list(range(1, 21))
    assert Registry(tmp_path / "reg", db=url).versions("m") == list(range(1, 21))


def test_two_processes_race_postgres(pg_url: str, tmp_path: Path) -> None:
    open_db(pg_url).dispose()
    got = _race(str(tmp_path / "reg"), pg_url, tmp_path, {})
    assert sorted(got) == list(range(1, 21))


def test_down_database_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DatabaseError) as e:
        Registry(tmp_path / "reg", db=f"postgresql+psycopg://vf:secret@127.0.0.1:{port}/vf")
    msg = str(e.value)
    assert msg.startswith(f"Got postgresql+psycopg://vf:***@127.0.0.1:{port}/vf for VISIONFLEET_DB")
    assert "could not connect" in msg and "secret" not in msg
