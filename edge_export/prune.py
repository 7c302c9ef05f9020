"""Structured channel pruning with torch-pruning: channels are removed, so the model gets faster.

:func:`prune_macs` takes any ``nn.Module`` and an example input and removes whole
channels (conv filters with their BatchNorm entries and every coupled input, residual
branches included, found by torch-pruning's dependency graph) until the requested
share of multiply-accumulates is gone: "pruned 50%" means half of the MACs removed.
The channel ratio that achieves it is found by bisection, because MACs fall roughly
with the square of the channel ratio and differ per architecture.

:func:`prune_finetune_export` is the whole procedure: prune, fine-tune through a
callable (``train.finetune.dataset_finetune_fn`` gives one), export with
``edge_export.onnx_export.export_onnx`` (parity-checked).

Saving without pickled code: a pruned model's ``state_dict`` holds tensors whose shapes
*are* the per-layer channel counts. :func:`resize_to_state_dict` rebuilds the pruned
module from a fresh instance of the original architecture by resizing its Conv,
BatchNorm and Linear layers to those shapes, so ``torch.load(weights_only=True)`` is
all a loader needs. (torch-pruning's own ``tp.save`` pickles modules; we never use it.)
"""

from __future__ import annotations

import copy
import enum
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "Importance",
    "PruneReport",
    "PruneResult",
    "count_macs_torch",
    "prune_macs",
    "channel_counts",
    "resize_to_state_dict",
    "prune_finetune_export",
]


_COARSE_STEP = 0.1


class Importance(str, enum.Enum):
    """How channels are ranked: group L1 or L2 norm of the weights (coupled layers together)."""

    L1 = "l1"
    L2 = "l2"


def _importance(kind: Importance):
    import torch_pruning as tp

    return {
        Importance.L1: lambda: tp.importance.GroupMagnitudeImportance(p=1),
        Importance.L2: lambda: tp.importance.GroupMagnitudeImportance(p=2),
    }[kind]()


