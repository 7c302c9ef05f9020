"""Which model version answers a request: pure functions over the running experiments.

A request that names a version or an alias goes to exactly that. A request that names
only a model (or nothing: the default model) goes to the model's running experiment
when there is one (weighted, sticky by ``X-Client-Id``), else to ``@production``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from serve_apps.config import ExperimentConfig
from visionfleet.spec import parse_ref

__all__ = ["Route", "CompiledExperiment", "compile_experiment", "choose_route"]


@dataclass(frozen=True)
class Route:
    """Where one request goes."""

    ref: str  # NAME[:VERSION|@ALIAS] to resolve
    variant: str  # default | arm name
    experiment: str | None = None
    shadow_ref: str | None = None  # NAME:VERSION to mirror to, when chosen


@dataclass(frozen=True)
class CompiledExperiment:
    config: ExperimentConfig
    arm_refs: dict[str, str]  # arm name -> NAME:VERSION
    allocation: Any  # visionfleet.experiments Allocation

    @property
    def name(self) -> str:
        return self.config.name


def compile_experiment(cfg: ExperimentConfig) -> CompiledExperiment:
    """Validate refs and build the allocation (from ``cfg.allocation`` or the weights)."""
    from visionfleet.experiments import Allocation, initial_allocation

    arm_refs = {}
    for arm in cfg.arms:
        r = parse_ref(arm.model)
        if r.version is None:
            raise ValueError(f"Got {arm.model!r} for arm {arm.name}; expected a concrete NAME:VERSION")
        if r.name != cfg.model:
            raise ValueError(f"arm {arm.name} serves {r.name!r}; the experiment is on model {cfg.model!r}")
        arm_refs[arm.name] = f"{r.name}:{r.version}"
    if cfg.shadow is not None and parse_ref(cfg.shadow.model).version is None:
        raise ValueError(f"Got {cfg.shadow.model!r} for the shadow; expected a concrete NAME:VERSION")
    alloc = Allocation.from_dict(cfg.allocation) if cfg.allocation is not None else initial_allocation(cfg.weights())
    return CompiledExperiment(config=cfg, arm_refs=arm_refs, allocation=alloc)


def choose_route(
    model: str | None,
    version: str | None,
    default_model: str,
    experiments: dict[str, CompiledExperiment],
    client_key: str | None,
    rng: random.Random,
) -> Route:
    """Pick the route of one request (see the module docstring)."""
    from serve_apps.inputs import model_ref_from
    from visionfleet.experiments import assign

    ref = model_ref_from(model, version, default_model)
    parsed = parse_ref(ref)
    explicit = version not in (None, "") or (model is not None and (":" in model or "@" in model))
    exp = experiments.get(parsed.name)
    if explicit or exp is None or exp.config.status != "running":
        return Route(ref=ref, variant="default")
    key = client_key if exp.config.sticky else None
    arm = assign(exp.allocation, key, exp.config.effective_salt, rng)
    shadow = None
    if exp.config.shadow is not None and rng.random() < exp.config.shadow.share:
        shadow = exp.config.shadow.model
    return Route(ref=exp.arm_refs[arm], variant=arm, experiment=exp.name, shadow_ref=shadow)
