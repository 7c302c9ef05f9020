"""Import an ONNX model from any framework: load safely, wrap, check parity, register.

A PyTorch checkpoint of a built-in architecture is imported by
:func:`train.checkpoint_import.import_checkpoint` (the architectures live in ``train``,
which ``edge_export`` never imports); it reuses :func:`card_preprocessing` and
:func:`source_sha256` from here so both kinds of import describe themselves alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from edge_export.importer.reference import check_import_parity, output_kind, run_original
from edge_export.importer.resolve import fmt_dims, normalize_dynamic_dims, resolve_spec
from edge_export.importer.safe_load import check_source_file, load_onnx_safely
from edge_export.importer.samples import load_sample_images, sample_images
from edge_export.importer.spec import ImportSpec, OutputKind
from edge_export.importer.wrap import WrapInfo, wrap_onnx
from edge_export.onnx_metadata import write_metadata
from visionfleet.names import DETECTION_OUTPUTS, INPUT_NAME, OUTPUT_NAME
from visionfleet.spec import Lineage, ModelCard, Task
from visionfleet.targets import Precision

__all__ = ["import_onnx", "card_preprocessing", "source_sha256"]


def _ort_session(model_bytes: bytes, what: str):
    """A single-threaded CPU session, with a clear error when ONNX Runtime refuses the model."""
    from visionfleet.inference import RuntimeOptions, create_session

    try:
        return create_session(model_bytes, RuntimeOptions(threads=1, providers=("CPUExecutionProvider",)))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind exception types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"ONNX Runtime cannot load {what}: {msg}") from None


def source_sha256(path: Path) -> str:
    """The sha256 of an imported file, recorded in the card's lineage."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _precision_of(model: onnx.ModelProto) -> Precision:
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"}:
        return Precision.INT8
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        return Precision.FP16
    return Precision.FP32


