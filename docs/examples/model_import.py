"""Import a foreign ONNX classifier (BGR, NCHW, float, logits) and run it like any other version."""

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_export.importer import ImportRequest, import_onnx, sample_images
from visionfleet.inference import load_model_dir
from visionfleet.predict import predictions
from visionfleet.registry import Registry

# A stand-in for a file exported by another framework: input "data" [N, 3, 32, 32] float
# in BGR order, normalized with mean/std on the 0..1 scale; output "scores" = logits.
rng = np.random.default_rng(0)
graph = helper.make_graph(
    [
        helper.make_node("Conv", ["data", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["scores"], transB=1),
    ],
    "foreign",
    [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 32, 32])],
    [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
    initializer=[
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.5, (3, 8)).astype(np.float32), "fc"),
    ],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

with tempfile.TemporaryDirectory() as tmp:
    src = Path(tmp) / "model.onnx"
    onnx.save(model, str(src))

    # Everything about the model is declared; nothing is guessed.
    spec = ImportRequest.parse(
        task="classification",
        labels=["cat", "dog", "bird"],
        input_size=(32, 32),               # (height, width)
        layout="NCHW",
        input_dtype="float32",
        channel_order="BGR",
        mean=(0.406, 0.456, 0.485),        # per channel, in the model's (BGR) order
        std=(0.225, 0.224, 0.229),
        scale="0-1",                       # mean/std apply to pixels / 255
        output="logits",                   # the wrapper adds Softmax
        resize="letterbox",
        framework="caffe",
    ).to_spec()

    registry = Registry(Path(tmp) / "registry")
    card = import_onnx(src, registry, "shapes-bgr", spec)  # wrap + parity check + register
    print(f"registered {card.ref}: parity {card.metrics['import_parity']}")

    # The new version takes uint8 RGB NHWC images, like every registered model.
    loaded = load_model_dir(registry.local_dir(card.name, card.version))
    images = sample_images(card.input_size, card.resize, n=4)
    probs = loaded.run(images)[0]
    print(predictions(card, [probs[:1]], [None], top_k=3)[0].response())

    # The same prediction by hand: BGR, /255, normalize, NCHW, run the original, softmax.
    import onnxruntime as ort

    x = images[..., ::-1].astype(np.float32) / 255
    x = ((x - np.array([0.406, 0.456, 0.485])) / np.array([0.225, 0.224, 0.229])).astype(np.float32)
    logits = ort.InferenceSession(str(src)).run(None, {"data": x.transpose(0, 3, 1, 2)})[0]
    print("same top-1 as by hand:", bool((logits.argmax(1) == probs.argmax(1)).all()))
