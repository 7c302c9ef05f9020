"""Model architectures: a ResNet-style network and a MobileNetV3-style network.

Both take float NCHW input of any size (global pooling at the end) and return logits.
Width and stem stride are configurable, so the same code gives the tiny models of the
test suite, the demo model and a heavy ResNet-18-style model for benchmarks.
Normalization and softmax are added at export time (see ``edge_export.onnx_export``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F

from train.detect_models import AnchorFreeDetector

__all__ = ["ArchSpec", "ResNet", "MobileNetV3", "build_model", "ARCHS", "count_params", "infer_arch", "load_init_weights"]

# ITU-R BT.601 luma: how a grayscale model sees an RGB image (exact for gray images, R = G = B)
_LUMA = (0.299, 0.587, 0.114)


def _to_model_channels(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A 1-channel model takes 1-channel input as is and turns 3-channel input into luma.

    The normalization folded in at export is per channel with equal values for a gray
    model, so luma of normalized RGB equals normalized luma.
    """
    if in_channels == 1 and x.shape[1] == 3:
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to rebuild a model from a checkpoint."""

    arch: str = "resnet"
    num_classes: int = 10
    width: int = 16  # channels of the first stage; later stages double it
    depths: tuple[int, ...] = (1, 1, 1, 1)
    stem_stride: int = 2  # 1 gives a CIFAR-style stem (no downsampling at the start)
    dropout: float = 0.0
    in_channels: int = 3  # 1: a grayscale model (its stem sees one channel; RGB input is turned to luma)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"Got {self.arch!r} for arch; expected one of {sorted(ARCHS)}")
        if self.num_classes < 2:
            raise ValueError(f"Got {self.num_classes} for num_classes; expected >= 2")
        if self.width < 4:
            raise ValueError(f"Got {self.width} for width; expected >= 4")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"Got {self.stem_stride} for stem_stride; expected 1 or 2")
        if not self.depths or any(d < 1 for d in self.depths):
            raise ValueError(f"Got {self.depths} for depths; expected positive stage depths")
        if self.in_channels not in (1, 3):
            raise ValueError(f"Got {self.in_channels} for in_channels; expected 1 (grayscale) or 3 (RGB)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"] = list(self.depths)
        if d["in_channels"] == 3:  # RGB, the default: cards and checkpoints from before keep their form
            del d["in_channels"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ArchSpec":
        d = dict(d)
        d["depths"] = tuple(d.get("depths", (1, 1, 1, 1)))
        return cls(**d)


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with basic blocks; ``depths=(2, 2, 2, 2), width=64`` is ResNet-18."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        w = spec.width
        self.in_channels = spec.in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(spec.in_channels, w, 3, spec.stem_stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        cin = w
        for i, depth in enumerate(spec.depths):
            cout = w * 2**i
            for j in range(depth):
                stages.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(spec.dropout)
        self.fc = nn.Linear(cin, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(_to_model_channels(x, self.in_channels)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))


# ------------------------------------------------------------------------ MobileNetV3


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = _make_divisible(channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, expand: int, cout: int, kernel: int, stride: int, se: bool, hswish: bool) -> None:
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if expand != cin:
            layers += [nn.Conv2d(cin, expand, 1, bias=False), nn.BatchNorm2d(expand), act()]
        layers += [
            nn.Conv2d(expand, expand, kernel, stride, kernel // 2, groups=expand, bias=False),
            nn.BatchNorm2d(expand),
            act(),
        ]
        if se:
            layers.append(SqueezeExcite(expand))
        layers += [nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetV3(nn.Module):
    """MobileNetV3-Small-style network: inverted residuals, squeeze-excite, hard-swish.

    ``width`` scales every layer (16 gives the published Small widths); ``depths``
    repeats the blocks of each of the four stages.
    """

    # (kernel, expansion ratio, output multiple of width, SE, hard-swish, stride)
    _STAGES = (
        (3, 4.0, 1.5, False, False, 2),
        (5, 4.0, 2.5, True, True, 2),
        (5, 6.0, 3.0, True, True, 1),
        (5, 6.0, 6.0, True, True, 2),
    )

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        w = spec.width
        self.in_channels = spec.in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(spec.in_channels, w, 3, spec.stem_stride, 1, bias=False), nn.BatchNorm2d(w), nn.Hardswish()
        )
        blocks: list[nn.Module] = [InvertedResidual(w, w, w, 3, 1, True, False)]
        cin = w
        depths = list(spec.depths) + [1] * (len(self._STAGES) - len(spec.depths))
        for (k, exp, mult, se, hs, stride), depth in zip(self._STAGES, depths):
            cout = _make_divisible(w * mult)
            for j in range(depth):
                blocks.append(
                    InvertedResidual(cin, _make_divisible(cin * exp), cout, k, stride if j == 0 else 1, se, hs)
                )
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        last = _make_divisible(cin * 6)
        self.head = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.Hardswish())
        self.dropout = nn.Dropout(spec.dropout)
        self.fc = nn.Linear(last, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(_to_model_channels(x, self.in_channels))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))


# "anchorfree" is the built-in detector (train/detect_models.py, trained by train/detect.py).
ARCHS: dict[str, type[nn.Module]] = {"resnet": ResNet, "mobilenetv3": MobileNetV3, "anchorfree": AnchorFreeDetector}


def build_model(spec: ArchSpec) -> nn.Module:
    """Instantiate the architecture a spec names."""
    return ARCHS[spec.arch](spec)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ pretrained weights


def _read_state_dict(path) -> dict[str, torch.Tensor]:
    """A plain state dict, or the ``state_dict`` of a visionfleet ``model.pt``; never unpickles code."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same refusal
        raise ValueError(
            f"Got a file {path} that torch.load(weights_only=True) cannot read ({type(exc).__name__}: "
            f"{str(exc)[:200]}); expected a state dict saved with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError(
            f"Got {type(blob).__name__} in {path}; expected a state dict (a dict of tensors) of a built-in "
            f"architecture ({', '.join(sorted(ARCHS))})"
        )
    return blob


