"""The sweep's search space: built from a pydantic config, enumerated for the grid, checked early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_export.quantize import QuantizeConfig
from tune.space import DEFAULT_SCHEMES, Point, SpaceConfig, default_input_sizes, parse_scheme
from tune.sweep import SweepConfig, build_config, prepare
from visionfleet.settings import Settings

BEST_KEYS = {"quantize", "engine", "calibration", "method", "per_channel", "prune", "input_size", "threads"}


def test_default_space_for_the_demo_model_has_168_distinct_points() -> None:
    space = SpaceConfig().build(native_size=64, default_threads=2)
    points = space.points()
    assert len(space) == len(points) == 168 >= 60
    assert len({p.key for p in points}) == 168
    assert space.input_sizes == (64, 48, 32) and space.threads == (1, 2)  # one thread and the target's
    assert space.prune == (0.0, 0.3, 0.5, 0.7)
    assert [s.name for s in space.schemes] == list(DEFAULT_SCHEMES)
    # the identity point (the parent itself) is part of the space, once per thread count
    assert sum(p.is_identity(64) for p in points) == 2
    # 2 resolution changes, 3 pruned networks per size, 6 quantizations per network
    assert space.builds() == {"resized": 2, "pruned": 9, "quantized": 72}


def test_points_group_expensive_builds_and_round_trip_through_tune() -> None:
    space = SpaceConfig(input_sizes=[48, 32], prune=[0.0, 0.5], quantize=["none", "int8-static:ort:entropy"]).build(
        native_size=48, default_threads=4
    )
    points = space.points()
    assert [p.input_size for p in points] == [48] * 8 + [32] * 8  # one resolution after the other
    assert [p.threads for p in points[:2]] == [1, 4]  # one thread and the target's by default
    choices = space.choices()
    for p in points:
        d = p.to_dict()
        assert set(d) == set(choices) and all(d[k] in choices[k] for k in d)
        assert Point.from_dict(json.loads(json.dumps(d))) == p
        assert space.decode(json.loads(json.dumps(space.encode(p)))) == p
        assert space.contains(p)
    assert not space.contains(Point(0.3, parse_scheme("none"), 48, 4))


def test_the_searcher_sees_ordered_fields_as_indexes() -> None:
    space = SpaceConfig(input_sizes=[64, 32, 48], prune=[0.5, 0.0]).build(native_size=64, default_threads=2)
    dims = space.search_dims()
    assert dims["size_idx"] == ("index", [32, 48, 64]) and dims["prune_idx"] == ("index", [0.0, 0.5])
    assert dims["quantize"][0] == "choice" and dims["provider"] == ("choice", ["CPUExecutionProvider"])
    p = space.decode({"size_idx": 2, "prune_idx": 1, "threads_idx": 0, "quantize": "none",
                      "provider": "CPUExecutionProvider"})
    assert (p.input_size, p.prune, p.threads) == (64, 0.5, 1)
    with pytest.raises(ValueError, match="search_dims"):
        space.decode({"size_idx": 3, "prune_idx": 0, "threads_idx": 0, "quantize": "none", "provider": "x"})
    with pytest.raises(ValueError, match="outside this space"):
        space.decode({"size_idx": 0, "prune_idx": 0, "threads_idx": 0, "quantize": "fp16",
                      "provider": "CPUExecutionProvider"})


@pytest.mark.parametrize(
    "text, quantize, engine, method, per_channel",
    [
        ("none", "none", None, None, None),
        ("fp16", "fp16", None, None, None),
        ("int8-dynamic", "int8-dynamic", None, None, True),
        ("int8-dynamic:per-tensor", "int8-dynamic", None, None, False),
        ("int8-static", "int8-static", "nncf", None, True),
        ("int8-static:nncf:per-tensor", "int8-static", "nncf", None, False),
        ("int8-static:ort", "int8-static", "ort", "minmax", True),
        ("INT8-static:ort:Entropy:per-tensor", "int8-static", "ort", "entropy", False),
    ],
)
def test_schemes_parse_to_valid_quantize_configs(text, quantize, engine, method, per_channel) -> None:
    s = parse_scheme(text)
    assert (s.quantize, s.engine, s.method, s.per_channel) == (quantize, engine, method, per_channel)
    assert parse_scheme(s.name) == s  # the compact name round-trips
    QuantizeConfig(**s.quantize_kwargs(256))  # issue 3's own validation accepts every scheme
    best = Point(0.5, s, 48, 2).best_config(256)
    assert set(best) == BEST_KEYS
    assert (best["quantize"], best["engine"], best["method"], best["per_channel"]) == (quantize, engine, method, per_channel)
    assert (best["prune"], best["input_size"], best["threads"], best["calibration"]) == (0.5, 48, 2, 256)


@pytest.mark.parametrize(
    "text", ["int4", "fp16:ort", "none:per-tensor", "int8-dynamic:ort", "int8-static:tensorrt", "int8-static:nncf:entropy",
             "int8-static:ort:kl", "int8-static:ort:minmax:per-tensor:extra"],
)
def test_bad_schemes_are_refused_with_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"^Got .*expected|^Got .*takes no"):
        parse_scheme(text)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prune": [0.0, 0.95]}, "0 <= r <= 0.9"),
        ({"prune": []}, "empty list"),
        ({"prune": [0.5, 0.5]}, "each value once"),
        ({"quantize": ["none", "int8-static", "int8-static:nncf"]}, "each value once"),  # same scheme twice
        ({"input_sizes": [64, 8]}, "16 <= pixels"),
        ({"threads": [0]}, ">= 1"),
        ({"providers": ["CUDA"]}, "provider name"),
        ({"calibration": 0}, ">= 1"),
        ({"finetune_limit": 0}, ">= 1 or null"),
        ({"quantize": ["int8-static:ort:percentile"], "calibration": 300}, "multiple of 8"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_space_config_refuses_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpaceConfig(**kwargs)


def test_default_input_sizes() -> None:
    assert default_input_sizes(64) == [64, 48, 32]
    assert default_input_sizes(32) == [32, 24, 16]
    assert default_input_sizes(224) == [224, 168, 112]
    assert default_input_sizes(20) == [20, 16]  # never below 16, no duplicates


def test_build_config_reads_a_space_file_and_flags_override_it(tmp_path: Path) -> None:
    f = tmp_path / "space.yaml"
    f.write_text("prune: [0, 0.5]\nquantize: [none, 'int8-static:ort:entropy']\ninput_sizes: [32]\ncalibration: 64\n")
    cfg = build_config("demo:1", space_file=str(f), prune="0,0.3,0.7", budget_fraction=0.3, trials=5)
    assert cfg.space.prune == [0.0, 0.3, 0.7]  # the flag wins
    assert cfg.space.quantize == ["none", "int8-static:ort:entropy"] and cfg.space.calibration == 64
    assert (cfg.budget_fraction, cfg.trials, cfg.target) == (0.3, 5, "x86-cpu")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        build_config("demo:1", space_file=str(bad))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"latency_budget_ms": 4, "budget_fraction": 0.3}, "Got both --latency-budget-ms and --budget-fraction"),
        ({"latency_budget_ms": 0}, "positive number of milliseconds"),
        ({"budget_fraction": -1}, "0 < fraction"),
        ({"trials": 0}, "1 <= trials"),
        ({"target": "mars"}, "expected one of"),
        ({"prune": "0,a"}, "comma-separated numbers"),
        ({"input_sizes": "64,4"}, "16 <= pixels"),
        ({"sweep_id": "../etc"}, "sweep-id"),
    ],
)
def test_sweep_config_refuses_bad_input_with_one_clear_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as exc:
        build_config("demo:1", **kwargs)
    assert "\n" not in str(exc.value) and "pydantic" not in str(exc.value)


def test_sweep_config_is_strict() -> None:
    with pytest.raises(ValueError):
        SweepConfig(model="demo:1", budget=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="budget"):
        build_config("demo:1", budget=4)  # not a sweep flag


def test_unknown_model_is_refused_before_anything_runs(tmp_path: Path) -> None:
    settings = Settings.from_env(tmp_path).ensure()
    with pytest.raises(LookupError, match="nope"):
        prepare(build_config("nope:3", trials=3), settings)
    assert not (tmp_path / "tune").exists()  # no sweep folder, no trial
