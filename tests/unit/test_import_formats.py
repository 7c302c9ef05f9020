"""Formats beyond ONNX: TorchScript files and ``--from-python module:function``, converted with a parity check.

Tiny real torch modules, scripted or traced here; real ``torch.onnx.export``, real ONNX
Runtime, the real registry; one path through the installed ``visionfleet`` command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_export import importer as imp
from edge_export.importer.convert import convert_to_onnx, import_python, is_torchscript_archive, source_format
from train.checkpoint_import import import_model
from visionfleet.inference import RuntimeOptions, load_model_dir
from visionfleet.registry import Registry
from visionfleet.spec import Task

CPU = RuntimeOptions(threads=1, providers=("CPUExecutionProvider",))
LABELS = ("cat", "dog", "bird")
VF = str(Path(sys.executable).parent / "visionfleet")
REPO = Path(__file__).resolve().parents[2]


class Net(torch.nn.Module):
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class FFT(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft2(x).real.mean((2, 3))


class Yolo(torch.nn.Module):
    """A YOLOv8/YOLO11-style head [N, 4 + 3, A] with boxes that move with the image."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("base", torch.cat([torch.rand(2, 30, generator=g) * 60 + 20,
                                                torch.rand(2, 30, generator=g) * 20 + 8,
                                                torch.rand(3, 30, generator=g)])[None])
        scale = torch.tensor([40.0, 40, 10, 10, 1, 1, 1]).reshape(1, 7, 1)
        self.register_buffer("direction", torch.randn(7, 30, generator=g)[None] * 0.2 * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3)).reshape(-1, 1, 1)
        out = self.base + self.direction * m
        return torch.cat([out[:, :4], out[:, 4:].clamp(0, 1)], dim=1)


def spec(task: Task = Task.CLASSIFICATION, size=(32, 32), **kw) -> imp.ImportSpec:
    det = imp.DetectionOptions(max_detections=10) if task is Task.DETECTION else None
    return imp.ImportSpec(
        task=task, labels=LABELS, input_size=size, framework="pytorch", detection=det,
        resize=imp.ResizeMode.LETTERBOX if det else imp.ResizeMode.STRETCH,
        preprocessing=imp.Preprocessing(layout=kw.pop("layout", imp.Layout.AUTO), dtype=imp.InputDType.AUTO,
                                        mean=(0.5,), std=(0.25,), scale=None),
        output=None if det else imp.OutputKind.AUTO, **kw,
    )


def probs_by_torch(module: torch.nn.Module, images: np.ndarray, pre: imp.Preprocessing) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(module(torch.from_numpy(pre.apply(images))), dim=1).numpy()


def test_torchscript_pt_is_told_from_a_state_dict_converted_and_served_like_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Net().eval()
    scripted = tmp_path / "net.pt"
    torch.jit.script(net).save(str(scripted))
    state = tmp_path / "state.pt"
    torch.save(net.state_dict(), state)
    assert is_torchscript_archive(scripted) and not is_torchscript_archive(state)
    assert source_format(scripted) == "torchscript" and source_format(state) is None
    reg = Registry(tmp_path / "reg")
    card = import_model(scripted, reg, "ts", spec())  # the same dispatch the CLI uses
    convert, step = card.lineage.steps
    assert convert["op"] == "convert" and convert["format"] == "torchscript" and convert["source"] == "net.pt"
    assert "dynamo=False" in convert["converter"] and convert["example_input"] == {"shape": [2, 3, 32, 32],
                                                                                     "dtype": "float32"}
    parity = convert["conversion_parity"]
    assert parity["n"] == 24 and parity["max_abs_diff"] <= parity["outputs"][0]["tolerance"] <= 1e-3
    assert card.metrics["conversion_parity"]["n"] == 24 and card.metrics["import_parity"]["agreement"] == 1.0
    assert step["op"] == "import" and step["output_kind"] == "logits" and card.framework == "pytorch"
    # The registered model gives torch's softmax on the images, preprocessing folded in.
    loaded = load_model_dir(reg.local_dir("ts", 1), CPU)
    images = imp.sample_images((32, 32), imp.ResizeMode.STRETCH, n=5, seed=9)
    (probs,) = loaded.run(images)
    pre = imp.Preprocessing(mean=(0.5,), std=(0.25,))
    np.testing.assert_allclose(probs, probs_by_torch(net, images, pre), atol=1e-5)


