"""Typed configuration of the Serve application (parsed once, at the edge)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["AutoscalingConfig", "ReplicaConfig", "IngressConfig", "AppConfig", "ArmConfig", "ShadowConfig", "GuardrailConfig", "ExperimentConfig", "IngressUserConfig", "SamplingConfig", "MonitoringConfig"]


class AutoscalingConfig(BaseModel):
    """Ray Serve's ``autoscaling_config`` of one deployment (the field names are Serve's own).

    Serve adds a replica when the ongoing requests per replica stay above
    ``target_ongoing_requests`` for ``upscale_delay_s`` and removes one when they stay
    below it for ``downscale_delay_s``, between ``min_replicas`` and ``max_replicas``.
    """

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0, le=1000, description="fewest replicas (0: scale to zero)")
    max_replicas: int = Field(default=4, ge=1, le=1000, description="most replicas")
    target_ongoing_requests: float = Field(default=2.0, gt=0, le=100_000,
                                           description="ongoing requests per replica Serve aims for")
    upscale_delay_s: float | None = Field(default=None, ge=0, le=3600,
                                          description="how long load stays high before a replica is added")
    downscale_delay_s: float | None = Field(default=None, ge=0, le=3600,
                                            description="how long load stays low before a replica is removed")

    @model_validator(mode="after")
    def _min_le_max(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"Got min_replicas={self.min_replicas} > max_replicas={self.max_replicas}; "
                             "expected min_replicas <= max_replicas")
        return self

    def serve_dict(self) -> dict[str, Any]:
        """The ``autoscaling_config`` mapping Serve reads (unset delays: Serve's defaults)."""
        return self.model_dump(exclude_none=True)


def _autoscaling_or_fixed(cfg: Any, where: str) -> None:
    """Refuse a non-default ``num_replicas`` together with autoscaling (Serve would refuse it later)."""
    if cfg.autoscaling is not None and cfg.num_replicas != 1:
        raise ValueError(f"Got {where}.num_replicas={cfg.num_replicas} with {where}.autoscaling; expected one of "
                         "them: a fixed count or min_replicas/max_replicas")


class ReplicaConfig(BaseModel):
    """The model replica deployment: resources and ONNX Runtime threads (batching is the ingress's)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1, le=64, description="replicas of ModelReplica")
    num_cpus: float = Field(default=0.5, gt=0, le=64, description="CPUs reserved per replica (fractional on small boxes)")
    ort_threads: int = Field(default=2, ge=1, le=64, description="ONNX Runtime intra-op threads per session")
    max_models_per_replica: int = Field(default=4, ge=1, le=64,
                                        description="versions one replica keeps loaded (the LRU of @serve.multiplexed; "
                                                    "with --inference-in ingress, of the ingress's sessions)")
    max_ongoing_requests: int = Field(default=64, ge=1, le=10_000, description="requests in flight per replica")
    max_queued_requests: int = Field(default=256, ge=-1, le=100_000,
                                     description="calls waiting for a replica before the ingress answers 503 (-1: no limit)")
    max_replicas_per_node: int | None = Field(default=None, ge=1, le=100, description="spread replicas across nodes")
    health_check_period_s: float = Field(default=10.0, gt=0, description="how often Serve runs check_health")
    autoscaling: AutoscalingConfig | None = Field(
        default=None, description="Serve autoscaling of ModelReplica (instead of a fixed num_replicas)")

    @model_validator(mode="after")
    def _scaling(self) -> "ReplicaConfig":
        _autoscaling_or_fixed(self, "replica")
        return self


class IngressConfig(BaseModel):
    """The HTTP ingress deployment."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1, le=64)
    num_cpus: float = Field(default=0.25, gt=0, le=64)
    max_ongoing_requests: int = Field(default=256, ge=1, le=100_000,
                                      description="Serve's limit; keep it above max_in_flight so overload is answered in JSON")
    max_queued_requests: int = Field(default=256, ge=-1, le=100_000,
                                     description="requests the Serve proxy queues for a full ingress before a 503 (-1: no limit)")
    decode_threads: int = Field(default=2, ge=1, le=64, description="threads decoding images off the event loop")
    max_batch_items: int = Field(default=64, ge=1, le=4096, description="images per /v1/predict/batch request")
    alias_ttl_s: float = Field(default=1.0, ge=0, le=3600, description="how long an alias lookup is cached")
    max_batch_size: int = Field(default=16, ge=1, le=1024,
                                description="images per model call: the cap of the adaptive batcher, the one batcher of "
                                            "every layout (a request with more images goes alone)")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0, le=1,
        description="extra wait for a group to fill (0: a batch leaves as soon as a slot is free; serve_apps.batching)")
    max_concurrent_batches: int | None = Field(
        default=None, ge=1, le=64,
        description="batches in flight per ingress replica when batching (default: 2 with replicas, 1 in the ingress)")
    inference_in: Literal["replicas", "ingress"] = Field(
        default="replicas",
        description="where models run: ModelReplica deployments (a Ray handle call per batch) or inside the ingress "
                    "(no hop: the fastest on a small box; the ingress replicas then hold the sessions)")
    retry_backoff_s: list[float] = Field(default=[0.05, 0.2, 0.5], description="waits between retries when a replica dies")
    retry_after_s: int = Field(default=1, ge=0, le=3600, description="Retry-After of a 503")
    max_in_flight: int = Field(default=192, ge=1, le=100_000,
                               description="inference requests one ingress replica holds at once; more get a fast 503")
    request_timeout_s: float = Field(default=30.0, gt=0, le=3600, description="inference requests slower than this get 408")
    autoscaling: AutoscalingConfig | None = Field(
        default=None, description="Serve autoscaling of the ingress (min_replicas >= 1: it answers HTTP)")

    @model_validator(mode="after")
    def _scaling(self) -> "IngressConfig":
        _autoscaling_or_fixed(self, "ingress")
        if self.autoscaling is not None and self.autoscaling.min_replicas < 1:
            raise ValueError(f"Got ingress.autoscaling.min_replicas={self.autoscaling.min_replicas}; expected at "
                             "least 1 (with no ingress replica nothing answers HTTP, not even /healthz)")
        return self


