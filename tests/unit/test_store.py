"""The storage interface (visionfleet.store) on a local dir and on a real S3-API server (moto),
and the settings that place each area of state."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionfleet.settings import Settings
from visionfleet.store import StoreError, StoreUnavailable, open_store


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_env") + "/prefix"


def test_round_trip_list_delete(store_uri: str) -> None:
    st = open_store(store_uri)
    st.check()
    st.write_bytes("a/b/one.bin", b"1" * 10)
    st.write_bytes("a/two.bin", b"22")
    assert st.read_bytes("a/b/one.bin") == b"1" * 10
    assert st.exists("a/two.bin") and not st.exists("a/none.bin")
    files = {k: size for k, size, is_dir in st.list("a", recursive=True) if not is_dir}
    assert files == {"a/b/one.bin": 10, "a/two.bin": 2}
    child = st.child("a/b")
    assert child.read_bytes("one.bin") == b"1" * 10
    st.write_bytes("a/two.bin", b"333")  # replaced whole
    assert st.read_bytes("a/two.bin") == b"333"
    st.delete("a/two.bin")
    assert not st.exists("a/two.bin")
    assert list(st.list("missing")) == []


def test_object_store_has_no_local_path(s3_env: str) -> None:
    st = open_store(s3_env + "/p")
    with pytest.raises(ValueError, match="object store"):
        st.local_path("x")


def test_bad_urls_fail_clearly(s3_env: str) -> None:
    with pytest.raises(StoreError, match="expected s3://bucket"):
        open_store("s3://")
    with pytest.raises(StoreError, match="expected a local path or s3://"):
        open_store("nosuchscheme://x/y")
    with pytest.raises(StoreError, match="not found|NoSuchBucket|NO_SUCH_BUCKET|does not exist"):
        open_store("s3://vf-no-such-bucket-here/p").check()


def test_store_that_disappears_fails_fast_and_recovers(s3_server, s3_env: str, monkeypatch) -> None:
    monkeypatch.setenv("VISIONFLEET_S3_TIMEOUT", "1")
    st = open_store(s3_env + "/p")
    st.write_bytes("kept.bin", b"acknowledged")
    s3_server.pause()
    try:
        with pytest.raises(StoreUnavailable, match="did not answer"):
            st.read_bytes("kept.bin")
    finally:
        s3_server.resume()
    assert st.read_bytes("kept.bin") == b"acknowledged"  # nothing lost, works again


def test_settings_place_each_area(tmp_path: Path, monkeypatch) -> None:
    s = Settings.from_env(tmp_path / "h")
    assert s.store == str(tmp_path / "h") and s.db_url == f"sqlite:///{tmp_path / 'h'}/state.db"
    assert s.store_uri("registry") == f"{tmp_path / 'h'}/registry" and not s.shared
    monkeypatch.setenv("VISIONFLEET_STORE", "s3://bkt/vf")
    monkeypatch.setenv("VISIONFLEET_STORE_TELEMETRY", "s3://lake/events")
    monkeypatch.setenv("VISIONFLEET_DB", "postgresql+psycopg://u@db:5432/vf")
    s = Settings.from_env(tmp_path / "h")
    assert s.shared and s.store_uri("registry") == "s3://bkt/vf/registry"
    assert s.store_uri("telemetry") == "s3://lake/events"
    env = s.runtime_env_vars()
    assert env["VISIONFLEET_STORE"] == "s3://bkt/vf" and env["VISIONFLEET_DB"].startswith("postgresql")
    assert env["VISIONFLEET_STORE_TELEMETRY"] == "s3://lake/events"
    moved = s.with_home(tmp_path / "other")
    assert moved.store == "s3://bkt/vf" and moved.db_url == s.db_url  # shared state does not follow home
    with pytest.raises(ValueError, match="expected a local path"):
        Settings.from_env("s3://bkt/home")
    with pytest.raises(ValueError, match="store area"):
        s.store_uri("nope")
