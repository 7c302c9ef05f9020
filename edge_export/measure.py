"""Measure what a model costs and what it is worth: latency, throughput, accuracy, MACs, memory.

The functions are small and composable, so `visionfleet optimize`, `visionfleet bench`,
the ``bench/`` scripts and the Tune sweep all measure the same way:

* a **runner** is anything called with uint8 NHWC images that returns probabilities
  (:class:`OrtRunner` for an ONNX file, :class:`TorchRunner` for an ``nn.Module``);
* the three MLPerf Inference scenarios: :func:`single_stream` (batch 1, one query at a
  time, p50/p90), :func:`offline` (throughput at a batch size) and :func:`server`
  (Poisson arrivals; the highest QPS whose p99 stays under a bound);
* :func:`alternate` runs several runners round by round in rotating order, so that a
  ratio is taken between measurements made at the same moment on a shared, noisy
  machine; :func:`ratio_stats` turns the rounds into median and min–max;
* :func:`count_macs` reads multiply-accumulates from the ONNX graph (Conv, Gemm,
  MatMul and their integer forms), :func:`gemm_ceiling` measures the fastest square
  GEMM through ONNX Runtime on the same threads, and :func:`efficiency` divides one by
  the other;
* :func:`peak_memory_mb` loads and runs the model in a fresh process and reports its
  peak resident memory above an idle ONNX Runtime process.

Thread counts are always explicit; nothing here asserts a timing.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from visionfleet.targets import Precision

__all__ = [
    "Runner",
    "OrtRunner",
    "TorchRunner",
    "LatencyStats",
    "OfflineResult",
    "ServerResult",
    "GemmCeiling",
    "RatioStats",
    "single_stream",
    "offline",
    "server",
    "alternate",
    "ratio_stats",
    "holdout_top1",
    "count_macs",
    "gemm_ceiling",
    "efficiency",
    "peak_memory_mb",
    "file_mb",
    "machine_info",
    "Scenario",
    "compare",
    "plot_comparison",
]


class Runner(Protocol):
    """A model ready to run: uint8 NHWC images in, probabilities out."""

    name: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


class OrtRunner:
    """An ONNX file in an ONNX Runtime session with an explicit thread count."""

    def __init__(self, path: str | os.PathLike[str], threads: int, *, name: str | None = None, spinning: bool = False):
        from visionfleet.inference import RuntimeOptions, create_session

        self.path = Path(path)
        self.name = name or self.path.name
        self.threads = threads
        self.session = create_session(
            self.path, RuntimeOptions(threads=threads, providers=("CPUExecutionProvider",), spinning=spinning)
        )
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input: images})[0]


class TorchRunner:
    """A float NCHW -> logits module run eagerly with normalization and softmax, as exported."""

    def __init__(self, core: Any, mean: Sequence[float], std: Sequence[float], threads: int, *, name: str = "torch"):
        import torch

        from edge_export.onnx_export import Deployable

        self.name = name
        self.threads = threads
        self.module = Deployable(core.eval(), mean, std).eval()
        self._torch = torch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        # torch's thread count is per process: set it on every call, so that an ONNX
        # Runtime session measured in between cannot leave it different.
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.module(torch.from_numpy(images)).numpy()


# ----------------------------------------------------------------------------- scenarios


def _percentile(values_ms: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values_ms, dtype=np.float64), q))


@dataclass(frozen=True)
class LatencyStats:
    """SingleStream: one query (batch) at a time, latencies in milliseconds."""

    batch: int
    n: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    @classmethod
    def from_samples(cls, batch: int, samples_ms: Sequence[float]) -> "LatencyStats":
        return cls(
            batch=batch,
            n=len(samples_ms),
            p50_ms=_percentile(samples_ms, 50),
            p90_ms=_percentile(samples_ms, 90),
            p95_ms=_percentile(samples_ms, 95),
            p99_ms=_percentile(samples_ms, 99),
            mean_ms=float(np.mean(samples_ms)),
            min_ms=float(np.min(samples_ms)),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    """Contiguous batches cycled from the image pool (at least one)."""
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"Got images {images.dtype} {images.shape}; expected a non-empty uint8 [N, H, W, 3]")
    if batch < 1:
        raise ValueError(f"Got {batch} for batch; expected >= 1")
    reps = -(-batch // len(images))
    pool = np.concatenate([images] * reps) if reps > 1 else images
    out = [np.ascontiguousarray(pool[i : i + batch]) for i in range(0, len(pool) - batch + 1, batch)]
    return out or [np.ascontiguousarray(pool[:batch])]


def single_stream(
    runner: Runner, images: np.ndarray, *, queries: int = 100, warmup: int = 5, batch: int = 1, min_seconds: float = 0.0
) -> LatencyStats:
    """SingleStream: run queries back to back at ``batch`` (1 by default); latency percentiles.

    Runs ``queries`` timed queries, more if ``min_seconds`` has not passed yet.
    """
    if queries < 1:
        raise ValueError(f"Got {queries} for queries; expected >= 1")
    pool = _batches(images, batch)
    for i in range(warmup):
        runner(pool[i % len(pool)])
    samples: list[float] = []
    t_end = time.perf_counter() + min_seconds
    i = 0
    while len(samples) < queries or time.perf_counter() < t_end:
        x = pool[i % len(pool)]
        t0 = time.perf_counter()
        runner(x)
        samples.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return LatencyStats.from_samples(batch, samples)


@dataclass(frozen=True)
class OfflineResult:
    """Offline: all queries available at once; throughput at a fixed batch size."""

    batch: int
    images: int
    seconds: float
    images_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def offline(
    runner: Runner, images: np.ndarray, *, batch: int = 8, batches: int = 4, warmup: int = 1, min_seconds: float = 0.0
) -> OfflineResult:
    """Offline throughput: ``batches`` timed batches (more until ``min_seconds``) after ``warmup``."""
    if batches < 1:
        raise ValueError(f"Got {batches} for batches; expected >= 1")
    pool = _batches(images, batch)
    for i in range(warmup):
        runner(pool[i % len(pool)])
    n = 0
    t0 = time.perf_counter()
    while n < batches or time.perf_counter() - t0 < min_seconds:
        runner(pool[n % len(pool)])
        n += 1
    seconds = time.perf_counter() - t0
    return OfflineResult(batch=batch, images=n * batch, seconds=seconds, images_per_s=n * batch / seconds)


@dataclass(frozen=True)
class ServerResult:
    """Server: the highest Poisson arrival rate whose p99 latency stays under the bound."""

    p99_bound_ms: float
    max_batch: int
    best_qps: float  # 0 when even the lowest rate tried missed the bound
    p99_ms_at_best: float | None
    p50_ms_at_best: float | None
    trials: list[dict] = field(default_factory=list)  # every rate tried: qps, p50, p99, ok

    def to_dict(self) -> dict:
        return asdict(self)


def _server_trial(
    runner: Runner, pool: list[np.ndarray], qps: float, n: int, max_batch: int, rng: np.random.Generator
) -> list[float]:
    """Replay ``n`` Poisson arrivals in real time; queries that wait are batched (up to max_batch).

    A query's latency runs from its arrival to the end of the batch that served it,
    so queueing delay counts, as in MLPerf's Server scenario.
    """
    arrivals = np.cumsum(rng.exponential(1.0 / qps, n))
    latencies: list[float] = []
    t0 = time.perf_counter()
    i = 0
    k = 0
    while i < n:
        now = time.perf_counter() - t0
        if arrivals[i] > now:
            time.sleep(arrivals[i] - now)
            now = time.perf_counter() - t0
        j = i + 1
        while j < n and j - i < max_batch and arrivals[j] <= now:
            j += 1
        images = pool[k % len(pool)][: j - i]
        k += 1
        runner(images)
        done = time.perf_counter() - t0
        latencies.extend((done - arrivals[i:j]) * 1e3)
        i = j
    return latencies


def server(
    runner: Runner,
    images: np.ndarray,
    *,
    p99_bound_ms: float,
    max_batch: int = 8,
    trial_seconds: float = 4.0,
    min_queries: int = 100,
    max_qps: float | None = None,
    steps: int = 7,
    seed: int = 0,
) -> ServerResult:
    """Server scenario: bisect the arrival rate for the highest QPS with p99 <= bound.

    The search starts from the batch-1 rate the runner sustains and the Offline rate at
    ``max_batch`` (an upper bound unless given). Each trial replays ``min_queries`` or
    ``trial_seconds`` worth of arrivals, whichever is more.
    """
    if p99_bound_ms <= 0:
        raise ValueError(f"Got {p99_bound_ms} for p99_bound_ms; expected > 0")
    pool = _batches(images, max_batch)
    rng = np.random.default_rng(seed)
    if max_qps is None:
        max_qps = offline(runner, images, batch=max_batch, batches=3).images_per_s * 1.05
    lo, hi = 0.0, float(max_qps)
    trials: list[dict] = []
    best: dict | None = None
    qps = hi / 2
    for _ in range(steps):
        n = max(min_queries, int(qps * trial_seconds))
        lat = _server_trial(runner, pool, qps, n, max_batch, rng)
        p99, p50 = _percentile(lat, 99), _percentile(lat, 50)
        ok = p99 <= p99_bound_ms
        trials.append({"qps": qps, "queries": n, "p50_ms": p50, "p99_ms": p99, "ok": ok})
        if ok:
            lo = qps
            if best is None or qps > best["qps"]:
                best = trials[-1]
        else:
            hi = qps
        qps = (lo + hi) / 2
    return ServerResult(
        p99_bound_ms=p99_bound_ms,
        max_batch=max_batch,
        best_qps=best["qps"] if best else 0.0,
        p99_ms_at_best=best["p99_ms"] if best else None,
        p50_ms_at_best=best["p50_ms"] if best else None,
        trials=trials,
    )


# ------------------------------------------------------------------ side-by-side rounds


@dataclass(frozen=True)
class RatioStats:
    """A ratio measured round by round: median with its min–max over the rounds."""

    median: float
    min: float
    max: float
    rounds: int
    values: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "rounds": self.rounds, "values": list(self.values)}

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.min:.2f}–{self.max:.2f}, {self.rounds} rounds)"


def alternate(
    runners: Sequence[Runner],
    measure: Callable[[Runner], float],
    *,
    rounds: int = 5,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Measure every runner once per round, rotating the order each round.

    Rotating cancels a steady drift in machine load; a ratio between two runners is
    then taken within a round (see :func:`ratio_stats`). Returns name -> values by round.
    """
    if rounds < 1:
        raise ValueError(f"Got {rounds} for rounds; expected >= 1")
    names = [r.name for r in runners]
    if len(set(names)) != len(names):
        raise ValueError(f"Got runner names {names}; expected unique names")
    values: dict[str, list[float]] = {n: [] for n in names}
    for k in range(rounds):
        order = list(runners[k % len(runners) :]) + list(runners[: k % len(runners)])
        if k % 2:
            order.reverse()
        for r in order:
            values[r.name].append(float(measure(r)))
        if on_round:
            on_round(k + 1)
    return values


