"""visionfleet core: settings, imaging, model cards, registry, datasets, statistics.

Importing it never imports torch or ray (a test enforces this); modules that need
pyarrow import it themselves, so the device install stays light.
"""

from __future__ import annotations

from typing import Any

from visionfleet.imaging import ImageError, ResizeMode, decode_image, load_for_model, resize_image
from visionfleet.settings import Settings
from visionfleet.spec import ModelCard, ModelRef, Task, parse_ref

__all__ = [
    "Settings",
    "ImageError",
    "ResizeMode",
    "decode_image",
    "resize_image",
    "load_for_model",
    "ModelCard",
    "ModelRef",
    "Task",
    "parse_ref",
    "Registry",
    "__version__",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The registry needs pyarrow, which the device install does not have.
    if name == "Registry":
        from visionfleet.registry import Registry

        return Registry
    raise AttributeError(f"module 'visionfleet' has no attribute {name!r}")
