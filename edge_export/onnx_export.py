"""torch -> ONNX export that obeys the artifact contract.

The exported graph takes **uint8 NHWC** images at the model's size (dynamic batch; with
several ``input_sizes``, dynamic height and width too, checked at each size),
folds the normalization in, and returns class probabilities. ``metadata_props`` carry
task, labels, input size, resize mode, normalization and version, so the file describes
itself. An export-time parity check runs ONNX Runtime and torch on real images and
refuses the export when they disagree.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Deployable",
    "export_onnx",
    "ExportParityError",
    "ParityReport",
    "read_metadata",
    "write_metadata",
    "graph_hw",
    "check_runs_at_sizes",
    "INPUT_NAME",
    "OUTPUT_NAME",
]

from edge_export.input_sizes import check_runs_at_sizes, graph_hw  # noqa: E402  (re-exported)
from edge_export.onnx_metadata import read_metadata, write_metadata  # noqa: E402  (re-exported)
from visionfleet.names import INPUT_NAME, OUTPUT_NAME  # noqa: E402  (re-exported)
DEFAULT_OPSET = 18


class ExportParityError(RuntimeError):
    """ONNX Runtime and torch disagree on the exported model."""


class Deployable(nn.Module):
    """uint8 NHWC in, probabilities out: normalization and softmax folded into the graph."""

    def __init__(self, core: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        return F.softmax(self.core(x), dim=1)


@dataclass(frozen=True)
class ParityReport:
    n: int
    max_abs_diff: float
    top1_agreement: float

    def to_dict(self) -> dict:
        return {"n": self.n, "max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement}


def _session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_parity(
    deployable: nn.Module, onnx_path: Path, images: np.ndarray, *, atol: float = 1e-4
) -> ParityReport:
    """Run torch and ONNX Runtime on the same uint8 images; raise when they disagree.

    Raises:
        ExportParityError: max |p_torch - p_ort| > atol, or any top-1 disagrees.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"Got images {images.dtype} {images.shape}; expected uint8 [N, H, W, 3]")
    sess = _session(onnx_path)
    with torch.no_grad():
        ref = deployable(torch.from_numpy(images)).numpy()
    got = np.concatenate([sess.run(None, {INPUT_NAME: images[i : i + 64]})[0] for i in range(0, len(images), 64)])
    diff = float(np.abs(ref - got).max()) if len(images) else 0.0
    agree = float((ref.argmax(1) == got.argmax(1)).mean()) if len(images) else 1.0
    report = ParityReport(n=len(images), max_abs_diff=diff, top1_agreement=agree)
    if diff > atol or agree < 1.0:
        raise ExportParityError(
            f"ONNX Runtime and torch disagree on {len(images)} real images: max |diff| = {diff:.2e} "
            f"(tolerance {atol:.0e}), top-1 agreement {agree:.2%}"
        )
    return report


def export_onnx(
    core: nn.Module,
    out_path: str | os.PathLike[str],
    *,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    metadata: Mapping[str, object],
    parity_images: np.ndarray | None = None,
    atol: float = 1e-4,
    opset: int = DEFAULT_OPSET,
    input_sizes: Sequence[tuple[int, int]] | None = None,
) -> ParityReport | None:
    """Export ``core`` (float NCHW -> logits) as a contract-obeying ONNX file.

    Args:
        core: the trained network in eval mode.
        out_path: where to write the ``.onnx`` file.
        input_size: (height, width) of the model input (the default size).
        mean, std: per-channel normalization on the 0..255 scale, folded into the graph.
        metadata: written to ``metadata_props`` (task, labels, resize, version…).
        parity_images: real uint8 NHWC images for the parity check (recommended), at
            ``input_size``; with several ``input_sizes`` they are resized to each.
        input_sizes: every (height, width) the model is to serve at, ``input_size``
            first. More than one keeps height and width dynamic in the graph (the
            built-in architectures end in global pooling, so any size from the smallest
            listed to the largest runs), and the parity check runs at each size.
    Returns:
        The parity report (the worst over the sizes), or None when no images were given.
    Raises:
        ExportParityError: the exported graph disagrees with torch (at any size).
        ValueError: ``input_sizes`` does not start with ``input_size``.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    deployable = Deployable(core.eval(), mean, std).eval()
    h, w = input_size
    sizes = [(int(a), int(b)) for a, b in (input_sizes or [(h, w)])]
    if sizes[0] != (h, w) or len(set(sizes)) != len(sizes):
        raise ValueError(
            f"Got input_sizes {', '.join(f'{a}x{b}' for a, b in sizes)} with input_size {h}x{w}; expected distinct "
            "sizes, input_size first"
        )
    dynamic_hw = len(sizes) > 1
    example = torch.zeros((2, h, w, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dims: dict[int, object] = {0: batch}
    if dynamic_hw:
        # AUTO lets torch.export find the range the network supports (strides, pooling)
        # instead of failing on a guess; every listed size is then checked by running it.
        dims[1] = torch.export.Dim.AUTO
        dims[2] = torch.export.Dim.AUTO
    # The dynamo exporter is chatty on stdout/loggers; keep our progress output clean.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export internals, not ours
        program = torch.onnx.export(
            deployable,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": dims},
            opset_version=opset,
            dynamo=True,
            verbose=False,
            optimize=True,
        )
    proto = program.model_proto
    meta = {
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "input_size": [h, w],
        **({"input_sizes": [list(s) for s in sizes], "dynamic_hw": True} if dynamic_hw else {}),
        "normalization": {"mean": list(map(float, mean)), "std": list(map(float, std)), "scale": "0-255"},
        **metadata,
    }
    write_metadata(proto, meta)
    onnx.checker.check_model(proto)
    tmp = out_path.with_suffix(".onnx.tmp")
    onnx.save_model(proto, str(tmp))
    tmp.replace(out_path)
    if dynamic_hw:
        check_runs_at_sizes(out_path, sizes)
    if parity_images is None:
        return None
    if not dynamic_hw:
        return check_parity(deployable, out_path, parity_images, atol=atol)
    from visionfleet.imaging import resize_image

    reports = []
    for size in sizes:
        at = parity_images if tuple(parity_images.shape[1:3]) == size else np.stack(
            [resize_image(img, size, "stretch")[0] for img in parity_images])
        reports.append(check_parity(deployable, out_path, at, atol=atol))
    return ParityReport(n=sum(r.n for r in reports), max_abs_diff=max(r.max_abs_diff for r in reports),
                        top1_agreement=min(r.top1_agreement for r in reports))

