"""How a user's torch state dict fails to fit a module, worded once.

The three loaders of user weights (``visionfleet train --init-from``, ``visionfleet models
import weights.pt`` and ``--from-python --weights``) refuse a mismatch with it. Pure Python:
it reads only key names and ``.shape``.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["state_dict_mismatch"]


def state_dict_mismatch(
    own: Mapping[str, Any], state: Mapping[str, Any], *, new_head: tuple[str, ...] = (), most: int = 12
) -> tuple[str | None, list[str]]:
    """How ``state`` fails to fit a module whose state dict is ``own``.

    Returns the description (``None`` when it fits) and the keys whose shape differs but
    whose name starts with one of ``new_head`` (a classifier head left newly initialised).
    """
    def listed(items: list[str]) -> str:
        return ", ".join(items[:most]) + (f" (+{len(items) - most} more)" if len(items) > most else "")

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    head = [k for k, _, _ in shapes if new_head and k.startswith(new_head)]
    body = [f"{k}: got {g}, expected {e}" for k, g, e in shapes if k not in head]
    parts = []
    if body:
        parts.append("shape mismatches " + listed(body))
    if missing:
        parts.append("missing keys " + listed(missing))
    if unexpected:
        parts.append("unexpected keys " + listed(unexpected))
    return ("; ".join(parts) or None), head