@dataclass(frozen=True)
class PruneReport:
    """What pruning did: MACs and parameters before/after and the channels per layer."""

    mac_reduction_requested: float
    mac_reduction: float
    channel_ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    importance: str
    round_to: int | None
    layers: dict[str, list[int]] = field(default_factory=dict)  # name -> [out, in] after pruning
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_macs_torch(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """MACs per example of the Conv and Linear layers (as counted from the ONNX graph)."""
    total = 0

    def conv_hook(mod: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        k = mod.weight.shape[1] * int(np.prod(mod.weight.shape[2:]))
        total += out.numel() * k

    def linear_hook(mod: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * mod.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total // example_inputs.shape[0]


def _output_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """The leaf modules whose output is the model's output (the classifier): never pruned,
    since their output channels are the classes."""
    produced: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, o: produced.append((mod, o)))
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            out = model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return [m for m, o in produced if o is out]


def channel_counts(model: nn.Module) -> dict[str, list[int]]:
    """Per-layer ``[out, in]`` channels of every Conv and Linear layer."""
    counts: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            counts[name] = [m.out_channels, m.in_channels]
        elif isinstance(m, nn.Linear):
            counts[name] = [m.out_features, m.in_features]
    return counts


def _prune_copy(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ratio: float,
    importance: Importance,
    round_to: int | None,
    ignored: Sequence[str],
) -> nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())
    ignored_layers = [modules[n] for n in ignored]
    pruner = tp.pruner.BasePruner(
        pruned,
        example_inputs,
        importance=_importance(importance),
        pruning_ratio=ratio,
        ignored_layers=ignored_layers,
        round_to=round_to,
    )
    with torch.no_grad():
        pruner.step()
    return pruned


def prune_macs(
    model: nn.Module,
    example_inputs: torch.Tensor,
    mac_reduction: float,
    *,
    importance: Importance | str = Importance.L2,
    round_to: int | None = None,
    ignored_layers: Sequence[nn.Module] = (),
    iterations: int = 6,
    max_channel_ratio: float = 0.9,
) -> tuple[nn.Module, PruneReport]:
    """Remove channels until at least ``mac_reduction`` of the MACs are gone.

    Bisects the uniform per-layer channel ratio for the smallest one that reaches the
    target; ``model`` is not modified (a pruned copy is returned). The layers producing
    the model's output and ``ignored_layers`` keep their output channels.

    Args:
        model: any ``nn.Module`` in eval mode (BatchNorm statistics are kept per channel).
        example_inputs: a batch the model accepts, used to trace dependencies and count MACs.
        mac_reduction: share of MACs to remove, 0 < r < 1 (0.5 = half).
        importance: channel ranking (group L1 or L2 magnitude).
        round_to: keep channel counts multiples of this (SIMD-friendly), or None.

    Raises:
        ValueError: a ratio out of range, or a target the architecture cannot reach.
    """
    if not 0.0 < mac_reduction < 1.0:
        raise ValueError(f"Got {mac_reduction} for the MAC reduction; expected 0 < r < 1 (0.5 removes half the MACs)")
    if round_to is not None and round_to < 1:
        raise ValueError(f"Got {round_to} for round_to; expected >= 1 or None")
    importance = Importance(importance)
    t0 = time.perf_counter()
    model = model.eval()
    names = {id(m): n for n, m in model.named_modules()}
    ignored = [names[id(m)] for m in (*_output_layers(model, example_inputs), *ignored_layers)]
    macs0 = count_macs_torch(model, example_inputs)
    goal = macs0 * (1.0 - mac_reduction)

    def attempt(ratio: float) -> tuple[nn.Module, int]:
        pruned = _prune_copy(model, example_inputs, ratio, importance, round_to, ignored)
        return pruned, count_macs_torch(pruned, example_inputs)

    # MACs fall with the channel ratio, but not monotonically near the top: a layer
    # that would lose all its channels is skipped by torch-pruning. So step up in
    # coarse increments to the first ratio that reaches the goal, then bisect below it.
    lo, best, hi = 0.0, None, 0.0
    for k in range(1, int(max_channel_ratio / _COARSE_STEP + 1e-9) + 1):
        hi = k * _COARSE_STEP
        candidate = attempt(hi)
        if candidate[1] <= goal:
            best = candidate
            break
        lo = hi
    if best is None:
        raise ValueError(
            f"Got a MAC reduction of {mac_reduction:.0%}; this model cannot reach it by uniform channel "
            f"pruning up to a channel ratio of {max_channel_ratio}"
            + (f" with channel counts rounded to multiples of {round_to} (a smaller --round-to may)" if round_to else "")
        )
    for _ in range(iterations):
        mid = (lo + hi) / 2
        candidate = attempt(mid)
        if candidate[1] <= goal:
            hi, best = mid, candidate
        else:
            lo = mid
    pruned, macs1 = best
    report = PruneReport(
        mac_reduction_requested=mac_reduction,
        mac_reduction=1.0 - macs1 / macs0,
        channel_ratio=hi,
        macs_before=macs0,
        macs_after=macs1,
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in pruned.parameters()),
        importance=importance.value,
        round_to=round_to,
        layers=channel_counts(pruned),
        seconds=time.perf_counter() - t0,
    )
    return pruned, report


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Shrink a fresh instance of an architecture to a pruned state dict, then load it.

    Conv, BatchNorm and Linear layers take their channel counts from the tensors'
    shapes; depthwise convolutions stay depthwise. Modules whose forward relies on a
    channel count stored elsewhere are not covered (none in ``train.models``).

    Raises:
        ValueError: the state dict does not fit the architecture.
    """
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        w = state_dict.get(f"{prefix}weight")
        if w is None:
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            out_c, in_per_group = int(w.shape[0]), int(w.shape[1])
            if depthwise:
                m.groups = out_c
                m.in_channels = out_c
            else:
                m.in_channels = in_per_group * m.groups
            m.out_channels = out_c
            m.weight = nn.Parameter(torch.empty_like(w))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(out_c))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = int(w.shape[0])
            m.num_features = n
            m.weight = nn.Parameter(torch.empty(n))
            m.bias = nn.Parameter(torch.empty(n))
            m.running_mean = torch.zeros(n)
            m.running_var = torch.ones(n)
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
            m.weight = nn.Parameter(torch.empty_like(w))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_features))
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"Got a state dict that does not fit the architecture: {exc}") from None
    return model.eval()


@dataclass
class PruneResult:
    model: nn.Module
    report: PruneReport
    finetune: dict[str, Any] | None
    parity: dict[str, Any] | None


def prune_finetune_export(
    core: nn.Module,
    *,
    example_inputs: torch.Tensor,
    mac_reduction: float,
    finetune: Callable[[nn.Module], Mapping[str, Any]] | None,
    out_path: str | Path,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    metadata: Mapping[str, object],
    parity_images: np.ndarray | None = None,
    importance: Importance | str = Importance.L2,
    round_to: int | None = None,
) -> PruneResult:
    """Prune to a MAC reduction, fine-tune with ``finetune(model)``, export the ONNX file.

    ``finetune`` trains the pruned module in place and returns its metrics (or None to
    skip fine-tuning). The export obeys the artifact contract and is parity-checked
    on ``parity_images``.
    """
    from edge_export.onnx_export import export_onnx

    pruned, report = prune_macs(core, example_inputs, mac_reduction, importance=importance, round_to=round_to)
    ft = dict(finetune(pruned)) if finetune is not None else None
    pruned.eval()
    parity = export_onnx(
        pruned,
        out_path,
        input_size=input_size,
        mean=mean,
        std=std,
        metadata={**metadata, "pruned": {"mac_reduction": report.mac_reduction, "channel_ratio": report.channel_ratio}},
        parity_images=parity_images,
    )
    return PruneResult(model=pruned, report=report, finetune=ft, parity=parity.to_dict() if parity else None)
