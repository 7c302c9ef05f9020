"""TFLite -> ONNX on import, checked against a TFLite interpreter on the same inputs.

``visionfleet models import face.tflite …`` converts the flatbuffer with ``tflite2onnx``
(a pure-Python converter: the ``tflite`` flatbuffer schema and ``onnx``, no TensorFlow),
then hands the ONNX to the ordinary import (wrapper, its own parity check, registry).

What the conversion does to the graph, so that the ONNX *is* the TFLite model:

* **Interface layout kept.** tflite2onnx turns the graph NCHW and, with it, the model's
  input (``[1, 128, 128, 3]`` becomes ``[1, 3, 128, 128]``). A ``Transpose`` is put back
  in front (and after any 4-D output it transposed), so the ONNX keeps the TFLite
  signature: NHWC in, the same output shapes out. The importer then reads NHWC from it.
* **Batch made dynamic.** TFLite graphs are exported at batch 1 and tflite2onnx writes
  ``Reshape`` targets such as ``[1, 896, 16]``; a leading ``1`` there becomes ``0``
  ("copy the batch dim"), a ``Resize`` to fixed ``sizes`` of batch 1 takes the same
  ``scales``, and the input and output batch dims become symbolic. The parity
  check below runs a whole batch through ONNX Runtime against the interpreter one image
  at a time, so a graph where that is wrong is refused, not registered.
* **Parity.** The interpreter (``ai_edge_litert``, Google's LiteRT, or ``tflite_runtime``
  or TensorFlow's ``tf.lite`` when those are what is installed) and ONNX Runtime get the
  same float inputs (the sample images, preprocessed as declared); every output must
  agree within ``1e-3`` of its own scale, or :class:`ConversionParityError` names the
  output and the difference.

Sparse (``DENSIFY``) and other operators tflite2onnx does not know are refused by name.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_export.importer.convert import ConversionInfo, ConversionParityError
from edge_export.importer.spec import ImportSpec

__all__ = ["tflite_to_onnx", "tflite_interpreter", "run_tflite", "relax_batch_reshapes", "PARITY_RTOL", "INSTALL_HINT"]

PARITY_RTOL = 1e-3  # max |diff| allowed, as a share of max(1, max |reference|) per output
INSTALL_HINT = "pip install tflite2onnx ai-edge-litert (both are in visionfleet's conformance extra)"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def tflite_interpreter(path: str | os.PathLike[str]) -> Any:
    """A TFLite interpreter for ``path``, tensors allocated: LiteRT, else tflite_runtime, else tf.lite."""
    errors = []
    for module, attr in (
        ("ai_edge_litert.interpreter", "Interpreter"),
        ("tflite_runtime.interpreter", "Interpreter"),
        ("tensorflow.lite", "Interpreter"),
    ):
        try:
            cls = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            errors.append(f"{module}: {exc}")
            continue
        try:
            interp = cls(model_path=os.fspath(path))
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ValueError(
                f"Got {Path(path).name} that the TFLite interpreter cannot load ({exc}); expected a TensorFlow Lite "
                "flatbuffer (.tflite)"
            ) from None
        return interp
    raise ImportError(
        "Got no TFLite interpreter to check the conversion against (" + "; ".join(errors)
        + f"); expected {INSTALL_HINT}"
    )


def run_tflite(interp: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run a batch one image at a time (TFLite graphs are batch 1); outputs by name, batch concatenated."""
    inp = interp.get_input_details()[0]
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(x.shape[0]):
        interp.set_tensor(inp["index"], np.ascontiguousarray(x[i : i + 1], dtype=inp["dtype"]))
        interp.invoke()
        for d in interp.get_output_details():
            outs.setdefault(d["name"], []).append(np.array(interp.get_tensor(d["index"])))
    return {k: np.concatenate(v) for k, v in outs.items()}


def _convert_graph(path: Path) -> onnx.ModelProto:
    try:
        import tflite2onnx
    except ImportError as exc:
        raise ImportError(f"Got a .tflite file but no converter ({exc}); expected {INSTALL_HINT}") from None
    with tempfile.TemporaryDirectory(prefix="vf-tflite-") as tmp:
        dst = Path(tmp) / "converted.onnx"
        try:
            tflite2onnx.convert(os.fspath(path), os.fspath(dst))
        except NotImplementedError as exc:
            what = str(exc).strip().rstrip("!")
            raise ValueError(
                f"Got {path.name} with an operator tflite2onnx {_version('tflite2onnx')} cannot convert ({what}); "
                "expected the ops of a dense float model (a sparse *_sparse.tflite model has a dense twin: import "
                "that one; otherwise convert it with tf2onnx --tflite)"
            ) from None
        except Exception as exc:  # noqa: BLE001 - the converter raises anything on a bad flatbuffer
            raise ValueError(
                f"Got {path.name} that tflite2onnx could not convert ({type(exc).__name__}: {exc}); expected a "
                "TensorFlow Lite flatbuffer (.tflite)"
            ) from None
        return onnx.load(os.fspath(dst))


