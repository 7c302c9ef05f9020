"""Settings: the node-local state directory, the shared store and the database.

Three places hold state (docs/operations.md has the three profiles):

* ``home`` (``$VISIONFLEET_HOME``, else ``./.visionfleet``): this node's own directory,
  always a local path, made absolute at the edge (CLI, job entrypoint) so that no worker
  resolves it against its own working directory. Caches (model files by content hash),
  scratch space and the local Ray head's files live here; on one machine, everything else
  does too.
* ``store`` (``$VISIONFLEET_STORE``, default: ``home``): where shared blobs live (registry
  versions, datasets, the telemetry lake, labeling-sample images, Ray Train/Tune storage,
  the TUF repository). A local path or an ``s3://bucket/prefix`` URI; each area can be
  moved on its own with ``$VISIONFLEET_STORE_<AREA>`` (``store_uri``). Nothing builds a
  local path from a URI: code that needs a file asks ``visionfleet.store``.
* ``db_url`` (``$VISIONFLEET_DB``, default ``sqlite:///<home>/state.db``): the SQLAlchemy
  URL of the shared metadata (aliases and version allocation, the labeling queue,
  experiment state, the fleet). PostgreSQL (``postgresql+psycopg://...``) on a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["Settings", "ENV_HOME", "ENV_NODE_HOME", "ENV_STORE", "ENV_DB", "ENV_RETENTION", "DEFAULT_HOME", "STORE_AREAS"]

ENV_HOME = "VISIONFLEET_HOME"
ENV_STORE = "VISIONFLEET_STORE"
ENV_DB = "VISIONFLEET_DB"
ENV_RETENTION = "VISIONFLEET_RETENTION"  # $VISIONFLEET_RETENTION_<AREA>: 7d, 12h, forever
# Set by a node itself (its `ray start` environment, a pod spec): this node's own home. It wins
# over a home handed over from elsewhere (a deployment's config, a job's runtime env), so that on
# nodes that share no disk every process uses its own node's directory for caches and scratch.
ENV_NODE_HOME = "VISIONFLEET_NODE_HOME"
DEFAULT_HOME = ".visionfleet"
# The areas of the shared store; each may be overridden by $VISIONFLEET_STORE_<AREA>.
STORE_AREAS = ("registry", "datasets", "telemetry", "samples", "runs", "tune", "tuf", "experiments")

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
    store: str = ""  # "" means the home; else a local absolute path or a URI (s3://bucket/prefix)
    db_url: str = ""  # "" means sqlite:///<home>/state.db
    store_overrides: dict[str, str] = field(default_factory=dict)  # area -> URI
    # area -> retention ("7d", "forever"; $VISIONFLEET_RETENTION_<AREA>); defaults and meaning
    # in visionfleet.lake (RETENTION_DEFAULTS: a week of telemetry, 30 days of unlabeled samples)
    retention: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "://" in str(self.home):
            raise ValueError(f"Got {self.home!s} for home; expected a local path (a shared store goes in "
                             f"${ENV_STORE}, e.g. s3://bucket/prefix)")
        if not Path(self.home).is_absolute():
            raise ValueError(f"Got {self.home!s} for home; expected an absolute path")
        if not self.store:
            object.__setattr__(self, "store", str(self.home))
        elif "://" not in self.store:
            if not Path(self.store).is_absolute():
                raise ValueError(f"Got {self.store!r} for store; expected an absolute path or a URI")
        if not self.db_url:
            object.__setattr__(self, "db_url", f"sqlite:///{self.home}/state.db")
        for area in self.store_overrides:
            if area not in STORE_AREAS:
                raise ValueError(f"Got {area!r} for a store area; expected one of {', '.join(STORE_AREAS)}")
        for area, value in self.retention.items():
            from visionfleet.lake import RETENTION_AREAS, parse_retention

            if area not in STORE_AREAS:
                raise ValueError(f"Got {area!r} for a retention area; expected one of {', '.join(STORE_AREAS)}")
            try:
                seconds = parse_retention(value)
            except ValueError as e:
                raise ValueError(f"Got {value!r} for {ENV_RETENTION}_{area.upper()}; expected a duration like 7d, "
                                 f"12h, 90m or 'forever'") from e
            if area not in RETENTION_AREAS and seconds is not None:
                raise ValueError(f"Got {value!r} for {ENV_RETENTION}_{area.upper()}; expected 'forever' (only "
                                 f"{' and '.join(RETENTION_AREAS)} have a retention)")
        if self.max_pixels <= 0:
            raise ValueError(f"Got {self.max_pixels} for max_pixels; expected > 0")
        if self.max_body_bytes <= 0:
            raise ValueError(f"Got {self.max_body_bytes} for max_body_bytes; expected > 0")

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None) -> "Settings":
        """Build settings from ``$VISIONFLEET_NODE_HOME`` (a node's own directory, which wins),
        an explicit home, ``$VISIONFLEET_HOME`` or the default."""
        raw = os.environ.get(ENV_NODE_HOME) or (home if home is not None else os.environ.get(ENV_HOME, DEFAULT_HOME))
        kwargs: dict[str, int] = {}
        if "VISIONFLEET_MAX_PIXELS" in os.environ:
            kwargs["max_pixels"] = int(os.environ["VISIONFLEET_MAX_PIXELS"])
        if "VISIONFLEET_MAX_BODY_BYTES" in os.environ:
            kwargs["max_body_bytes"] = int(os.environ["VISIONFLEET_MAX_BODY_BYTES"])
        raw_s = os.fspath(raw)
        if "://" in raw_s:
            raise ValueError(f"Got {raw_s!r} for ${ENV_HOME}; expected a local path (a shared store goes in "
                             f"${ENV_STORE}, e.g. s3://bucket/prefix)")
        store = os.environ.get(ENV_STORE, "")
        if store and "://" not in store:
            store = str(Path(store).expanduser().resolve())
        overrides = {a: os.environ[f"{ENV_STORE}_{a.upper()}"] for a in STORE_AREAS
                     if os.environ.get(f"{ENV_STORE}_{a.upper()}")}
        retention = {a: os.environ[f"{ENV_RETENTION}_{a.upper()}"] for a in STORE_AREAS
                     if os.environ.get(f"{ENV_RETENTION}_{a.upper()}")}
        return cls(home=Path(raw_s).expanduser().resolve(), store=store, db_url=os.environ.get(ENV_DB, ""),
                   store_overrides=overrides, retention=retention, **kwargs)

    def with_home(self, home: str | os.PathLike[str]) -> "Settings":
        """The same settings under another home; a store or database that followed the old
        home (the embedded defaults) follow the new one."""
        new_home = Path(home).expanduser().resolve()
        store = "" if self.store == str(self.home) else self.store
        db = "" if self.db_url == f"sqlite:///{self.home}/state.db" else self.db_url
        return replace(self, home=new_home, store=store, db_url=db)

    @property
    def shared(self) -> bool:
        """True when the store is not this node's disk (an object store URI)."""
        return "://" in self.store

    def store_uri(self, area: str) -> str:
        """Where an area of the shared store lives: ``$VISIONFLEET_STORE_<AREA>``, else
        ``<store>/<area>`` (a local path or a URI; open it with ``visionfleet.store``)."""
        if area not in STORE_AREAS:
            raise ValueError(f"Got {area!r} for a store area; expected one of {', '.join(STORE_AREAS)}")
        if area in self.store_overrides:
            return self.store_overrides[area]
        return f"{self.store.rstrip('/')}/{area}"

    def retention_seconds(self) -> dict[str, float | None]:
        """Seconds to keep per area with a retention (``None``: forever), defaults filled in."""
        from visionfleet.lake import RETENTION_DEFAULTS, parse_retention

        return {a: parse_retention(self.retention.get(a, d)) for a, d in RETENTION_DEFAULTS.items()}

    @property
    def cache_dir(self) -> Path:
        """This node's cache (model files by content hash, resized holdouts …): always local."""
        return self.home / "cache"

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
        self.home.mkdir(parents=True, exist_ok=True)
        if self.store == str(self.home):  # the embedded profile: the shared areas live in the home
            for d in (self.registry_dir, self.datasets_dir, self.runs_dir):
                d.mkdir(parents=True, exist_ok=True)
        return self

    def runtime_env_vars(self) -> dict[str, str]:
        """Environment every actor, replica, Train worker and job must see."""
        env = {ENV_HOME: str(self.home)}
        if self.store != str(self.home):
            env[ENV_STORE] = self.store
        if self.db_url != f"sqlite:///{self.home}/state.db":
            env[ENV_DB] = self.db_url
        for area, uri in self.store_overrides.items():
            env[f"{ENV_STORE}_{area.upper()}"] = uri
        for area, value in self.retention.items():
            env[f"{ENV_RETENTION}_{area.upper()}"] = value
        env["VISIONFLEET_MAX_PIXELS"] = str(self.max_pixels)
        env["VISIONFLEET_MAX_BODY_BYTES"] = str(self.max_body_bytes)
        env.update(self.extra_env)
        return env
