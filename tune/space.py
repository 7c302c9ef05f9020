"""The search space of a compression sweep: prune ratio x quantization scheme x input size (x threads x provider).

The space is discrete on purpose: every point is a build that is cached by its settings
(``edge_export.optimize.build_variant``), so a sweep, a later sweep and the exhaustive
grid (``bench/tune_grid.py``) share their builds, and the grid is an enumeration of
exactly the points the sweep samples from.

A :class:`SpaceConfig` (pydantic, from the CLI or a YAML/JSON file) is turned into a
:class:`Space` of frozen :class:`Point` s. Quantization schemes are written compactly,
one string each, so a YAML file stays readable::

    none
    fp16
    int8-dynamic                    int8-dynamic:per-tensor
    int8-static:nncf                int8-static:nncf:per-tensor
    int8-static:ort:minmax          int8-static:ort:entropy:per-tensor

The searcher sees the space through :meth:`Space.encode` / :meth:`Space.decode`: the
ordered fields (input size, prune ratio, threads) as integer indexes into their sorted
values, so TPE's Parzen estimators can learn that a neighbouring size or ratio behaves
alike (a categorical dimension has no neighbours), and the quantization scheme and
provider as categories. Schemes are whole strings, so the invalid combinations of a
nested space (a calibration method with NNCF, an engine with FP16) cannot be sampled.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Scheme",
    "parse_scheme",
    "Point",
    "Space",
    "SpaceConfig",
    "DEFAULT_SCHEMES",
    "DEFAULT_PRUNE",
    "default_input_sizes",
]

_MODES = ("none", "fp16", "int8-dynamic", "int8-static")
_ENGINES = ("nncf", "ort")
_METHODS = ("minmax", "entropy", "percentile")
_GRANULARITY = {"per-channel": True, "per-tensor": False}

# The demo space: 4 prune ratios x 7 schemes x 3 sizes x 2 thread counts = 168 points. With channel counts
# rounded to multiples of 8 (edge_export's default) the demo ResNet reaches MAC
# reductions of 0.44, 0.53 and 0.73 for 0.3, 0.5 and 0.7, three distinct networks;
# 0.75 is out of its reach (8 channels is the floor) and 0.25 gives the same network as 0.3.
DEFAULT_PRUNE: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7)
DEFAULT_SCHEMES: tuple[str, ...] = (
    "none",
    "int8-dynamic",
    "int8-static:nncf",
    "int8-static:nncf:per-tensor",
    "int8-static:ort:minmax",
    "int8-static:ort:entropy",
    "int8-static:ort:percentile",
)
_MIN_SIZE = 16
_CALIBRATION_BATCH = 8  # edge_export.quantize feeds ORT's calibrators batches of 8


@dataclass(frozen=True)
class Scheme:
    """One quantization recipe of the space (``engine``/``method``/``per_channel`` only where they apply)."""

    quantize: str
    engine: str | None = None
    method: str | None = None
    per_channel: bool | None = None

    @property
    def name(self) -> str:
        """The compact spelling (round-trips through :func:`parse_scheme`)."""
        parts = [self.quantize]
        if self.engine:
            parts.append(self.engine)
        if self.method:
            parts.append(self.method)
        if self.per_channel is False:
            parts.append("per-tensor")
        return ":".join(parts)

    @property
    def static(self) -> bool:
        return self.quantize == "int8-static"

    def quantize_kwargs(self, calibration: int) -> dict[str, Any]:
        """Keyword arguments for ``edge_export.quantize.QuantizeConfig``."""
        kw: dict[str, Any] = {"mode": self.quantize}
        if self.static:
            kw.update(engine=self.engine, calibration=calibration, method=self.method, per_channel=self.per_channel)
        elif self.quantize == "int8-dynamic":
            kw["per_channel"] = self.per_channel
        return kw


def parse_scheme(text: str) -> Scheme:
    """Parse a compact scheme, e.g. ``int8-static:ort:entropy:per-tensor``.

    Raises:
        ValueError: an unknown mode, engine, method or granularity, or one that does not
            apply to the mode (an engine with fp16, a method with NNCF).
    """
    parts = [p.strip() for p in str(text).strip().lower().split(":")]
    mode, rest = parts[0], parts[1:]
    expected = (
        "expected none, fp16, int8-dynamic[:per-tensor] or "
        "int8-static:nncf[:per-tensor] / int8-static:ort[:minmax|entropy|percentile][:per-tensor]"
    )
    if mode not in _MODES:
        raise ValueError(f"Got {text!r} for a quantization scheme; {expected}")
    per_channel: bool | None = None
    if rest and rest[-1] in _GRANULARITY:
        per_channel = _GRANULARITY[rest.pop()]
    if mode in ("none", "fp16"):
        if rest or per_channel is not None:
            raise ValueError(f"Got {text!r} for a quantization scheme; {mode} takes no engine, method or granularity")
        return Scheme(mode)
    if mode == "int8-dynamic":
        if rest:
            raise ValueError(f"Got {text!r} for a quantization scheme; int8-dynamic takes no engine or method")
        return Scheme(mode, per_channel=per_channel is not False)
    engine = rest.pop(0) if rest else "nncf"
    if engine not in _ENGINES:
        raise ValueError(f"Got {text!r} for a quantization scheme; {expected}")
    method = None
    if engine == "ort":
        method = rest.pop(0) if rest else "minmax"
        if method not in _METHODS:
            raise ValueError(f"Got {text!r} for a quantization scheme; {expected}")
    if rest:
        raise ValueError(f"Got {text!r} for a quantization scheme; {expected}")
    return Scheme(mode, engine=engine, method=method, per_channel=per_channel is not False)


@dataclass(frozen=True)
class Point:
    """One configuration of the space: what a trial builds and measures."""

    prune: float
    scheme: Scheme
    input_size: int
    threads: int
    provider: str = "CPUExecutionProvider"

    @property
    def key(self) -> str:
        """A stable, readable identity (for de-duplication, tables and file names)."""
        return f"p{self.prune:g}|{self.scheme.name}|{self.input_size}px|{self.threads}t|{self.provider}"

    def is_identity(self, native_size: int) -> bool:
        """The parent itself: nothing pruned, nothing quantized, its own size."""
        return self.prune == 0 and self.scheme.quantize == "none" and self.input_size == native_size

    def to_dict(self) -> dict[str, Any]:
        """The readable flat form kept in trial records (``config``)."""
        return {
            "prune": self.prune,
            "quantize": self.scheme.name,
            "input_size": self.input_size,
            "threads": self.threads,
            "provider": self.provider,
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "Point":
        return cls(
            prune=float(config["prune"]),
            scheme=parse_scheme(config["quantize"]),
            input_size=int(config["input_size"]),
            threads=int(config["threads"]),
            provider=str(config.get("provider", "CPUExecutionProvider")),
        )

    def best_config(self, calibration: int) -> dict[str, Any]:
        """The ``config`` of ``<state>/tune/best/<model>--<target>.json`` (the retraining pipeline reads it)."""
        s = self.scheme
        return {
            "quantize": s.quantize,
            "engine": s.engine,
            "calibration": calibration,
            "method": s.method,
            "per_channel": s.per_channel,
            "prune": self.prune,
            "input_size": self.input_size,
            "threads": self.threads,
        }


def default_input_sizes(native: int) -> list[int]:
    """The parent's size, about 3/4 and 1/2 of it (multiples of 8, at least 16), largest first."""
    sizes = {native}
    for frac in (0.75, 0.5):
        s = max(_MIN_SIZE, int(round(native * frac / 8.0)) * 8)
        sizes.add(s)
    return sorted(sizes, reverse=True)