def test_traced_grayscale_nhwc_torchscript_and_a_traced_yolo_head(tmp_path: Path) -> None:
    class Nhwc(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net(channels=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.permute(0, 3, 1, 2))

    torch.manual_seed(1)
    gray = tmp_path / "gray.torchscript"
    torch.jit.trace(Nhwc().eval(), torch.zeros(1, 32, 32, 1)).save(str(gray))
    model, info = convert_to_onnx(gray, spec(layout=imp.Layout.NHWC))
    assert info.input_shape == (2, 32, 32, 1) and info.format == "torchscript"  # 3 channels failed, 1 fits
    resolved, io = imp.resolve_spec(model, spec(layout=imp.Layout.NHWC))
    assert resolved.preprocessing.channels == 1 and io.input_dims == (None, 32, 32, 1)
    yolo = tmp_path / "yolo.ts"
    torch.jit.trace(Yolo().eval(), torch.zeros(1, 3, 64, 64)).save(str(yolo))
    card = import_model(yolo, Registry(tmp_path / "reg"), "yolo", spec(Task.DETECTION, size=(64, 64)))
    assert card.lineage.steps[1]["head"]["kind"] == "channels-first" and card.resize is imp.ResizeMode.LETTERBOX
    assert card.metrics["import_parity"]["detections"] > 0 and card.metrics["import_parity"]["agreement"] == 1.0


def test_torchscript_refusals_say_what_was_found_and_what_is_expected(tmp_path: Path) -> None:
    fft = tmp_path / "fft.pt"
    torch.jit.script(FFT()).save(str(fft))
    with pytest.raises(ValueError) as err:
        convert_to_onnx(fft, spec())
    msg = str(err.value)
    assert msg.startswith("Got a TorchScript model fft.pt that torch.onnx.export cannot convert (")
    assert "fft_fft2" in msg and "; expected ops the ONNX exporter knows at opset 17" in msg
    garbage = tmp_path / "broken.ts"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"Got 'broken.ts', which torch.jit.load cannot read .*; expected a "
                                         "TorchScript archive"):
        convert_to_onnx(garbage, spec())
    with pytest.raises(ValueError, match="Got no --input-size for the TorchScript model fft.pt; expected HEIGHTxWIDTH"):
        convert_to_onnx(fft, spec(size=None))
    wrong = tmp_path / "wrong.pt"
    torch.jit.script(Net(channels=2)).save(str(wrong))
    with pytest.raises(ValueError, match=r"Got the TorchScript model wrong.pt that fails on a float32 NCHW image batch"
                                         r" \(\[2, 3, 32, 32\]: .*; \[2, 1, 32, 32\]: .*\); expected a model that "):
        convert_to_onnx(wrong, spec())
    (tmp_path / "model.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ValueError, match=r"Got 'model.h5'; expected a .onnx model or a .pt/.pth PyTorch state dict "
                                         r"\(or a format converted on import: a .pt/.pth TorchScript archive, "
                                         r".torchscript, .ts"):
        imp.check_source_file(tmp_path / "model.h5")
    state = tmp_path / "state.pt"
    torch.save(Net().state_dict(), state)
    with pytest.raises(ValueError, match=r"Got 'state.pt' to convert; expected one of .*\(a .onnx file needs no "
                                         "conversion; a .pt state dict of a built-in architecture takes --arch\\)"):
        convert_to_onnx(state, spec())


