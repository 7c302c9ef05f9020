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
    NMS_IN_MODEL,
    BoxFormat,
    DetectionOptions,
    HeadLayout,
    ImportSpec,
    InputDType,
    Layout,
    OutputKind,
)
from visionfleet.spec import Task

__all__ = [
    "GraphIO",
    "DetectionHead",
    "read_dim",
    "tensor_dims",
    "fmt_dims",
    "normalize_dynamic_dims",
    "resolve_spec",
    "resolve_head",
    "resolve_detection_head",
]

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
    output_names: tuple[str, ...] = ()  # every output the import reads (a detection head may have 2 or 4)
    head: "DetectionHead | None" = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "original_input_shape": fmt_dims(self.input_dims),
            "original_output_shape": fmt_dims(self.output_dims),
            "read_from_model": list(self.read_from_model),
            "output_picked_by": self.output_picked_by,
        }
        if self.head is not None:
            d["head"] = self.head.to_dict()
        return d


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
                f"{want} (name the layout with --head-layout channels-first|anchors-first); an end-to-end head is "
                "[N, K, 6] (--head-layout end-to-end)"
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


# What each head is called in the field, for the card.
_FAMILIES = {
    HeadLayout.CHANNELS_FIRST: "YOLOv8 / YOLO11 style [N, 4 + C, A], no objectness",
    HeadLayout.ANCHORS_FIRST: "YOLOv5 / v7 / YOLOX style [N, A, 4 + C] or [N, A, 5 + C]",
    HeadLayout.END_TO_END: "end-to-end [N, K, 6] x1, y1, x2, y2, score, class (YOLOv10, Ultralytics nms=True)",
    HeadLayout.NMS_OUTPUTS: "num_dets, boxes, scores, classes (EfficientNMS-style, NMS inside the graph)",
    HeadLayout.BOXES_SCORES: "separate boxes [N, A, 4] and scores [N, A, C] (SSD / YOLOX / NanoDet-style)",
}


@dataclass(frozen=True)
class DetectionHead:
    """The detection head found in the graph: its kind and the outputs it reads, in a fixed order.

    ``outputs``: ``(head,)`` for YOLO and end-to-end heads, ``(boxes, scores)`` for
    boxes-scores heads, ``(num_dets, boxes, scores, classes)`` for nms-outputs heads.
    """

    kind: HeadLayout
    outputs: tuple[str, ...]
    dims: tuple[tuple[int | None, ...], ...]
    objectness: bool | None  # YOLO heads only
    rows: int | None  # anchors (decoded heads) or rows (heads that already ran NMS); None: dynamic
    box_format: BoxFormat
    picked_by: str
    metadata: tuple[tuple[str, str], ...] = ()  # what the exporter's own metadata said about the head

    @property
    def nms_in_model(self) -> bool:
        return self.kind in NMS_IN_MODEL

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "family": _FAMILIES[self.kind],
            "outputs": {n: fmt_dims(d) for n, d in zip(self.outputs, self.dims)},
            "box_format": self.box_format.value,
            "objectness": self.objectness,
            "rows": self.rows,
            "import_added": "score threshold and top-K (the model's own NMS kept, no second one)"
            if self.nms_in_model
            else "box decode, NonMaxSuppression, top-K",
            "picked_by": self.picked_by,
            **({"from_metadata": dict(self.metadata)} if self.metadata else {}),
        }


def _is_float(elem: int) -> bool:
    return elem in (TensorProto.FLOAT, TensorProto.FLOAT16)


def _is_int(elem: int) -> bool:
    return elem in (TensorProto.INT32, TensorProto.INT64, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8)


def _by_name(cands: list[onnx.ValueInfoProto], words: tuple[str, ...]) -> list[onnx.ValueInfoProto]:
    return [c for c in cands if any(w in c.name.lower() for w in words)]


