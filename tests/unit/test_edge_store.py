"""The device's model store: install next to the current model, health check, atomic swap, rollback,
and SIGKILL at random points of an install (a small campaign; the full one is in tests/slow)."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from test_edge_bundle import toy_registry

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory):
    """Archives of toy:1 and toy:2 for x86-cpu, and of a signed-looking but broken toy:2."""
    from edge_export.bundle import export_bundle, pack_bundle
    from bench.fleet_sim import make_broken_bundle

    root = tmp_path_factory.mktemp("store")
    reg, _ = toy_registry(root, versions=2)
    b1, b2 = (export_bundle(reg, f"toy:{v}", "x86-cpu", out_dir=root / "bundles", golden=4, calibration=20)
              for v in (1, 2))
    bad = make_broken_bundle(b2, root / "bundles")
    return {name: pack_bundle(b, root / f"{name}.tar") for name, b in (("v1", b1), ("v2", b2), ("bad", bad))} | {
        "ids": {"v1": b1.name, "v2": b2.name, "bad": bad.name}}


def _home_on_v1(tmp_path: Path, archives) -> Path:
    from edge_agent.store import ModelStore

    home = tmp_path / "dev"
    assert ModelStore(home, threads=1).install_archive(archives["v1"]).outcome == "installed"
    return home


def test_install_swap_keep_last_good_and_roll_back(tmp_path: Path, archives) -> None:
    from edge_agent.store import ModelStore

    home = _home_on_v1(tmp_path, archives)
    st = ModelStore(home, threads=1)
    res = st.install_archive(archives["v2"], expect={"bundle_id": archives["ids"]["v2"], "version": 2})
    assert res.outcome == "installed" and res.previous == archives["ids"]["v1"] and res.health["ok"]
    assert (st.current_id(), st.previous_id()) == (archives["ids"]["v2"], archives["ids"]["v1"])
    assert sorted(p.name for p in st.models.iterdir()) == sorted([archives["ids"]["v1"], archives["ids"]["v2"]])
    assert st.install_archive(archives["v2"]).outcome == "already_current"
    assert st.rollback("operator") == archives["ids"]["v1"]
    active = ModelStore(home, threads=1).open()
    assert active.bundle_id == archives["ids"]["v1"]
    assert [e["event"] for e in st.state()["events"]][-2:] == ["installed", "rolled_back"]


def test_a_bundle_failing_its_health_check_is_not_swapped_in(tmp_path: Path, archives) -> None:
    from edge_agent.store import ModelStore

    home = _home_on_v1(tmp_path, archives)
    st = ModelStore(home, threads=1)
    res = st.install_archive(archives["bad"])
    assert res.outcome == "health_failed" and "golden outputs not reproduced" in res.error
    assert st.current_id() == archives["ids"]["v1"]
    assert not (st.models / archives["ids"]["bad"]).exists()
    assert ModelStore(home, threads=1).open().bundle_id == archives["ids"]["v1"]


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_hostile_archives_are_refused(tmp_path: Path, archives) -> None:
    from edge_agent.store import ModelStore

    home = _home_on_v1(tmp_path, archives)
    st = ModelStore(home, threads=1)
    escape = tarfile.TarInfo("../../evil.txt")
    escape.size = 4
    link = tarfile.TarInfo("model.onnx")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    for name, members in (("escape", [(escape, b"evil")]), ("link", [(link, None)])):
        res = st.install_archive(_tar(tmp_path / f"{name}.tar", members))
        assert res.outcome == "invalid", res
    assert not (tmp_path / "evil.txt").exists() and not (home.parent / "evil.txt").exists()
    res = st.install_archive(archives["v2"], expect={"version": 3})  # not what the signed metadata said
    assert res.outcome == "invalid" and "signed metadata says 3" in res.error
    assert st.current_id() == archives["ids"]["v1"] and not list(st.models.glob(".staging-*"))


def test_recovery_falls_back_to_the_last_good_model(tmp_path: Path, archives) -> None:
    from edge_agent.store import ModelStore

    home = _home_on_v1(tmp_path, archives)
    st = ModelStore(home, threads=1)
    st.install_archive(archives["v2"])
    (st.models / ".staging-leftover").mkdir()
    model_file = st.models / archives["ids"]["v2"] / "model.int8.onnx"
    model_file.write_bytes(model_file.read_bytes()[:100])  # a damaged current model
    active = ModelStore(home, threads=1).open()
    assert active.bundle_id == archives["ids"]["v1"]
    assert any("does not verify" in n for n in active.notes)
    assert not (st.models / ".staging-leftover").exists()


_INSTALL = """
import sys
from edge_agent.store import ModelStore
st = ModelStore(sys.argv[1], threads=1)
st.recover()
print("go", flush=True)
print(st.install_archive(sys.argv[2]).outcome, flush=True)
"""


def kill_campaign(tmp_path: Path, archives: dict, kills: int, seed: int = 0) -> dict[str, int]:
    """SIGKILL an install at random moments; after each, the device must come up on v1 or v2, verified.

    Each round restarts from a device on v1; the kill lands uniformly in the install's
    duration (measured once without a kill), after the process said it started.
    """
    from edge_agent.bundle import verify_files
    from edge_agent.store import ModelStore

    template = _home_on_v1(tmp_path / "template", archives)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(home: Path) -> tuple[subprocess.Popen, float]:
        p = subprocess.Popen([sys.executable, "-c", _INSTALL, str(home), str(archives["v2"])],
                             stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        assert p.stdout.readline().strip() == "go"
        return p, time.perf_counter()

    home = tmp_path / "timing"
    shutil.copytree(template, home)
    p, t0 = start(home)
    assert p.stdout.readline().strip() == "installed"
    p.wait()
    duration = time.perf_counter() - t0
    rng = random.Random(seed)
    seen = {"old": 0, "new": 0}
    for k in range(kills):
        home = tmp_path / f"k{k}"
        shutil.copytree(template, home)
        p, t0 = start(home)
        time.sleep(rng.uniform(0, duration * 1.1))
        p.send_signal(signal.SIGKILL)
        p.wait()
        active = ModelStore(home, threads=1).open()  # the restart
        assert active is not None, f"kill {k}: no model after restart"
        assert active.bundle_id in (archives["ids"]["v1"], archives["ids"]["v2"])
        verify_files(active.path)
        assert active.health.ok
        seen["new" if active.bundle_id == archives["ids"]["v2"] else "old"] += 1
        shutil.rmtree(home)
    seen["install_s"] = round(duration, 3)  # type: ignore[assignment]
    return seen


def test_sigkill_during_install_always_comes_up_on_a_verified_model(tmp_path: Path, archives) -> None:
    seen = kill_campaign(tmp_path, archives, kills=4)
    print(json.dumps(seen))
    assert seen["old"] + seen["new"] == 4