class SamplingConfig(BaseModel):
    """Active learning: which predictions go to the labeling queue (see visionfleet.sampling)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    low_confidence: float = Field(default=0.6, ge=0, le=1, description="sample when top-1 confidence is below this")
    margin: float = Field(default=0.15, ge=0, le=1, description="…or when top-1 minus top-2 is below this")
    random_share: float = Field(default=0.02, ge=0, le=1, description="…plus this share of all traffic, at random")
    rate_per_s: float = Field(default=20.0, gt=0, description="global token-bucket rate of kept samples")
    burst: int = Field(default=200, ge=1)
    per_class_cap: int = Field(default=500, ge=1, description="kept samples per predicted class per period")
    period_s: float = Field(default=3600.0, gt=0)
    max_image_bytes: int = Field(default=1024 * 1024, ge=1024, description="larger originals are stored resized")


class MonitoringConfig(BaseModel):
    """Windows and drift thresholds of the per-version monitor (see visionfleet.monitoring)."""

    model_config = ConfigDict(extra="forbid")

    reference_size: int = Field(default=300, ge=20, description="first predictions of a version = its reference")
    window_size: int = Field(default=300, ge=20, description="predictions in the current window")
    low_confidence: float = Field(default=0.5, ge=0, le=1, description="below this a prediction counts as low-confidence")
    psi: float = Field(default=0.25, gt=0, description="PSI above which a signal drifts (with KS)")
    ks_alpha: float = Field(default=0.001, gt=0, lt=1)
    min_samples: int = Field(default=100, ge=10)
    wandb: bool = Field(default=True, description="log window metrics to W&B (offline unless configured)")


class AppConfig(BaseModel):
    """Everything ``build_app`` needs; also the shape of the YAML Serve config's args."""

    model_config = ConfigDict(extra="forbid")

    home: str = Field(description="absolute state dir ($VISIONFLEET_HOME) every replica uses")
    default_model: str = Field(default="demo", description="model name used when a request names none")
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, description="largest request body (413 above)")
    max_pixels: int = Field(default=40_000_000, ge=64, description="largest decoded image (413 above)")
    top_k: int = Field(default=5, ge=1, le=1000, description="default number of classes in 'probs'")
    admin_token: str | None = Field(default=None, description="bearer token of the admin routes (None: admin routes refuse everything)")
    telemetry: bool = Field(default=True, description="send prediction events to the TelemetrySink")
    ray_namespace: str = Field(default="visionfleet", description="namespace of the detached helper actors")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)

    @field_validator("home")
    @classmethod
    def _abs_home(cls, v: str) -> str:
        if not v.startswith("/") and "://" not in v:
            raise ValueError(f"Got {v!r} for home; expected an absolute path")
        return v


