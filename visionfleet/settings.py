"""Settings and the state directory.

The state directory holds everything visionfleet writes: the model registry,
datasets, training runs, telemetry and the local Ray head's files. It is
``$VISIONFLEET_HOME`` when set, else ``./.visionfleet``, and it is always made
absolute at the edge (CLI, job entrypoint) so that no worker resolves a relative
path against its own working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["Settings", "ENV_HOME", "DEFAULT_HOME"]

ENV_HOME = "VISIONFLEET_HOME"
DEFAULT_HOME = ".visionfleet"

# 40 megapixels: a 8K frame is 33 MP. Anything larger is refused from the header,
# before a single pixel is decoded (decompression bombs declare huge sizes).
_DEFAULT_MAX_PIXELS = 40_000_000
# 20 MiB per request body: a 40 MP JPEG is rarely above 15 MiB.
_DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Where state lives and the input limits every entry point applies."""

    home: Path
    max_pixels: int = _DEFAULT_MAX_PIXELS
    max_body_bytes: int = _DEFAULT_MAX_BODY_BYTES
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not Path(self.home).is_absolute():
            raise ValueError(f"Got {self.home!s} for home; expected an absolute path")
        if self.max_pixels <= 0:
            raise ValueError(f"Got {self.max_pixels} for max_pixels; expected > 0")
        if self.max_body_bytes <= 0:
            raise ValueError(f"Got {self.max_body_bytes} for max_body_bytes; expected > 0")

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None) -> "Settings":
        """Build settings from an explicit home, ``$VISIONFLEET_HOME`` or the default."""
        raw = home if home is not None else os.environ.get(ENV_HOME, DEFAULT_HOME)
        kwargs: dict[str, int] = {}
        if "VISIONFLEET_MAX_PIXELS" in os.environ:
            kwargs["max_pixels"] = int(os.environ["VISIONFLEET_MAX_PIXELS"])
        if "VISIONFLEET_MAX_BODY_BYTES" in os.environ:
            kwargs["max_body_bytes"] = int(os.environ["VISIONFLEET_MAX_BODY_BYTES"])
        return cls(home=Path(raw).expanduser().resolve(), **kwargs)

    def with_home(self, home: str | os.PathLike[str]) -> "Settings":
        return replace(self, home=Path(home).expanduser().resolve())

    # Layout of the state directory -------------------------------------------------
    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def telemetry_dir(self) -> Path:
        return self.home / "telemetry"

    @property
    def ray_dir(self) -> Path:
        return self.home / "ray"

    def ensure(self) -> "Settings":
        """Create the state directory layout; returns self for chaining."""
        for d in (self.home, self.registry_dir, self.datasets_dir, self.runs_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def runtime_env_vars(self) -> dict[str, str]:
        """Environment every actor, replica, Train worker and job must see."""
        env = {ENV_HOME: str(self.home)}
        env["VISIONFLEET_MAX_PIXELS"] = str(self.max_pixels)
        env["VISIONFLEET_MAX_BODY_BYTES"] = str(self.max_body_bytes)
        env.update(self.extra_env)
        return env