def _dims(vi: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]


def _set_dims(vi: onnx.ValueInfoProto, dims: list[int | str]) -> None:
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        if isinstance(d, str):
            shape.dim.add().dim_param = d
        else:
            shape.dim.add().dim_value = int(d)


def _restore_interface(model: onnx.ModelProto, interp: Any) -> list[str]:
    """Put the TFLite signature back (NHWC input, the TFLite output shapes) with Transposes; batch symbolic."""
    g = model.graph
    notes = []
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    tfl_in = interp.get_input_details()
    if len(inputs) != 1 or len(tfl_in) != 1:
        raise ValueError(f"Got a TFLite model with {len(tfl_in)} inputs; expected one image input")
    onnx_in, want = inputs[0], [int(v) for v in tfl_in[0]["shape"]]
    have = _dims(onnx_in)
    new_nodes = []
    if have != want:
        if len(want) == 4 and have == [want[0], want[3], want[1], want[2]]:
            inner = onnx_in.name + "__nchw"
            for n in g.node:
                n.input[:] = [inner if v == onnx_in.name else v for v in n.input]
            new_nodes.append(helper.make_node("Transpose", [onnx_in.name], [inner], perm=[0, 3, 1, 2]))
            notes.append(f"input {onnx_in.name!r} kept NHWC {want} (tflite2onnx wrote NCHW {have})")
        else:
            raise ValueError(f"Got an ONNX input of shape {have} for the TFLite input {want}; expected the same")
    _set_dims(onnx_in, ["N", *want[1:]])
    tfl_out = {d["name"]: [int(v) for v in d["shape"]] for d in interp.get_output_details()}
    for out in g.output:
        want_o, have_o = tfl_out.get(out.name), _dims(out)
        if want_o is None:
            raise ValueError(f"Got ONNX output {out.name!r}, which the TFLite model does not have ({sorted(tfl_out)})")
        if have_o != want_o:
            if len(want_o) == 4 and have_o == [want_o[0], want_o[3], want_o[1], want_o[2]]:
                inner = out.name + "__nchw"
                for n in g.node:
                    n.output[:] = [inner if v == out.name else v for v in n.output]
                    n.input[:] = [inner if v == out.name else v for v in n.input]
                g.node.append(helper.make_node("Transpose", [inner], [out.name], perm=[0, 2, 3, 1]))
                notes.append(f"output {out.name!r} kept {want_o} (tflite2onnx wrote {have_o})")
            else:
                raise ValueError(f"Got an ONNX output {out.name!r} of shape {have_o}; expected the TFLite {want_o}")
        _set_dims(out, ["N", *want_o[1:]])
    for n in reversed(new_nodes):
        g.node.insert(0, n)
    # Reshape targets that hard-code the batch of 1: copy the batch dim instead.
    by_name = {i.name: i for i in g.initializer}
    relaxed = _resize_sizes_to_scales(model, by_name) + relax_batch_reshapes(model)
    if relaxed:
        notes.append(f"{relaxed} Reshape/Resize target(s) follow the batch instead of a fixed 1")
    del g.value_info[:]  # shapes inferred at batch 1; ONNX Runtime infers them again
    return notes


def relax_batch_reshapes(model: onnx.ModelProto) -> int:
    """``Reshape`` to a constant target starting with a batch of 1 copies the batch dim instead (``0``).

    Exporters write ``[1, 896, 16]`` or ``[1, 10, -1]`` for a graph traced at batch 1;
    with ``0`` the same graph runs any batch. Applies to targets held in initializers or
    ``Constant`` nodes; returns how many were changed. Whether the result is right is
    for a batched parity check to say (the importer's runs one).
    """
    g = model.graph
    by_name = {i.name: i for i in g.initializer}
    consts = {
        n.output[0]: n for n in g.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    done = 0
    for n in g.node:
        if n.op_type != "Reshape" or len(n.input) < 2:
            continue
        if n.input[1] in by_name:
            t = by_name[n.input[1]]
        elif n.input[1] in consts:
            t = consts[n.input[1]].attribute[0].t
        else:
            continue
        shape = numpy_helper.to_array(t)
        if shape.ndim == 1 and shape.size >= 2 and shape[0] == 1:
            shape = shape.astype(np.int64).copy()
            shape[0] = 0
            t.CopyFrom(numpy_helper.from_array(shape, t.name))
            done += 1
    return done


def _resize_sizes_to_scales(model: onnx.ModelProto, by_name: dict[str, onnx.TensorProto]) -> int:
    """``Resize`` to a constant ``sizes`` of batch 1 becomes the same ``scales`` (which hold for any batch)."""
    resizes = [
        n for n in model.graph.node
        if n.op_type == "Resize" and len(n.input) == 4 and n.input[3] in by_name
        and numpy_helper.to_array(by_name[n.input[3]]).tolist()[:1] == [1]
    ]
    if not resizes:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for vi in probe.graph.input:  # infer at the TFLite batch of 1
        if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].HasField("dim_param"):
            vi.type.tensor_type.shape.dim[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(probe)
    shapes = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input]}
    done = 0
    for n in resizes:
        src = shapes.get(n.input[0])
        sizes = numpy_helper.to_array(by_name[n.input[3]]).astype(np.float64)
        if not src or len(src) != len(sizes) or min(src) <= 0:
            continue
        scales = numpy_helper.from_array((sizes / np.asarray(src, np.float64)).astype(np.float32), n.name + "__scales")
        scales.dims[:] = [len(sizes)]
        model.graph.initializer.append(scales)
        n.input[:] = [n.input[0], n.input[1], scales.name]
        done += 1
    return done


