"""A model defined in Python, for `visionfleet models import --from-python from_python_model:build`.

The contract: `build` takes no arguments and returns an `nn.Module`, or `(module,
example_input)`; the example (one image batch the module takes) fixes the input size and
layout, so no --input-size is needed. `python from_python_model.py` writes
`tiny_weights.pt`, a state dict standing in for your trained weights (--weights).
"""

import torch
from torch import nn


class TinyNet(nn.Module):
    """RGB NCHW float input normalized as (pixel / 255 - 0.5) / 0.25; logits for 3 classes out."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def build():
    """No arguments; the example input says 3 channels, 24 high, 40 wide, NCHW."""
    return TinyNet(), torch.zeros(1, 3, 24, 40)


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.save(TinyNet().state_dict(), "tiny_weights.pt")
    print("wrote tiny_weights.pt")
