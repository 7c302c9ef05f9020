"""Deployment targets: a table from a :class:`Target` to a frozen :class:`TargetProfile`.

A profile fixes what a model must look like to ship to that kind of device (file
format, numeric precision, the thread count it runs with, the largest input size the
device pipeline feeds) and the budgets it must fit: file size, peak memory and p95
latency at batch 1 on the profile's threads. A TensorRT target (format ``plan``) also
carries its :class:`EngineProfile`: builder workspace, the dynamic-batch optimization
profile, and whether the engine is built on a Jetson (an engine runs only where it was
built). This is the only target table and :class:`Precision` the only precision enum:
``edge_export`` (TensorRT, quantization, bundles) and the Tune sweep read them. ``visionfleet optimize`` and
``visionfleet bench`` check measured numbers against a profile with
:func:`check_budgets`; the Tune sweep treats a trial over a budget as infeasible, and
the edge bundles use format and precision. Kept light on purpose (no torch, no onnx):
the device agent imports it.

Latency measured on the build machine is not the device's latency: a number checked
against the ``arm64-cpu`` budget on an x86 box says how the model runs *here* on four
threads, nothing more. Callers print where the number was measured.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

__all__ = [
    "Target",
    "ModelFormat",
    "Precision",
    "EngineProfile",
    "TargetProfile",
    "BudgetCheck",
    "TARGETS",
    "profile",
    "check_budgets",
    "build_table",
    "check_engine_build",
    "hw_profile",
]

_GIB = 1 << 30


class Target(str, enum.Enum):
    X86_CPU = "x86-cpu"
    ARM64_CPU = "arm64-cpu"
    ANDROID = "android"
    IOS = "ios"
    JETSON = "jetson"
    X86_GPU = "x86-gpu"


class ModelFormat(str, enum.Enum):
    ONNX = "onnx"  # ONNX Runtime, any CPU
    ORT = "ort"  # ONNX Runtime mobile format (flatbuffer, reduced-ops build)
    PLAN = "plan"  # TensorRT engine, built on the device from the ONNX file


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


def check_engine_build(min_batch: int, opt_batch: int, max_batch: int, workspace_bytes: int | None = None) -> None:
    """What every TensorRT build needs: an ordered dynamic-batch profile and room to build in.

    Raises:
        ValueError: not 1 <= min <= opt <= max, or a workspace under 16 MiB.
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"Got batches min {min_batch}, opt {opt_batch}, max {max_batch}; expected 1 <= min <= opt <= max"
        )
    if workspace_bytes is not None and workspace_bytes < 1 << 24:
        raise ValueError(f"Got {workspace_bytes} for workspace bytes; expected at least 16 MiB")


