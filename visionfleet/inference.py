"""ONNX Runtime sessions and output decoding shared by the server, batch jobs and the edge.

``onnxruntime`` is imported inside the functions that need it, so importing this module
stays cheap. Provider choice prefers TensorRT, then CUDA, then CPU; the thread count is
always explicit (a session left to pick its own threads takes every core).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from visionfleet.names import DETECTION_OUTPUTS
from visionfleet.spec import ModelCard, Task

__all__ = [
    "RuntimeOptions",
    "best_providers",
    "create_session",
    "LoadedModel",
    "load_model_dir",
    "PROVIDER_PREFERENCE",
]

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model: threads, providers and ONNX Runtime knobs."""

    threads: int = 1
    providers: tuple[str, ...] | None = None  # None: the best available
    spinning: bool = False  # spinning intra-op threads steal CPU from the proxy on small boxes
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"Got {self.threads} for threads; expected >= 1")


def best_providers(available: Sequence[str] | None = None) -> list[str]:
    """Available providers in preference order (TensorRT -> CUDA -> CPU)."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    return chosen or ["CPUExecutionProvider"]


def create_session(path: str | os.PathLike[str] | bytes, opts: RuntimeOptions = RuntimeOptions()):
    """An ``onnxruntime.InferenceSession`` with explicit threads and providers."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not opts.spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = list(opts.providers) if opts.providers else best_providers()
    provider_args = [(p, opts.provider_options.get(p, {})) for p in providers]
    target = path if isinstance(path, bytes) else os.fspath(path)
    return ort.InferenceSession(target, so, providers=provider_args)


@dataclass
class LoadedModel:
    """A registered version ready to run: its card and an ONNX Runtime session."""

    card: ModelCard
    session: Any
    input_name: str
    output_names: list[str]

    @property
    def ref(self) -> str:
        return self.card.ref

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """Run uint8 NHWC images already resized to one of the model's sizes (``card.sizes``)."""
        sizes = self.card.sizes
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3:] != (3,) or images.shape[1:3] not in sizes:
            want = " or ".join(f"[N, {h}, {w}, 3]" for h, w in sizes)
            raise ValueError(f"Got images {images.dtype} {tuple(images.shape)}; expected uint8 {want}")
        return self.session.run(self.output_names, {self.input_name: images})


def load_model_dir(path: str | os.PathLike[str], opts: RuntimeOptions = RuntimeOptions()) -> LoadedModel:
    """Load a version folder (``card.json`` + model file) into a runnable session.

    The one loader of the server (replicas and the ingress), batch jobs, offline
    inference and the edge agent: a registry version or an edge bundle. A detection
    model's outputs are run in the order :func:`visionfleet.predict.predictions` reads
    (:data:`visionfleet.names.DETECTION_OUTPUTS`).

    Raises:
        FileNotFoundError: no card, or the file it names is missing.
        ValueError: a detection model lacks one of the contract's outputs.
    """
    path = Path(path)
    card_path = path / "card.json"
    if not card_path.is_file():
        raise FileNotFoundError(f"no card.json in {path}")
    card = ModelCard.model_validate_json(card_path.read_text())
    model_path = path / card.model_file
    if card.format == "plan":
        # ONNX Runtime cannot load a TensorRT engine; a plan version keeps the ONNX it was
        # built from, which ORT runs (on its TensorRT EP where present, see best_providers).
        source = card.file("onnx")
        if source is None:
            raise FileNotFoundError(f"{card.ref} is a TensorRT engine without its source ONNX; ONNX Runtime cannot load it")
        model_path = path / source.name
    if not model_path.is_file():
        raise FileNotFoundError(f"card names {card.model_file} but {model_path} is missing")
    sess = create_session(model_path, opts)
    output_names = [o.name for o in sess.get_outputs()]
    if card.task is Task.DETECTION:
        missing = set(DETECTION_OUTPUTS) - set(output_names)
        if missing:
            raise ValueError(
                f"Got a detection model {card.ref} without outputs {sorted(missing)}; expected {list(DETECTION_OUTPUTS)}"
            )
        output_names = list(DETECTION_OUTPUTS)
    return LoadedModel(card=card, session=sess, input_name=sess.get_inputs()[0].name, output_names=output_names)
