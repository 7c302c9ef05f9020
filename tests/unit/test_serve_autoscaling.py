"""Serve autoscaling: AutoscalingConfig on ModelReplica and the ingress, in the YAML as Serve reads it."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from cluster.serve_config import serve_config, validate_serve_config
from serve_apps.app import _scaling
from serve_apps.config import AppConfig, AutoscalingConfig, IngressConfig, ReplicaConfig

HOME = "/srv/visionfleet"
runner = CliRunner()


def _deployments(doc: dict) -> dict[str, dict]:
    return {d["name"]: d for d in doc["applications"][0]["deployments"]}


def test_the_yaml_carries_autoscaling_and_rays_own_schema_accepts_it() -> None:
    from ray.serve.schema import ServeDeploySchema

    app = AppConfig(
        home=HOME,
        replica=ReplicaConfig(autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=6, target_ongoing_requests=3,
                                                            upscale_delay_s=2, downscale_delay_s=20)),
        ingress=IngressConfig(autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=3)),
    )
    doc = yaml.safe_load(yaml.safe_dump(serve_config(app)))
    deps = _deployments(doc)
    assert deps["ModelReplica"]["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 6,
                                                          "target_ongoing_requests": 3.0, "upscale_delay_s": 2.0,
                                                          "downscale_delay_s": 20.0}
    assert "num_replicas" not in deps["ModelReplica"] and "num_replicas" not in deps["Ingress"]
    assert deps["Ingress"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3,
                                                     "target_ongoing_requests": 2.0}
    schema = ServeDeploySchema.model_validate(doc)
    by_name = {d.name: d for d in schema.applications[0].deployments}
    auto = by_name["ModelReplica"].autoscaling_config
    auto = auto if isinstance(auto, dict) else auto.model_dump()
    assert auto["max_replicas"] == 6 and auto["downscale_delay_s"] == 20.0
    # Ray's own AutoscalingConfig accepts what we emit, field for field.
    from ray.serve.config import AutoscalingConfig as RayAutoscaling

    ray_cfg = RayAutoscaling(**deps["ModelReplica"]["autoscaling_config"])
    assert (ray_cfg.min_replicas, ray_cfg.max_replicas, ray_cfg.target_ongoing_requests) == (0, 6, 3.0)
    # serve up's code path hands Serve the same options.
    assert _scaling(app.replica) == {"autoscaling_config": deps["ModelReplica"]["autoscaling_config"]}
    assert _scaling(ReplicaConfig(num_replicas=2)) == {"num_replicas": 2}


def test_the_models_in_the_ingress_scale_with_the_ingress() -> None:
    app = AppConfig(home=HOME, ingress=IngressConfig(inference_in="ingress", num_replicas=3))
    assert _deployments(serve_config(app))["Ingress"]["num_replicas"] == 3
    app = AppConfig(home=HOME, ingress=IngressConfig(inference_in="ingress",
                                                     autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=4)))
    doc = serve_config(app)
    assert set(_deployments(doc)) == {"Ingress"}
    assert _deployments(doc)["Ingress"]["autoscaling_config"]["max_replicas"] == 4
    validate_serve_config(doc)
    with pytest.raises(ValueError, match=r"Got replica.autoscaling=.*expected their defaults"):
        serve_config(AppConfig(home=HOME, ingress=IngressConfig(inference_in="ingress"),
                               replica=ReplicaConfig(autoscaling=AutoscalingConfig())))


@pytest.mark.parametrize(
    "build,needle",
    [
        (lambda: AutoscalingConfig(min_replicas=3, max_replicas=2), "Got min_replicas=3 > max_replicas=2; expected"),
        (lambda: AutoscalingConfig(min_replicas=-1), "greater than or equal to 0"),
        (lambda: AutoscalingConfig(target_ongoing_requests=0), "greater than 0"),
        (lambda: IngressConfig(autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=2)),
         "Got ingress.autoscaling.min_replicas=0; expected at least 1"),
        (lambda: ReplicaConfig(num_replicas=3, autoscaling=AutoscalingConfig()),
         "Got replica.num_replicas=3 with replica.autoscaling; expected one of them"),
    ],
)
def test_bad_autoscaling_values_are_refused(build, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        build()


def test_serve_config_command_emits_autoscaling(tmp_path, monkeypatch) -> None:
    from visionfleet.cli import app

    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path))
    r = runner.invoke(app, ["serve", "config", "--home", HOME, "--min-replicas", "1", "--max-replicas", "5",
                            "--target-ongoing-requests", "4", "--downscale-delay-s", "30",
                            "--ingress-min-replicas", "1", "--ingress-max-replicas", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(r.stdout)
    validate_serve_config(doc)
    deps = _deployments(doc)
    assert deps["ModelReplica"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 5,
                                                          "target_ongoing_requests": 4.0, "downscale_delay_s": 30.0}
    assert deps["Ingress"]["autoscaling_config"]["max_replicas"] == 2


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--min-replicas", "3", "--max-replicas", "2"), "Got min_replicas=3 > max_replicas=2; expected"),
        (("--min-replicas", "1"), "Got only one of --min-replicas/--max-replicas; expected both"),
        (("--ingress-min-replicas", "0", "--ingress-max-replicas", "2"), "Got ingress.autoscaling.min_replicas=0"),
        (("--target-ongoing-requests", "3"), "Got --target-ongoing-requests/"),
        (("--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "0"),
         "Got 0.0 for target_ongoing_requests; expected greater than 0"),
        (("--inference-in", "ingress", "--min-replicas", "1", "--max-replicas", "2"),
         "Got --min-replicas 1, --max-replicas 2 with --inference-in ingress"),
        (("--ingress-replicas", "2", "--ingress-min-replicas", "1", "--ingress-max-replicas", "2"),
         "Got --ingress-replicas 2 with --ingress-min-replicas/--ingress-max-replicas; expected one of them"),
    ],
)
def test_bad_autoscaling_flags_exit_2(tmp_path, monkeypatch, args: tuple[str, ...], needle: str) -> None:
    from visionfleet.cli import app

    monkeypatch.setenv("VISIONFLEET_HOME", str(tmp_path))
    r = runner.invoke(app, ["serve", "config", "--home", HOME, *args], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "Traceback" not in r.output
    assert needle in " ".join(r.output.split()), r.output
