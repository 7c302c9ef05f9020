"""Several input sizes per model: the size rule, the card, export/import with a dynamic H x W, TensorRT profiles.

Serving at each listed size over the real FastAPI app (classifier and letterbox detector,
every route, the 400s) is in ``tests/unit/test_prediction_path.py``; this file covers
the pieces around it. Real ONNX Runtime and a real torch export; no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from visionfleet.imaging import SizeNotServed, choose_size, encode_image, parse_size, preprocess
from visionfleet.spec import ModelCard

SIZES = [(224, 224), (320, 320), (160, 256)]


def test_a_requested_size_must_be_listed() -> None:
    assert choose_size(SIZES, (50, 50), "320") == (320, 320)
    assert choose_size(SIZES, (50, 50), "160x256") == (160, 256)
    assert choose_size(SIZES, None, (224, 224)) == (224, 224)
    with pytest.raises(SizeNotServed) as exc:
        choose_size(SIZES, (50, 50), "500x500")
    assert str(exc.value) == "Got size 500x500; expected one of 224x224, 320x320, 160x256"
    with pytest.raises(SizeNotServed) as exc:
        choose_size([(224, 224)], (50, 50), 320)
    assert str(exc.value) == "Got size 320x320; expected one of 224x224 (this model's input size is fixed)"
    with pytest.raises(ValueError, match=r"Got '32x' for size; expected HEIGHTxWIDTH such as 320x320"):
        parse_size("32x")
    assert parse_size(" 64 X 48 ") == (64, 48) and parse_size(96) == (96, 96)


def test_without_a_request_the_nearest_listed_size_by_pixel_count_wins() -> None:
    # pixel counts: 224x224 = 50,176; 320x320 = 102,400; 160x256 = 40,960; compared as ratios
    assert choose_size(SIZES, (300, 300)) == (320, 320)  # 90,000 px: 1.14x below 320x320, 1.79x above 224x224
    assert choose_size(SIZES, (1080, 1920)) == (320, 320)  # bigger than all: the largest
    assert choose_size(SIZES, (200, 230)) == (224, 224)  # 46,000 px: 1.09x vs 1.12x (160x256)
    assert choose_size(SIZES, (20, 20)) == (160, 256)  # smaller than all: the smallest
    assert choose_size(SIZES, None) == (224, 224)  # no image: the default
    assert choose_size([(64, 64), (32, 128)], (64, 64)) == (64, 64)  # a tie goes to the first listed
    assert choose_size([(224, 224)], (1000, 1000)) == (224, 224)  # one size: always it
    img, info = preprocess(encode_image(np.zeros((300, 290, 3), np.uint8), "png"), SIZES, "letterbox")
    assert img.shape == (320, 320, 3) and info.input_size == (320, 320)
    assert (info.original_width, info.original_height) == (290, 300)


def test_the_card_lists_its_sizes_default_first() -> None:
    card = ModelCard(name="m", labels=["a", "b"], input_size=(224, 224), input_sizes=SIZES)
    assert card.sizes == tuple(SIZES)
    assert ModelCard(name="m", labels=["a", "b"], input_size=(64, 48)).sizes == ((64, 48),)
    assert ModelCard.model_validate_json(card.model_dump_json()).sizes == tuple(SIZES)
    with pytest.raises(ValueError, match="Got input_size 320x320 and input_sizes 224x224, 320x320; expected "
                                         "input_size to be the first listed"):
        ModelCard(name="m", labels=["a", "b"], input_size=(320, 320), input_sizes=[(224, 224), (320, 320)])
    with pytest.raises(ValueError, match="expected each size once"):
        ModelCard(name="m", labels=["a", "b"], input_size=(224, 224), input_sizes=[(224, 224), (224, 224)])
    with pytest.raises(ValueError, match="out of range"):
        ModelCard(name="m", labels=["a", "b"], input_size=(224, 224), input_sizes=[(224, 224), (5000, 8)])


def test_a_tensorrt_profile_spans_every_listed_size() -> None:
    from edge_export import tensorrt as trt
    from visionfleet.targets import hw_profile

    assert hw_profile(SIZES) == ((160, 224), (224, 224), (320, 320))
    assert hw_profile([(64, 48)]) == ((64, 48), (64, 48), (64, 48))
    opts = trt.ort_tensorrt_provider_options("fp16", "/c", input_size=(224, 224), input_sizes=SIZES,
                                             min_batch=1, opt_batch=8, max_batch=32)
    assert opts["trt_profile_min_shapes"] == "images:1x160x224x3"
    assert opts["trt_profile_opt_shapes"] == "images:8x224x224x3"
    assert opts["trt_profile_max_shapes"] == "images:32x320x320x3"
    with pytest.raises(ValueError, match="expected input_size to be the first listed"):
        trt.ort_tensorrt_provider_options("fp16", "/c", input_size=(320, 320), input_sizes=SIZES)


def _nhwc_graph(h: int | str, w: int | str, *, flatten: bool) -> onnx.ModelProto:
    """uint8 NHWC -> probs [N, 2]: global mean (any size) or a flatten that fixes the size."""
    if flatten:  # a fixed-size head, as some exporters write: runs only at 8x8
        nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("Reshape", ["f", "shape"], ["flat"]),
                 helper.make_node("MatMul", ["flat", "w"], ["z"])]
        inits = [numpy_helper.from_array(np.array([0, 8 * 8 * 3], np.int64), "shape"),
                 numpy_helper.from_array(np.full((8 * 8 * 3, 2), 0.001, np.float32), "w")]
    else:
        nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
                 helper.make_node("MatMul", ["m", "w"], ["z"])]
        inits = [numpy_helper.from_array(np.full((3, 2), 0.01, np.float32), "w")]
    nodes.append(helper.make_node("Softmax", ["z"], ["probs"], axis=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["n", h, w, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 2])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_a_graph_must_run_at_every_listed_size(tmp_path: Path) -> None:
    from edge_export.input_sizes import check_runs_at_sizes, graph_hw

    fixed = _nhwc_graph(8, 8, flatten=False)
    assert graph_hw(fixed) == (8, 8)
    with pytest.raises(ValueError) as exc:
        check_runs_at_sizes(fixed, [(8, 8), (16, 16)])
    assert str(exc.value).startswith("Got size 16x16 for a model whose input is fixed at 8x8; expected one size, 8x8")
    check_runs_at_sizes(_nhwc_graph("h", "w", flatten=False), [(8, 8), (16, 16), (24, 12)])
    with pytest.raises(ValueError, match=r"Got an ONNX Runtime error at size 16x16: .*; expected the model to run at "
                                         r"every listed size"):
        check_runs_at_sizes(_nhwc_graph("h", "w", flatten=True), [(8, 8), (16, 16)])


def _import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    from typer.testing import CliRunner

    from visionfleet.cli import app

    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path / "home"))
    return CliRunner().invoke(app, ["models", "import", *args])


def _run_at_each_size(tmp_path: Path, name: str, card: dict) -> None:
    """The registered version loads and answers at each of its sizes, as the edge agent runs it."""
    from edge_agent.predict import predict_bytes
    from visionfleet.inference import load_model_dir
    from visionfleet.registry import Registry

    model = load_model_dir(Registry(tmp_path / "home" / "registry").local_dir(name, card["version"]))
    data = encode_image(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8), "png")
    for h, w in card["input_sizes"]:
        got = predict_bytes(model, data, size=f"{h}x{w}")
        assert got.prediction.input_size == (h, w) and got.fields["input_size"] == f"{h}x{w}"
        assert sum(got.result["probs"].values()) == pytest.approx(1.0, abs=1e-4)


def test_export_keeps_height_and_width_dynamic_and_checks_each_size(tmp_path: Path) -> None:
    """Built-in resnet (global pooling): one export, torch vs ONNX Runtime parity at each listed size."""
    torch = pytest.importorskip("torch")
    from edge_export.input_sizes import graph_hw
    from edge_export.onnx_export import export_onnx, read_metadata
    from train.models import ArchSpec, build_model

    torch.manual_seed(0)
    core = build_model(ArchSpec(arch="resnet", num_classes=3, width=4, depths=(1,)))
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    out = tmp_path / "m.onnx"
    sizes = [(32, 32), (48, 40)]
    report = export_onnx(core, out, input_size=(32, 32), input_sizes=sizes, mean=(0, 0, 0), std=(255, 255, 255),
                         metadata={"task": "classification"}, parity_images=images)
    assert report is not None and report.n == 2 * len(images) and report.top1_agreement == 1.0
    assert graph_hw(out) == (None, None)
    meta = {k: json.loads(v) for k, v in read_metadata(out).items() if k in ("input_size", "input_sizes")}
    assert meta == {"input_size": [32, 32], "input_sizes": [[32, 32], [48, 40]]}
    with pytest.raises(ValueError, match="Got input_sizes 48x40, 32x32 with input_size 32x32; expected distinct "
                                         "sizes, input_size first"):
        export_onnx(core, out, input_size=(32, 32), input_sizes=[(48, 40), (32, 32)], mean=(0, 0, 0),
                    std=(1, 1, 1), metadata={})


@pytest.mark.slow
def test_models_import_of_a_checkpoint_exports_a_dynamic_hw_graph(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``models import weights.pt --input-sizes``: exported with a dynamic H x W, served at each size.

    Slow tier (a second export, ~10-30 s on 2 busy cores); the export itself is covered above.
    """
    torch = pytest.importorskip("torch")
    from edge_export.input_sizes import graph_hw
    from train.models import ArchSpec, build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "weights.pt"
    torch.save(build_model(ArchSpec(arch="resnet", num_classes=3, width=4, depths=(1,))).state_dict(), ckpt)
    r = _import(tmp_path, monkeypatch, str(ckpt), "--name", "multi", "--labels", "a,b,c", "--arch", "resnet",
                "--width", "4", "--depths", "1", "--input-sizes", "32x32,48x48,40x64", "--json")
    assert r.exit_code == 0, r.output
    card = json.loads(r.stdout)
    assert card["input_size"] == [32, 32] and card["input_sizes"] == [[32, 32], [48, 48], [40, 64]]
    assert card["metrics"]["export_parity"]["n"] > 0 and card["metrics"]["export_parity"]["top1_agreement"] == 1.0
    from visionfleet.registry import Registry

    onnx_path = Registry(tmp_path / "home" / "registry").local_dir("multi", 1) / "model.onnx"
    assert graph_hw(onnx_path) == (None, None)
    _run_at_each_size(tmp_path, "multi", card)


