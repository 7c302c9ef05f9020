"""Import a PyTorch checkpoint of a built-in architecture, and ``import_model``, which picks by suffix.

A ``.pt``/``.pth`` state dict is loaded with ``torch.load(weights_only=True)`` only
(pickles are never unpickled), fitted to a :mod:`train.models` architecture, exported
through :func:`edge_export.onnx_export.export_onnx` (parity-checked) and registered
with the ONNX file and a re-saved ``model.pt``. It lives in ``train`` because the
architectures do: ``edge_export`` never imports ``train``. ONNX files from any
framework go through :func:`edge_export.importer.import_onnx`.

Nothing here imports torch at import time: ``visionfleet models import x.onnx`` stays light.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edge_export.importer import (
    CHECKPOINT_SUFFIXES,
    ChannelOrder,
    ImportSpec,
    InputDType,
    Layout,
    OutputKind,
    PixelScale,
    card_preprocessing,
    check_source_file,
    import_onnx,
    sample_images,
    source_sha256,
)
from visionfleet.spec import Lineage, ModelCard, Task

__all__ = ["import_checkpoint", "import_model"]


def _load_state_dict(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from the weights-only unpickler
            blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; quote only the refused item.
        found = re.search(r"(Trying to load unsupported GLOBAL [^\n]*|Unsupported [^\n]*)", str(exc))
        why = found.group(1).strip() if found else "not tensors and plain containers only"
        raise ValueError(
            f"{path.name} is not a weights-only checkpoint: torch.load(weights_only=True) refused it ({why[:200]}). "
            "visionfleet never unpickles code; save a state dict with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - zip/format errors of every kind
        raise ValueError(f"{path.name} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path.name} holds no state dict; expected {{name: tensor}} (or a dict with a 'state_dict' entry)"
        )
    return dict(state)


def import_checkpoint(
    path: str | os.PathLike[str],
    registry: Any,
    name: str,
    spec: ImportSpec,
    arch: Mapping[str, Any],
    *,
    images: np.ndarray | None = None,
    description: str = "",
    input_sizes: Sequence[tuple[int, int]] | None = None,
) -> ModelCard:
    """Import a state dict of a built-in architecture: load safely, export, register.

    ``input_sizes`` (the default size first) exports with a dynamic height and width,
    parity-checked at each size, and lists them on the card.

    Args:
        path: a ``.pt``/``.pth`` file loaded with ``torch.load(weights_only=True)``.
        spec: labels, input size, resize and normalization; the layout is NCHW float32
            RGB and the output logits, as for every built-in architecture.
        arch: the :class:`train.models.ArchSpec` fields (``num_classes`` comes from the labels).
    Raises:
        ValueError: unsafe or unreadable file, or a state dict that does not fit ``arch``.
        ExportParityError: the exported ONNX disagrees with torch.
    """
    p = check_source_file(path)
    if p.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"Got {p.name!r} for import_checkpoint; expected a .pt or .pth file")
    pre = spec.preprocessing
    fixed = {
        "--task": (spec.task, Task.CLASSIFICATION),
        "--layout": (pre.layout, Layout.NCHW),
        "--input-dtype": (pre.dtype, InputDType.FLOAT32),
        "--channel-order": (pre.channel_order, ChannelOrder.RGB),
        "--outputs-are": (spec.output or OutputKind.LOGITS, OutputKind.LOGITS),
    }
    for flag, (got, want) in fixed.items():
        if got is not want:
            raise ValueError(
                f"Got {flag} {got.value} for a PyTorch checkpoint; expected {want.value} (built-in architectures "
                "are RGB NCHW float32 classifiers returning logits)"
            )
    for flag, got in (("--input-name", spec.input_name), ("--output-name", spec.output_name)):
        if got is not None:
            raise ValueError(f"Got {flag} for a PyTorch checkpoint; expected none (it applies to ONNX files)")
    from edge_export.onnx_export import export_onnx
    from train.checkpoint import save_checkpoint
    from edge_export.weights import state_dict_mismatch
    from train.models import ArchSpec, build_model

    arch_dict = {k: v for k, v in dict(arch).items() if v is not None}
    if "num_classes" in arch_dict and int(arch_dict["num_classes"]) != len(spec.labels):
        raise ValueError(f"Got num_classes {arch_dict['num_classes']} and {len(spec.labels)} labels; expected equal")
    arch_spec = ArchSpec.from_dict({**arch_dict, "num_classes": len(spec.labels)})
    state = _load_state_dict(p)
    model = build_model(arch_spec)
    problem, _ = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise ValueError(f"Got a state dict that does not fit {arch_spec.to_dict()}: {problem}")
    model.load_state_dict(state)
    model.eval()
    # export_onnx folds mean/std on the 0..255 scale.
    factor = 255.0 if pre.scale is PixelScale.UNIT else 1.0
    mean255 = [m * factor for m in pre.mean]
    std255 = [s * factor for s in pre.std]
    if images is None:
        images = sample_images(spec.input_size, spec.resize)
    source_sha = source_sha256(p)
    with tempfile.TemporaryDirectory(prefix="vf-import-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        parity = export_onnx(
            model,
            onnx_path,
            input_size=spec.input_size,
            input_sizes=[tuple(sz) for sz in input_sizes] if input_sizes else None,  # refused unless input_size first
            mean=mean255,
            std=std255,
            metadata={
                "task": Task.CLASSIFICATION.value,
                "labels": list(spec.labels),
                "resize": spec.resize.value,
                "model_name": name,
                "framework": spec.framework,
                "arch": arch_spec.to_dict(),
                "imported_from": {"file": p.name, "sha256": source_sha},
            },
            parity_images=images,
        )
        # Re-saved in the checkpoint format (tensors and plain values only), so
        # fine-tuning and pruning can start from an imported version.
        torch_path = save_checkpoint(
            Path(tmp) / "model.pt",
            model,
            {
                "arch": arch_spec.to_dict(),
                "labels": list(spec.labels),
                "input_size": list(spec.input_size),
                "resize": spec.resize.value,
                "mean": mean255,
                "std": std255,
                "metrics": "{}",
                "dataset": None,
            },
        )
        card = ModelCard(
            name=name,
            task=Task.CLASSIFICATION,
            labels=list(spec.labels),
            input_size=spec.input_size,
            input_sizes=[tuple(sz) for sz in input_sizes] if input_sizes and len(input_sizes) > 1 else [],
            resize=spec.resize,
            model_file="model.onnx",
            format="onnx",
            precision="fp32",
            framework=spec.framework,
            arch=arch_spec.to_dict(),
            preprocessing={**card_preprocessing(spec, None), "input_name": None, "mean_0_255": mean255,
                           "std_0_255": std255},
            metrics={"export_parity": parity.to_dict() if parity else None},
            lineage=Lineage(
                steps=[{"op": "import", "format": "pytorch-state-dict", "source": p.name, "sha256": source_sha,
                        "framework": spec.framework, "arch": arch_spec.to_dict()}]
            ),
            description=description or f"imported from {p.name}",
        )
        return registry.register(card, {"onnx": onnx_path, "torch": torch_path})


def import_model(
    path: str | os.PathLike[str],
    registry: Any,
    name: str,
    spec: ImportSpec,
    *,
    arch: Mapping[str, Any] | None = None,
    images: np.ndarray | None = None,
    description: str = "",
    input_sizes: Sequence[tuple[int, int]] | None = None,
) -> ModelCard:
    """Import ``.onnx`` (any framework), a converted format (TorchScript, …) or a built-in architecture's .pt.

    ``input_sizes``: serve at several sizes (``.onnx`` classifiers with a dynamic height and
    width, and built-in architectures, exported with a dynamic height and width).
    """
    from edge_export.importer.convert import import_converted, source_format

    p = check_source_file(path)
    arch = {k: v for k, v in (arch or {}).items() if v is not None}
    fmt = source_format(p)
    if fmt is not None and input_sizes and len(input_sizes) > 1:
        raise ValueError(f"Got --input-sizes for {p.name}, a {fmt} model; expected it only for .onnx files and "
                         ".pt/.pth state dicts (import the converted ONNX with --input-sizes)")
    if fmt is not None:
        if arch:
            raise ValueError(
                f"Got {sorted(arch)} for {p.name}, a {fmt} model; expected architecture options only with a .pt/.pth "
                "state dict"
            )
        return import_converted(p, registry, name, spec, images=images, description=description)
    if p.suffix.lower() == ".onnx":
        if arch:
            raise ValueError(f"Got {sorted(arch)} for an ONNX file; expected architecture options only with .pt/.pth")
        return import_onnx(p, registry, name, spec, images=images, description=description, input_sizes=input_sizes)
    if not arch.get("arch"):
        raise ValueError(f"Got {p.name!r} without --arch; expected the built-in architecture (resnet or mobilenetv3)")
    return import_checkpoint(p, registry, name, spec, arch, images=images, description=description,
                             input_sizes=input_sizes)
