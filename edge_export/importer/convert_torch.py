"""PyTorch models to ONNX on import: TorchScript archives and ``nn.Module``s built by a Python entry point.

* **TorchScript** (``torch.jit.save`` archives: ``.pt``, ``.pth``, ``.torchscript``, ``.ts``):
  ``torch.jit.load``, then the TorchScript-based ``torch.onnx.export(dynamo=False)`` — the
  torch.export-based exporter (the default since torch 2.9) cannot take a ScriptModule.
* **An ``nn.Module`` from ``--from-python package.module:function``**: the function is
  called with no arguments and returns the module, or ``(module, example_input)``; weights
  given with ``--weights`` are loaded with ``torch.load(weights_only=True)``. The
  torch.export-based exporter (``dynamo=True``) is tried first, the TorchScript-based one
  second; the card says which one converted it.

Either way the converted graph is run by ONNX Runtime and by torch on the same sample
images, preprocessed as declared, and must agree (:func:`_parity`); the figures go into
the card's lineage. Importing ``package.module`` runs its code: it is code execution, as
``python -c "import package.module"`` is.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import pickle
import re
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from edge_export.importer.convert import ConversionInfo, ConversionParityError
from edge_export.importer.resolve import resolve_spec
from edge_export.importer.samples import load_sample_images, sample_images
from edge_export.importer.spec import ImportSpec, InputDType, Layout

__all__ = ["torchscript_to_onnx", "module_to_onnx", "load_python_module", "LEGACY_OPSET", "DYNAMO_OPSET"]

LEGACY_OPSET = 17  # the TorchScript-based exporter's well-trodden opset
DYNAMO_OPSET = 18  # the lowest the torch.export-based exporter implements
_TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _flatten(out: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    """(name, tensor) for each tensor of a model output: a tensor, a tuple/list, or a dict of them."""
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (list, tuple)):
        items = [(f"{prefix}{i}", v) for i, v in enumerate(out)]
    else:
        raise ValueError(
            f"Got a model output of type {type(out).__name__}; expected a tensor, a tuple or a dict of them"
        )
    flat: list[tuple[str, Any]] = []
    for name, value in items:
        flat += _flatten(value, name) if not isinstance(value, torch.Tensor) else [(name, value)]
    return flat


def _example_shape(spec: ImportSpec, channels: int) -> tuple[int, ...]:
    assert spec.input_size is not None
    h, w = spec.input_size
    nhwc = spec.preprocessing.layout is Layout.NHWC
    return (2, h, w, channels) if nhwc else (2, channels, h, w)


def _export_dtype(spec: ImportSpec) -> InputDType:
    dtype = spec.preprocessing.dtype
    return InputDType.FLOAT32 if dtype is InputDType.AUTO else dtype


def _torch_dtype(dtype: InputDType):
    import torch

    return {InputDType.FLOAT32: torch.float32, InputDType.FLOAT16: torch.float16, InputDType.UINT8: torch.uint8}[dtype]


@contextlib.contextmanager
def _quiet():
    """The exporters print progress on stdout and warn a lot; stdout is where ``--json`` goes."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export_legacy(module: Any, example: Any, names: list[str]) -> onnx.ModelProto:
    import torch

    buf = io.BytesIO()
    dims = [n for n in ("input", *names)]
    with _quiet():
        torch.onnx.export(
            module,
            (example,),
            buf,
            dynamo=False,
            input_names=["input"],
            output_names=names,
            dynamic_axes={n: {0: "batch"} for n in dims},
            opset_version=LEGACY_OPSET,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(module: Any, example: Any, names: list[str]) -> onnx.ModelProto:
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=names,
            dynamic_shapes=({0: batch},),
            opset_version=DYNAMO_OPSET,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def _declare_output_shapes(model: onnx.ModelProto, outputs: list[Any]) -> list[str]:
    """Write the outputs' non-batch dims, as torch gave them on the example, where the exporter left them unknown.

    The TorchScript-based exporter often loses them (a traced head comes out ``[?, ?, ?]``),
    and the importer reads a head's kind from its shape; the parity check then runs the
    graph on another batch size and compares every shape with torch's.
    """
    notes = []
    for vi, t in zip(model.graph.output, outputs):
        shape = list(t.shape)
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 0:
            for _ in shape:
                dims.add()
        if len(dims) != len(shape):
            continue
        for axis, (dim, size) in enumerate(zip(dims, shape)):
            if axis == 0:
                if not dim.HasField("dim_value") and not dim.dim_param:
                    dim.dim_param = "batch"
            elif not (dim.HasField("dim_value") and dim.dim_value > 0):
                dim.Clear()
                dim.dim_value = int(size)
                notes.append(f"{vi.name} axis {axis}")
    return notes


def _run_torch(module: Any, x: np.ndarray) -> list[np.ndarray]:
    import torch

    outs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, len(x), 16):
            flat = _flatten(module(torch.from_numpy(np.ascontiguousarray(x[i : i + 16]))))
            outs.append([t.detach().float().numpy() for _, t in flat])
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def _parity(module: Any, model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> dict[str, Any]:
    """torch vs ONNX Runtime on the same model inputs; raises ConversionParityError past the tolerance."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception as exc:  # noqa: BLE001 - ORT's own exception types
        raise ConversionParityError(
            f"Got a converted graph that ONNX Runtime cannot run on {len(x)} sample inputs ({_first_line(exc)}); "
            "expected one that runs (export the model to ONNX yourself and import the .onnx)"
        ) from None
    want = _run_torch(module, x)
    half = x.dtype == np.float16
    per_output, worst = [], 0.0
    for name, g, t in zip(names, got, want):
        g = np.asarray(g, np.float32)
        if g.shape != t.shape:
            raise ConversionParityError(
                f"Got output {name!r} of shape {list(g.shape)} from ONNX Runtime and {list(t.shape)} from torch on "
                f"{len(x)} sample inputs; expected the same"
            )
        diff = float(np.abs(g - t).max()) if g.size else 0.0
        # Relative to the output's magnitude: boxes are in pixels, probabilities in 0..1.
        tol = (1e-2 if half else 1e-4) * max(1.0, float(np.abs(t).max()) if t.size else 1.0)
        per_output.append({"name": name, "shape": list(g.shape), "max_abs_diff": diff, "tolerance": tol})
        if not diff <= tol:
            raise ConversionParityError(
                f"Got max |diff| {diff:.3g} between torch and ONNX Runtime on output {name!r} over {len(x)} sample "
                f"inputs; expected <= {tol:.3g} (the converter changed what the model computes)"
            )
        worst = max(worst, diff)
    return {"n": int(len(x)), "max_abs_diff": worst, "runtimes": "torch vs onnxruntime", "outputs": per_output}


def _inputs_for(model: onnx.ModelProto, spec: ImportSpec, images: Any) -> tuple[ImportSpec, np.ndarray, np.ndarray]:
    """(resolved spec, uint8 sample images, the model inputs they give under the declared preprocessing)."""
    resolved, _ = resolve_spec(model, spec)
    assert resolved.input_size is not None
    if images is None:
        images = sample_images(resolved.input_size, resolved.resize)
    elif not isinstance(images, np.ndarray):
        images = load_sample_images(images, resolved.input_size, resolved.resize)
    return resolved, images, resolved.preprocessing.apply(images)


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _probe_channels(module: Any, spec: ImportSpec, what: str) -> tuple[Any, list[str], list[Any]]:
    """An example batch the module takes (3 channels, else 1: a grayscale model), its output names and outputs."""
    import torch

    dtype = _export_dtype(spec)
    errors = []
    for channels in (3, 1):
        shape = _example_shape(spec, channels)
        example = torch.zeros(shape, dtype=_torch_dtype(dtype))
        try:
            with torch.no_grad():
                flat = _flatten(module(example))
            return example, [n for n, _ in flat], [t for _, t in flat]
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the model raises
            errors.append(f"{list(shape)}: {_first_line(exc)}")
    layout = "NHWC" if spec.preprocessing.layout is Layout.NHWC else "NCHW"
    raise ValueError(
        f"Got {what} that fails on a {dtype.value} {layout} image batch ({'; '.join(errors)}); expected a model that "
        f"takes [N, 3 or 1, H, W] at --input-size {spec.input_size[0]}x{spec.input_size[1]} (or say --layout nhwc, "
        "--input-dtype)"
    )


def torchscript_to_onnx(
    path: str | os.PathLike[str], spec: ImportSpec, images: np.ndarray | None = None
) -> tuple[onnx.ModelProto, ConversionInfo]:
    """A ``torch.jit.save`` archive -> ONNX (TorchScript-based exporter), checked against torch.

    The input size must be declared (a ScriptModule does not record it); the layout is
    NCHW unless ``--layout nhwc`` says otherwise, the dtype float32 unless declared, and
    the channel count is the one the module takes (3, else 1).

    Raises:
        ValueError: no input size, an archive torch.jit.load cannot read, a module that
            fails on an image batch or that the exporter cannot convert.
        ConversionParityError: ONNX Runtime and torch disagree on the sample images.
    """
    import torch

    from edge_export.importer.register import source_sha256

    p = Path(path)
    if spec.input_size is None:
        raise ValueError(
            f"Got no --input-size for the TorchScript model {p.name}; expected HEIGHTxWIDTH (a TorchScript module "
            "does not record the size it takes)"
        )
    try:
        module = torch.jit.load(os.fspath(p), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - RuntimeError and friends from the C++ loader
        raise ValueError(
            f"Got {p.name!r}, which torch.jit.load cannot read ({_first_line(exc)}); expected a TorchScript archive "
            "saved with torch.jit.save(torch.jit.script(model) or torch.jit.trace(model, x), path)"
        ) from None
    module.eval()
    example, names, outs = _probe_channels(module, spec, f"the TorchScript model {p.name}")
    converter = f"torch.onnx.export (TorchScript-based, dynamo=False), opset {LEGACY_OPSET}"
    try:
        model = _export_legacy(module, example, names)
    except Exception as exc:  # noqa: BLE001 - UnsupportedOperatorError, SymbolicValueError, …
        raise ValueError(
            f"Got a TorchScript model {p.name} that torch.onnx.export cannot convert ({_first_line(exc)}); expected "
            f"ops the ONNX exporter knows at opset {LEGACY_OPSET} (replace the op in the model, or export it to "
            "ONNX yourself and import the .onnx)"
        ) from None
    notes = []
    filled = _declare_output_shapes(model, outs)
    if filled:
        notes.append(f"output dims the exporter left unknown, written from torch's outputs: {', '.join(filled)}")
    resolved, _, x = _inputs_for(model, spec, images)
    parity = _parity(module, model, x, names)
    if spec.preprocessing.layout is Layout.AUTO:
        notes.append("layout auto: exported as NCHW, torch's convention (say --layout nhwc for an NHWC model)")
    if spec.preprocessing.dtype is InputDType.AUTO:
        notes.append("input dtype auto: exported as float32 (say --input-dtype for another)")
    info = ConversionInfo(
        format="torchscript",
        source=p.name,
        converter=converter,
        versions=_versions(),
        input_shape=tuple(example.shape),
        input_dtype=str(example.dtype).removeprefix("torch."),
        parity=parity,
        sha256=source_sha256(p),
        notes=tuple(notes),
    )
    return model, info


def load_python_module(target: str) -> Callable[[], Any]:
    """``package.module:function`` -> the function, imported like ``python -m`` would (current folder first).

    Importing the module runs its code.

    Raises:
        ValueError: a target not spelled ``module:function``, a module that cannot be
            imported, a missing attribute or one that is not callable.
    """
    if not _TARGET.match(target.strip()):
        raise ValueError(
            f"Got {target!r} for --from-python; expected package.module:function (a module importable from the "
            "current folder or the environment, and a function in it)"
        )
    mod_name, attr = target.strip().split(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or whatever the module raises on import
        raise ValueError(
            f"Got --from-python {target}, but importing {mod_name!r} failed ({type(exc).__name__}: "
            f"{_first_line(exc)}); expected a module importable from the current folder ({cwd}) or the environment "
            "(pip install -e your package, or run from its folder)"
        ) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"Got --from-python {target}, but {mod_name!r} has no attribute {attr!r}; expected a function that "
                "returns an nn.Module"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"Got --from-python {target}, a {type(obj).__name__} that is not callable; expected a function that "
            "returns an nn.Module (or (module, example_input))"
        )
    try:
        required = [
            n for n, prm in inspect.signature(obj).parameters.items()
            if prm.default is prm.empty
            and prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY)
        ]
    except (TypeError, ValueError):  # builtins without a signature
        required = []
    if required:
        raise ValueError(
            f"Got --from-python {target}, which needs arguments {required}; expected a function callable with no "
            "arguments (wrap it: def build(): return make_model(...))"
        )
    return obj


def _load_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such weights file: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blob = torch.load(os.fspath(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(Trying to load unsupported GLOBAL [^\n]*|Unsupported [^\n]*)", str(exc))
        why = found.group(1).strip() if found else "not tensors and plain containers only"
        raise ValueError(
            f"Got --weights {p.name}, which torch.load(weights_only=True) refused ({why[:200]}); expected a state "
            "dict saved with torch.save(model.state_dict(), path) (visionfleet never unpickles code)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - zip/format errors of every kind
        raise ValueError(
            f"Got --weights {p.name}, which is not a readable PyTorch file ({type(exc).__name__}: {_first_line(exc)}); "
            "expected a state dict saved with torch.save(model.state_dict(), path)"
        ) from None
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"Got --weights {p.name} holding a {type(blob).__name__} that is not a state dict; expected "
            "{name: tensor} (or a dict with a 'state_dict' entry)"
        )
    return dict(state)


def _fit_weights(module: Any, state: dict[str, Any], target: str, weights: str | os.PathLike[str]) -> None:
    from edge_export.weights import state_dict_mismatch

    problem, _ = state_dict_mismatch(module.state_dict(), state)
    if problem:
        raise ValueError(
            f"Got --weights {Path(weights).name} that do not fit the module {target} returns ({problem}); "
            "expected the state dict of that very module (torch.save(model.state_dict(), path))"
        )
    module.load_state_dict(state)


def module_to_onnx(
    target: str,
    spec: ImportSpec,
    *,
    weights: str | os.PathLike[str] | None = None,
    images: np.ndarray | str | os.PathLike[str] | None = None,
) -> tuple[onnx.ModelProto, ConversionInfo, ImportSpec, np.ndarray]:
    """``package.module:function`` -> ONNX, checked against torch on sample images.

    The contract: the function takes no arguments and returns an ``torch.nn.Module``, or
    ``(module, example_input)`` where the example is one image batch tensor the module
    takes (its height and width are the input size unless ``--input-size`` says). The
    module is put in eval mode; ``weights`` (a state dict) are loaded into it strictly.

    Returns:
        The ONNX model, how it was converted, the spec with its input size filled, and
        the uint8 sample images the parity check used.
    Raises:
        ValueError: any part of the contract broken (each message says which).
        ConversionParityError: ONNX Runtime and torch disagree on the sample images.
    """
    import torch

    from edge_export.importer.register import source_sha256

    build = load_python_module(target)
    try:
        made = build()
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise ValueError(
            f"Got --from-python {target}, which raised {type(exc).__name__}: {_first_line(exc)}; expected it to "
            "return an nn.Module"
        ) from None
    example = None
    if isinstance(made, tuple) and len(made) == 2:
        made, example = made
    if not isinstance(made, torch.nn.Module) or isinstance(made, torch.jit.ScriptModule):
        what = "a ScriptModule" if isinstance(made, torch.jit.ScriptModule) else f"a {type(made).__name__}"
        raise ValueError(
            f"Got --from-python {target} returning {what}; expected an nn.Module or (nn.Module, example input "
            "tensor)" + (" (import a TorchScript model as a file: torch.jit.save it)" if "Script" in what else "")
        )
    module = made.eval()
    if weights is not None:
        _fit_weights(module, _load_weights(weights), target, weights)
    notes: list[str] = []
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.ndim != 4:
            got = f"a tensor of shape {list(example.shape)}" if isinstance(example, torch.Tensor) else (
                f"a {type(example).__name__}")
            raise ValueError(
                f"Got --from-python {target} returning (module, {got}); expected the example input as a 4-D image "
                "batch tensor, e.g. torch.zeros(1, 3, 224, 224)"
            )
        if example.dtype not in (torch.float32, torch.float16, torch.uint8):
            raise ValueError(
                f"Got an example input of dtype {example.dtype} from {target}; expected float32, float16 or uint8"
            )
        # Two images, so that the exporter keeps the batch axis dynamic.
        example = example[:1].expand(2, *example.shape[1:]).contiguous()
        if spec.input_size is not None:
            size_at = (1, 2) if spec.preprocessing.layout is Layout.NHWC else (2, 3)
            if spec.preprocessing.layout is Layout.AUTO:
                size_at = (2, 3) if example.shape[1] in (1, 3) else (1, 2)
            if tuple(example.shape[i] for i in size_at) != tuple(spec.input_size):
                raise ValueError(
                    f"Got --input-size {spec.input_size[0]}x{spec.input_size[1]} and an example input of shape "
                    f"{list(example.shape)} from {target}; expected them to agree (or leave --input-size out)"
                )
        with torch.no_grad():
            try:
                flat = _flatten(module(example))
                names, outs = [n for n, _ in flat], [t for _, t in flat]
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise ValueError(
                    f"Got a module from {target} that fails on its own example input {list(example.shape)} "
                    f"({_first_line(exc)}); expected it to run"
                ) from None
    else:
        if spec.input_size is None:
            raise ValueError(
                f"Got --from-python {target} returning a module without an example input and no --input-size; "
                "expected HEIGHTxWIDTH (or return (module, example_input) from the function)"
            )
        example, names, outs = _probe_channels(module, spec, f"the module from {target}")
    errors = []
    model = None
    converter = ""
    for converter, export in (
        (f"torch.onnx.export (torch.export-based, dynamo=True), opset {DYNAMO_OPSET}", _export_dynamo),
        (f"torch.onnx.export (TorchScript-based, dynamo=False), opset {LEGACY_OPSET}", _export_legacy),
    ):
        try:
            model = export(module, example, names)
            break
        except Exception as exc:  # noqa: BLE001 - every exporter error type
            errors.append(f"{converter.split(' (')[1].split(')')[0]}: {_first_line(exc)}")
    if model is None:
        raise ValueError(
            f"Got a module from {target} that neither ONNX exporter converts ({'; '.join(errors)}); expected ops "
            "ONNX knows (replace the op, or export to ONNX yourself and import the .onnx)"
        )
    if errors:
        notes.append(f"the torch.export-based exporter failed ({errors[0][:200]}); the TorchScript-based one converted")
    filled = _declare_output_shapes(model, outs)
    if filled:
        notes.append(f"output dims the exporter left unknown, written from torch's outputs: {', '.join(filled)}")
    resolved, imgs, x = _inputs_for(model, spec, images)
    parity = _parity(module, model, x, names)
    info = ConversionInfo(
        format="pytorch-module",
        source=target,
        converter=converter,
        versions=_versions(),
        input_shape=tuple(example.shape),
        input_dtype=str(example.dtype).removeprefix("torch."),
        parity=parity,
        sha256=source_sha256(Path(weights)) if weights is not None else None,
        notes=tuple(notes + ([f"weights: {Path(weights).name} (torch.load weights_only=True)"] if weights else [])),
    )
    return model, info, replace(spec, input_size=resolved.input_size), imgs