USER_CODE = '''
import torch

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.softmax(self.fc(self.conv(x).amax((2, 3))), dim=1)

def build():
    return Tiny()

def with_example():
    return Tiny(), torch.zeros(1, 3, 24, 40)

def needs_args(depth):
    return Tiny()

def scripted():
    return torch.jit.script(Tiny())

def not_a_module():
    return {"conv": 1}

def broken():
    raise RuntimeError("weights server down")

NOT_CALLABLE = 3
'''


@pytest.fixture()
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "proj" / "mymodels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "zoo.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.chdir(tmp_path / "proj")  # importable from the current folder, as `python -m` would have it
    monkeypatch.delitem(sys.modules, "mymodels.zoo", raising=False)
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    return tmp_path / "proj"


def test_from_python_docs_example_with_weights_is_exported_and_checked(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_export.importer.convert_torch import load_python_module

    # The module docs/model-import.md shows, imported from its folder as the doc's command does.
    monkeypatch.chdir(REPO / "docs" / "examples")
    monkeypatch.delitem(sys.modules, "from_python_model", raising=False)
    torch.manual_seed(3)
    trained = load_python_module("from_python_model:build")()[0].eval()  # "trained": weights of its own
    weights = tmp_path / "tiny.pt"
    torch.save(trained.state_dict(), weights)
    reg = Registry(tmp_path / "reg")
    card = import_python("from_python_model:build", reg, "tiny", spec(size=None), weights=weights)
    convert = card.lineage.steps[0]
    assert convert["format"] == "pytorch-module" and convert["source"] == "from_python_model:build"
    assert "torch.export-based, dynamo=True" in convert["converter"]
    assert convert["example_input"]["shape"] == [2, 3, 24, 40]
    assert convert["sha256"] and any("weights_only=True" in n for n in convert["notes"])
    assert card.input_size == (24, 40) and card.lineage.steps[1]["output_kind"] == "logits"  # measured
    loaded = load_model_dir(reg.local_dir("tiny", 1), CPU)
    images = imp.sample_images((24, 40), imp.ResizeMode.STRETCH, n=4, seed=2)
    pre = imp.Preprocessing(mean=(0.5,), std=(0.25,))
    # The trained weights, not the fresh ones build() makes.
    np.testing.assert_allclose(loaded.run(images)[0], probs_by_torch(trained, images, pre), atol=1e-5)


def test_from_python_refusals_say_what_was_found_and_what_is_expected(tmp_path: Path, user_package: Path) -> None:
    reg = Registry(tmp_path / "reg")
    cases = [
        ("mymodels/zoo.py", "Got 'mymodels/zoo.py' for --from-python; expected package.module:function"),
        ("nosuch.pkg:build", "Got --from-python nosuch.pkg:build, but importing 'nosuch.pkg' failed "
                             "(ModuleNotFoundError: No module named 'nosuch'); expected a module importable from the "
                             "current folder"),
        ("mymodels.zoo:missing", "Got --from-python mymodels.zoo:missing, but 'mymodels.zoo' has no attribute "
                                 "'missing'; expected a function that returns an nn.Module"),
        ("mymodels.zoo:NOT_CALLABLE", "Got --from-python mymodels.zoo:NOT_CALLABLE, a int that is not callable; "
                                      "expected a function"),
        ("mymodels.zoo:needs_args", "Got --from-python mymodels.zoo:needs_args, which needs arguments ['depth']; "
                                    "expected a function callable with no arguments"),
        ("mymodels.zoo:not_a_module", "Got --from-python mymodels.zoo:not_a_module returning a dict; expected an "
                                      "nn.Module or (nn.Module, example input tensor)"),
        ("mymodels.zoo:scripted", "returning a ScriptModule; expected an nn.Module or (nn.Module, example input "
                                  "tensor) (import a TorchScript model as a file"),
        ("mymodels.zoo:broken", "Got --from-python mymodels.zoo:broken, which raised RuntimeError: weights server "
                                "down; expected it to return an nn.Module"),
        ("mymodels.zoo:build", "Got --from-python mymodels.zoo:build returning a module without an example input and "
                               "no --input-size; expected HEIGHTxWIDTH"),
    ]
    for target, needle in cases:
        with pytest.raises(ValueError) as err:
            import_python(target, reg, "x", spec(size=None))
        assert needle in str(err.value), (target, str(err.value))
    bad = tmp_path / "bad.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), bad)
    with pytest.raises(ValueError, match=r"Got --weights bad.pt that do not fit the module mymodels.zoo:build returns "
                                         r"\(missing keys .*conv.bias.*; expected the state dict of that very module"):
        import_python("mymodels.zoo:build", reg, "x", spec(), weights=bad)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a whole module: a pickle of code
    with pytest.raises(ValueError, match=r"Got --weights pickled.pt, which torch.load\(weights_only=True\) refused "
                                         r"\(.*\); expected a state dict saved with torch.save\(model.state_dict\(\)"):
        import_python("mymodels.zoo:build", reg, "x", spec(), weights=pickled)
    assert reg.list_models() == []


def test_cli_refusals_for_from_python_and_formats(tmp_path: Path, user_package: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from visionfleet.cli import app

    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path / "home"))
    ts = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(ts))
    base = ["models", "import", "--name", "m", "--labels", ",".join(LABELS)]
    for args, needle in [
        ([], "Got neither a FILE nor --from-python; expected one"),
        ([str(ts), "--from-python", "mymodels.zoo:build"], "Got both a FILE and --from-python; expected one"),
        ([str(ts), "--weights", str(ts)], "Got --weights without --from-python; expected it only with --from-python"),
        ([str(ts), "--arch", "resnet", "--input-size", "32"],
         "a torchscript model; expected architecture options only"),
        ([str(ts)], "Got no --input-size for the TorchScript model net.pt; expected HEIGHTxWIDTH"),
        (["--from-python", "mymodels.zoo:build", "--arch", "resnet", "--input-size", "32"],
         "Got --arch/--width/--depths/--stem-stride with --from-python; expected none"),
        (["--from-python", "mymodels.zoo:build", "--input-sizes", "32x32,48x48"],
         "Got --input-sizes with --from-python; expected one size"),
    ]:
        r = CliRunner().invoke(app, [*base, *args])
        text = " ".join(r.output.split())
        assert r.exit_code == 2 and needle in text, (args, text)
        assert r.exception is None or isinstance(r.exception, SystemExit)