def card_preprocessing(
    spec: ImportSpec, info: WrapInfo | None, *, found: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The card's ``preprocessing``: what was declared (or read from the model) and that it is folded into the graph.

    ``found`` adds what the import read from the graph and measured on the sample images
    (``read_from_model``, ``output_kind_from``, ``softmax_added``).
    """
    d = {
        **spec.preprocessing.to_dict(),
        "input_name": info.original_input if info else None,
        "output": (spec.output or OutputKind.PROBS).value,
        "folded_into_graph": True,
        "resize": spec.resize.value,
        **(found or {}),
    }
    if spec.detection is not None:
        head = info.head if info is not None else None
        post: dict[str, Any] = {"decode": "yolo-cxcywh", "nms": "onnx NonMaxSuppression"}
        if head is not None:
            post = {"head": head.kind.value, "decode": f"{head.kind.value} ({head.box_format.value} boxes)",
                    "nms": "in the model (kept; score threshold and top-K only)" if head.nms_in_model
                    else "onnx NonMaxSuppression"}
        settings = spec.detection.to_dict()
        if head is not None and head.nms_in_model:
            # The model's own NMS ran with its own settings; ours do not apply.
            settings = {k: v for k, v in settings.items() if k not in ("iou_threshold", "class_agnostic")}
        d["postprocessing"] = {**post, **settings}
    return d


def import_onnx(
    path: str | os.PathLike[str],
    registry: Any,
    name: str,
    spec: ImportSpec,
    *,
    images: np.ndarray | str | os.PathLike[str] | None = None,
    description: str = "",
    conversion: Any = None,
    input_sizes: Sequence[tuple[int, int]] | None = None,
) -> ModelCard:
    """Import an ONNX model from any framework: read what the graph says, wrap, check parity, register.

    ``input_sizes`` (the default size first) serves a classifier whose graph has a dynamic
    height and width at several sizes (:func:`edge_export.input_sizes.import_at_sizes`).

    Args:
        path: the ``.onnx`` file (external data, if any, must sit inside its folder).
        registry: a :class:`visionfleet.registry.Registry`.
        name: the model name to register under (a new version).
        spec: everything declared about the model; ``auto`` options and a missing input
            size are read from the graph, ``auto`` outputs measured on the images.
        images: uint8 NHWC images at the model size for the parity check, or a folder
            of image files (resized to the model's size once it is known); default
            :func:`sample_images`.
        conversion: the :class:`.convert.ConversionInfo` when ``path`` was converted
            from another format (:mod:`.convert`); recorded as the lineage's first step,
            and the card names the original file.
    Returns:
        The stored card.
    Raises:
        ValueError: unsafe or invalid file, or declared options that do not fit it.
        ImportParityError: the wrapped graph disagrees with running the original by hand.
    """
    p = check_source_file(path)
    if p.suffix.lower() != ".onnx":
        raise ValueError(f"Got {p.name!r} for import_onnx; expected a .onnx file")
    original = load_onnx_safely(p)
    # The by-hand reference runs the original nodes with their -1/0 dims read as dynamic
    # (ONNX Runtime takes a 0 literally); the wrapper does the same.
    runnable, _ = normalize_dynamic_dims(original)
    original_session = _ort_session(runnable.SerializeToString(), p.name)
    spec, io = resolve_spec(original, spec)
    assert spec.input_size is not None
    if images is None:
        images = sample_images(spec.input_size, spec.resize)
    elif not isinstance(images, np.ndarray):
        images = load_sample_images(images, spec.input_size, spec.resize)
    raw = run_original(original_session, spec, images, input_name=io.input_name,
                       output_name=io.output_names or io.output_name, batch_of_one=io.batch_of_one)
    found: dict[str, Any] = {"read_from_model": list(io.read_from_model)}
    if spec.task is Task.CLASSIFICATION:
        per_image = raw[0].size if len(raw) else len(spec.labels)
        if per_image != len(spec.labels):
            # Before looking at the values: a wrong label count explains any of them.
            n = len(spec.labels)
            raise ValueError(
                f"Got a model output {io.output_name!r} of shape {fmt_dims(io.output_dims)} giving {per_image} scores "
                f"per image; expected [N, {n}] for {n} labels"
            )
        check = output_kind(raw, spec.output, float16=io.output_elem == TensorProto.FLOAT16)
        spec = replace(spec, output=check.kind)
        found |= check.to_dict()
    wrapped, info = wrap_onnx(original, spec)
    sizes = [tuple(sz) for sz in input_sizes or ()]
    if len(sizes) > 1 or (sizes and sizes[0] != tuple(spec.input_size)):  # one size must be the input size
        from edge_export.input_sizes import import_at_sizes

        wrapped = import_at_sizes(wrapped, sizes, spec, io)  # dynamic H x W, run at every size
    wrapped_session = _ort_session(wrapped.SerializeToString(), f"the wrapped {p.name}")
    parity = check_import_parity(original_session, wrapped_session, spec, info, images, reference=raw)
    source_sha = source_sha256(p)
    source_meta = {pr.key: pr.value for pr in original.metadata_props}
    metadata: dict[str, object] = {
        "task": spec.task.value,
        "labels": list(spec.labels),
        "input_name": INPUT_NAME,
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "input_size": list(spec.input_size),
        **({"input_sizes": [list(sz) for sz in sizes]} if len(sizes) > 1 else {}),
        "resize": spec.resize.value,
        "normalization": spec.preprocessing.to_dict(),
        "framework": spec.framework,
        "model_name": name,
        "imported_from": {"file": p.name, "sha256": source_sha, **info.to_dict()},
    }
    converted = conversion.to_dict() if conversion is not None else None
    if converted is not None:
        metadata["imported_from"]["converted_from"] = {
            k: converted[k] for k in ("format", "source", "converter", "sha256") if k in converted
        }
    if spec.task is Task.CLASSIFICATION:
        metadata["output_name"] = OUTPUT_NAME
    else:
        assert spec.detection is not None
        metadata["output_names"] = list(DETECTION_OUTPUTS)
        metadata["max_detections"] = spec.detection.max_detections
        metadata["detection"] = spec.detection.to_dict()
    if source_meta:
        text = json.dumps(source_meta)
        metadata["source_metadata"] = text if len(text) <= 65536 else json.dumps({"truncated": True})
    write_metadata(wrapped, metadata)
    step = {
        "op": "import",
        "format": "onnx",
        "source": p.name,
        "sha256": source_sha,
        "framework": spec.framework,
        **info.to_dict(),
        **io.to_dict(),
        **found,
    }
    if spec.detection is not None:
        step["detection"] = spec.detection.to_dict()
    card = ModelCard(
        name=name,
        task=spec.task,
        labels=list(spec.labels),
        input_size=spec.input_size,
        input_sizes=sizes if len(sizes) > 1 else [],
        resize=spec.resize,
        model_file="model.onnx",
        format="onnx",
        precision=_precision_of(original).value,
        framework=spec.framework,
        preprocessing=card_preprocessing(
            spec, info, found={k: v for k, v in found.items() if k != "output_values"}
        ),
        metrics={
            "import_parity": parity.to_dict(),
            **({"conversion_parity": {k: converted["conversion_parity"][k] for k in ("n", "max_abs_diff")}}
               if converted is not None else {}),
        },
        lineage=Lineage(steps=[converted, step] if converted is not None else [step]),
        description=description
        or (f"imported from {converted['source']} ({converted['format']}, converted to ONNX)" if converted
            else f"imported from {p.name}"),
    )
    with tempfile.TemporaryDirectory(prefix="vf-import-") as tmp:
        out = Path(tmp) / "model.onnx"
        onnx.save_model(wrapped, os.fspath(out))
        return registry.register(card, {"onnx": out})
