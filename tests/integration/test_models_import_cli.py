"""`visionfleet models import` and `visionfleet tensorrt` end to end, as installed commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image

VF = str(Path(sys.executable).parent / "visionfleet")


def _run(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "VISIONFLEET_HOME": str(home)}
    return subprocess.run([VF, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _classifier(path: Path) -> None:
    """A TensorFlow-style export: NHWC float input "input_1" on the 0..255 scale, softmax output."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["input_1"], ["t"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("MatMul", ["f", "fc"], ["z"]),
            helper.make_node("Softmax", ["z"], ["predictions"], axis=1),
        ],
        "tf_like",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk", 48, 48, 3])],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["unk", 3])],
        initializer=[
            numpy_helper.from_array(rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(0, 0.5, (6, 3)).astype(np.float32), "fc"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _detector(path: Path) -> None:
    """A YOLOv8-style head [N, 4 + 2, 3] with fixed boxes (cx, cy, w, h in 64 px input)."""
    base = np.array(
        [[[16, 40, 48], [16, 40, 20], [10, 12, 8], [10, 12, 8], [0.9, 0.1, 0.3], [0.05, 0.8, 0.1]]], np.float32
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Reshape", ["m", "s"], ["m3"]),
            helper.make_node("Mul", ["m3", "zero"], ["z"]),
            helper.make_node("Add", ["z", "base"], ["output0"]),
        ],
        "yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],  # fixed batch of 1
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, 3])],
        initializer=[
            numpy_helper.from_array(np.array([0, 1, 1], np.int64), "s"),
            numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero"),
            numpy_helper.from_array(base, "base"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("import-src")
    _classifier(d / "tf_model.onnx")
    _detector(d / "yolo.onnx")
    (d / "labels.txt").write_text("circle\nsquare\nstar\n")
    img = d / "photo.png"
    img.write_bytes(encode_image(render_sample(1, 2, 80)[0][:, :60], "png"))  # 60 wide, 80 high
    return {k: d / v for k, v in {"clf": "tf_model.onnx", "det": "yolo.onnx", "labels": "labels.txt",
                                  "img": "photo.png"}.items()}


def test_import_show_list_and_predict(tmp_path: Path, files: dict[str, Path]) -> None:
    home = tmp_path / "home"
    r = _run(
        "models", "import", str(files["clf"]), "--name", "tfnet", "--labels", str(files["labels"]),
        "--input-size", "48x48", "--layout", "NHWC", "--scale", "0-255", "--mean", "127.5,127.5,127.5",
        "--std", "127.5,127.5,127.5", "--outputs-are", "probs", "--resize", "center-crop", "--framework", "tensorflow",
        "--json", home=home,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads(r.stdout)
    assert card["name"] == "tfnet" and card["version"] == 1 and card["framework"] == "tensorflow"
    assert card["preprocessing"]["layout"] == "NHWC" and card["preprocessing"]["scale"] == "0-255"
    assert card["lineage"]["steps"][0]["op"] == "import" and card["metrics"]["import_parity"]["agreement"] == 1.0

    shown = _run("models", "show", "tfnet", "--json", home=home)
    assert shown.returncode == 0 and json.loads(shown.stdout)["labels"] == ["circle", "square", "star"]
    listed = json.loads(_run("models", "list", "--json", home=home).stdout)["models"]
    assert [(m["model"], m["version"], m["task"]) for m in listed] == [("tfnet", 1, "classification")]
    pred = _run("predict", str(files["img"]), "--local", "--model", "tfnet", "--json", home=home)
    assert pred.returncode == 0, pred.stderr[-2000:]
    assert json.loads(pred.stdout)["label"] in card["labels"]

    det = _run(
        "models", "import", str(files["det"]), "--name", "yolo", "--task", "detection", "--labels", "cat,dog",
        "--input-size", "64", "--resize", "letterbox", "--score-threshold", "0.3", "--max-detections", "5",
        home=home,
    )
    assert det.returncode == 0, det.stderr[-3000:]
    assert "registered yolo:1: detection, 2 labels" in det.stdout
    dcard = json.loads(_run("models", "show", "yolo:1", "--json", home=home).stdout)
    step = dcard["lineage"]["steps"][0]
    assert dcard["task"] == "detection" and step["batch_relaxed"] is True and step["head_layout"] == "channels-first"
    assert step["detection"]["score_threshold"] == 0.3 and dcard["metrics"]["import_parity"]["detections"] > 0


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--layout", "NCWH"], "Got 'NCWH' for --layout; expected 'NCHW' or 'NHWC'"),
        (["--input-size", "48by48"], "expected HEIGHTxWIDTH"),
        (["--input-size", "32x32"], "--input-size 32x32, but the model's input 'input_1'"),
        (["--layout", "NCHW"], "it looks NHWC"),
        (["--mean", "127.5,127.5"], "--mean; expected 3 comma-separated numbers"),
        (["--scale", "0-1", "--mean", "127.5,127.5,127.5"], "pass --scale 0-255"),
        (["--labels", "a,b"], "expected [N, 2] for 2 labels"),
        (["--max-detections", "5"], "--max-detections for task 'classification'"),
        (["--name", "bad name!"], "for model name"),
        (["--arch", "resnet"], "architecture options only with .pt/.pth"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                             extra: list[str], needle: str) -> None:
    # In-process (typer's runner) to keep the tier fast; the subprocess paths are covered above and below.
    from typer.testing import CliRunner

    from visionfleet.cli import app

    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path / "home"))
    base = {"--name": "tfnet", "--labels": str(files["labels"]), "--input-size": "48x48", "--layout": "NHWC",
            "--scale": "0-255"}
    for flag, value in zip(extra[::2], extra[1::2]):
        base[flag] = value
    args = [a for kv in base.items() for a in kv]
    r = CliRunner().invoke(app, ["models", "import", str(files["clf"]), *args])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "error:" in text and needle in text, text
    assert r.exception is None or isinstance(r.exception, SystemExit)  # a message, not a traceback


def test_engines_and_pickles_are_refused_and_tensorrt_says_what_is_missing(tmp_path: Path,
                                                                          files: dict[str, Path]) -> None:
    home = tmp_path / "home"
    plan = tmp_path / "downloaded.plan"
    plan.write_bytes(b"\x00" * 32)
    r = _run("models", "import", str(plan), "--name", "x", "--labels", "a,b", "--input-size", "8", home=home)
    assert r.returncode == 2 and "TensorRT engines are never accepted from outside" in " ".join(r.stderr.split())

    info = _run("tensorrt", "info", "--json", home=home)
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    if doc["tensorrt_builder_ready"]:
        pytest.skip("TensorRT and CUDA are present here; the missing-TensorRT path cannot be shown")
    imported = _run("models", "import", str(files["clf"]), "--name", "tfnet", "--labels", str(files["labels"]),
                    "--input-size", "48x48", "--layout", "NHWC", "--scale", "0-255", home=home)
    assert imported.returncode == 0, imported.stderr[-2000:]
    build = _run("tensorrt", "build", "tfnet:1", "--precision", "fp16", "--target", "x86-gpu", home=home)
    assert build.returncode == 1
    assert doc["builder_problem"].split(";")[0] in " ".join(build.stderr.split()) and "Traceback" not in build.stderr
    bad = _run("tensorrt", "build", "tfnet:7", home=home)
    assert bad.returncode == 2 and "has no version 7" in bad.stderr
    bad = _run("tensorrt", "build", "tfnet:1", "--precision", "int4", home=home)
    assert bad.returncode == 2 and "expected fp16, int8 or fp32" in bad.stderr
    listed = json.loads(_run("models", "list", "--json", home=home).stdout)["models"]
    assert len(listed) == 1  # nothing registered by the failed builds
