"""Import safety: external data stays in the model's folder, no pickles run, no foreign engines."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_export import importer as imp
from train.checkpoint_import import import_model
from visionfleet.registry import Registry
from visionfleet.spec import Task

SPEC = imp.ImportSpec(
    task=Task.CLASSIFICATION, labels=("a", "b"), input_size=(8, 8), output=imp.OutputKind.LOGITS
)


def model_with_weight(location: str | None = None) -> onnx.ModelProto:
    """Mean pixel -> MatMul -> 2 logits; the weight optionally stored as external data."""
    w = numpy_helper.from_array(np.array([[1.0, -1.0], [0.5, 0.5], [-1.0, 1.0]], np.float32), "w")
    if location is not None:
        w.ClearField("float_data")
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "24")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["logits"]),
        ],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


WEIGHT_BYTES = np.array([[1.0, -1.0], [0.5, 0.5], [-1.0, 1.0]], np.float32).tobytes()


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname", "sub/../../secret.bin"])
def test_external_data_leaving_the_model_folder_is_refused(tmp_path: Path, location: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(WEIGHT_BYTES)
    path = folder / "model.onnx"
    path.write_bytes(model_with_weight(location).SerializeToString())
    with pytest.raises(ValueError, match="paths that leave it are refused"):
        imp.load_onnx_safely(path)
    with pytest.raises(ValueError, match="paths that leave it are refused"):
        imp.import_onnx(path, Registry(tmp_path / "registry"), "x", SPEC)
    assert Registry(tmp_path / "registry").list_models() == []


def test_a_symlink_inside_the_folder_pointing_outside_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(WEIGHT_BYTES)
    os.symlink(tmp_path / "secret.bin", folder / "weights.bin")
    path = folder / "model.onnx"
    path.write_bytes(model_with_weight("weights.bin").SerializeToString())
    with pytest.raises(ValueError, match="leave"):
        imp.load_onnx_safely(path)


def test_external_data_inside_the_folder_is_imported(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "weights.bin").write_bytes(WEIGHT_BYTES)
    path = folder / "model.onnx"
    path.write_bytes(model_with_weight("data/weights.bin").SerializeToString())
    loaded = imp.load_onnx_safely(path)
    (w,) = loaded.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(w).ravel(), np.frombuffer(WEIGHT_BYTES, np.float32))
    card = imp.import_onnx(path, Registry(tmp_path / "registry"), "ext", SPEC)
    assert card.metrics["import_parity"]["agreement"] == 1.0
    with pytest.raises(FileNotFoundError, match="missing"):
        (folder / "data" / "weights.bin").unlink()
        imp.load_onnx_safely(path)


@pytest.mark.parametrize("name", ["model.plan", "model.engine", "yolo.trt", "MODEL.PLAN"])
def test_tensorrt_engines_from_outside_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="TensorRT engines are never accepted from outside"):
        import_model(path, Registry(tmp_path / "registry"), "x", SPEC)


@pytest.mark.parametrize("name", ["model.pkl", "model.pickle", "model.joblib", "weights.bin"])
def test_other_formats_are_refused_before_reading(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"never read")
    with pytest.raises(ValueError, match="expected a .onnx model or a .pt/.pth"):
        imp.check_source_file(path)


def test_corrupt_or_invalid_onnx_gives_a_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="garbage.onnx is not a readable ONNX model"):
        imp.load_onnx_safely(garbage)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_with_weight().SerializeToString()[:-40])
    with pytest.raises(ValueError, match="truncated.onnx"):
        imp.load_onnx_safely(truncated)
    # Passes parsing but not onnx.checker: an op that does not exist in the default domain.
    bad = model_with_weight()
    bad.graph.node[1].op_type = "NotAnOp"
    (tmp_path / "bad.onnx").write_bytes(bad.SerializeToString())
    with pytest.raises(ValueError, match="bad.onnx fails onnx.checker"):
        imp.load_onnx_safely(tmp_path / "bad.onnx")
    # Passes onnx.checker but ONNX Runtime cannot load it: an op from an unknown domain.
    custom = model_with_weight()
    custom.graph.node[1].domain = "com.example"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    (tmp_path / "custom.onnx").write_bytes(custom.SerializeToString())
    imp.load_onnx_safely(tmp_path / "custom.onnx")
    with pytest.raises(ValueError, match="ONNX Runtime cannot load custom.onnx"):
        imp.import_onnx(tmp_path / "custom.onnx", Registry(tmp_path / "registry"), "x", SPEC)


class _Evil:
    """Unpickling this runs ``touch MARKER`` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_malicious_pickle_checkpoint_is_never_executed(tmp_path: Path, writer: str) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "hook": _Evil(marker)}
    if writer == "pickle":
        with open(ckpt, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, ckpt)
    # Sanity: the file really is malicious when unpickled naively.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Evil(probe)))
    assert probe.exists()
    spec = imp.ImportSpec(task=Task.CLASSIFICATION, labels=("a", "b"), input_size=(32, 32))
    with pytest.raises(ValueError, match=r"not a weights-only checkpoint: torch.load\(weights_only=True\) refused it"):
        import_model(ckpt, Registry(tmp_path / "registry"), "evil", spec, arch={"arch": "resnet", "width": 8})
    assert not marker.exists()


def test_a_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    spec = imp.ImportSpec(task=Task.CLASSIFICATION, labels=("a", "b"), input_size=(32, 32))
    ckpt = tmp_path / "list.pt"
    torch.save([1, 2, 3], ckpt)
    with pytest.raises(ValueError, match="holds no state dict"):
        import_model(ckpt, Registry(tmp_path / "r"), "x", spec, arch={"arch": "resnet"})
    zipped = tmp_path / "broken.pth"
    zipped.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="broken.pth is not a readable PyTorch checkpoint"):
        import_model(zipped, Registry(tmp_path / "r"), "x", spec, arch={"arch": "resnet"})
