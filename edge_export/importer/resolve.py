"""What the graph itself says about its image input and its output, read once.

Exporters spell a dynamic dimension in many ways: PyTorch writes a named ``dim_param``
(``batch``), tf2onnx ``unk__123``, paddle2onnx ``dim_value: -1``, other converters
``dim_value: 0`` or nothing at all. :func:`read_dim` is the one place a dimension is
read; the wrapper, the parity check and the registration all go through it, and
:func:`normalize_dynamic_dims` rewrites the graph's own ``-1``/``0`` dims as unknown ones
so that ONNX Runtime (which takes ``0`` literally) runs the original on any batch.

:func:`resolve_spec` fills what was left ``auto`` in an :class:`.ImportSpec` from the
graph — input size, layout (the axis that holds 1 or 3 channels), element type,
channels, which output — and checks what was declared against it. Whether a classifier
returns logits is not in the graph; :func:`.reference.output_kind` measures it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import onnx
from onnx import TensorProto

from edge_export.importer.spec import (
    DTYPES,
    DetectionOptions,
    HeadLayout,
    ImportSpec,
    InputDType,
    Layout,
    OutputKind,
)
from visionfleet.spec import Task

__all__ = ["GraphIO", "read_dim", "tensor_dims", "fmt_dims", "normalize_dynamic_dims", "resolve_spec", "resolve_head"]

_CHANNELS = (1, 3)
_ONNX_TO_DTYPE = {d.onnx_type: k for k, d in DTYPES.items()}


def read_dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A fixed size, or None for a dynamic dimension however the exporter wrote it.

    Only a positive ``dim_value`` is a size. ``-1`` (paddle2onnx) and ``0`` are not image
    sizes anyone exports on purpose, so they mean "dynamic", as do a ``dim_param`` of
    any name (``batch``, ``unk__123``, ``N``) and a dimension with neither field set.
    """
    return int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None


def tensor_dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    """A tensor's dims through :func:`read_dim` (empty when it has no recorded shape)."""
    return [read_dim(d) for d in vi.type.tensor_type.shape.dim]


