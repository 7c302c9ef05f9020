"""Structured pruning: channels really removed to a MAC target, rebuilt without pickles, exported."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_export.prune import channel_counts, count_macs_torch, prune_macs, resize_to_state_dict
from train.models import ArchSpec, build_model

REPO = Path(__file__).resolve().parents[2]
ARCHS = {
    "resnet": {"arch": "resnet", "width": 8, "stem_stride": 2},
    "mobilenetv3": {"arch": "mobilenetv3", "width": 8, "stem_stride": 2},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core box, two OpenMP threads that wait on each
    other run small models many times slower (measured 16x on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(ArchSpec.from_dict({**ARCHS[arch], "num_classes": 10}))
    # non-trivial BatchNorm statistics, as after training
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 32, 32))
    return m.eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_prune_half_the_macs_removes_channels(arch: str) -> None:
    model = _model(arch)
    ex = torch.zeros(1, 3, 32, 32)
    before = channel_counts(model)
    macs0 = count_macs_torch(model, ex)
    pruned, rep = prune_macs(model, ex, 0.5, iterations=4)
    assert rep.macs_before == macs0 and rep.macs_after == count_macs_torch(pruned, ex)
    assert rep.mac_reduction >= 0.5 and rep.macs_after <= macs0 / 2
    assert rep.mac_reduction < 0.65  # the smallest ratio that reaches the target, not an overshoot
    assert rep.params_after < rep.params_before
    after = channel_counts(pruned)
    shrunk = [n for n in before if after[n][0] < before[n][0]]
    assert len(shrunk) >= len(before) // 2  # channels removed in most layers, not masked
    assert after["fc"][0] == 10  # the classifier keeps its classes
    assert channel_counts(model) == before  # the input model is untouched
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert pruned(x).shape == (4, 10) and model(x).shape == (4, 10)


def test_round_to_keeps_channel_counts_multiples() -> None:
    model = _model("resnet")
    pruned, rep = prune_macs(model, torch.zeros(1, 3, 32, 32), 0.4, round_to=4, iterations=2)
    assert rep.round_to == 4 and rep.mac_reduction >= 0.4
    for name, (out_c, _) in channel_counts(pruned).items():
        if name != "fc":
            assert out_c % 4 == 0, (name, out_c)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pruned_checkpoint_round_trip_needs_no_pickled_code(arch: str, tmp_path: Path) -> None:
    from train.checkpoint import load_checkpoint, save_checkpoint

    model = _model(arch)
    pruned, rep = prune_macs(model, torch.zeros(1, 3, 32, 32), 0.5, iterations=1)
    meta = {"arch": ArchSpec.from_dict({**ARCHS[arch], "num_classes": 10}).to_dict(), "labels": [str(i) for i in range(10)]}
    path = save_checkpoint(tmp_path / "model.pt", pruned, {**meta, "pruned": {"layers": rep.layers}})
    blob = torch.load(path, weights_only=True)  # plain tensors and builtins only
    assert "pruned" in blob and isinstance(blob["state_dict"], dict)
    rebuilt, got_meta = load_checkpoint(path)
    assert got_meta["labels"] == meta["labels"] and channel_counts(rebuilt) == channel_counts(pruned)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x))


def test_resize_to_state_dict_rejects_a_foreign_state_dict() -> None:
    sd = _model("mobilenetv3").state_dict()
    with pytest.raises(ValueError, match="does not fit the architecture"):
        resize_to_state_dict(build_model(ArchSpec.from_dict({**ARCHS["resnet"], "num_classes": 10})), sd)


def test_bad_mac_reduction_is_a_clear_error() -> None:
    model = _model("resnet")
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="MAC reduction"):
            prune_macs(model, torch.zeros(1, 3, 32, 32), bad)
    with pytest.raises(ValueError, match="cannot reach"):
        prune_macs(model, torch.zeros(1, 3, 32, 32), 0.999)


def test_prune_finetune_export_round_trip(tmp_path: Path) -> None:
    """Prune 50%, fine-tune one epoch on real data, export: the ONNX graph has half the MACs,
    fewer weights, and predicts what the pruned torch model predicts."""
    from edge_export.measure import count_macs
    from edge_export.prune import prune_finetune_export
    from train.finetune import FinetuneConfig, channel_stats, dataset_finetune_fn, predict_probs
    from visionfleet.datasets.store import load_arrays, synthesize

    ds = tmp_path / "ds"
    synthesize(ds, n_train=256, n_holdout=64, size=32, seed=2)
    hx, _ = load_arrays(ds, "holdout", (32, 32))
    mean, std = channel_stats(hx)
    model = _model("resnet")
    macs0 = count_macs_torch(model, torch.zeros(1, 3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ft = dataset_finetune_fn(
        ds, input_size=(32, 32), resize="stretch", mean=mean, std=std,
        config=FinetuneConfig(epochs=1, lr=0.01, batch_size=32, threads=1),
    )
    out = tmp_path / "pruned.onnx"
    result = prune_finetune_export(
        model, example_inputs=torch.zeros(1, 3, 32, 32), mac_reduction=0.5, finetune=ft, out_path=out,
        input_size=(32, 32), mean=mean, std=std, metadata={"task": "classification"}, parity_images=hx[:16],
    )
    assert result.finetune is not None and result.finetune["steps"] == 8
    assert result.parity is not None and result.parity["top1_agreement"] == 1.0
    assert count_macs(out) == result.report.macs_after <= macs0 / 2  # counted from the ONNX graph
    assert result.report.params_after < 0.7 * result.report.params_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # parent untouched
    from visionfleet.inference import RuntimeOptions, create_session

    onnx_probs = create_session(out, RuntimeOptions(threads=1)).run(None, {"images": hx})[0]
    torch_probs = predict_probs(result.model, hx, mean=mean, std=std, threads=1)
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)


def test_edge_export_never_imports_train() -> None:
    """Pruning takes an nn.Module and callables (PruneTools); train wires itself in, not the reverse."""
    offending = []
    for f in sorted((REPO / "edge_export").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offending += [f"{f.relative_to(REPO)}: {n}" for n in names if n == "train" or n.startswith("train.")]
    assert not offending, offending


def test_pruning_without_prune_tools_is_a_clear_error(tmp_path: Path) -> None:
    from edge_export.optimize import OptimizeSettings, build_variant
    from visionfleet.spec import ModelCard

    card = ModelCard(name="m", labels=["a", "b"], input_size=(8, 8))
    with pytest.raises(ValueError, match="Got --prune without PruneTools"):
        build_variant(tmp_path, card, OptimizeSettings(prune=0.5), dataset=tmp_path, cache_dir=tmp_path / "c")


def test_prune_tools_come_from_train_and_use_the_one_checkpoint_format() -> None:
    from edge_export.optimize import PruneTools
    from train.checkpoint import load_checkpoint, save_checkpoint
    from train.finetune import prune_tools

    tools = prune_tools()
    assert isinstance(tools, PruneTools) and tools.load is load_checkpoint and tools.save is save_checkpoint
