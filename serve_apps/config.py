"""Typed configuration of the Serve application (parsed once, at the edge)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ReplicaConfig", "IngressConfig", "AppConfig"]


class ReplicaConfig(BaseModel):
    """The model replica deployment: resources, batching and ONNX Runtime threads."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1, le=64, description="replicas of ModelReplica")
    num_cpus: float = Field(default=0.5, gt=0, le=64, description="CPUs reserved per replica (fractional on small boxes)")
    ort_threads: int = Field(default=2, ge=1, le=64, description="ONNX Runtime intra-op threads per session")
    max_batch_size: int = Field(default=16, ge=1, le=1024, description="@serve.batch max_batch_size")
    batch_wait_timeout_s: float = Field(default=0.004, ge=0, le=1, description="@serve.batch wait for a batch to fill")
    max_models_per_replica: int = Field(default=4, ge=1, le=64, description="LRU size of @serve.multiplexed")
    max_ongoing_requests: int = Field(default=64, ge=1, le=10_000, description="requests in flight per replica")


class IngressConfig(BaseModel):
    """The HTTP ingress deployment."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1, le=64)
    num_cpus: float = Field(default=0.25, gt=0, le=64)
    max_ongoing_requests: int = Field(default=256, ge=1, le=100_000)
    decode_threads: int = Field(default=2, ge=1, le=64, description="threads decoding images off the event loop")
    max_batch_items: int = Field(default=64, ge=1, le=4096, description="images per /v1/predict/batch request")
    alias_ttl_s: float = Field(default=1.0, ge=0, le=3600, description="how long an alias lookup is cached")


class AppConfig(BaseModel):
    """Everything ``build_app`` needs; also the shape of the YAML Serve config's args."""

    model_config = ConfigDict(extra="forbid")

    home: str = Field(description="absolute state dir ($VISIONFLEET_HOME) every replica uses")
    default_model: str = Field(default="demo", description="model name used when a request names none")
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, description="largest request body (413 above)")
    max_pixels: int = Field(default=40_000_000, ge=64, description="largest decoded image (413 above)")
    top_k: int = Field(default=5, ge=1, le=1000, description="default number of classes in 'probs'")
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)

    @field_validator("home")
    @classmethod
    def _abs_home(cls, v: str) -> str:
        if not v.startswith("/") and "://" not in v:
            raise ValueError(f"Got {v!r} for home; expected an absolute path")
        return v