def ratio_stats(numerator: Sequence[float], denominator: Sequence[float]) -> RatioStats:
    """Per-round ratios ``numerator[k] / denominator[k]``: median and min–max."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"Got {len(numerator)} and {len(denominator)} rounds; expected the same, non-zero count")
    vals = tuple(float(a) / float(b) for a, b in zip(numerator, denominator))
    return RatioStats(statistics.median(vals), min(vals), max(vals), len(vals), vals)


# ------------------------------------------------------------------------- accuracy


def holdout_top1(runner: Runner, images: np.ndarray, labels: np.ndarray, *, batch: int = 64) -> float:
    """Top-1 accuracy of a runner on labeled uint8 NHWC images."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"Got {len(images)} images and {len(labels)} labels; expected the same, non-zero count")
    preds = np.concatenate([runner(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return float((preds == np.asarray(labels)).mean())


# ----------------------------------------------------------------------------- MACs

# op type -> index of the weight input; MACs = output elements * weight elements per output
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
# op type -> index of the A input; MACs = output elements * K (A's last dimension)
_MATMUL_A = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0}


def count_macs(model: Any, batch: int = 1) -> int:
    """Multiply-accumulates for ``batch`` images, from the graph's Conv, Gemm and MatMul nodes.

    Works on FP32, FP16 and quantized graphs (QDQ, QLinearConv, ConvInteger,
    MatMulInteger). ``model`` is a path or an ``onnx.ModelProto``; the batch dimension
    of the first input is fixed to ``batch`` for shape inference.

    Raises:
        ValueError: a counted node's shapes cannot be inferred.
    """
    import onnx

    proto = onnx.load(os.fspath(model), load_external_data=False) if not isinstance(model, onnx.ModelProto) else model
    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # never touch the caller's graph
    init_names = {i.name for i in proto.graph.initializer}
    real_inputs = [i for i in proto.graph.input if i.name not in init_names]
    if real_inputs:
        dim0 = real_inputs[0].type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_param")
        dim0.dim_value = batch
    # ONNX Runtime's symbolic shape inference follows Shape -> Reshape chains (the
    # flatten before a classifier) that onnx's own inference leaves unknown.
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception:  # noqa: BLE001 - e.g. a detector's NMS tail (data-dependent shapes) trips it
        # onnx's own inference still gives the static shapes of every Conv before the tail
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)

    def shape(name: str, node: Any) -> list[int]:
        if name not in shapes:
            raise ValueError(f"Got no static shape for {name!r} of {node.op_type} node {node.name!r}; cannot count MACs")
        return shapes[name]

    total = 0
    for node in inferred.graph.node:
        op = node.op_type
        if op in _CONV_WEIGHT:
            w = shape(node.input[_CONV_WEIGHT[op]], node)
            total += int(np.prod(shape(node.output[0], node))) * int(np.prod(w[1:]))
        elif op in _MATMUL_A:
            a = shape(node.input[_MATMUL_A[op]], node)
            total += int(np.prod(shape(node.output[0], node))) * int(a[-1])
        elif op == "Gemm":
            a = shape(node.input[0], node)
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            total += int(np.prod(shape(node.output[0], node))) * int(k)
    return total


# --------------------------------------------------------------------- GEMM ceiling


@dataclass(frozen=True)
class GemmCeiling:
    """The fastest square GEMM through ONNX Runtime on the given threads (GMAC/s)."""

    precision: str  # fp32 (MatMul) or int8 (MatMulInteger, uint8 x int8)
    threads: int
    gmacs: float  # the best over sizes
    best_size: int
    by_size: dict[int, float]

    def to_dict(self) -> dict:
        return {**asdict(self), "by_size": {str(k): v for k, v in self.by_size.items()}}


# The precisions a ceiling is measured for: FP32 MatMul and INT8 MatMulInteger.
_GEMM_PRECISIONS = (Precision.FP32, Precision.INT8)


def _gemm_model(n: int, precision: str, rng: np.random.Generator) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    if precision == Precision.FP32.value:
        b = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    else:
        b = numpy_helper.from_array(rng.integers(-127, 128, (n, n)).astype(np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    # B is a constant initializer, as model weights are, so ONNX Runtime pre-packs it.
    graph = helper.make_graph(
        [node],
        f"gemm{n}",
        [helper.make_tensor_value_info("A", a_type, [n, n])],
        [helper.make_tensor_value_info("Y", y_type, [n, n])],
        [b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def gemm_ceiling(
    precision: str = Precision.FP32.value,
    threads: int = 2,
    sizes: Sequence[int] = (512, 1024, 2048, 4096),
    *,
    repeats: int = 3,
    min_seconds: float = 0.3,
) -> GemmCeiling:
    """The machine's ceiling for one precision: best GMAC/s of square GEMMs on ``threads``.

    Each size runs ``repeats`` times (more until ``min_seconds``) and keeps its fastest
    run: a ceiling is the best the hardware did, and noise only ever slows a run.
    The activation is uint8 and the weight int8 for INT8, as in a QDQ-quantized model.
    """
    if precision not in {p.value for p in _GEMM_PRECISIONS}:
        raise ValueError(f"Got {precision!r} for precision; expected fp32 or int8")
    from visionfleet.inference import RuntimeOptions, create_session

    rng = np.random.default_rng(0)
    by_size: dict[int, float] = {}
    for n in sizes:
        sess = create_session(_gemm_model(n, precision, rng), RuntimeOptions(threads=threads))
        a = (
            rng.standard_normal((n, n)).astype(np.float32)
            if precision == Precision.FP32.value
            else rng.integers(0, 256, (n, n)).astype(np.uint8)
        )
        sess.run(None, {"A": a})  # warm-up (and weight pre-packing)
        best = float("inf")
        t_end = time.perf_counter() + min_seconds
        k = 0
        while k < repeats or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            sess.run(None, {"A": a})
            best = min(best, time.perf_counter() - t0)
            k += 1
        by_size[n] = n**3 / best / 1e9
        del sess
    best_n = max(by_size, key=by_size.__getitem__)
    return GemmCeiling(precision=precision, threads=threads, gmacs=by_size[best_n], best_size=best_n, by_size=by_size)


def efficiency(macs_per_image: int, images_per_s: float, ceiling_gmacs: float) -> float:
    """Share of the GEMM ceiling a model reaches: MACs x images/s / ceiling."""
    return macs_per_image * images_per_s / 1e9 / ceiling_gmacs


# --------------------------------------------------------------------- size & memory


def file_mb(path: str | os.PathLike[str]) -> float:
    """File size in MB (10^6 bytes), including ONNX external data beside it when present."""
    p = Path(path)
    size = p.stat().st_size
    data = p.with_name(p.name + ".data")
    if data.is_file():
        size += data.stat().st_size
    return size / 1e6


_PEAK_CHILD = r"""
import json, sys
import numpy as np
from visionfleet.inference import RuntimeOptions, create_session

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # kB

path, threads, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Reset the high-water mark after the imports, so that only what the model adds counts
# (importing onnxruntime peaks higher than its steady state).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
s = create_session(path, RuntimeOptions(threads=threads, providers=("CPUExecutionProvider",)))
i = s.get_inputs()[0]
h, w = int(i.shape[1]), int(i.shape[2])
for _ in range(2):
    s.run(None, {i.name: np.zeros((batch, h, w, 3), np.uint8)})
print(json.dumps({"base_kb": base, "peak_kb": status("VmHWM")}))
"""


def peak_memory_mb(model_path: str | os.PathLike[str], *, threads: int = 1, batch: int = 1) -> float:
    """Peak resident memory (MB) that loading and running a model adds to a process.

    A fresh interpreter imports ONNX Runtime, resets its peak-RSS mark
    (``/proc/self/clear_refs``), loads the model and runs two batches of zeros; the
    peak minus the resident size before loading is what the model costs (weights,
    pre-packed buffers, arena, activations). Linux only; needs a uint8 NHWC model.
    """
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, os.fspath(model_path), str(threads), str(batch)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if r.returncode != 0:
        raise RuntimeError(f"peak-memory probe failed: {r.stderr.strip()[-500:]}")
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    return max(0, doc["peak_kb"] - doc["base_kb"]) / 1024.0


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Where a number was measured: CPU model, cores, load, library versions, date."""
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if threads is not None:
        info["threads"] = threads
    return info


def to_json(doc: Mapping[str, Any]) -> str:
    """JSON for result files (dataclasses via ``to_dict``)."""
    return json.dumps(doc, indent=2, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o))


# ------------------------------------------------------------------------- comparison


class Scenario(str, enum.Enum):
    """MLPerf Inference scenarios."""

    SINGLE_STREAM = "single-stream"
    OFFLINE = "offline"
    SERVER = "server"


# scenario -> (headline value, unit, True when higher is better)
_HEADLINE: Mapping[Scenario, tuple[str, str, bool]] = {
    Scenario.SINGLE_STREAM: ("p50_ms", "ms", False),
    Scenario.OFFLINE: ("images_per_s", "images/s", True),
    Scenario.SERVER: ("best_qps", "QPS", True),
}


def compare(
    runners: Sequence[Runner],
    images: Mapping[str, np.ndarray] | np.ndarray,
    scenario: Scenario | str,
    *,
    rounds: int = 5,
    batch: int = 8,
    offline_batches: int = 4,
    queries: int = 50,
    p99_bound_ms: float = 100.0,
    max_batch: int = 8,
    trial_seconds: float = 2.0,
    server_steps: int = 6,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run one scenario for several runners side by side, ``rounds`` alternating rounds.

    ``images`` is one pool for all runners, or a pool per runner name (models with
    different input sizes). The first runner is the baseline: every other runner gets
    a speed-up per round (throughput or QPS ratio, or the baseline's p50 divided by
    its own) and :class:`RatioStats` over the rounds.
    """
    scenario = Scenario(scenario)
    pools = images if isinstance(images, Mapping) else {r.name: images for r in runners}
    details: dict[str, list[dict]] = {r.name: [] for r in runners}

    def measure(r: Runner) -> float:
        pool = pools[r.name]
        if scenario is Scenario.OFFLINE:
            res: Any = offline(r, pool, batch=batch, batches=offline_batches)
        elif scenario is Scenario.SINGLE_STREAM:
            res = single_stream(r, pool, queries=queries)
        else:
            res = server(
                r, pool, p99_bound_ms=p99_bound_ms, max_batch=max_batch,
                trial_seconds=trial_seconds, steps=server_steps,
            )
        d = res.to_dict()
        details[r.name].append(d)
        return float(d[_HEADLINE[scenario][0]])

    values = alternate(runners, measure, rounds=rounds, on_round=on_round)
    key, unit, higher = _HEADLINE[scenario]
    base = runners[0].name
    out: dict[str, Any] = {
        "scenario": scenario.value,
        "headline": key,
        "unit": unit,
        "higher_is_better": higher,
        "rounds": rounds,
        "baseline": base,
        "settings": {
            Scenario.OFFLINE: {"batch": batch, "batches_per_round": offline_batches},
            Scenario.SINGLE_STREAM: {"batch": 1, "queries_per_round": queries},
            Scenario.SERVER: {"p99_bound_ms": p99_bound_ms, "max_batch": max_batch, "trial_seconds": trial_seconds},
        }[scenario],
        "variants": {},
    }
    for r in runners:
        v = values[r.name]
        entry: dict[str, Any] = {"values": v, "median": statistics.median(v), "min": min(v), "max": max(v)}
        if scenario is Scenario.SINGLE_STREAM:
            entry["p90_ms_median"] = statistics.median(d["p90_ms"] for d in details[r.name])
        if r.name != base:
            ratio = ratio_stats(v, values[base]) if higher else ratio_stats(values[base], v)
            entry["speedup_vs_baseline"] = ratio.to_dict()
        out["variants"][r.name] = entry
    out["details"] = details
    return out


def plot_comparison(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str) -> Path:
    """A PNG bar chart: one bar per variant (headline value with its min–max) and top-1 beside it.

    ``rows`` are dicts with ``name``, ``median``, ``min``, ``max``, ``unit`` and
    optionally ``top1``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    med = np.array([r["median"] for r in rows], dtype=float)
    lo = med - np.array([r["min"] for r in rows], dtype=float)
    hi = np.array([r["max"] for r in rows], dtype=float) - med
    has_top1 = any(r.get("top1") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_top1 else 1, figsize=(11 if has_top1 else 7, 4), squeeze=False)
    ax = axes[0][0]
    ax.bar(names, med, yerr=[lo, hi], capsize=4, color="#4C72B0")
    ax.set_ylabel(rows[0]["unit"] if rows else "")
    ax.set_title(title)
    for i, v in enumerate(med):
        ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", rotation=20)
    if has_top1:
        ax2 = axes[0][1]
        t1 = [100 * (r.get("top1") or 0.0) for r in rows]
        ax2.bar(names, t1, color="#55A868")
        ax2.set_ylabel("holdout top-1 (%)")
        ax2.set_ylim(max(0.0, min(t1) - 5), 100)
        ax2.set_title("accuracy")
        for i, v in enumerate(t1):
            ax2.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax2.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
