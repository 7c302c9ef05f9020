"""Registry: versions, cards, refs, atomic alias switches, ONNX self-description."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from visionfleet.registry import NotFound, Registry
from visionfleet.spec import ModelCard, parse_ref


def _tiny_onnx(path: Path) -> Path:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def _card(name: str = "m") -> ModelCard:
    return ModelCard(name=name, labels=["a", "b"], input_size=(32, 32))


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return _tiny_onnx(tmp_path / "model.onnx")


def test_register_allocates_versions_and_first_is_production(reg: Registry, model_file: Path) -> None:
    c1 = reg.register(_card(), {"onnx": model_file})
    c2 = reg.register(_card(), {"onnx": model_file})
    assert (c1.version, c2.version) == (1, 2)
    assert reg.versions("m") == [1, 2]
    assert reg.aliases("m") == {"production": 1}
    assert reg.resolve("m") == reg.resolve("m@production")
    assert reg.resolve("m").version == 1
    assert reg.resolve("m:2").version == 2
    card = reg.card("m", 2)
    assert card.version == 2 and card.files[0].name == "model.onnx" and len(card.files[0].sha256) == 64


def test_onnx_files_are_stamped_with_name_and_version(reg: Registry, model_file: Path) -> None:
    reg.register(_card(), {"onnx": model_file})
    c2 = reg.register(_card(), {"onnx": model_file})
    props = {p.key: p.value for p in onnx.load(str(reg.local_dir("m", 2) / "model.onnx")).metadata_props}
    assert props["version"] == "2" and props["model_name"] == "m"
    import hashlib

    data = (reg.local_dir("m", 2) / "model.onnx").read_bytes()
    assert c2.files[0].sha256 == hashlib.sha256(data).hexdigest()


def test_unknown_refs(reg: Registry, model_file: Path) -> None:
    with pytest.raises(NotFound):
        reg.resolve("nope")
    reg.register(_card(), {"onnx": model_file})
    with pytest.raises(NotFound):
        reg.resolve("m:7")
    with pytest.raises(NotFound):
        reg.resolve("m@candidate")
    with pytest.raises(ValueError):
        reg.resolve("m:abc")
    with pytest.raises(NotFound):
        reg.set_alias("m", "production", 9)


def test_register_refuses_bad_input(reg: Registry, model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        reg.register(_card("bad name!"), {"onnx": model_file})
    with pytest.raises(FileNotFoundError):
        reg.register(_card(), {"onnx": tmp_path / "missing.onnx"})
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError):  # the card's model_file is not among the files
        reg.register(_card(), {"weights": other})
    assert reg.versions("m") == []
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "registry" / "m").iterdir())


def test_alias_switch_is_atomic_under_concurrent_readers(reg: Registry, model_file: Path) -> None:
    for _ in range(3):
        reg.register(_card(), {"onnx": model_file})
    alias_file = reg.local_dir("m", 1).parent / "aliases.json"
    seen: set[int] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                doc = json.loads(alias_file.read_text())  # never a half-written file
                seen.add(doc["aliases"]["production"])
                seen.add(reg.resolve("m").version)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(200):
        reg.set_alias("m", "production", 1 + i % 3, reason="flip")
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert seen <= {1, 2, 3} and len(seen) >= 2
    history = reg.alias_history("m")
    assert history[-1]["alias"] == "production" and history[-1]["reason"] == "flip"


def test_concurrent_registrations_get_distinct_versions(reg: Registry, model_file: Path) -> None:
    results: list[int] = []

    def go() -> None:
        results.append(reg.register(_card(), {"onnx": model_file}).version)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    assert reg.versions("m") == [1, 2, 3, 4, 5, 6]


def test_update_metrics_and_remove_alias(reg: Registry, model_file: Path) -> None:
    reg.register(_card(), {"onnx": model_file})
    reg.update_metrics("m", 1, {"acc": 0.5})
    assert reg.card("m", 1).metrics["acc"] == 0.5
    reg.set_alias("m", "candidate", 1)
    assert reg.remove_alias("m", "candidate") == 1
    assert "candidate" not in reg.aliases("m")


def test_list_models_ignores_hidden(reg: Registry, model_file: Path) -> None:
    reg.register(_card("a"), {"onnx": model_file})
    reg.register(_card("b"), {"onnx": model_file})
    assert reg.list_models() == ["a", "b"]


@pytest.mark.parametrize(
    "text,name,version,alias",
    [
        ("demo", "demo", None, "production"),
        ("demo:3", "demo", 3, None),
        ("demo@candidate", "demo", None, "candidate"),
        ("my-model.v2:10", "my-model.v2", 10, None),
    ],
)
def test_parse_ref(text: str, name: str, version: int | None, alias: str | None) -> None:
    r = parse_ref(text)
    assert (r.name, r.version, r.alias) == (name, version, alias)


@pytest.mark.parametrize("bad", ["", ":1", "demo:", "demo:0", "demo@", "de mo", "demo:1@x", "../etc", "demo:-1"])
def test_parse_ref_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_ref(bad)


def test_card_validation() -> None:
    with pytest.raises(ValueError):
        ModelCard(name="m", labels=[], input_size=(32, 32))
    with pytest.raises(ValueError):
        ModelCard(name="m", labels=["a", "a"], input_size=(32, 32))
    with pytest.raises(ValueError):
        ModelCard(name="m", labels=["a"], input_size=(2, 32))
    with pytest.raises(ValueError):
        ModelCard.model_validate({"name": "m", "labels": ["a"], "input_size": [32, 32], "surprise": 1})


def test_remote_filesystem_through_pyarrow_fs(tmp_path: Path, model_file: Path) -> None:
    """A non-local URI goes through pyarrow.fs (mock:// here, s3:// in production)."""
    reg = Registry("mock:///bucket/models", cache_dir=tmp_path / "cache")
    c1 = reg.register(_card(), {"onnx": model_file})
    reg.register(_card(), {"onnx": model_file})
    assert reg.versions("m") == [1, 2] and reg.resolve("m").version == c1.version == 1
    reg.set_alias("m", "production", 2)
    assert reg.resolve("m").version == 2
    local = reg.local_dir("m", 2)  # downloaded once into the cache
    assert local.is_relative_to(tmp_path / "cache") and (local / "card.json").is_file()
    props = {p.key: p.value for p in onnx.load(str(local / "model.onnx")).metadata_props}
    assert props["version"] == "2"