def _import_args(src: Path) -> list[str]:
    return ["models", "import", str(src), "--name", "tsnet", "--labels", ",".join(LABELS), "--input-size", "32x32",
            "--mean", "0.5", "--std", "0.25", "--json"]


def _check_cli_card(stdout: str) -> None:
    card = json.loads(stdout)  # stdout holds the card only: the exporters' chatter stays out of it
    assert card["framework"] == "pytorch" and card["lineage"]["steps"][0]["format"] == "torchscript"
    assert card["metrics"]["conversion_parity"]["max_abs_diff"] < 1e-4
    assert card["metrics"]["import_parity"]["agreement"] == 1.0


def test_the_cli_imports_a_torchscript_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from visionfleet.cli import app

    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path / "home"))
    torch.manual_seed(4)
    src = tmp_path / "classifier.torchscript"
    torch.jit.script(Net().eval()).save(str(src))
    r = CliRunner().invoke(app, _import_args(src))
    assert r.exit_code == 0, r.output
    _check_cli_card(r.stdout)


@pytest.mark.slow  # a fresh interpreter importing torch: seconds; the same path runs in-process above
def test_the_installed_command_imports_a_torchscript_file(tmp_path: Path) -> None:
    torch.manual_seed(4)
    src = tmp_path / "classifier.torchscript"
    torch.jit.script(Net().eval()).save(str(src))
    env = {**os.environ, "VISIONFLEET_HOME": str(tmp_path / "home")}
    r = subprocess.run([VF, *_import_args(src)], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_cli_card(r.stdout)
