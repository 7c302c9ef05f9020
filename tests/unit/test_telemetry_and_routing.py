"""Telemetry events and sink logic, the non-blocking client, and request routing (no Ray)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from serve_apps.config import ExperimentConfig
from serve_apps.routing import choose_route, compile_experiment
from serve_apps.telemetry import TelemetryClient, TelemetrySinkImpl
from visionfleet.telemetry import ArmAccumulator, LatencyHistogram, input_stats, make_event


def _ev(rid: str, variant: str = "control", role: str = "primary", label: str = "a", conf: float = 0.9, **kw) -> dict:
    return make_event(request_id=rid, role=role, model="m", version=1 if variant == "control" else 2, variant=variant,
                      experiment="e1", status=200, latency_ms=10.0, label=label, confidence=conf, **kw)


def test_make_event_validates() -> None:
    ev = make_event(request_id="r", model="m")
    assert ev["role"] == "primary" and ev["ts"] > 0 and ev["label"] is None
    with pytest.raises(ValueError):
        make_event(request_id="r", surprise=1)
    with pytest.raises(ValueError):
        make_event(model="m")


def test_input_stats() -> None:
    flat = np.full((32, 32, 3), 100, np.uint8)
    noisy = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    a, b = input_stats(flat), input_stats(noisy)
    assert abs(a["brightness"] - 100) < 1e-6 and a["contrast"] == 0 and a["blur"] == 0
    assert b["contrast"] > 50 and b["blur"] > a["blur"]


def test_latency_histogram_quantiles() -> None:
    h = LatencyHistogram()
    for v in np.random.default_rng(0).uniform(10, 20, 10_000):
        h.add(float(v))
    assert 14 < h.quantile(0.5) < 16 and 18.5 < h.quantile(0.95) < 20.5
    assert np.isnan(LatencyHistogram().quantile(0.5))


def test_sink_deduplicates_and_joins_late_labels(tmp_path: Path) -> None:
    sink = TelemetrySinkImpl(str(tmp_path))
    assert sink.record([_ev("r1"), _ev("r1"), _ev("r2", "treatment", label="b")]) == 2
    assert sink.stats()["duplicates"] == 1
    assert sink.record([_ev("r1")]) == 0  # a retry with the same request id never counts twice
    # label before its event (late event), and after
    assert sink.feedback("r3", "a") == {"matched": False, "given": "name", "label": "a", "class_id": None}
    sink.record([_ev("r3", label="a")])
    assert sink.feedback("r2", "a")["matched"] is True
    arms = sink.experiment_summary("e1")["arms"]
    assert arms["control"]["n"] == 2 and arms["control"]["labeled"] == 1 and arms["control"]["correct"] == 1
    assert arms["treatment"]["labeled"] == 1 and arms["treatment"]["correct"] == 0
    assert sink.flush() == 3
    files = list((tmp_path / "telemetry" / "events").rglob("part-*.parquet"))
    assert files and "date=" in str(files[0]) and "source=server" in str(files[0])
    table = pq.read_table(files[0])
    assert sorted(table.column("request_id").to_pylist()) == ["r1", "r2", "r3"]
    fb = list((tmp_path / "telemetry" / "feedback").rglob("part-*.parquet"))
    assert fb and pq.read_table(fb[0]).num_rows == 2


def test_sink_shadow_comparison(tmp_path: Path) -> None:
    sink = TelemetrySinkImpl(str(tmp_path))
    sink.record([_ev("r1", label="a"), _ev("r1", role="shadow", variant="shadow", label="a", conf=0.5)])
    sink.record([_ev("r2", role="shadow", variant="shadow", label="b"), _ev("r2", label="a")])  # shadow first
    sh = sink.experiment_summary("e1")["shadow"]
    assert sh["n"] == 2 and sh["pairs"] == 2 and sh["agree"] == 1 and sh["agreement"] == 0.5
    arms = sink.experiment_summary("e1")["arms"]
    assert set(arms) == {"control"} and arms["control"]["n"] == 2  # shadows never count as the primary's


def test_arm_accumulator_to_arm_summary() -> None:
    acc = ArmAccumulator("control")
    for i in range(10):
        acc.add_event({"status": 200, "confidence": 0.8, "latency_ms": 5.0 + i, "version": 1, "client_key": f"c{i % 3}"})
    acc.add_event({"status": 503, "version": 1})
    acc.add_label(True)
    acc.add_label(False)
    s = acc.arm_summary(sticky=True)
    assert (s.n, s.errors, s.labeled, s.correct, s.units) == (10, 1, 2, 1, 3)
    assert abs(s.conf_sum - 8.0) < 1e-9 and s.p95_latency_ms is not None


def test_client_never_blocks_and_counts_drops() -> None:
    class SlowSink:
        class _Record:
            def __init__(self) -> None:
                self.calls = []

            def remote(self, batch, dropped, samples=None):
                self.calls.append((len(batch), dropped))
                return object()  # never becomes ready

        def __init__(self) -> None:
            self.record = self._Record()

    import serve_apps.telemetry as t

    sink = SlowSink()
    client = TelemetryClient(sink, batch_size=10, max_in_flight=2, max_buffer=50)
    orig = t._is_ready
    t._is_ready = lambda ref: False  # the sink is stuck: nothing is ever acknowledged
    try:
        async def go() -> None:
            for i in range(500):
                client.add({"request_id": str(i)})
            await client.ship()
        asyncio.run(go())
    finally:
        t._is_ready = orig
    assert len(sink.record.calls) == 2  # only max_in_flight batches left
    assert client.dropped > 0 and client.sent == 20
    assert client.sent + client.dropped + len(client._buf) == 500


def _exp(**kw) -> ExperimentConfig:
    base = dict(name="e1", model="m", arms=[{"name": "control", "model": "m:1", "weight": 1},
                                            {"name": "treatment", "model": "m:2", "weight": 1}])
    base.update(kw)
    return ExperimentConfig.model_validate(base)


def test_routing_explicit_versions_bypass_experiments() -> None:
    exps = {"m": compile_experiment(_exp())}
    rng = random.Random(0)
    assert choose_route("m", "3", "m", exps, None, rng).variant == "default"
    assert choose_route("m:3", None, "m", exps, None, rng).ref == "m:3"
    assert choose_route("m@candidate", None, "m", exps, None, rng).variant == "default"
    assert choose_route("other", None, "m", exps, None, rng).ref == "other"
    r = choose_route(None, None, "m", exps, "client-1", rng)
    assert r.experiment == "e1" and r.variant in ("control", "treatment") and r.ref in ("m:1", "m:2")


def test_routing_sticky_and_split() -> None:
    exps = {"m": compile_experiment(_exp(arms=[{"name": "control", "model": "m:1", "weight": 9},
                                               {"name": "treatment", "model": "m:2", "weight": 1}]))}
    rng = random.Random(1)
    first = {f"c{i}": choose_route("m", None, "m", exps, f"c{i}", rng).variant for i in range(2000)}
    again = {f"c{i}": choose_route("m", None, "m", exps, f"c{i}", rng).variant for i in range(2000)}
    assert first == again
    share = sum(v == "treatment" for v in first.values()) / len(first)
    assert 0.07 < share < 0.13
    unsticky = {"m": compile_experiment(_exp(sticky=False))}
    assert len({choose_route("m", None, "m", unsticky, "same", rng).variant for _ in range(50)}) == 2


def test_routing_shadow_share_and_validation() -> None:
    exps = {"m": compile_experiment(_exp(shadow={"model": "m:3", "share": 0.25}))}
    rng = random.Random(2)
    shadows = [choose_route("m", None, "m", exps, None, rng).shadow_ref for _ in range(4000)]
    share = sum(s == "m:3" for s in shadows) / len(shadows)
    assert 0.21 < share < 0.29
    with pytest.raises(ValueError):
        compile_experiment(_exp(arms=[{"name": "control", "model": "m", "weight": 1}, {"name": "treatment", "model": "m:2", "weight": 1}]))
    with pytest.raises(ValueError):
        compile_experiment(_exp(arms=[{"name": "control", "model": "x:1", "weight": 1}, {"name": "treatment", "model": "m:2", "weight": 1}]))
    with pytest.raises(ValueError):
        ExperimentConfig.model_validate({"name": "e", "model": "m", "arms": [{"name": "a", "model": "m:1", "weight": 0}, {"name": "b", "model": "m:2", "weight": 0}]})


def test_app_builder_accepts_experiments_in_the_serve_config() -> None:
    from serve_apps.app import app_builder

    app = app_builder({
        "home": "/srv/vf",
        "default_model": "m",
        "user_config": {"experiments": [_exp().model_dump(mode="json")]},
    })
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    assert ingress._deployment_config.user_config["experiments"][0]["name"] == "e1"
    with pytest.raises(ValueError):
        app_builder({"home": "relative/path"})


def test_feedback_takes_a_label_name_or_a_class_index_and_says_which(tmp_path: Path) -> None:
    """The datasets store integer labels: a class index is a label too (resolved with the model's card)."""
    import onnx
    from test_offline_inference import _colour_model

    from visionfleet.registry import Registry
    from visionfleet.spec import ModelCard

    src = tmp_path / "src"
    src.mkdir()
    onnx.save(_colour_model(8), src / "model.onnx")
    Registry(tmp_path / "registry").register(ModelCard(name="m", labels=["a", "b", "c"], input_size=(8, 8)),
                                             {"onnx": src / "model.onnx"})
    sink = TelemetrySinkImpl(str(tmp_path))
    sink.record([{**_ev("r1", label="b"), "model": "m", "version": 1}, {**_ev("r2", label="a"), "model": "m", "version": 1}])
    by_index = sink.feedback("r1", 1)
    assert (by_index["given"], by_index["label"], by_index["class_id"], by_index["correct"]) == ("class_index", "b", 1, True)
    by_name = sink.feedback("r2", "c")
    assert (by_name["given"], by_name["label"], by_name["class_id"], by_name["correct"]) == ("name", "c", 2, False)
    with pytest.raises(ValueError, match=r"Got class index 7; model m:1 has classes 0\.\.2"):
        sink.feedback("r1", 7)
    with pytest.raises(ValueError, match=r"Got label 'z'; model m:1 knows \['a', 'b', 'c'\] \(or send the class index"):
        sink.feedback("r1", "z")
    # an index before its prediction is kept, then resolved by the model that answered
    early = sink.feedback("r3", 2)
    assert (early["matched"], early["given"], early["label"], early["class_id"]) == (False, "class_index", None, 2)
    sink.record([{**_ev("r3", label="c"), "model": "m", "version": 1}])
    sink.feedback("r4", 9)  # out of range for m: dropped when r4 arrives, and counted
    sink.record([{**_ev("r4", label="c"), "model": "m", "version": 1}])
    assert sink.stats()["labels_refused_late"] == 1
    arms = sink.experiment_summary("e1")["arms"]["control"]
    assert (arms["labeled"], arms["correct"]) == (3, 2)  # r1 (b, right), r2 (c, wrong), r3 (index 2 = c, right)
    sink.flush()
    rows = [r for p in (tmp_path / "telemetry" / "feedback").rglob("part-*.parquet") for r in pq.read_table(p).to_pylist()]
    assert {(r["request_id"], r["label"], r["class_id"]) for r in rows} >= {("r1", "b", 1), ("r2", "c", 2), ("r3", "c", 2)}