def _match_nms_outputs(cands: list[onnx.ValueInfoProto]) -> tuple[onnx.ValueInfoProto, ...] | None:
    """(num_dets, boxes, scores, classes) among the outputs, or None when they are not that form."""
    if len(cands) != 4:
        return None
    elem = {c.name: c.type.tensor_type.elem_type for c in cands}
    dims = {c.name: tensor_dims(c) for c in cands}
    num = [c for c in cands if _is_int(elem[c.name]) and (len(dims[c.name]) == 1 or dims[c.name][1:] == [1])]
    boxes = [c for c in cands if _is_float(elem[c.name]) and len(dims[c.name]) == 3 and dims[c.name][2] == 4]
    rows = [c for c in cands if len(dims[c.name]) == 2 and dims[c.name][1] != 1 and c not in num]
    if len(num) != 1 or len(boxes) != 1 or len(rows) != 2:
        return None
    ints = [c for c in rows if _is_int(elem[c.name])]
    if len(ints) == 1:
        classes = ints[0]
    else:  # both float (or both int): the names tell
        named = _by_name(rows, ("class", "label", "cls"))
        if len(named) != 1:
            return None
        classes = named[0]
    scores = next(c for c in rows if c is not classes)
    if not _is_float(elem[scores.name]):
        return None
    return num[0], boxes[0], scores, classes


def _match_boxes_scores(cands: list[onnx.ValueInfoProto], n_cls: int) -> tuple[onnx.ValueInfoProto, ...] | None:
    """(boxes [N, A, 4], scores [N, A, C]) among the outputs, or None."""
    three = [c for c in cands if len(tensor_dims(c)) == 3 and _is_float(c.type.tensor_type.elem_type)]
    boxes = [c for c in three if tensor_dims(c)[2] == 4]
    scores = [c for c in three if tensor_dims(c)[2] == n_cls]
    if n_cls == 4:  # both are [N, A, 4]: the names tell
        boxes, scores = _by_name(boxes, ("box",)), _by_name(scores, ("score", "conf", "cls", "class", "logit"))
    if len(boxes) != 1 or len(scores) != 1 or boxes[0] is scores[0]:
        return None
    a1, a2 = tensor_dims(boxes[0])[1], tensor_dims(scores[0])[1]
    if a1 is not None and a2 is not None and a1 != a2:
        return None
    return boxes[0], scores[0]


def _box_format(kind: HeadLayout, opts: DetectionOptions, boxes: onnx.ValueInfoProto) -> BoxFormat:
    declared = opts.box_format
    if kind in (HeadLayout.CHANNELS_FIRST, HeadLayout.ANCHORS_FIRST):
        if declared is BoxFormat.XYXY:
            raise ValueError(
                f"Got --box-format xyxy for a {kind.value} YOLO head; expected cxcywh or auto (YOLO heads write "
                "centre boxes; for corner boxes in a separate output use --head-layout boxes-scores)"
            )
        return BoxFormat.CXCYWH
    if declared is not BoxFormat.AUTO:
        return declared
    if kind in NMS_IN_MODEL:
        return BoxFormat.XYXY  # what YOLOv10, Ultralytics nms=True and EfficientNMS write
    name = boxes.name.lower()
    said = [f for f, words in ((BoxFormat.XYXY, ("xyxy", "x1y1")), (BoxFormat.CXCYWH, ("cxcywh", "xywh")))
            if any(w in name for w in words)]
    if len(said) != 1:
        raise ValueError(
            f"Got a boxes output {boxes.name!r} {fmt_dims(tensor_dims(boxes))} with --box-format auto; expected "
            "--box-format xyxy or cxcywh (corner and centre boxes look alike in a graph; auto reads only an "
            "output name that says xyxy or cxcywh)"
        )
    return said[0]


def _refuse_plugins(model: onnx.ModelProto) -> None:
    plugins = sorted({n.op_type for n in model.graph.node if "TRT" in n.op_type or n.domain.lower() == "trt"})
    if plugins:
        raise ValueError(
            f"Got a graph with the TensorRT plugin op(s) {plugins}; expected standard ONNX ops (ONNX Runtime cannot "
            "run a TensorRT plugin: export with ONNX NonMaxSuppression, or without NMS, and import that)"
        )


