"""Safe loading of a file offered for import: refuse what is never imported, vet ONNX external data.

Safety: ONNX external-data paths that leave the model's folder are refused, pickles
are never unpickled, TensorRT engines (``.plan``) are never accepted from outside
(build them locally with ``visionfleet tensorrt build``).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto

__all__ = ["check_source_file", "load_onnx_safely", "CHECKPOINT_SUFFIXES", "ENGINE_SUFFIXES"]

_PROTOBUF_LIMIT = 2**31 - 1
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def check_source_file(path: str | os.PathLike[str]) -> Path:
    """Refuse what is never imported (engines, pickles, unknown formats) before reading it."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in ENGINE_SUFFIXES:
        raise ValueError(
            f"Got {p.name!r}: TensorRT engines are never accepted from outside (an engine is native code for one "
            "GPU and cannot be verified); import the ONNX model and build the engine here with "
            "`visionfleet tensorrt build`"
        )
    from edge_export.importer.convert import CONVERTED_SUFFIXES  # formats converted to ONNX on import

    if suffix not in (".onnx", *CHECKPOINT_SUFFIXES, *CONVERTED_SUFFIXES):
        others = "".join(f", {s}" for s in CONVERTED_SUFFIXES)
        raise ValueError(
            f"Got {p.name!r}; expected a .onnx model or a .pt/.pth PyTorch state dict (or a format converted on "
            f"import: a .pt/.pth TorchScript archive{others}; pickles and TensorRT engines are refused)"
        )
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    return p


def _graph_tensors(graph: onnx.GraphProto):
    """Every tensor stored in a graph: initializers, sparse ones, node attributes, subgraphs."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for g in attr.graphs:
                yield from _graph_tensors(g)


def _model_tensors(model: onnx.ModelProto):
    yield from _graph_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> int:
    """Refuse external-data references that leave ``base_dir``; returns how many there are."""
    base = base_dir.resolve()
    count = 0
    for tensor in _model_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        count += 1
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        # Resolve symlinks too: a link inside the folder pointing outside escapes it.
        target = (base / location).resolve() if location else base
        if (
            not location
            or os.path.isabs(location)
            or Path(location).drive
            or ".." in Path(location.replace("\\", "/")).parts
            or not target.is_relative_to(base)
            or target == base
        ):
            raise ValueError(
                f"Got external data location {location!r} for tensor {tensor.name!r}; expected a file inside the "
                f"model's folder {base} (paths that leave it are refused)"
            )
        if not target.is_file():
            raise FileNotFoundError(f"tensor {tensor.name!r} names external data {location!r}, which is missing")
    return count


def load_onnx_safely(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX file for import: external data vetted, ``onnx.checker`` passed.

    Raises:
        ValueError: not an ONNX model, external data outside the model's folder, or the
            model fails ``onnx.checker``.
    """
    p = Path(path)
    try:
        model = onnx.load(os.fspath(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for garbage
        raise ValueError(f"{p.name} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise ValueError(f"{p.name} is not a readable ONNX model (no graph nodes)")
    if _check_external_data(model, p.parent):
        onnx.load_external_data_for_model(model, os.fspath(p.parent.resolve()))
        if model.ByteSize() > _PROTOBUF_LIMIT:
            raise ValueError(
                f"{p.name} holds more than 2 GB of weights; models over the protobuf limit are not supported"
            )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - ValidationError and C++ errors alike
        raise ValueError(f"{p.name} fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None
    return model
