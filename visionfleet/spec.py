"""Model references and model cards: the self-description of every registered version.

A model reference is ``NAME[:VERSION|@ALIAS]`` everywhere; without a version it
means ``@production``. A card (``card.json``) describes a version fully: task, labels,
input size, resize mode, the files, metrics and lineage. Readers never guess.
"""

from __future__ import annotations

import datetime as _dt
import enum
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from visionfleet.imaging import ResizeMode, format_size

__all__ = ["Task", "ModelRef", "ModelCard", "Lineage", "FileEntry", "parse_ref", "DEFAULT_ALIAS", "ALIASES"]

DEFAULT_ALIAS = "production"
ALIASES = ("production", "candidate")

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_REF_RE = re.compile(rf"^(?P<name>{_NAME})(?::(?P<version>\d{{1,9}})|@(?P<alias>[A-Za-z][A-Za-z0-9_-]{{0,31}}))?$")
_NAME_RE = re.compile(rf"^{_NAME}$")


class Task(str, enum.Enum):
    CLASSIFICATION = "classification"
    DETECTION = "detection"


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``NAME[:VERSION|@ALIAS]``; exactly one of version and alias is set."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        return f"{self.name}@{self.alias or DEFAULT_ALIAS}"


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise ValueError(
            f"Got {name!r} for model name; expected letters, digits, '_', '.', '-' (max 64, starting alphanumeric)"
        )
    return name


def parse_ref(ref: str) -> ModelRef:
    """Parse ``NAME[:VERSION|@ALIAS]``.

    Raises:
        ValueError: the text is not a model reference.
    """
    m = _REF_RE.match((ref or "").strip())
    if not m:
        raise ValueError(f"Got {ref!r} for model reference; expected NAME, NAME:VERSION or NAME@ALIAS")
    version = m.group("version")
    if version is not None:
        if int(version) < 1:
            raise ValueError(f"Got {ref!r}; versions start at 1")
        return ModelRef(m.group("name"), version=int(version))
    return ModelRef(m.group("name"), alias=m.group("alias") or DEFAULT_ALIAS)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="file name inside the version folder")
    role: str = Field(description="what the file is: onnx, torch, ort, plan, labels…")
    bytes: int = Field(ge=0)
    sha256: str


class Lineage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parent: str | None = Field(default=None, description="NAME:VERSION this version derives from")
    dataset: str | None = Field(default=None, description="dataset the weights were trained or calibrated on")
    run: str | None = Field(default=None, description="training or optimization run id")
    steps: list[dict[str, Any]] = Field(default_factory=list, description="every transformation with its settings")


class ModelCard(BaseModel):
    """The contents of ``card.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    name: str
    version: int | None = Field(default=None, description="set by the registry at registration")
    task: Task = Task.CLASSIFICATION
    labels: list[str]
    input_size: tuple[int, int] = Field(description="model input (height, width) in pixels; the default size")
    input_sizes: list[tuple[int, int]] = Field(
        default_factory=list,
        description="every (height, width) the model is served at, the default (input_size) first; "
        "empty: input_size only. More than one needs a graph with dynamic height and width",
    )
    resize: ResizeMode = ResizeMode.STRETCH
    model_file: str = Field(default="model.onnx", description="the file a server loads")
    format: str = Field(default="onnx", description="onnx, ort, plan")
    precision: str = Field(default="fp32", description="fp32, fp16, int8")
    framework: str = Field(default="pytorch", description="where the weights came from")
    arch: dict[str, Any] | None = Field(default=None, description="built-in architecture spec, when one")
    preprocessing: dict[str, Any] = Field(
        default_factory=dict, description="normalization folded into the graph (mean, std, layout, channel order)"
    )
    files: list[FileEntry] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: Lineage = Field(default_factory=Lineage)
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    description: str = ""

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("labels must not be empty")
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v

    @field_validator("input_size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 8 or v[1] < 8 or v[0] > 4096 or v[1] > 4096:
            raise ValueError(f"input_size {v} out of range 8..4096")
        return v

    @field_validator("input_sizes")
    @classmethod
    def _sizes(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for size in v:
            cls._size(size)
        if len(set(v)) != len(v):
            raise ValueError(f"Got input_sizes {[format_size(s) for s in v]}; expected each size once")
        return v

    @model_validator(mode="after")
    def _default_first(self) -> "ModelCard":
        if self.input_sizes and tuple(self.input_sizes[0]) != tuple(self.input_size):
            raise ValueError(
                f"Got input_size {format_size(self.input_size)} and input_sizes "
                f"{', '.join(format_size(s) for s in self.input_sizes)}; expected input_size to be the first listed"
            )
        return self

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The sizes this version serves at, the default first (``input_sizes``, or ``input_size`` alone)."""
        return tuple(tuple(s) for s in self.input_sizes) or (tuple(self.input_size),)  # type: ignore[return-value]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def file(self, role: str) -> FileEntry | None:
        return next((f for f in self.files if f.role == role), None)