def resolve_detection_head(model: onnx.ModelProto, spec: ImportSpec) -> DetectionHead:
    """Which detection head the graph ends in, and which outputs it reads.

    ``--head-layout`` names it, or ``auto`` recognises it from the outputs' shapes: four
    outputs shaped num_dets/boxes/scores/classes, a pair ``[N, A, 4]`` + ``[N, A, C]``,
    or one output that is a YOLO head (``[N, 4+C, A]``, ``[N, A, 4+C]``, ``[N, A, 5+C]``)
    or an end-to-end one (``[N, K, 6]``). ``--output A[,B…]`` restricts the outputs looked at.

    Raises:
        ValueError: no head, or a shape that reads as two kinds (named with --head-layout).
    """
    opts = spec.detection
    assert opts is not None
    _refuse_plugins(model)
    n_cls = len(spec.labels)
    meta = {p.key: p.value for p in model.metadata_props}
    from_meta: list[tuple[str, str]] = []
    if meta.get("description"):
        from_meta.append(("description", meta["description"][:200]))
    outputs = list(model.graph.output)
    names = [o.name for o in outputs]
    cands, picked = outputs, ("only output" if len(outputs) == 1 else "shape")
    if spec.output_name is not None:
        wanted = [w.strip() for w in spec.output_name.split(",") if w.strip()]
        if not (wanted == [spec.output_name.strip()] and wanted[0].lower() in ("logits", "probs")
                and wanted[0] not in names):  # the older --output probs
            missing = [w for w in wanted if w not in names]
            if missing:
                raise ValueError(
                    f"Got {missing} for --output; expected names among the model's outputs {names} (a head with "
                    "several outputs: --output BOXES,SCORES)"
                )
            cands, picked = [o for w in wanted for o in outputs if o.name == w], "--output"
    kind = opts.head_layout
    found: tuple[onnx.ValueInfoProto, ...] | None = None
    if kind is HeadLayout.AUTO:
        if (found := _match_nms_outputs(cands)) is not None:
            kind = HeadLayout.NMS_OUTPUTS
        elif (found := _match_boxes_scores(cands, n_cls)) is not None:
            kind = HeadLayout.BOXES_SCORES
        else:
            single = [c for c in cands if _fits_task(tensor_dims(c), spec)]
            if len(cands) == 1:
                single = cands
            if len(single) != 1:
                listed = ", ".join(f"{o.name!r} {fmt_dims(tensor_dims(o))}" for o in cands)
                raise ValueError(
                    f"Got a model with {len(cands)} outputs ({listed}), {len(single) or 'none'} of them shaped like "
                    f"a detection head for {n_cls} labels; expected one YOLO-style or end-to-end output, a boxes "
                    "[N, A, 4] + scores [N, A, C] pair, or num_dets/boxes/scores/classes (name them with --output "
                    "A[,B…] and --head-layout)"
                )
            dims = tensor_dims(single[0])
            widths = (4 + n_cls, 5 + n_cls)
            said = meta.get("end2end")  # Ultralytics writes end2end True/False into the file's metadata
            # [N, K, 6] rows; a [N, 4 + C, 6] output stays a channels-first head of 6 anchors (as before
            # end-to-end heads were known), so only a 6 that could be a YOLO feature axis is ambiguous; a
            # square [N, 6, 6] is no head auto can tell.
            e2e = (len(dims) == 3 and dims[2] == 6 and opts.objectness is not True and dims[1] not in widths
                   and dims[1] != 6)
            yolo = len(dims) == 3 and dims[2] in widths
            if said in ("True", "False") and len(dims) == 3 and dims[2] == 6:
                e2e, yolo = said == "True", said == "False"
                from_meta.append(("end2end", said))
            if e2e and yolo:
                raise ValueError(
                    f"Got a detection output {single[0].name!r} of shape {fmt_dims(dims)} for {n_cls} labels: it reads "
                    f"as an end-to-end head (rows x1, y1, x2, y2, score, class) and as a YOLO head (4 + {n_cls} or "
                    f"5 + {n_cls} wide); expected one: name it with --head-layout end-to-end or --head-layout "
                    "anchors-first"
                )
            kind = HeadLayout.END_TO_END if e2e else HeadLayout.AUTO  # AUTO: resolve_head picks the YOLO layout
            found = (single[0],)
    elif kind is HeadLayout.NMS_OUTPUTS:
        found = _match_nms_outputs(cands)
        if found is None:
            listed = ", ".join(f"{o.name!r} {fmt_dims(tensor_dims(o))}" for o in cands)
            raise ValueError(
                f"Got --head-layout nms-outputs and outputs {listed}; expected four: num_dets int [N, 1], boxes "
                "[N, K, 4], scores [N, K] and classes [N, K] (int, or a name saying class)"
            )
    elif kind is HeadLayout.BOXES_SCORES:
        found = _match_boxes_scores(cands, n_cls)
        if found is None:
            listed = ", ".join(f"{o.name!r} {fmt_dims(tensor_dims(o))}" for o in cands)
            raise ValueError(
                f"Got --head-layout boxes-scores and outputs {listed}; expected boxes [N, A, 4] and scores [N, A, "
                f"{n_cls}] for {n_cls} labels (name them with --output BOXES,SCORES)"
            )
    else:  # one output: a YOLO or an end-to-end head
        single = cands if len(cands) == 1 else [c for c in cands if _fits_task(tensor_dims(c), spec)]
        if len(single) != 1:
            raise ValueError(
                f"Got --head-layout {kind.value} and {len(cands)} outputs {[c.name for c in cands]}; expected one "
                "(name it with --output NAME)"
            )
        found = (single[0],)
        if kind is HeadLayout.END_TO_END:
            dims = tensor_dims(found[0])
            if len(dims) != 3 or dims[2] != 6:
                raise ValueError(
                    f"Got --head-layout end-to-end and an output {found[0].name!r} of shape {fmt_dims(dims)}; "
                    "expected [N, K, 6] rows of x1, y1, x2, y2, score, class"
                )
    assert found is not None
    dims_all = tuple(tuple(tensor_dims(o)) for o in found)
    objectness: bool | None = None
    if kind in (HeadLayout.AUTO, HeadLayout.CHANNELS_FIRST, HeadLayout.ANCHORS_FIRST):
        kind, objectness, rows = resolve_head(dims_all[0], n_cls, opts)
    elif kind is HeadLayout.BOXES_SCORES:
        rows = dims_all[0][1] if dims_all[0][1] is not None else dims_all[1][1]
    else:
        rows = dims_all[0][1] if kind is HeadLayout.END_TO_END else dims_all[1][1]
    if kind is not HeadLayout.END_TO_END and not all(_is_float(o.type.tensor_type.elem_type)
                                                     for o in found[(1 if kind is HeadLayout.NMS_OUTPUTS else 0):][:2]):
        raise ValueError(
            f"Got a non-float detection output among {[o.name for o in found]}; expected float32 or float16 boxes "
            "and scores"
        )
    if kind is HeadLayout.END_TO_END and not _is_float(found[0].type.tensor_type.elem_type):
        raise ValueError(f"Got a non-float end-to-end output {found[0].name!r}; expected float32 or float16 rows")
    boxes = found[1] if kind is HeadLayout.NMS_OUTPUTS else found[0]
    if kind in NMS_IN_MODEL and opts.class_agnostic:
        raise ValueError(
            f"Got --class-agnostic for an {kind.value} head, whose NMS is already inside the model; expected it only "
            "for heads the import runs NMS on (leave it out)"
        )
    return DetectionHead(
        kind=kind,
        outputs=tuple(o.name for o in found),
        dims=dims_all,
        objectness=objectness,
        rows=rows,
        box_format=_box_format(kind, opts, boxes),
        picked_by=picked,
        metadata=tuple(from_meta),
    )


def _fits_task(dims: list[int | None], spec: ImportSpec) -> bool:
    """Whether an output of this shape could be the task's output (unknown dims could be anything)."""
    n = len(spec.labels)
    if spec.task is Task.CLASSIFICATION:
        rest = dims[1:]
        if not rest:
            return False
        known = math.prod(d for d in rest if d is not None)
        return known == n if None not in rest else n % known == 0
    return len(dims) == 3 and (any(d is None or d in (4 + n, 5 + n) for d in dims[1:]) or dims[2] == 6)


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

    head = None
    if spec.task is Task.DETECTION:
        head = resolve_detection_head(model, spec)
        outs = {o.name: o for o in model.graph.output}
        out_vi, picked_by = outs[head.outputs[1 if head.kind is HeadLayout.NMS_OUTPUTS else 0]], head.picked_by
        legacy = OutputKind.PROBS if (spec.output_name or "").strip().lower() == "probs" else None
    else:
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
        output_name=",".join(head.outputs) if head is not None else out_vi.name,
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
        output_names=head.outputs if head is not None else (out_vi.name,),
        head=head,
    )
    return resolved, io