def hw_profile(sizes: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """A TensorRT optimization profile's (min, opt, max) height x width for a model's sizes.

    ``sizes`` are the card's ``input_sizes`` (default first): min and max are the smallest
    and largest height and width listed (per axis), opt is the default size, so one
    engine serves every listed size without a rebuild.

    Raises:
        ValueError: no sizes, or a side < 1.
    """
    listed = [(int(h), int(w)) for h, w in sizes]
    if not listed or min(min(s) for s in listed) < 1:
        raise ValueError(f"Got sizes {listed}; expected at least one (height, width) with sides >= 1")
    lo = (min(h for h, _ in listed), min(w for _, w in listed))
    hi = (max(h for h, _ in listed), max(w for _, w in listed))
    return lo, listed[0], hi


@dataclass(frozen=True)
class EngineProfile:
    """How a TensorRT engine is built for a target: workspace and the dynamic-batch profile."""

    workspace_bytes: int
    min_batch: int
    opt_batch: int
    max_batch: int
    on_jetson: bool  # an engine runs only where it was built: Jetson engines are built on the Jetson

    def __post_init__(self) -> None:
        check_engine_build(self.min_batch, self.opt_batch, self.max_batch, self.workspace_bytes)

    def to_dict(self) -> dict:
        return {
            "workspace_bytes": self.workspace_bytes,
            "min_batch": self.min_batch,
            "opt_batch": self.opt_batch,
            "max_batch": self.max_batch,
            "on_jetson": self.on_jetson,
        }


@dataclass(frozen=True)
class TargetProfile:
    """What a model for one kind of device looks like, and the budgets it must fit.

    Budgets are maxima at batch 1 on ``threads`` threads; ``input_size`` is the largest
    (height, width) the device's pipeline feeds a model.
    """

    target: Target
    description: str
    format: ModelFormat
    precision: Precision
    threads: int
    input_size: tuple[int, int]
    max_model_mb: float
    max_peak_memory_mb: float
    max_p95_ms: float
    accelerator: str = "cpu"
    engine: EngineProfile | None = None  # TensorRT targets (format plan) only

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"Got {self.threads} for threads; expected >= 1")
        if min(self.input_size) < 8:
            raise ValueError(f"Got {self.input_size} for input_size; expected sides >= 8")
        for name in ("max_model_mb", "max_peak_memory_mb", "max_p95_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Got {getattr(self, name)} for {name}; expected > 0")
        if (self.format is ModelFormat.PLAN) != (self.engine is not None):
            raise ValueError(
                f"Got format {self.format.value} and engine {self.engine} for {self.target.value}; expected an "
                "engine profile exactly for the plan (TensorRT) format"
            )

    def to_dict(self) -> dict:
        return {
            "target": self.target.value,
            "description": self.description,
            "format": self.format.value,
            "precision": self.precision.value,
            "threads": self.threads,
            "input_size": list(self.input_size),
            "max_model_mb": self.max_model_mb,
            "max_peak_memory_mb": self.max_peak_memory_mb,
            "max_p95_ms": self.max_p95_ms,
            "accelerator": self.accelerator,
            "engine": self.engine.to_dict() if self.engine else None,
        }


def build_table(profiles: Iterable[TargetProfile]) -> Mapping[Target, TargetProfile]:
    """A read-only table keyed by target; a duplicate key is a bug, so it raises.

    Raises:
        ValueError: two profiles name the same target.
    """
    table: dict[Target, TargetProfile] = {}
    for p in profiles:
        if p.target in table:
            raise ValueError(f"Got a second profile for {p.target.value!r}; expected one profile per target")
        table[p.target] = p
    return MappingProxyType(table)


# The budgets describe typical devices of each class at batch 1: a small x86 server or
# gateway (2 cores), a Raspberry Pi 4/5-class board (4 Cortex-A cores, 1-8 GB), a
# mid-range phone's big cores, a Jetson Orin Nano (GPU, TensorRT FP16) and a GPU server.
# Orin-class boards share 8-64 GB between CPU and GPU: a small workspace and batch keep
# the TensorRT builder inside what a camera pipeline leaves free.
TARGETS: Mapping[Target, TargetProfile] = build_table(
    [
        TargetProfile(
            Target.X86_CPU,
            "x86-64 server or gateway CPU, ONNX Runtime with INT8 (VNNI) kernels",
            ModelFormat.ONNX, Precision.INT8, threads=2, input_size=(224, 224),
            max_model_mb=100.0, max_peak_memory_mb=1024.0, max_p95_ms=50.0,
        ),
        TargetProfile(
            Target.ARM64_CPU,
            "Raspberry Pi 4/5-class arm64 board, ONNX Runtime INT8",
            ModelFormat.ONNX, Precision.INT8, threads=4, input_size=(224, 224),
            max_model_mb=25.0, max_peak_memory_mb=512.0, max_p95_ms=200.0,
        ),
        TargetProfile(
            Target.ANDROID,
            "Android phone, ONNX Runtime Mobile (ORT format), INT8 on the big cores",
            ModelFormat.ORT, Precision.INT8, threads=4, input_size=(224, 224),
            max_model_mb=20.0, max_peak_memory_mb=256.0, max_p95_ms=100.0,
        ),
        TargetProfile(
            Target.IOS,
            "iPhone, ONNX Runtime Mobile (ORT format) with the CoreML provider, FP16",
            ModelFormat.ORT, Precision.FP16, threads=4, input_size=(224, 224),
            max_model_mb=20.0, max_peak_memory_mb=256.0, max_p95_ms=100.0,
        ),
        TargetProfile(
            Target.JETSON,
            "NVIDIA Jetson (Orin class), TensorRT engine built on the device, FP16",
            ModelFormat.PLAN, Precision.FP16, threads=1, input_size=(224, 224),
            max_model_mb=200.0, max_peak_memory_mb=2048.0, max_p95_ms=20.0, accelerator="cuda",
            engine=EngineProfile(1 * _GIB, 1, 1, 8, on_jetson=True),
        ),
        TargetProfile(
            Target.X86_GPU,
            "discrete NVIDIA GPU in an x86-64 server, TensorRT engine built on the server, FP16",
            ModelFormat.PLAN, Precision.FP16, threads=2, input_size=(224, 224),
            max_model_mb=500.0, max_peak_memory_mb=8192.0, max_p95_ms=10.0, accelerator="cuda",
            engine=EngineProfile(4 * _GIB, 1, 8, 64, on_jetson=False),
        ),
    ]
)


