"""An ONNX file's ``metadata_props``: how a model describes itself (labels, size, preprocessing…).

Light on purpose (onnx only, no torch): the exporter, the quantizer and the ONNX import
all write through :func:`write_metadata`.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import onnx

__all__ = ["write_metadata", "read_metadata"]


def write_metadata(model_proto: onnx.ModelProto, metadata: Mapping[str, object]) -> None:
    """Set ``metadata_props``; non-string values are stored as JSON."""
    existing = {p.key: p for p in model_proto.metadata_props}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            p = model_proto.metadata_props.add()
            p.key, p.value = key, text


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (without loading external weights)."""
    m = onnx.load(os.fspath(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}
