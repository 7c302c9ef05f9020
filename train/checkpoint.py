"""The one way to save a model checkpoint (``model.pt``) and to load it back into a module.

The format is a dict of tensors and plain values only, so loading needs nothing but
``torch.load(weights_only=True)`` (never pickled code):

* ``state_dict``: the module's tensors;
* ``arch``: the :class:`train.models.ArchSpec` fields the module is rebuilt from;
* ``labels``, ``input_size``, ``resize``, ``mean``, ``std`` (0..255 scale), ``metrics``
  (JSON text), ``dataset``, and whatever else the writer adds;
* ``pruned`` (pruned models only): the module is then rebuilt from its tensors' shapes
  by :func:`edge_export.prune.resize_to_state_dict`.

The Ray Train loop, the in-process fine-tune, pruning, checkpoint import and the Tune
resize stage all write and read checkpoints through these two functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s state dict and ``meta`` to ``path`` atomically (temp file, rename).

    A pruned model should carry ``meta["pruned"]`` (its channel counts);
    :func:`load_checkpoint` then rebuilds it from the tensors' shapes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {**dict(meta), "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild ``(model, meta)`` from a ``model.pt``, pruned or not; the model is in eval mode."""
    from edge_export.prune import resize_to_state_dict
    from train.models import ArchSpec, build_model

    blob = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    model = build_model(ArchSpec.from_dict(blob["arch"]))
    if blob.get("pruned"):  # channel counts come from the tensors' shapes
        resize_to_state_dict(model, blob["state_dict"])
    else:
        model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, {k: v for k, v in blob.items() if k != "state_dict"}