def _parity_inputs(interp: Any, spec: ImportSpec, images: np.ndarray | None) -> tuple[np.ndarray, str]:
    d = interp.get_input_details()[0]
    shape = [int(v) for v in d["shape"]]
    if np.dtype(d["dtype"]) != np.float32:
        raise ValueError(
            f"Got a TFLite input {d['name']!r} of type {np.dtype(d['dtype']).name}; expected float32 (quantized "
            "TFLite models are not converted: import the float model and quantize it with visionfleet optimize)"
        )
    if images is not None and len(shape) == 4 and tuple(images.shape[1:3]) == tuple(shape[1:3]):
        from dataclasses import replace

        from edge_export.importer.spec import InputDType, Layout, PixelScale

        pre = spec.preprocessing
        pre = replace(
            pre,
            layout=Layout.NHWC,
            dtype=InputDType.FLOAT32,
            scale=pre.scale or PixelScale.UNIT,
        )
        return pre.apply(images).astype(np.float32), f"{len(images)} sample images, preprocessed as declared"
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (8, *shape[1:])).astype(np.float32), "8 uniform(-1, 1) tensors"


def tflite_to_onnx(
    path: str | os.PathLike[str], spec: ImportSpec, images: np.ndarray | None = None
) -> tuple[onnx.ModelProto, ConversionInfo]:
    """Convert a ``.tflite`` file to ONNX with the TFLite signature, checked against a TFLite interpreter.

    Raises:
        ImportError: tflite2onnx or every TFLite interpreter is missing (the message says what to install).
        ValueError: an operator or input type the converter does not take.
        ConversionParityError: the ONNX disagrees with the interpreter on the same inputs.
    """
    from edge_export.importer.register import source_sha256
    from visionfleet.inference import RuntimeOptions, create_session

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    interp = tflite_interpreter(p)
    model = _convert_graph(p)
    notes = _restore_interface(model, interp)
    onnx.checker.check_model(model)
    x, what = _parity_inputs(interp, spec, images)
    ref = run_tflite(interp, x)
    sess = create_session(model.SerializeToString(), RuntimeOptions(threads=1, providers=("CPUExecutionProvider",)))
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    per_output = {}
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            raise ConversionParityError(f"Got ONNX output {name!r} of shape {list(g.shape)}; expected {list(r.shape)}")
        diff = float(np.abs(g.astype(np.float64) - r).max())
        tol = PARITY_RTOL * max(1.0, float(np.abs(r).max()))
        per_output[name] = {"max_abs_diff": diff, "tolerance": tol}
        if not diff <= tol:
            raise ConversionParityError(
                f"Got ONNX output {name!r} differing from the TFLite interpreter by {diff:.3g} on {what}; expected at "
                f"most {tol:.3g} (tflite2onnx {_version('tflite2onnx')} mis-converted this graph: try tf2onnx --tflite)"
            )
    info = ConversionInfo(
        format="tflite",
        source=p.name,
        converter=f"tflite2onnx {_version('tflite2onnx')}, interface kept NHWC, batch made dynamic",
        versions={
            "tflite2onnx": _version("tflite2onnx"),
            "ai-edge-litert": _version("ai-edge-litert"),
            "onnx": onnx.__version__,
        },
        input_shape=(1, *(int(v) for v in x.shape[1:])),  # the TFLite signature; the batch is dynamic in the ONNX
        input_dtype="float32",
        parity={
            "n": int(x.shape[0]),
            "runtimes": f"{type(interp).__module__.split('.')[0]} (one image at a time) vs onnxruntime (the batch)",
            "inputs": what,
            "batched": True,
            "max_abs_diff": max(v["max_abs_diff"] for v in per_output.values()),
            "outputs": per_output,
        },
        sha256=source_sha256(p),
        notes=tuple(notes),
    )
    return model, info