class ArmConfig(BaseModel):
    """One variant of an experiment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$", description="variant name, e.g. control or treatment")
    model: str = Field(description="NAME:VERSION this variant serves")
    weight: float = Field(ge=0, description="traffic weight (normalized over arms)")


class ShadowConfig(BaseModel):
    """Mirror a share of the experiment's traffic to a candidate; callers never see it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="NAME:VERSION that receives the mirrored requests")
    share: float = Field(default=1.0, gt=0, le=1, description="fraction of requests mirrored")


class GuardrailConfig(BaseModel):
    """Guardrails: a breach rolls the treatment back whatever the metric says."""

    model_config = ConfigDict(extra="forbid")

    latency_max_increase: float = Field(default=0.20, ge=0, description="p95 latency may grow by this fraction")
    latency_min_increase_ms: float = Field(default=2.0, ge=0, description="…and by at least this many ms before it counts")
    latency_min_samples: int = Field(default=200, ge=1, description="requests per arm before the latency guardrail applies")
    error_max_increase: float = Field(default=0.0, ge=0, le=1, description="tolerated error-rate increase (tested at alpha)")
    error_min_samples: int = Field(default=100, ge=1, description="requests per arm before the error guardrail applies")


class ExperimentConfig(BaseModel):
    """An A/B experiment, as given to ``visionfleet ab start``, ``POST /v1/experiments``
    or the ingress ``user_config`` of a Serve config file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    model: str = Field(description="model name whose un-versioned requests the experiment splits")
    arms: list[ArmConfig] = Field(min_length=2, max_length=2, description="control first, then treatment")
    sticky: bool = Field(default=True, description="same X-Client-Id, same variant")
    salt: str | None = Field(default=None, description="hash salt of the sticky assignment (default: the name)")
    shadow: ShadowConfig | None = None
    metric: str = Field(default="accuracy", pattern=r"^(accuracy|confidence)$")
    auto_decide: bool = Field(default=False, description="promote or roll back by itself when the statistics say so")
    bandit: bool = Field(default=False, description="Thompson-sampling weights instead of a fixed split")
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    min_samples: int = Field(default=200, ge=1, description="labeled (accuracy) or total (confidence) samples per arm before deciding")
    guardrails: GuardrailConfig = Field(default_factory=GuardrailConfig)
    allocation: Any = Field(default=None, description="the traffic allocation (managed by visionfleet; JSON)")
    status: str = Field(default="running", pattern=r"^(running|stopped|promoted|rolled_back)$")
    started_at: float | None = None
    decision: dict | None = None

    @field_validator("arms")
    @classmethod
    def _unique_arms(cls, v: list[ArmConfig]) -> list[ArmConfig]:
        names = [a.name for a in v]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        if sum(a.weight for a in v) <= 0:
            raise ValueError("arm weights must not all be 0")
        return v

    @property
    def control(self) -> ArmConfig:
        return self.arms[0]

    @property
    def treatment(self) -> ArmConfig:
        return self.arms[1]

    @property
    def effective_salt(self) -> str:
        return self.salt or self.name

    def weights(self) -> dict[str, float]:
        total = sum(a.weight for a in self.arms)
        return {a.name: a.weight / total for a in self.arms}


class IngressUserConfig(BaseModel):
    """What ``reconfigure`` of the ingress receives: runtime state, no restart."""

    model_config = ConfigDict(extra="forbid")

    experiments: list[ExperimentConfig] = Field(default_factory=list)
    telemetry: bool | None = Field(default=None, description="pause (False) or resume telemetry without a restart")
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    batch_wait_timeout_s: float | None = Field(default=None, ge=0, le=1)
    max_concurrent_batches: int | None = Field(default=None, ge=1, le=64)
