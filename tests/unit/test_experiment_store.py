"""Experiment state in the database: CAS decisions, races across coordinators, legacy import."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
from pathlib import Path

import onnx
import pytest
import sqlalchemy as sa
from onnx import TensorProto, helper

from serve_apps.experiments import Conflict, ExperimentCoordinator
from visionfleet.db.experiments import ExperimentStore, experiment_timeline
from visionfleet.experiments import ArmSummary
from visionfleet.registry import Registry
from visionfleet.settings import Settings
from visionfleet.spec import ModelCard


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the W&B view is not under test here


def _summaries(name: str, sticky: bool, arms: list[str]) -> dict[str, ArmSummary]:
    return {a: ArmSummary(name=a, n=10, labeled=10, correct=7) for a in arms}


def _settings(home: Path, db_url: str | None = None) -> Settings:
    s = Settings.from_env(home)
    return Settings(home=s.home, store=s.store, db_url=db_url) if db_url else s


def _coordinator(home: Path, db_url: str | None = None) -> ExperimentCoordinator:
    return ExperimentCoordinator(str(home), summaries=_summaries, reset=lambda n: None, apply=lambda uc: None,
                                 settings=_settings(home, db_url))


def _home_with_model(tmp_path: Path, db_url: str | None = None) -> Path:
    home = tmp_path / "home"
    m = tmp_path / "model.onnx"
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), str(m))
    reg = Registry.from_settings(_settings(home, db_url).ensure())
    for _ in range(2):
        reg.register(ModelCard(name="m", labels=["a", "b"], input_size=(32, 32)), {"onnx": m})
    return home


def _spec(name: str = "e1") -> dict:
    return {"name": name, "model": "m",
            "arms": [{"name": "control", "model": "m:1", "weight": 0.5}, {"name": "treatment", "model": "m:2", "weight": 0.5}]}


def test_lifecycle_lives_in_the_database_and_a_second_coordinator_sees_it(tmp_path: Path) -> None:
    home = _home_with_model(tmp_path)
    a = _coordinator(home)
    a.start(_spec())
    assert not (home / "experiments").exists()  # nothing on the node's disk
    b = _coordinator(home)  # another replica / a restarted coordinator
    assert [c.name for c in b.running()] == ["e1"]
    b.reweight("e1", {"control": 0.2, "treatment": 0.8})
    assert a.load("e1").weights() == pytest.approx({"control": 0.2, "treatment": 0.8})
    a.tick()
    doc = b.stop("e1", "promote", "treatment wins")
    assert doc["status"] == "promoted" and doc["decision"]["action"] == "promote"
    assert Registry.from_settings(Settings.from_env(home)).aliases("m")["production"] == 2
    assert len(a.timeline("e1")) == 2  # the tick's snapshot and the stop's
    assert a.list()[0]["status"] == "promoted"
    with pytest.raises(Conflict, match="already promoted"):
        a.stop("e1", "rollback")
    with pytest.raises(Conflict, match="already exists"):
        b.start(_spec())


def test_one_running_experiment_per_model_even_when_two_start_at_once(tmp_path: Path) -> None:
    home = _home_with_model(tmp_path)
    store = ExperimentStore(Settings.from_env(home).db_url)
    assert store.create(_spec("x") | {"status": "running"})
    assert not store.create(_spec("y") | {"status": "running"})  # the partial unique index
    assert store.create(_spec("z") | {"status": "stopped"})
    with pytest.raises(Conflict, match="already has a running experiment"):
        _coordinator(home).start(_spec("w"))


def test_update_is_compare_and_set(tmp_path: Path) -> None:
    store = ExperimentStore(f"sqlite:///{tmp_path}/s.db")
    store.create(_spec() | {"status": "running"})
    got = store.get("e1")
    assert got is not None and got.rev == 1
    assert store.update(got.doc | {"status": "stopped"}, 1)
    assert not store.update(got.doc | {"status": "promoted"}, 1)  # a stale revision loses
    assert store.get("e1").doc["status"] == "stopped"  # type: ignore[union-attr]


def _race_threads(home: Path, db_url: str | None, n: int = 4) -> list[str]:
    coords = [_coordinator(home, db_url) for _ in range(n)]
    results: list[str] = []
    barrier = threading.Barrier(n)

    def go(c: ExperimentCoordinator, action: str) -> None:
        barrier.wait()
        try:
            c.stop("e1", action, "race")
            results.append(action)
        except Conflict:
            results.append("conflict")

    ts = [threading.Thread(target=go, args=(c, "promote" if i % 2 else "rollback")) for i, c in enumerate(coords)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return results


def _assert_one_decision(home: Path, db_url: str | None, results: list[str]) -> None:
    winners = [r for r in results if r != "conflict"]
    assert len(winners) == 1, results
    c = _coordinator(home, db_url)
    assert c.load("e1").decision["action"] == winners[0]  # type: ignore[index]
    hist = [h for h in Registry.from_settings(c.settings).alias_history("m") if "experiment e1" in (h.get("reason") or "")]
    assert len(hist) == 1, hist  # the alias moved once
    assert Registry.from_settings(c.settings).aliases("m")["production"] == (2 if winners[0] == "promote" else 1)


def test_two_coordinators_racing_apply_one_decision_sqlite(tmp_path: Path) -> None:
    home = _home_with_model(tmp_path)
    _coordinator(home).start(_spec())
    _assert_one_decision(home, None, _race_threads(home, None))


def test_two_coordinators_racing_apply_one_decision_postgres(tmp_path: Path, pg_url: str) -> None:
    home = _home_with_model(tmp_path, pg_url)
    _coordinator(home, pg_url).start(_spec())
    _assert_one_decision(home, pg_url, _race_threads(home, pg_url))


def _stop_in_process(home: str, action: str, barrier, out) -> None:  # noqa: ANN001 - mp objects
    import os

    os.environ["WANDB_MODE"] = "disabled"
    c = _coordinator(Path(home))
    barrier.wait()
    try:
        c.stop("e1", action, "race")
        out.put(action)
    except Conflict:
        out.put("conflict")


@pytest.mark.slow  # 10-60 s; `make test` keeps the smaller sibling tests of this file
def test_two_processes_racing_apply_one_decision(tmp_path: Path) -> None:
    home = _home_with_model(tmp_path)
    _coordinator(home).start(_spec())
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    ps = [ctx.Process(target=_stop_in_process, args=(str(home), a, barrier, out)) for a in ("promote", "rollback")]
    for p in ps:
        p.start()
    results = [out.get(timeout=120) for _ in ps]
    for p in ps:
        p.join(60)
    _assert_one_decision(home, None, results)


def test_legacy_files_are_imported_once(tmp_path: Path) -> None:
    home = _home_with_model(tmp_path)
    legacy = home / "experiments" / "old"
    legacy.mkdir(parents=True)
    doc = _spec("old") | {"status": "running", "started_at": 1.0}
    (legacy / "experiment.json").write_text(json.dumps(doc))
    rows = [{"t": 1.0, "at": 2.0, "weights": {"control": 0.5, "treatment": 0.5}}, {"t": 2.0, "at": 3.0, "weights": {}}]
    (legacy / "timeline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = _coordinator(home)
    assert [c.name for c in a.running()] == ["old"]
    assert a.timeline("old") == rows
    _coordinator(home)  # opening again imports nothing twice
    store = ExperimentStore(Settings.from_env(home).db_url)
    with store.db.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(experiment_timeline)).scalar() == 2
    assert store.import_legacy(home / "experiments") == []
    a.stop("old")
    assert a.load("old").status == "stopped"
