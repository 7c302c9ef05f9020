"""The write order that survives a real power cut, shown by recording the system calls.

SIGKILL keeps the page cache, so a kill test cannot show that data reached the disk.
These tests record every ``os.open/write/fsync/close/rename/replace`` of an atomic
write and of a whole bundle install, and check the order: each file written and
fsynced before it is renamed or its folder is, each rename followed by an fsync of the
directory that holds the new name, and the switch (``state.json``) last.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_edge_bundle import toy_registry


class Recorder:
    """A stand-in for the ``os`` module that logs the calls that matter and passes them on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fds: dict[int, str] = {}

    def __getattr__(self, name: str):
        return getattr(os, name)

    def open(self, path, flags, mode=0o777, *a, **k):
        fd = os.open(path, flags, mode, *a, **k)
        self.fds[fd] = os.fspath(path)
        self.calls.append(("open", os.fspath(path)))
        return fd

    def write(self, fd, data):
        self.calls.append(("write", self.fds.get(fd, "?")))
        return os.write(fd, data)

    def fsync(self, fd):
        self.calls.append(("fsync", self.fds.get(fd, "?")))
        return os.fsync(fd)

    def close(self, fd):
        self.calls.append(("close", self.fds.pop(fd, "?")))
        return os.close(fd)

    def replace(self, src, dst):
        self.calls.append(("rename", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        return os.replace(src, dst)

    def rename(self, src, dst):
        self.calls.append(("rename", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        return os.rename(src, dst)


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    import edge_agent.durable as D
    import edge_agent.store as S

    r = Recorder()
    monkeypatch.setattr(D, "os", r)
    monkeypatch.setattr(S, "os", r)
    return r


def _index(calls, kind: str, pred) -> int:
    for i, (k, arg) in enumerate(calls):
        if k == kind and pred(arg):
            return i
    raise AssertionError(f"no {kind} matching in {calls}")


def test_atomic_write_order(tmp_path: Path, rec: Recorder) -> None:
    from edge_agent.durable import atomic_write

    target = tmp_path / "state.json"
    atomic_write(target, b"{}")
    kinds = [k for k, _ in rec.calls]
    assert kinds == ["open", "write", "fsync", "close", "rename", "open", "fsync", "close"]
    tmp = rec.calls[0][1]
    assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".state.json.tmp-")
    assert rec.calls[2] == ("fsync", tmp)  # the file's data, before its name moves
    assert rec.calls[4] == ("rename", f"{tmp} -> {target}")
    assert rec.calls[6] == ("fsync", str(tmp_path))  # then the directory entry
    assert target.read_bytes() == b"{}"


def test_install_write_order_survives_a_power_cut(tmp_path: Path, rec: Recorder, monkeypatch) -> None:
    from edge_export.bundle import export_bundle, pack_bundle
    from edge_agent.store import ModelStore

    reg, _ = toy_registry(tmp_path / "r")
    archive = pack_bundle(export_bundle(reg, "toy:1", "x86-cpu", out_dir=tmp_path / "b", golden=4, calibration=20),
                          tmp_path / "b.tar")
    home = tmp_path / "dev"
    store = ModelStore(home, threads=1)
    rec.calls.clear()
    res = store.install_archive(archive)
    assert res.outcome == "installed"
    calls = rec.calls
    models = str(store.models)
    staging_files = [arg for k, arg in calls if k == "open" and "/.staging-" in arg and Path(arg).suffix]
    assert len(staging_files) >= 8  # bundle.json, card, model, golden.json, preprocessing, golden images
    # 1. every extracted file: written and fsynced before it is closed
    for f in staging_files:
        w, s, c = (_index(calls, k, lambda a, f=f: a == f) for k in ("write", "fsync", "close"))
        assert w < s < c, f
    # 2. the staging folder (and its golden/ sub-folder) fsynced after the files, before the rename
    rename_bundle = _index(calls, "rename", lambda a: "/.staging-" in a and a.endswith(res.bundle_id))
    staging = calls[rename_bundle][1].split(" -> ")[0]
    last_file_sync = max(_index(calls, "fsync", lambda a, f=f: a == f) for f in staging_files)
    dir_syncs = [i for i, (k, a) in enumerate(calls) if k == "fsync" and a in (staging, f"{staging}/golden")]
    assert len(dir_syncs) == 2 and all(last_file_sync < i < rename_bundle for i in dir_syncs)
    # 3. the rename into models/ made durable by an fsync of models/
    assert any(k == "fsync" and a == models for k, a in calls[rename_bundle + 1:rename_bundle + 4])
    # 4. the switch: state.json replaced after the bundle is in place, then the home folder fsynced
    switch = _index(calls, "rename", lambda a: a.endswith(" -> " + str(home / "state.json")))
    assert switch > rename_bundle
    tmp_state = calls[switch][1].split(" -> ")[0]
    assert _index(calls, "fsync", lambda a: a == tmp_state) < switch
    assert calls[switch + 2] == ("fsync", str(home))
