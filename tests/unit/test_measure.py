"""Measurement: MACs from ONNX graphs, GEMM ceiling, the three scenarios, alternation, memory.

No assertion here is about how fast anything is (the machine is shared); the tests
check that the numbers are computed the way the docs say.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_export import measure as M

H = W = 8


def _contract_model(path: Path, hidden: int = 16, fc_in: int = 4) -> Path:
    """uint8 NHWC [N, 8, 8, 3] -> Conv 3->4 (3x3, pad 1) -> GAP -> Flatten -> Gemm -> MatMul -> Softmax."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.1, "conv_w"),
        numpy_helper.from_array(rng.standard_normal((fc_in, hidden)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "fc_b"),
        numpy_helper.from_array(rng.standard_normal((hidden, 5)).astype(np.float32), "head_w"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["h"]),
        helper.make_node("MatMul", ["h", "head_w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", H, W, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# Conv: 4 out x 8 x 8 x (3 x 3 x 3); Gemm: 4 x 16; MatMul: 16 x 5
EXPECTED_MACS = 4 * H * W * 27 + 4 * 16 + 16 * 5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _contract_model(tmp_path_factory.mktemp("measure") / "tiny.onnx")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (32, H, W, 3), dtype=np.uint8)


def test_count_macs_from_conv_gemm_matmul(model_path: Path) -> None:
    assert M.count_macs(model_path) == EXPECTED_MACS
    assert M.count_macs(model_path, batch=4) == 4 * EXPECTED_MACS
    assert M.count_macs(onnx.load(str(model_path))) == EXPECTED_MACS


def test_count_macs_is_the_same_after_quantization(model_path: Path, images: np.ndarray, tmp_path: Path) -> None:
    from edge_export.quantize import QuantizeConfig, quantize

    q = tmp_path / "q.onnx"
    quantize(model_path, q, QuantizeConfig(mode="int8-static", engine="ort", calibration=32), calib=images)
    dyn = tmp_path / "d.onnx"
    quantize(model_path, dyn, QuantizeConfig(mode="int8-dynamic"))
    assert M.count_macs(q) == EXPECTED_MACS  # QDQ around Conv/Gemm/MatMul
    assert "ConvInteger" in {n.op_type for n in onnx.load(str(dyn)).graph.node}
    assert M.count_macs(dyn) == EXPECTED_MACS  # ConvInteger and MatMulInteger counted too


def test_scenarios_on_a_real_session(model_path: Path, images: np.ndarray) -> None:
    r = M.OrtRunner(model_path, threads=1, name="tiny")
    lat = M.single_stream(r, images, queries=30, warmup=2)
    assert lat.n == 30 and lat.batch == 1
    assert 0 < lat.min_ms <= lat.p50_ms <= lat.p90_ms <= lat.p95_ms <= lat.p99_ms
    off = M.offline(r, images, batch=8, batches=5)
    assert off.images == 40 and off.images_per_s == pytest.approx(40 / off.seconds)
    srv = M.server(r, images, p99_bound_ms=1e6, max_batch=4, trial_seconds=0.05, min_queries=20, steps=2)
    assert srv.best_qps > 0 and len(srv.trials) == 2 and all(t["ok"] for t in srv.trials)
    assert srv.trials[1]["qps"] > srv.trials[0]["qps"]  # every rate met the bound: the search goes up
    none = M.server(r, images, p99_bound_ms=1e-6, max_batch=4, trial_seconds=0.05, min_queries=20, steps=2)
    assert none.best_qps == 0.0 and none.p99_ms_at_best is None


def test_holdout_top1(model_path: Path, images: np.ndarray) -> None:
    r = M.OrtRunner(model_path, threads=1)
    labels = r(images).argmax(1)
    assert M.holdout_top1(r, images, labels, batch=7) == 1.0
    assert M.holdout_top1(r, images, (labels + 1) % 5) == 0.0
    with pytest.raises(ValueError, match="same, non-zero count"):
        M.holdout_top1(r, images, labels[:3])


class _Recorder:
    def __init__(self, inner: M.Runner, name: str, log: list[str]) -> None:
        self.inner, self.name, self.log = inner, name, log

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.log.append(self.name)
        return self.inner(images)


def test_alternate_rotates_the_order_every_round(model_path: Path, images: np.ndarray) -> None:
    log: list[str] = []
    base = M.OrtRunner(model_path, threads=1)
    runners = [_Recorder(base, n, log) for n in ("a", "b", "c")]
    values = M.alternate(runners, lambda r: (r(images[:1]), len(log))[1], rounds=4)
    assert [len(v) for v in values.values()] == [4, 4, 4]
    rounds = [log[i : i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len({r[0] for r in rounds}) >= 2  # not always the same runner first
    with pytest.raises(ValueError, match="unique names"):
        M.alternate([runners[0], runners[0]], lambda r: 1.0)


def test_ratio_stats_and_compare(model_path: Path, images: np.ndarray) -> None:
    rs = M.ratio_stats([2.0, 3.0, 4.0, 9.0, 5.0], [1.0, 1.0, 1.0, 3.0, 1.0])
    assert (rs.median, rs.min, rs.max, rs.rounds) == (3.0, 2.0, 5.0, 5)
    a, b = M.OrtRunner(model_path, 1, name="a"), M.OrtRunner(model_path, 1, name="b")
    doc = M.compare([a, b], images, "offline", rounds=3, batch=4, offline_batches=2)
    assert doc["baseline"] == "a" and doc["rounds"] == 3
    sp = doc["variants"]["b"]["speedup_vs_baseline"]
    assert sp["rounds"] == 3 and sp["min"] <= sp["median"] <= sp["max"]
    assert "speedup_vs_baseline" not in doc["variants"]["a"]
    ss = M.compare([a, b], images, M.Scenario.SINGLE_STREAM, rounds=2, queries=5)
    # SingleStream: speed-up is the baseline's p50 over the variant's, per round
    v = ss["variants"]
    expected = sorted(x / y for x, y in zip(v["a"]["values"], v["b"]["values"]))
    assert v["b"]["speedup_vs_baseline"]["min"] == pytest.approx(expected[0])
    with pytest.raises(ValueError):
        M.compare([a], images, "batch")


def test_gemm_ceiling_and_efficiency() -> None:
    for prec in ("fp32", "int8"):
        c = M.gemm_ceiling(prec, threads=1, sizes=(64, 128), repeats=2, min_seconds=0.0)
        assert c.precision == prec and c.best_size in (64, 128) and set(c.by_size) == {64, 128}
        assert c.gmacs == max(c.by_size.values()) > 0
    assert M.efficiency(5_000_000_000, 40.0, 250.0) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="fp32 or int8"):
        M.gemm_ceiling("fp16")


def test_peak_memory_counts_the_model(tmp_path: Path) -> None:
    small = _contract_model(tmp_path / "small.onnx")
    big = _contract_model(tmp_path / "big.onnx", hidden=200_000)  # 4 x 200k + 200k x 5 floats: ~7 MB
    assert M.file_mb(big) > 6
    assert M.peak_memory_mb(big) > M.peak_memory_mb(small) + 4


def test_torch_runner_matches_the_exported_contract() -> None:
    import torch

    core = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))
    r = M.TorchRunner(core, [100.0] * 3, [50.0] * 3, threads=1)
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    p = r(x)
    assert p.shape == (3, 5) and np.allclose(p.sum(1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = torch.softmax(core((torch.from_numpy(x).permute(0, 3, 1, 2).float() - 100.0) / 50.0), 1).numpy()
    np.testing.assert_allclose(p, ref, atol=1e-6)


def test_plot_comparison_writes_a_png(tmp_path: Path) -> None:
    rows = [
        {"name": "m:1", "median": 10.0, "min": 9.0, "max": 11.0, "unit": "images/s", "top1": 0.9},
        {"name": "m:2", "median": 30.0, "min": 28.0, "max": 31.0, "unit": "images/s", "top1": 0.89},
    ]
    out = M.plot_comparison(rows, tmp_path / "c.png", title="offline")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_machine_info_says_where() -> None:
    info = M.machine_info(2)
    assert info["threads"] == 2 and info["cores"] >= 1 and info["date"] and info["onnxruntime"]
