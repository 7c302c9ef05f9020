"""Edge bundles on the device side: read, verify, load and health-check a bundle folder.

A bundle is a folder (shipped as one tar archive)::

    bundle.json         the manifest: model, version, target, format, precision, the
                        sha256 and size of every other file, golden tolerance, runtime
    card.json           the model card (model_file names the file below)
    model.int8.onnx     or model.ort (android/ios) or model.onnx (+ tensorrt.json, jetson)
    preprocessing.json  input size, resize mode, layout, normalization folded in the graph
    golden.json         expected outputs of the golden samples
    golden/000.png …    golden samples: real images from the model's dataset, encoded

The exporter (``edge_export.bundle``) and the device run the *same* check
(:func:`health_check`): verify every file's hash, load the model in ONNX Runtime the
way the agent will, push each golden image through the agent's own decode → resize →
run path and compare with the expected outputs. Nothing here imports torch, ray or
pyarrow.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MANIFEST",
    "GOLDEN",
    "BundleError",
    "BundleFile",
    "GoldenSpec",
    "RuntimeSpec",
    "BundleManifest",
    "GoldenResult",
    "HealthReport",
    "read_manifest",
    "verify_files",
    "file_digest",
    "load_bundle",
    "run_golden",
    "health_check",
]

MANIFEST = "bundle.json"
GOLDEN = "golden.json"
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle folder is incomplete, altered or does not describe itself."""


class BundleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class GoldenSpec(BaseModel):
    """How closely a device must reproduce the golden outputs."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(ge=1, description="number of golden samples")
    atol: float = Field(gt=0, description="largest allowed absolute difference of any output value")
    min_top1_agreement: float = Field(
        ge=0, le=1, description="classification: share of samples whose top-1 must match the expected top-1"
    )


class RuntimeSpec(BaseModel):
    """How the device runs the model."""

    model_config = ConfigDict(extra="forbid")

    threads: int = Field(ge=1, description="ONNX Runtime intra-op threads of the target profile")
    providers: list[str] | None = Field(default=None, description="execution providers in order (None: best available)")
    tensorrt: dict[str, Any] | None = Field(
        default=None,
        description="jetson: TensorRT EP options; trt_engine_cache_path is relative to the agent's engine cache",
    )


class BundleManifest(BaseModel):
    """The contents of ``bundle.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    bundle_id: str = Field(description="<model>-v<version>-<target>-<first 12 hex of the model file's sha256>")
    model: str
    version: int = Field(ge=1)
    target: str
    task: str
    format: str = Field(description="onnx or ort")
    precision: str
    model_file: str
    input_size: tuple[int, int]
    resize: str
    files: dict[str, BundleFile] = Field(description="every file of the bundle except bundle.json")
    golden: GoldenSpec
    runtime: RuntimeSpec
    source: dict[str, Any] = Field(default_factory=dict, description="the registered version it was built from")
    checks: dict[str, Any] = Field(default_factory=dict, description="export-time golden check and budgets")
    created_at: str = ""


def file_digest(path: str | os.PathLike[str]) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a file, read in chunks."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts) and "\\" not in name


def read_manifest(path: str | os.PathLike[str]) -> BundleManifest:
    """Parse ``bundle.json`` of a bundle folder.

    Raises:
        BundleError: missing or invalid manifest.
    """
    p = Path(path) / MANIFEST
    try:
        return BundleManifest.model_validate_json(p.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"no {MANIFEST} in {path}") from None
    except ValueError as exc:
        raise BundleError(f"invalid {MANIFEST} in {path}: {exc}") from None


def verify_files(path: str | os.PathLike[str], manifest: BundleManifest | None = None) -> BundleManifest:
    """Check that every file the manifest lists is present with its size and sha256.

    Raises:
        BundleError: a file is missing, has another size or hash, or a name escapes the folder.
    """
    root = Path(path)
    m = manifest or read_manifest(root)
    for name in (m.model_file, "card.json", GOLDEN):
        if name not in m.files:
            raise BundleError(f"Got a manifest without {name!r} in its files; expected model, card and golden files")
    for name, entry in m.files.items():
        if not _safe_name(name):
            raise BundleError(f"Got file name {name!r} in {MANIFEST}; expected a relative path inside the bundle")
        fp = root / name
        if not fp.is_file():
            raise BundleError(f"{m.bundle_id}: {name} is missing")
        digest, size = file_digest(fp)
        if size != entry.bytes or digest != entry.sha256:
            raise BundleError(f"{m.bundle_id}: {name} does not match its manifest (sha256 {digest[:12]}…, {size} bytes)")
    return m


def load_bundle(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    engine_cache: str | os.PathLike[str] | None = None,
    manifest: BundleManifest | None = None,
):
    """Load a bundle's model in ONNX Runtime (the ``.ort`` format too) as a ``LoadedModel``.

    ``threads`` defaults to the target profile's; a jetson bundle gets its TensorRT EP
    options with the engine cache under ``engine_cache`` (built once on the device,
    reused on every start).
    """
    from visionfleet.inference import RuntimeOptions, load_model_dir

    m = manifest or read_manifest(path)
    providers = tuple(m.runtime.providers) if m.runtime.providers else None
    provider_options: dict[str, dict[str, Any]] = {}
    if m.runtime.tensorrt is not None:
        import onnxruntime as ort

        if "TensorrtExecutionProvider" in ort.get_available_providers():
            opts = dict(m.runtime.tensorrt)
            cache = Path(engine_cache or Path(path) / ".engine-cache") / m.bundle_id
            cache.mkdir(parents=True, exist_ok=True)
            opts["trt_engine_cache_path"] = str(cache)
            if opts.get("trt_timing_cache_enable"):
                opts["trt_timing_cache_path"] = str(cache)
            provider_options["TensorrtExecutionProvider"] = opts
        else:
            # No TensorRT here (a CPU box, or a Jetson without the GPU build): ONNX
            # Runtime's best available providers run the same ONNX file.
            providers = None
    return load_model_dir(
        path,
        RuntimeOptions(threads=threads or m.runtime.threads, providers=providers, provider_options=provider_options),
    )


