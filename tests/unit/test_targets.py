"""Target profiles: one profile per target, budgets checked against measured numbers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from visionfleet.targets import (
    TARGETS,
    EngineProfile,
    ModelFormat,
    Precision,
    Target,
    TargetProfile,
    build_table,
    check_budgets,
    check_engine_build,
    profile,
)

REPO = Path(__file__).resolve().parents[2]


def test_every_target_has_exactly_one_profile() -> None:
    assert set(TARGETS) == set(Target)
    for target, prof in TARGETS.items():
        assert prof.target is target
        assert prof.threads >= 1 and prof.max_p95_ms > 0 and prof.max_model_mb > 0
    assert profile("jetson").format is ModelFormat.PLAN
    assert profile(Target.ANDROID).format is ModelFormat.ORT
    assert profile("arm64-cpu").precision is Precision.INT8


def test_duplicate_target_keys_are_rejected() -> None:
    p = TARGETS[Target.X86_CPU]
    with pytest.raises(ValueError, match="second profile for 'x86-cpu'"):
        build_table([p, TARGETS[Target.IOS], p])


def test_tensorrt_targets_carry_their_engine_build_settings() -> None:
    engines = {t: p.engine for t, p in TARGETS.items() if p.engine is not None}
    assert set(engines) == {t for t, p in TARGETS.items() if p.format is ModelFormat.PLAN} == {
        Target.JETSON, Target.X86_GPU}
    assert engines[Target.JETSON] == EngineProfile(1 << 30, 1, 1, 8, on_jetson=True)
    assert engines[Target.X86_GPU] == EngineProfile(4 << 30, 1, 8, 64, on_jetson=False)
    assert profile("x86-gpu").to_dict()["engine"]["max_batch"] == 64 and profile("ios").to_dict()["engine"] is None
    with pytest.raises(ValueError, match="engine profile exactly for the plan"):
        TargetProfile(Target.X86_CPU, "x", ModelFormat.ONNX, Precision.INT8, 1, (64, 64), 1, 1, 1,
                      engine=engines[Target.JETSON])
    with pytest.raises(ValueError, match="engine profile exactly for the plan"):
        TargetProfile(Target.JETSON, "x", ModelFormat.PLAN, Precision.FP16, 1, (64, 64), 1, 1, 1)
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        EngineProfile(1 << 30, 4, 2, 8, on_jetson=False)
    with pytest.raises(ValueError, match="at least 16 MiB"):
        check_engine_build(1, 1, 1, 1024)


def test_precision_and_target_enums_are_defined_only_here() -> None:
    """One Precision enum and one target table: no other module defines its own."""
    own = REPO / "visionfleet" / "targets.py"
    pattern = re.compile(r"^class \w*(Precision|Target)\w*\(.*Enum\)|^TARGETS\b\s*[:=]", re.M)
    hits = [
        f"{f.relative_to(REPO)}: {m.group(0)}"
        for pkg in ("visionfleet", "edge_export", "edge_agent", "train", "tune", "serve_apps", "cluster")
        for f in sorted((REPO / pkg).rglob("*.py"))
        if f != own
        for m in pattern.finditer(f.read_text(encoding="utf-8"))
    ]
    assert not hits, hits


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TARGETS[Target.X86_CPU] = TARGETS[Target.IOS]  # type: ignore[index]


def test_unknown_target_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Got 'raspberry' for target; expected one of"):
        profile("raspberry")


def test_profile_validation() -> None:
    with pytest.raises(ValueError, match="threads"):
        TargetProfile(Target.X86_CPU, "x", ModelFormat.ONNX, Precision.INT8, 0, (64, 64), 1, 1, 1)
    with pytest.raises(ValueError, match="max_p95_ms"):
        TargetProfile(Target.X86_CPU, "x", ModelFormat.ONNX, Precision.INT8, 1, (64, 64), 1, 1, 0)


def test_check_budgets_flags_what_is_exceeded_and_what_was_not_measured() -> None:
    prof = profile("arm64-cpu")  # 25 MB, 512 MB, 200 ms, 224x224, int8
    checks = {c.name.split(" (")[0]: c for c in check_budgets(
        prof, model_mb=30.0, peak_memory_mb=None, p95_ms=120.0, input_size=(320, 320), precision="fp32"
    )}
    assert checks["model size"].ok is False and "EXCEEDED" in checks["model size"].message()
    assert checks["peak memory"].ok is None and "not measured" in checks["peak memory"].message()
    assert checks["p95 latency"].ok is True
    assert checks["input size"].ok is False
    assert checks["precision"].ok is False
    ok = check_budgets(prof, model_mb=1.0, peak_memory_mb=10.0, p95_ms=1.0, input_size=(64, 64), precision="int8")
    assert all(c.ok for c in ok) and len(ok) == 5
    assert ok[2].name == "p95 latency (batch 1, 4 threads)"  # the latency budget names its thread count
    other = check_budgets(prof, p95_ms=1.0, threads=1)[2]
    assert other.name == "p95 latency (batch 1, 1 threads; the profile runs 4)"


def test_targets_module_stays_light() -> None:
    r = subprocess.run(
        [sys.executable, "-c", "import visionfleet.targets, sys; print(' '.join(sys.modules))"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    mods = set(r.stdout.split())
    assert not {"torch", "onnx", "onnxruntime", "ray"} & mods