class SpaceConfig(BaseModel):
    """The search space as a user writes it (CLI flags or a YAML/JSON file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prune: list[float] = Field(
        default_factory=lambda: list(DEFAULT_PRUNE), description="shares of MACs to remove (0 = no pruning), 0..0.9"
    )
    quantize: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SCHEMES),
        description="quantization schemes, e.g. none, int8-dynamic, int8-static:nncf, int8-static:ort:entropy:per-tensor",
    )
    input_sizes: list[int] | None = Field(
        default=None, description="square input sizes in pixels (default: the parent's, 3/4 and 1/2 of it)"
    )
    threads: list[int] | None = Field(
        default=None, description="ONNX Runtime threads (default: 1 and the target's count)"
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"], description="ONNX Runtime execution providers to try"
    )
    calibration: int = Field(default=256, description="calibration images for int8-static")
    prune_round_to: int = Field(default=8, description="pruned channel counts are multiples of this (1: any count)")
    finetune_epochs: int = Field(default=2, description="fine-tune epochs after pruning and after a resolution change")
    finetune_limit: int | None = Field(default=2000, description="fine-tune on the first N training images (None: all)")
    finetune_lr: float = Field(default=0.02, description="fine-tune peak learning rate")
    finetune_batch: int = Field(default=64, description="fine-tune batch size")
    resize_finetune: bool = Field(
        default=True, description="fine-tune at a new input size before pruning/quantizing (else only re-export)"
    )

    @field_validator("prune")
    @classmethod
    def _prune(cls, v: list[float]) -> list[float]:
        _nonempty_unique(v, "prune")
        for r in v:
            if not 0.0 <= r <= 0.9:
                raise ValueError(f"Got {r} in prune; expected shares of MACs to remove, 0 <= r <= 0.9")
        return v

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, v: list[str]) -> list[str]:
        _nonempty_unique(v, "quantize")
        names = [parse_scheme(s).name for s in v]
        _nonempty_unique(names, "quantize (after normalizing)")
        return names

    @field_validator("input_sizes")
    @classmethod
    def _sizes(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        _nonempty_unique(v, "input_sizes")
        for s in v:
            if not _MIN_SIZE <= s <= 4096:
                raise ValueError(f"Got {s} in input_sizes; expected {_MIN_SIZE} <= pixels <= 4096")
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        _nonempty_unique(v, "threads")
        if min(v) < 1:
            raise ValueError(f"Got {v} for threads; expected counts >= 1")
        return v

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: list[str]) -> list[str]:
        _nonempty_unique(v, "providers")
        for p in v:
            if not p.endswith("ExecutionProvider"):
                raise ValueError(f"Got {p!r} in providers; expected an ONNX Runtime provider name like CPUExecutionProvider")
        return v

    @field_validator("calibration", "finetune_epochs", "finetune_batch", "prune_round_to")
    @classmethod
    def _positive(cls, v: int, info: Any) -> int:
        if v < 1:
            raise ValueError(f"Got {v} for {info.field_name}; expected >= 1")
        return v

    @field_validator("finetune_limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"Got {v} for finetune_limit; expected >= 1 or null (all images)")
        return v

    @field_validator("finetune_lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"Got {v} for finetune_lr; expected > 0")
        return v

    @model_validator(mode="after")
    def _histogram_batches(self) -> "SpaceConfig":
        # ONNX Runtime's histogram calibrators (entropy, percentile) stack the activations
        # of every calibration batch into one array; edge_export feeds batches of 8, so a
        # partial last batch makes that array ragged and quantize_static fails
        # ("inhomogeneous shape"). Found on the demo model with 300 images; 304 works.
        histogram = [q for q in self.quantize if parse_scheme(q).method in ("entropy", "percentile")]
        if histogram and self.calibration % _CALIBRATION_BATCH:
            raise ValueError(
                f"Got {self.calibration} calibration images with {', '.join(histogram)}; expected a multiple of "
                f"{_CALIBRATION_BATCH} (ONNX Runtime's histogram calibrators fail on a partial last batch)"
            )
        return self

    def build(self, *, native_size: int, default_threads: int) -> "Space":
        """The concrete space for a parent of ``native_size`` pixels on a target with ``default_threads``."""
        return Space(
            prune=tuple(sorted(self.prune)),
            schemes=tuple(parse_scheme(s) for s in self.quantize),
            input_sizes=tuple(self.input_sizes or default_input_sizes(native_size)),
            # One thread is worth trying on any target: for small models at batch 1 the
            # intra-op thread pool costs more than it brings (the demo model at 48 px, FP32:
            # p95 0.12 ms on 1 thread against 0.20 ms on 2 on this project's loaded 2-core
            # box; 17 of the 18 feasible configs of bench/results/tune-grid-demo-run1.json use 1).
            threads=tuple(self.threads or sorted({1, default_threads})),
            providers=tuple(self.providers),
            native_size=native_size,
        )


def _nonempty_unique(values: Sequence[Any], what: str) -> None:
    if not values:
        raise ValueError(f"Got an empty list for {what}; expected at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"Got {list(values)} for {what}; expected each value once")


@dataclass(frozen=True)
class Space:
    """The discrete product space; :meth:`points` enumerates it (the grid), :meth:`choices` feeds Tune."""

    prune: tuple[float, ...]
    schemes: tuple[Scheme, ...]
    input_sizes: tuple[int, ...]
    threads: tuple[int, ...]
    providers: tuple[str, ...]
    native_size: int

    def __len__(self) -> int:
        return len(self.prune) * len(self.schemes) * len(self.input_sizes) * len(self.threads) * len(self.providers)

    def points(self) -> list[Point]:
        """Every point, in a fixed order (sizes, then prune, then scheme, then threads, provider).

        The order groups points that share an expensive build step (a resolution change,
        a pruned network) so that an enumeration reuses each one while it is fresh.
        """
        return [
            Point(prune=r, scheme=s, input_size=n, threads=t, provider=p)
            for n, r, s, t, p in itertools.product(
                self.input_sizes, self.prune, self.schemes, self.threads, self.providers
            )
        ]

    def choices(self) -> dict[str, list[Any]]:
        """The values each field of a :class:`Point` takes."""
        return {
            "prune": list(self.prune),
            "quantize": [s.name for s in self.schemes],
            "input_size": list(self.input_sizes),
            "threads": list(self.threads),
            "provider": list(self.providers),
        }

    def search_dims(self) -> dict[str, tuple[str, list[Any]]]:
        """The searcher's dimensions: ``name -> ("index", sorted values)`` or ``("choice", values)``."""
        return {
            "size_idx": ("index", sorted(self.input_sizes)),
            "prune_idx": ("index", sorted(self.prune)),
            "threads_idx": ("index", sorted(self.threads)),
            "quantize": ("choice", [s.name for s in self.schemes]),
            "provider": ("choice", list(self.providers)),
        }

    def encode(self, point: Point) -> dict[str, Any]:
        """A point as the searcher's config (see :meth:`search_dims`)."""
        dims = self.search_dims()
        return {
            "size_idx": dims["size_idx"][1].index(point.input_size),
            "prune_idx": dims["prune_idx"][1].index(point.prune),
            "threads_idx": dims["threads_idx"][1].index(point.threads),
            "quantize": point.scheme.name,
            "provider": point.provider,
        }

    def decode(self, config: dict[str, Any]) -> Point:
        """The point a searcher's config stands for.

        Raises:
            ValueError: an index or a value outside this space.
        """
        dims = self.search_dims()
        try:
            point = Point(
                prune=dims["prune_idx"][1][int(config["prune_idx"])],
                scheme=parse_scheme(config["quantize"]),
                input_size=dims["size_idx"][1][int(config["size_idx"])],
                threads=dims["threads_idx"][1][int(config["threads_idx"])],
                provider=str(config["provider"]),
            )
        except (KeyError, IndexError) as exc:
            raise ValueError(f"Got {config} for a config of this space; expected the fields of search_dims()") from exc
        if not self.contains(point):
            raise ValueError(f"Got {config}, which is outside this space")
        return point

    def contains(self, point: Point) -> bool:
        return (
            point.prune in self.prune
            and point.scheme in self.schemes
            and point.input_size in self.input_sizes
            and point.threads in self.threads
            and point.provider in self.providers
        )

    def builds(self) -> dict[str, int]:
        """How many distinct expensive steps the whole space needs (fine-tunes dominate)."""
        resized = sum(1 for n in self.input_sizes if n != self.native_size)
        pruned = sum(1 for r in self.prune if r > 0) * len(self.input_sizes)
        quantized = sum(1 for s in self.schemes if s.quantize != "none") * len(self.prune) * len(self.input_sizes)
        return {"resized": resized, "pruned": pruned, "quantized": quantized}

    def to_dict(self) -> dict[str, Any]:
        return {**self.choices(), "native_size": self.native_size, "points": len(self)}

