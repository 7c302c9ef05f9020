"""Formats other than ONNX, converted to ONNX on import, with a parity check against their own runtime.

One dispatch point: :func:`convert_to_onnx` picks a converter by what the file is
(:func:`source_format`: its suffix, and for ``.pt``/``.pth`` whether it is a TorchScript
archive or a plain state dict) from the :data:`CONVERTERS` table; each converter returns
the ONNX model and a :class:`ConversionInfo` whose parity figures (the source runtime vs
ONNX Runtime on the same sample inputs) go into the card's lineage. The converted ONNX
then takes the ordinary ONNX path (:func:`.register.import_onnx`: wrapper, its own parity
check, registration). A new format joins with one row in :data:`CONVERTERS` and, when
its suffix is new, one in :data:`CONVERTED_SUFFIXES`.

Nothing here imports torch at import time; the converter modules do, inside functions.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from edge_export.importer.spec import ImportSpec

__all__ = [
    "ConversionInfo",
    "ConversionParityError",
    "CONVERTERS",
    "CONVERTED_SUFFIXES",
    "is_torchscript_archive",
    "source_format",
    "convert_to_onnx",
    "import_converted",
    "import_python",
]


class ConversionParityError(RuntimeError):
    """The converted ONNX disagrees with the source runtime on the sample inputs."""


@dataclass(frozen=True)
class ConversionInfo:
    """How a model was converted to ONNX and how the result compares with the source runtime."""

    format: str  # "torchscript", "pytorch-module", …
    source: str  # the file name, or package.module:function
    converter: str  # which exporter, with its settings
    versions: dict[str, str]
    input_shape: tuple[int, ...]  # the example input the graph was exported with (batch axis dynamic)
    input_dtype: str
    parity: dict[str, Any]  # n, max_abs_diff, tolerance, per output
    sha256: str | None = None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "op": "convert",
            "format": self.format,
            "source": self.source,
            "converter": self.converter,
            "versions": dict(self.versions),
            "example_input": {"shape": list(self.input_shape), "dtype": self.input_dtype},
            "conversion_parity": dict(self.parity),
        }
        if self.sha256:
            d["sha256"] = self.sha256
        if self.notes:
            d["notes"] = list(self.notes)
        return d


# Suffixes that are always converted; ".pt"/".pth" are converted only when the file is a
# TorchScript archive (a plain state dict is a built-in architecture's checkpoint).
CONVERTED_SUFFIXES: dict[str, str] = {".torchscript": "torchscript", ".ts": "torchscript", ".tflite": "tflite"}
# format -> (module, function(path, spec, images) -> (onnx.ModelProto, ConversionInfo)).
CONVERTERS: dict[str, tuple[str, str]] = {
    "torchscript": ("edge_export.importer.convert_torch", "torchscript_to_onnx"),
    "tflite": ("edge_export.importer.convert_tflite", "tflite_to_onnx"),  # tflite2onnx, checked against LiteRT
}


def is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """Whether a file is a ``torch.jit.save`` archive (read as a zip listing; nothing is unpickled).

    A TorchScript archive holds ``<name>/code/`` (the serialized TorchScript) and
    ``constants.pkl``; a ``torch.save`` state dict holds ``data.pkl`` and tensors only.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def source_format(path: str | os.PathLike[str]) -> str | None:
    """The format to convert ``path`` from, or None for a file that is not converted (ONNX, state dicts)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in CONVERTED_SUFFIXES:
        return CONVERTED_SUFFIXES[suffix]
    if suffix in (".pt", ".pth") and p.is_file() and is_torchscript_archive(p):
        return "torchscript"
    return None


def convert_to_onnx(
    path: str | os.PathLike[str], spec: ImportSpec, images: np.ndarray | None = None
) -> tuple[onnx.ModelProto, ConversionInfo]:
    """Convert a non-ONNX model file to ONNX, checked against its own runtime on sample images.

    Raises:
        ValueError: a suffix no converter takes, or a model the converter refuses.
        ConversionParityError: the converted graph disagrees with the source runtime.
    """
    p = Path(path)
    fmt = source_format(p)
    if fmt is None or fmt not in CONVERTERS:
        known = sorted({*CONVERTED_SUFFIXES, ".pt (TorchScript)", ".pth (TorchScript)"})
        raise ValueError(
            f"Got {p.name!r} to convert; expected one of {', '.join(known)} (a .onnx file needs no conversion; a "
            ".pt state dict of a built-in architecture takes --arch)"
        )
    module, function = CONVERTERS[fmt]
    converter: Callable[..., tuple[onnx.ModelProto, ConversionInfo]] = getattr(
        importlib.import_module(module), function
    )
    return converter(p, spec, images)


def _register_converted(
    model: onnx.ModelProto,
    conversion: ConversionInfo,
    registry: Any,
    name: str,
    spec: ImportSpec,
    *,
    images: Any,
    description: str,
):
    from edge_export.importer.register import import_onnx

    with tempfile.TemporaryDirectory(prefix="vf-convert-") as tmp:
        onnx_path = Path(tmp) / "converted.onnx"
        onnx.save_model(model, os.fspath(onnx_path))
        return import_onnx(
            onnx_path, registry, name, spec, images=images, description=description, conversion=conversion
        )


def import_converted(
    path: str | os.PathLike[str],
    registry: Any,
    name: str,
    spec: ImportSpec,
    *,
    images: np.ndarray | str | os.PathLike[str] | None = None,
    description: str = "",
):
    """Convert (:func:`convert_to_onnx`), then import the ONNX as any other; the card records both steps."""
    model, info = convert_to_onnx(path, spec, images)
    return _register_converted(model, info, registry, name, spec, images=images, description=description)


def import_python(
    target: str,
    registry: Any,
    name: str,
    spec: ImportSpec,
    *,
    weights: str | os.PathLike[str] | None = None,
    images: np.ndarray | str | os.PathLike[str] | None = None,
    description: str = "",
):
    """``--from-python package.module:function [--weights state_dict.pt]``: build, export, import.

    Importing ``package.module`` runs its code (see :func:`.convert_torch.load_python_module`).
    """
    from edge_export.importer.convert_torch import module_to_onnx

    model, info, resolved, sample = module_to_onnx(target, spec, weights=weights, images=images)
    return _register_converted(model, info, registry, name, resolved, images=sample, description=description)