def infer_arch(path) -> dict:
    """The architecture fields a state dict shows: arch, width, in_channels and (ResNet) depths."""
    sd = _read_state_dict(path)
    stem = sd.get("stem.0.weight")
    if stem is None or stem.ndim != 4:
        raise ValueError(
            f"Got a state dict without stem.0.weight (first keys: {', '.join(list(sd)[:4])}); "
            f"expected the state dict of a built-in architecture ({', '.join(sorted(ARCHS))})"
        )
    out: dict = {"width": int(stem.shape[0]), "in_channels": int(stem.shape[1])}
    if any(k.startswith("stages.") for k in sd):
        out["arch"] = "resnet"
        w = out["width"]
        blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.") and k.endswith("conv1.weight")})
        stage_of = [int(round(torch.log2(torch.tensor(sd[f"stages.{b}.conv1.weight"].shape[0] / w)).item())) for b in blocks]
        out["depths"] = [stage_of.count(i) for i in range(max(stage_of) + 1)]
    elif any(k.startswith("blocks.") for k in sd):
        out["arch"] = "mobilenetv3"
    return out


def load_init_weights(model: nn.Module, path) -> dict:
    """Load the state dict at ``path`` into ``model``; a head of another class count is left new.

    Returns ``{"loaded": n, "head_reinitialized": [keys]}``.

    Raises:
        ValueError: ``Got ...; expected ...`` listing every missing, unexpected or mis-shaped key.
    """
    from edge_export.weights import state_dict_mismatch

    sd = _read_state_dict(path)
    own = model.state_dict()
    problem, head = state_dict_mismatch(own, sd, new_head=("fc.",))
    if problem:
        raise ValueError(
            f"Got a state dict in {path} that does not fit the model ({problem}); expected the state dict "
            f"of the same architecture: pass the --arch, --width, --depths and --stem-stride it was trained with "
            f"(leave --width unset to take arch, width and depths from the file)"
        )
    model.load_state_dict({k: (own[k] if k in head else v) for k, v in sd.items()})
    return {"loaded": len(sd) - len(head), "head_reinitialized": head}