@dataclass(frozen=True)
class GoldenResult:
    """How a loaded model reproduced the golden outputs."""

    n: int
    max_abs_diff: float
    top1_agreement: float | None
    ok: bool
    message: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement,
                "ok": self.ok, "message": self.message, "seconds": round(self.seconds, 4)}


def _golden_doc(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads((path / GOLDEN).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"unreadable {GOLDEN} in {path}: {exc}") from None
    if not isinstance(doc.get("samples"), list) or not doc["samples"]:
        raise BundleError(f"{GOLDEN} in {path} lists no samples")
    return doc


def run_golden(
    model: Any, path: str | os.PathLike[str], spec: GoldenSpec, *, atol: float | None = None,
    min_agreement: float | None = None,
) -> GoldenResult:
    """Run every golden image through decode → resize → model and compare with the expected outputs.

    ``atol``/``min_agreement`` override the manifest's tolerance (the exporter checks
    its own output more tightly than a device, whose kernels may differ).
    """
    from edge_agent.predict import run_model
    from visionfleet.imaging import load_for_model

    t0 = time.perf_counter()
    root = Path(path)
    doc = _golden_doc(root)
    atol = spec.atol if atol is None else atol
    min_agreement = spec.min_top1_agreement if min_agreement is None else min_agreement
    card = model.card
    worst = 0.0
    agree = total = 0
    for s in doc["samples"]:
        name = str(s.get("file", ""))
        if not _safe_name(name):
            raise BundleError(f"Got golden file {name!r}; expected a relative path inside the bundle")
        img, _ = load_for_model((root / name).read_bytes(), tuple(card.input_size), card.resize)
        outputs = run_model(model, img)
        expected = s.get("outputs") or {}
        if len(expected) != len(model.output_names):
            return GoldenResult(len(doc["samples"]), float("inf"), None, False,
                                f"golden sample {name} has outputs {sorted(expected)}; the model has {model.output_names}",
                                time.perf_counter() - t0)
        for out_name, got in zip(model.output_names, outputs):
            want = np.asarray(expected.get(out_name), dtype=np.float64)
            have = np.asarray(got[0], dtype=np.float64)
            if want.shape != have.shape:
                return GoldenResult(len(doc["samples"]), float("inf"), None, False,
                                    f"golden sample {name}: output {out_name} has shape {have.shape}, expected {want.shape}",
                                    time.perf_counter() - t0)
            worst = max(worst, float(np.max(np.abs(want - have))) if want.size else 0.0)
        if card.task.value == "classification":
            total += 1
            want0 = np.asarray(expected[model.output_names[0]])
            agree += int(int(np.argmax(want0)) == int(np.argmax(outputs[0][0])))
    agreement = agree / total if total else None
    ok = worst <= atol and (agreement is None or agreement >= min_agreement)
    msg = (f"{len(doc['samples'])} golden samples: max |diff| {worst:.2e} (tolerance {atol:.1e})"
           + (f", top-1 agreement {agreement:.3f} (needs {min_agreement:.2f})" if agreement is not None else ""))
    return GoldenResult(len(doc["samples"]), worst, agreement, ok, msg, time.perf_counter() - t0)


@dataclass(frozen=True)
class HealthReport:
    """The outcome of :func:`health_check`: files verified, model loaded, golden outputs reproduced."""

    ok: bool
    bundle_id: str | None
    model: str | None = None
    version: int | None = None
    golden: GoldenResult | None = None
    error: str | None = None
    seconds: float = 0.0
    providers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "bundle_id": self.bundle_id, "model": self.model, "version": self.version,
                "golden": self.golden.to_dict() if self.golden else None, "error": self.error,
                "seconds": round(self.seconds, 4), "providers": self.providers}


def health_check(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    engine_cache: str | os.PathLike[str] | None = None,
    atol: float | None = None,
    min_agreement: float | None = None,
    keep_model: list | None = None,
) -> HealthReport:
    """Verify, load and golden-check a bundle folder; never raises for a bad bundle.

    ``keep_model``: when given a list, the loaded model is appended to it on success, so
    the caller can serve it without loading it twice.
    """
    t0 = time.perf_counter()
    bundle_id = model_name = version = None
    try:
        m = verify_files(path)
        bundle_id, model_name, version = m.bundle_id, m.model, m.version
        model = load_bundle(path, threads=threads, engine_cache=engine_cache, manifest=m)
        if model.card.name != m.model or model.card.version != m.version:
            raise BundleError(f"card says {model.card.ref}, manifest says {m.model}:{m.version}")
        golden = run_golden(model, path, m.golden, atol=atol, min_agreement=min_agreement)
    except Exception as exc:  # noqa: BLE001 - any failure means "not healthy", with the reason
        return HealthReport(False, bundle_id, model_name, version, error=f"{type(exc).__name__}: {exc}",
                            seconds=time.perf_counter() - t0)
    if golden.ok and keep_model is not None:
        keep_model.append(model)
    return HealthReport(golden.ok, bundle_id, model_name, version, golden,
                        None if golden.ok else f"golden outputs not reproduced: {golden.message}",
                        time.perf_counter() - t0, model.providers)