def profile(target: Target | str) -> TargetProfile:
    """The profile of a target given as enum or name.

    Raises:
        ValueError: unknown target name.
    """
    try:
        key = Target(target)
    except ValueError:
        raise ValueError(f"Got {target!r} for target; expected one of {[t.value for t in Target]}") from None
    return TARGETS[key]


@dataclass(frozen=True)
class BudgetCheck:
    """One line of a budget report: what was measured against what the profile allows."""

    name: str
    limit: float | str
    measured: float | str | None
    ok: bool | None  # None: not measured
    unit: str = ""

    def message(self) -> str:
        if self.ok is None:
            return f"{self.name}: not measured (budget {self.limit}{self.unit})"
        verdict = "ok" if self.ok else "EXCEEDED"
        measured = f"{self.measured:.2f}" if isinstance(self.measured, float) else str(self.measured)
        return f"{self.name}: {measured}{self.unit} vs budget {self.limit}{self.unit} — {verdict}"

    def to_dict(self) -> dict:
        return {"name": self.name, "limit": self.limit, "measured": self.measured, "ok": self.ok, "unit": self.unit}


def check_budgets(
    prof: TargetProfile,
    *,
    model_mb: float | None = None,
    peak_memory_mb: float | None = None,
    p95_ms: float | None = None,
    input_size: tuple[int, int] | None = None,
    precision: str | None = None,
    threads: int | None = None,
) -> list[BudgetCheck]:
    """Compare measured numbers with a profile; a None measurement is reported as not measured.

    ``threads`` is the thread count the latency was measured with (default: the
    profile's); when it differs from the profile's, the check says so. Precision is a
    requirement, not a budget: an FP32 model for an INT8 target fails it.
    """
    n = prof.threads if threads is None else threads
    latency = f"p95 latency (batch 1, {n} threads" + (f"; the profile runs {prof.threads})" if n != prof.threads else ")")
    checks = [
        _max("model size", prof.max_model_mb, model_mb, " MB"),
        _max("peak memory", prof.max_peak_memory_mb, peak_memory_mb, " MB"),
        _max(latency, prof.max_p95_ms, p95_ms, " ms"),
    ]
    if input_size is not None:
        h, w = input_size
        lh, lw = prof.input_size
        checks.append(BudgetCheck("input size", f"{lh}x{lw}", f"{h}x{w}", h <= lh and w <= lw))
    if precision is not None:
        checks.append(BudgetCheck("precision", prof.precision.value, precision, precision == prof.precision.value))
    return checks


def _max(name: str, limit: float, measured: float | None, unit: str) -> BudgetCheck:
    if measured is None:
        return BudgetCheck(name, limit, None, None, unit)
    return BudgetCheck(name, limit, float(measured), float(measured) <= limit, unit)