def test_models_import_of_an_onnx_classifier_at_several_sizes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from test_import_exporters import LABELS, classifier

    dynamic, fixed = tmp_path / "dyn.onnx", tmp_path / "fixed.onnx"
    onnx.save(classifier("x", [-1, 3, -1, -1]), str(dynamic))
    onnx.save(classifier("x", [-1, 3, 24, 24]), str(fixed))
    labels = ",".join(LABELS)
    r = _import(tmp_path, monkeypatch, str(dynamic), "--name", "ocr", "--labels", labels, "--input-sizes",
                "24x24,40x40", "--json")
    assert r.exit_code == 0, r.output
    card = json.loads(r.stdout)
    assert card["input_size"] == [24, 24] and card["input_sizes"] == [[24, 24], [40, 40]]
    _run_at_each_size(tmp_path, "ocr", card)
    refusals = [
        ((str(fixed), "--input-sizes", "24x24,40x40"),
         "Got --input-sizes 24x24, 40x40, but the model's input 'x' is [?, 3, 24, 24] (NCHW) with a fixed height "
         "or width; expected one size (24x24)"),
        ((str(dynamic), "--input-size", "40x40", "--input-sizes", "24x24,40x40"),
         "Got --input-size 40x40 and --input-sizes 24x24,40x40; expected --input-size to be the first of "
         "--input-sizes (the default), or left out"),
        ((str(dynamic), "--input-sizes", "24x24,24x24"),
         "Got '24x24,24x24' for --input-sizes; expected distinct sizes such as 224x224,320x320"),
    ]
    for args, message in refusals:
        r = _import(tmp_path, monkeypatch, *args, "--name", "ocr", "--labels", labels)
        assert r.exit_code == 2, r.output
        assert message in " ".join(r.output.split())
