"""Build an engine from a registered ONNX version, check it against ONNX Runtime, register it.

The build settings (workspace, batch profile, where it must be built) come from the
target's :class:`visionfleet.targets.EngineProfile` in the one target table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edge_export.tensorrt.availability import Availability, require_tensorrt
from edge_export.tensorrt.builder import build_engine, run_engine
from visionfleet.targets import TARGETS, EngineProfile, Precision, Target, check_engine_build

__all__ = ["MIN_AGREEMENT", "ENGINE_TARGETS", "engine_profile", "engine_parity", "build_registered_engine"]

# The targets an engine is built for: those of the target table with an engine profile.
ENGINE_TARGETS: tuple[Target, ...] = tuple(t for t, p in TARGETS.items() if p.engine is not None)


def engine_profile(target: Target | str) -> EngineProfile:
    """The engine build settings of a TensorRT target (``x86-gpu``, ``jetson``).

    Raises:
        ValueError: not a target an engine is built for.
    """
    try:
        prof = TARGETS[Target(target)]
    except ValueError:
        prof = None
    if prof is None or prof.engine is None:
        raise ValueError(
            f"Got {target!r} for --target; expected one of {', '.join(t.value for t in ENGINE_TARGETS)}"
        )
    return prof.engine


# Minimum agreement between the engine and ONNX Runtime (CPU) on real images before a
# built engine is registered; TF32/FP16/INT8 move probabilities, near-ties may flip.
MIN_AGREEMENT: dict[Precision, float] = {Precision.FP32: 0.99, Precision.FP16: 0.99, Precision.INT8: 0.95}


def engine_parity(task: str, engine_out: Mapping[str, np.ndarray], ort_out: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Compare engine outputs with ONNX Runtime's on the same images (pure numpy).

    Classification: top-1 agreement and max |Δp|. Detection: agreement of the
    per-image detection count and of the top box's class, max |Δ top score|.
    """
    if task == "classification":
        a, b = np.asarray(engine_out["probs"], np.float64), np.asarray(ort_out["probs"], np.float64)
        return {
            "n": int(len(a)),
            "agreement": float((a.argmax(1) == b.argmax(1)).mean()) if len(a) else 1.0,
            "max_abs_diff": float(np.abs(a - b).max()) if len(a) else 0.0,
        }
    s_e, s_o = np.asarray(engine_out["scores"], np.float64), np.asarray(ort_out["scores"], np.float64)
    c_e, c_o = np.asarray(engine_out["classes"]), np.asarray(ort_out["classes"])
    count_ok = (s_e > 0).sum(1) == (s_o > 0).sum(1)
    top_ok = (c_e[:, 0] == c_o[:, 0]) | ((s_e[:, 0] <= 0) & (s_o[:, 0] <= 0))
    return {
        "n": int(len(s_e)),
        "agreement": float((count_ok & top_ok).mean()) if len(s_e) else 1.0,
        "max_abs_diff": float(np.abs(s_e[:, 0] - s_o[:, 0]).max()) if len(s_e) else 0.0,
    }


def build_registered_engine(
    registry: Any,
    ref: str,
    precision: Precision | str,
    target: Target | str = Target.X86_GPU,
    *,
    images: np.ndarray,
    calibration_images: np.ndarray | None = None,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_bytes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    availability: Availability | None = None,
):
    """Build an engine from a registered ONNX version, check it, register a new version.

    The new version's ``model.plan`` is the engine (``format: plan``); its source
    ``model.onnx`` is kept beside it (role ``onnx``) so hosts without TensorRT, and ONNX
    Runtime, still load the version. Registered only when the engine agrees with ONNX
    Runtime on ``images`` (real images at the model size) per :data:`MIN_AGREEMENT`.

    Raises:
        ValueError: bad options, a version that is not ONNX, a target this machine is not.
        TensorRTUnavailable: TensorRT or a CUDA device is missing.
        RuntimeError: build failure, or the engine disagrees with ONNX Runtime.
    """
    import tempfile

    from visionfleet.inference import RuntimeOptions, create_session
    from visionfleet.spec import Lineage

    precision = Precision(precision)
    spec = engine_profile(target)
    target = Target(target)
    batches = (min_batch or spec.min_batch, opt_batch or spec.opt_batch, max_batch or spec.max_batch)
    check_engine_build(*batches)
    resolved = registry.resolve(ref)
    card = registry.card(resolved.name, resolved.version)
    if card.format != "onnx" or not card.model_file.endswith(".onnx"):
        raise ValueError(f"Got {card.ref} in format {card.format!r}; expected an ONNX version to build from")
    av = require_tensorrt("tensorrt", availability)
    if spec.on_jetson != av.jetson:
        where = "on the Jetson itself" if spec.on_jetson else "on the x86 GPU server that will run it"
        raise ValueError(
            f"Got --target {target.value} on a {'Jetson' if av.jetson else 'non-Jetson'} machine; expected to build "
            f"{where} (an engine runs only on the GPU model and TensorRT version that built it)"
        )
    src_dir = registry.local_dir(resolved.name, resolved.version)
    onnx_path = src_dir / card.model_file
    with tempfile.TemporaryDirectory(prefix="vf-trt-") as tmp:
        plan_path = Path(tmp) / "model.plan"
        report = build_engine(
            onnx_path,
            plan_path,
            precision,
            input_size=tuple(card.input_size),  # type: ignore[arg-type]
            input_sizes=card.sizes,
            min_batch=batches[0],
            opt_batch=batches[1],
            max_batch=batches[2],
            workspace_bytes=workspace_bytes or spec.workspace_bytes,
            calibration_images=calibration_images,
            timing_cache=(Path(cache_dir) / "timing.cache") if cache_dir else None,
            availability=av,
        )
        sess = create_session(onnx_path, RuntimeOptions(threads=2, providers=("CPUExecutionProvider",)))
        names = [o.name for o in sess.get_outputs()]
        chunks = [images[i : i + batches[2]] for i in range(0, len(images), batches[2])]
        ort_parts = [dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: c}))) for c in chunks]
        eng_parts = [run_engine(plan_path, c) for c in chunks]
        ort_out = {k: np.concatenate([p[k] for p in ort_parts]) for k in names}
        eng_out = {k: np.concatenate([p[k] for p in eng_parts]) for k in names}
        parity = engine_parity(card.task.value, eng_out, ort_out)
        if parity["agreement"] < MIN_AGREEMENT[precision]:
            raise RuntimeError(
                f"the {precision.value} engine agrees with ONNX Runtime on {parity['agreement']:.2%} of "
                f"{parity['n']} images (needs {MIN_AGREEMENT[precision]:.0%}); not registered"
            )
        onnx_copy = Path(tmp) / "model.onnx"
        onnx_copy.write_bytes(onnx_path.read_bytes())
        step = {"op": "tensorrt-build", "target": target.value, **report.to_dict()}
        step.pop("plan_path", None)
        new = card.model_copy(
            update={
                "version": None,
                "files": [],
                "model_file": "model.plan",
                "format": "plan",
                "precision": precision.value,
                "metrics": {"engine_parity": parity},
                "lineage": Lineage(
                    parent=card.ref,
                    dataset=card.lineage.dataset,
                    run=card.lineage.run,
                    steps=[*card.lineage.steps, step],
                ),
                "description": f"TensorRT {report.tensorrt} {precision.value} engine for {report.device}",
            }
        )
        stored = registry.register(new, {"plan": plan_path, "onnx": onnx_copy}, set_production_if_none=False)
    return stored, report, parity
