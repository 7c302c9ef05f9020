"""Serving one ONNX model at several input sizes: read, relax and check its height and width.

A model served at several sizes (a card's ``input_sizes``) needs a graph whose uint8
NHWC ``images`` input has a dynamic height and width, and that really runs at each
listed size: global pooling makes the built-in architectures size-free, but a graph
with a fixed reshape or a fixed-size head does not run elsewhere, whatever its input
declares. :func:`check_runs_at_sizes` runs ONNX Runtime at every size to find out.
Light on purpose (onnx, onnxruntime, numpy): the ONNX importer uses it without torch.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import onnx

from visionfleet.imaging import format_size
from visionfleet.names import INPUT_NAME

__all__ = ["graph_hw", "check_runs_at_sizes", "relax_hw", "import_at_sizes"]


Source = str | os.PathLike[str] | bytes | onnx.ModelProto  # a file, its bytes, or the loaded model


def _proto(source: Source) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, bytes):
        return onnx.load_from_string(source)
    return onnx.load(os.fspath(source), load_external_data=False)


def graph_hw(source: Source) -> tuple[int | None, int | None]:
    """(height, width) of the uint8 NHWC ``images`` input as the graph declares it (None: dynamic)."""
    model = _proto(source)
    vi = next((i for i in model.graph.input if i.name == INPUT_NAME), model.graph.input[0])
    d = vi.type.tensor_type.shape.dim
    if len(d) != 4:
        raise ValueError(f"Got an input {vi.name!r} with {len(d)} dims; expected uint8 [N, H, W, 3]")

    def one(x) -> int | None:
        return int(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else None

    return one(d[1]), one(d[2])


def check_runs_at_sizes(source: Source, sizes: Sequence[tuple[int, int]]) -> None:
    """Run the ONNX file with ONNX Runtime at every listed size (a batch of 2 gray images).

    Raises:
        ValueError: the graph's input has a fixed height/width another size needs, or
            ONNX Runtime fails at a size (its message quoted), or the outputs' batch is off.
    """
    gh, gw = graph_hw(source)
    for h, w in sizes:
        if (gh is not None and gh != h) or (gw is not None and gw != w):
            fixed = f"{gh or 'H'}x{gw or 'W'}"
            raise ValueError(
                f"Got size {h}x{w} for a model whose input is fixed at {fixed}; expected one size, {fixed} "
                "(export or import it with a dynamic height and width to serve several sizes)"
            )
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    target = source.SerializeToString() if isinstance(source, onnx.ModelProto) else (
        source if isinstance(source, bytes) else os.fspath(source))
    sess = ort.InferenceSession(target, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for h, w in sizes:
        try:
            out = sess.run(None, {name: np.full((2, h, w, 3), 114, np.uint8)})
        except Exception as exc:  # noqa: BLE001 - ORT raises several types; quote it
            first = str(exc).strip().splitlines()[0][:300]
            raise ValueError(f"Got an ONNX Runtime error at size {h}x{w}: {first}; expected the model to run at "
                             f"every listed size") from None
        if any(o.shape[:1] != (2,) for o in out):
            raise ValueError(f"Got outputs {[o.shape for o in out]} at size {h}x{w}; expected a batch of 2")


def relax_hw(model: onnx.ModelProto, sizes: Sequence[tuple[int, int]]) -> onnx.ModelProto:
    """The model with its ``images`` input's height and width dynamic (``height``, ``width``), in place.

    Only for a graph that runs at ``sizes`` once relaxed: the caller checks with
    :func:`check_runs_at_sizes`.
    """
    vi = next((i for i in model.graph.input if i.name == INPUT_NAME), model.graph.input[0])
    dims = vi.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ValueError(f"Got an input {vi.name!r} with {len(dims)} dims; expected uint8 [N, H, W, 3]")
    if len(sizes) > 1:
        for d, name in ((dims[1], "height"), (dims[2], "width")):
            d.Clear()
            d.dim_param = name
    return model


def import_at_sizes(wrapped: onnx.ModelProto, sizes: Sequence[tuple[int, int]], spec, io) -> onnx.ModelProto:
    """An imported (wrapped) classifier made servable at every listed size, checked by running it.

    Args:
        wrapped: the importer's contract graph (uint8 NHWC ``images`` at the default size).
        sizes: ``--input-sizes``, the default (``spec.input_size``) first.
        spec: the resolved :class:`~edge_export.importer.spec.ImportSpec`.
        io: what the importer read from the original graph (``GraphIO``: its input's dims).
    Raises:
        ValueError: the original input has a fixed height or width, the model is a
            detector (its folded head clips boxes to the default size), the sizes do not
            start with the default, or the graph does not run at a size.
    """
    from visionfleet.spec import Task

    listed = [(int(h), int(w)) for h, w in sizes]
    given = ", ".join(format_size(s) for s in listed)
    if tuple(listed[0]) != tuple(spec.input_size):
        raise ValueError(f"Got --input-sizes {given} with --input-size {format_size(spec.input_size)}; expected "
                         "the input size first (it is the default)")
    if len(listed) == 1:
        return wrapped
    if spec.task is Task.DETECTION:
        raise ValueError(f"Got --input-sizes {given} for a detection import; expected one size (the folded "
                         "detection head clips boxes to the import size)")
    layout = getattr(spec.preprocessing.layout, "value", str(spec.preprocessing.layout)).upper()
    hw_at = (2, 3) if layout == "NCHW" else (1, 2)
    dims = list(io.input_dims)
    fixed = [dims[i] for i in hw_at if dims[i] is not None]
    if fixed:
        shape = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
        raise ValueError(f"Got --input-sizes {given}, but the model's input {io.input_name!r} is {shape} ({layout}) "
                         f"with a fixed height or width; expected one size ({format_size(spec.input_size)})")
    relax_hw(wrapped, listed)
    check_runs_at_sizes(wrapped, listed)
    return wrapped