def fmt_dims(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def normalize_dynamic_dims(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy whose ``-1``/``0`` dims (graph inputs, outputs, value_info) are unknown dims.

    ONNX Runtime treats ``-1`` as dynamic but ``0`` as a fixed, empty axis, so a model
    exported with a ``0`` batch would refuse every real batch. The nodes are untouched;
    only the declared shapes change. Returns the copy and one note per rewritten dim.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes: list[str] = []
    graph = out.graph
    for where, values in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
        for vi in values:
            for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value <= 0:
                    if where != "value_info":
                        notes.append(f"{where} {vi.name!r} axis {axis}: dim_value {dim.dim_value} read as dynamic")
                    dim.Clear()
    return out, notes


@dataclass(frozen=True)
class GraphIO:
    """The image input and the output the import uses, as the graph declares them."""

    input_name: str
    output_name: str
    input_dims: tuple[int | None, ...]
    output_dims: tuple[int | None, ...]
    output_elem: int
    batch_of_one: bool  # the input's batch is fixed at 1 (the wrapper makes it dynamic)
    read_from_model: tuple[str, ...]  # the options taken from the graph rather than declared
    output_picked_by: str  # "only output", "--output" or "shape"

    def to_dict(self) -> dict[str, Any]:
        return {
            "original_input_shape": fmt_dims(self.input_dims),
            "original_output_shape": fmt_dims(self.output_dims),
            "read_from_model": list(self.read_from_model),
            "output_picked_by": self.output_picked_by,
        }


def _elem_name(elem: int) -> str:
    return TensorProto.DataType.Name(elem).lower() if elem else "untyped"


def _pick_input(model: onnx.ModelProto, name: str | None) -> onnx.ValueInfoProto:
    init_names = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in init_names]
    names = [v.name for v in inputs]
    if name is not None:
        chosen = next((v for v in inputs if v.name == name), None)
        if chosen is None:
            raise ValueError(f"Got {name!r} for --input-name; expected one of the model's inputs {names}")
    elif len(inputs) != 1:
        raise ValueError(f"Got a model with {len(inputs)} inputs {names}; expected one, or name it with --input-name")
    else:
        chosen = inputs[0]
    others = [n for n in names if n != chosen.name]
    if others:
        raise ValueError(f"Got a model with further inputs {others} besides {chosen.name!r}; expected one image input")
    return chosen


def resolve_head(
    dims: Sequence[int | None], n_classes: int, opts: DetectionOptions
) -> tuple[HeadLayout, bool, int | None]:
    """(layout, objectness, anchors) of a YOLO-style head output ``dims``."""
    dims = list(dims)
    if len(dims) != 3:
        raise ValueError(
            f"Got a detection output of shape {fmt_dims(dims)}; expected [N, 4 + C, A] or [N, A, 4 + C] (YOLO-style)"
        )
    widths = {4 + n_classes: False, 5 + n_classes: True}
    if opts.objectness is not None:
        widths = {k: v for k, v in widths.items() if v == opts.objectness}
    fits = {HeadLayout.CHANNELS_FIRST: dims[1] in widths, HeadLayout.ANCHORS_FIRST: dims[2] in widths}
    want = " or ".join(f"{k} ({'5' if v else '4'} + {n_classes})" for k, v in widths.items())
    if opts.head_layout is HeadLayout.AUTO:
        matches = [k for k, ok in fits.items() if ok]
        if len(matches) != 1:
            raise ValueError(
                f"Got a detection output of shape {fmt_dims(dims)} for {n_classes} labels; expected one axis of width "
                f"{want} (name the layout with --head-layout channels-first|anchors-first)"
            )
        layout = matches[0]
    else:
        layout = opts.head_layout
        if not fits[layout]:
            raise ValueError(
                f"Got --head-layout {layout.value} and a detection output of shape {fmt_dims(dims)}; expected a "
                f"feature axis of width {want} for {n_classes} labels"
            )
    width = dims[1] if layout is HeadLayout.CHANNELS_FIRST else dims[2]
    anchors = dims[2] if layout is HeadLayout.CHANNELS_FIRST else dims[1]
    return layout, widths[width], anchors  # type: ignore[index]


def _fits_task(dims: list[int | None], spec: ImportSpec) -> bool:
    """Whether an output of this shape could be the task's output (unknown dims could be anything)."""
    n = len(spec.labels)
    if spec.task is Task.CLASSIFICATION:
        rest = dims[1:]
        if not rest:
            return False
        known = math.prod(d for d in rest if d is not None)
        return known == n if None not in rest else n % known == 0
    return len(dims) == 3 and any(d is None or d in (4 + n, 5 + n) for d in dims[1:])


def _pick_output(model: onnx.ModelProto, spec: ImportSpec) -> tuple[onnx.ValueInfoProto, str, OutputKind | None]:
    """(output, how it was picked, the kind the older ``--output logits|probs`` spelling named)."""
    outputs = list(model.graph.output)
    names = [o.name for o in outputs]
    name = spec.output_name
    legacy: OutputKind | None = None
    if name is not None:
        chosen = next((o for o in outputs if o.name == name), None)
        if chosen is not None:
            return chosen, "--output", None
        if name.lower() not in (OutputKind.LOGITS.value, OutputKind.PROBS.value):
            raise ValueError(
                f"Got {name!r} for --output; expected one of the model's outputs {names} (what the output holds "
                "is --outputs-are logits|probs|auto)"
            )
        # `--output logits|probs` said what the output holds before `--output` named it;
        # a value that names no output of this model still means that.
        legacy = OutputKind(name.lower())
        if spec.output not in (None, OutputKind.AUTO, legacy):
            raise ValueError(
                f"Got --output {name} (no output of the model has that name) and --outputs-are {spec.output.value}; "
                f"expected an output name among {names}"
            )
    if len(outputs) == 1:
        return outputs[0], "only output", legacy
    fitting = [o for o in outputs if _fits_task(tensor_dims(o), spec)]
    if len(fitting) == 1:
        return fitting[0], "shape", legacy
    found = ", ".join(f"{o.name!r} {fmt_dims(tensor_dims(o))}" for o in outputs)
    want = f"[N, {len(spec.labels)}]" if spec.task is Task.CLASSIFICATION else "a YOLO-style head"
    raise ValueError(
        f"Got a model with {len(outputs)} outputs ({found}), {len(fitting) or 'none'} of them shaped like {want}; "
        f"expected one, or name it with --output NAME (one of {names})"
    )


def _layout(vi: onnx.ValueInfoProto, dims: list[int | None], declared: Layout) -> Layout:
    shape = fmt_dims(dims)
    if declared is Layout.AUTO:
        fits = [lay for lay, c in ((Layout.NCHW, dims[1]), (Layout.NHWC, dims[3])) if c in _CHANNELS]
        if len(fits) != 1:
            found = "both axis 1 and axis 3 hold" if fits else "neither axis 1 nor axis 3 holds"
            raise ValueError(
                f"Got a model input {vi.name!r} of shape {shape}: {found} 1 or 3 channels; expected exactly one "
                "(NCHW: axis 1, NHWC: axis 3), or name the layout with --layout nchw|nhwc"
            )
        return fits[0]
    c_at, other = (1, 3) if declared is Layout.NCHW else (3, 1)
    if dims[c_at] not in (None, *_CHANNELS):
        hint = ""
        if dims[other] in _CHANNELS:
            hint = f" (it looks {'NHWC' if declared is Layout.NCHW else 'NCHW'})"
        raise ValueError(
            f"Got --layout {declared.value}, but the model's input {vi.name!r} is {shape}{hint}; expected 1 or 3 "
            "channels where the layout puts them (or --layout auto)"
        )
    return declared


def resolve_spec(model: onnx.ModelProto, spec: ImportSpec) -> tuple[ImportSpec, GraphIO]:
    """Fill ``auto`` options from the graph and check the declared ones against it.

    Returns a spec whose input size, layout, dtype, channels, scale and input/output
    names are concrete (the output kind stays ``auto`` for a classifier until it is
    measured), and what the graph declares. Idempotent on its own result.

    Raises:
        ValueError: a declaration does not fit the graph, or the graph leaves open what
            nothing declared (a dynamic height/width without an input size, a layout
            no axis tells); every message names the flag that settles it.
    """
    pre = spec.preprocessing
    vi = _pick_input(model, spec.input_name)
    dims = tensor_dims(vi)
    shape = fmt_dims(dims)
    if len(dims) != 4:
        raise ValueError(f"Got a model input {vi.name!r} of shape {shape}; expected a 4-D image batch")
    read: list[str] = []

    elem = vi.type.tensor_type.elem_type
    if pre.dtype is InputDType.AUTO:
        if elem not in _ONNX_TO_DTYPE:
            raise ValueError(
                f"Got a model input {vi.name!r} of type {_elem_name(elem)}; expected float32, float16 or uint8"
            )
        dtype = _ONNX_TO_DTYPE[elem]
        read.append("input_dtype")
    else:
        dtype = pre.dtype
        if elem != DTYPES[dtype].onnx_type:
            raise ValueError(
                f"Got --input-dtype {dtype.value}, but the model's input {vi.name!r} is {_elem_name(elem)}; "
                "expected them to match (or --input-dtype auto)"
            )

    layout = _layout(vi, dims, pre.layout)
    if pre.layout is Layout.AUTO:
        read.append("layout")
    c_at, hw_at = (1, (2, 3)) if layout is Layout.NCHW else (3, (1, 2))
    channels = dims[c_at] or 3  # a dynamic channel axis takes the RGB image as it is
    if pre.channels is None:
        read.append("channels")
    elif pre.channels != channels:
        raise ValueError(
            f"Got {pre.channels} channels, but the model's input {vi.name!r} is {shape} ({layout.value}); "
            "expected them to match"
        )

    model_hw = (dims[hw_at[0]], dims[hw_at[1]])
    if spec.input_size is None:
        if None in model_hw:
            raise ValueError(
                f"Got a model input {vi.name!r} of shape {shape} ({layout.value}) with a dynamic height or width; "
                "expected --input-size HEIGHTxWIDTH, the size to serve it at"
            )
        size = (int(model_hw[0]), int(model_hw[1]))  # type: ignore[arg-type]
        read.append("input_size")
    else:
        size = spec.input_size
        if any(m is not None and m != d for m, d in zip(model_hw, size)):
            raise ValueError(
                f"Got --input-size {size[0]}x{size[1]}, but the model's input {vi.name!r} is {shape} "
                f"({layout.value}); expected them to match (or leave --input-size out to use the model's)"
            )

    if dims[0] not in (None, 1):
        raise ValueError(
            f"Got a model input {vi.name!r} with a fixed batch of {dims[0]}; expected a dynamic batch (or 1)"
        )

    out_vi, picked_by, legacy = _pick_output(model, spec)
    output = legacy or spec.output
    if spec.task is Task.DETECTION:
        output = OutputKind.PROBS if output in (None, OutputKind.AUTO) else output
    elif output is None:
        output = OutputKind.AUTO

    resolved = replace(
        spec,
        input_size=size,
        preprocessing=replace(pre, layout=layout, dtype=dtype, channels=channels),
        input_name=vi.name,
        output_name=out_vi.name,
        output=output,
    )
    io = GraphIO(
        input_name=vi.name,
        output_name=out_vi.name,
        input_dims=tuple(dims),
        output_dims=tuple(tensor_dims(out_vi)),
        output_elem=out_vi.type.tensor_type.elem_type,
        batch_of_one=dims[0] == 1,
        read_from_model=tuple(read),
        output_picked_by=picked_by,
    )
    return resolved, io
