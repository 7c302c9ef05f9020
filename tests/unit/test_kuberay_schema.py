"""RayService manifests from cluster.kuberay checked against KubeRay's real ray.io/v1 CRD schema."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from typer.testing import CliRunner

from cluster.kuberay import SCHEMA_PATH, RayServiceOptions, rayservice_manifest, serve_config_of, validate_manifest
from cluster.serve_config import ServeConfigOptions, serve_config
from serve_apps.config import AppConfig
from visionfleet.cli import app

HOME = "/var/lib/visionfleet"
STORE = dict(store="s3://vf-bucket/prod", db_secret="vf-db", aws_secret="vf-s3",
             aws_endpoint_url="http://minio.storage:9000", aws_region="eu-west-1")


def _doc() -> dict:
    return serve_config(AppConfig(home=HOME), ServeConfigOptions())


def _env(m: dict) -> dict:
    c = m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_vendored_schema_names_its_source() -> None:
    meta = json.loads(SCHEMA_PATH.read_text())
    assert meta["kuberay"]["commit"] == "feeaf72facab4881ba2b179248bb67315634e229"
    assert "rayClusterConfig" in meta["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert "Apache License" in (SCHEMA_PATH.parent / "LICENSE-kuberay").read_text()


def test_default_manifest_matches_crd() -> None:
    m = rayservice_manifest(_doc(), RayServiceOptions(image="vf:1"))
    validate_manifest(m)
    vols = m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert vols == [{"name": "visionfleet-state", "persistentVolumeClaim": {"claimName": "visionfleet-state"}}]
    assert set(_env(m)) == {"VISIONFLEET_HOME"}


def test_store_db_secrets_manifest_matches_crd() -> None:
    doc = _doc()
    m = rayservice_manifest(doc, RayServiceOptions(image="vf:1", **STORE))
    validate_manifest(m)
    for group in (m["spec"]["rayClusterConfig"]["headGroupSpec"], m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]):
        assert group["template"]["spec"]["volumes"] == [{"name": "visionfleet-state", "emptyDir": {}}]
    env = _env(m)
    assert env["VISIONFLEET_STORE"] == "s3://vf-bucket/prod"
    assert env["VISIONFLEET_DB"] == {"secretKeyRef": {"name": "vf-db", "key": "url"}}
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "vf-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "vf-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000" and env["AWS_REGION"] == "eu-west-1"
    assert serve_config_of(m) == doc  # serveConfigV2 carries the Serve config unchanged
    m2 = rayservice_manifest(doc, RayServiceOptions(image="vf:1", store_secret="vf-store"))
    validate_manifest(m2)
    assert _env(m2)["VISIONFLEET_STORE"] == {"secretKeyRef": {"name": "vf-store", "key": "store"}}


@pytest.mark.parametrize("path,value,needle", [
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "replicas"), "2", "workerGroupSpecs/0/replicas"),
    (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParamz"), {}, "Additional properties"),
    (("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0, "resources", "limits", "cpu"),
     [2], "limits/cpu"),
])
def test_broken_manifest_is_rejected(path: tuple, value: object, needle: str) -> None:
    m = copy.deepcopy(rayservice_manifest(_doc(), RayServiceOptions(image="vf:1")))
    node = m
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ValueError, match="Got a RayService that KubeRay's CRD rejects") as exc:
        validate_manifest(m)
    assert needle in str(exc.value)


@pytest.mark.parametrize("kw,needle", [
    ({"store": "gs://b/p"}, "Got 'gs://b/p' for --store; expected s3://bucket/prefix"),
    ({"store": "s3://b/p", "db_secret": "VF_DB"}, "Got 'VF_DB' for --db-secret; expected a Kubernetes Secret name"),
    ({"aws_secret": "vf-s3"}, "Got AWS settings without --store or --store-secret; expected"),
    ({"store": "s3://vf-b/p", "store_secret": "s"}, "Got both --store and --store-secret; expected one"),
    ({"store": "s3://vf-b/p", "pvc": "vf-state"}, "Got --pvc with a store; expected one of them"),
])
def test_bad_store_options_refused(kw: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        RayServiceOptions(image="vf:1", **kw)


def test_cli_store_flags(tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "rs.yaml"
    r = runner.invoke(app, ["serve", "config", "--kuberay", "--image", "vf:1", "--home", HOME,
                            "--store", "s3://vf-bucket/prod", "--db-secret", "vf-db", "--aws-secret", "vf-s3",
                            "--aws-region", "eu-west-1", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = yaml.safe_load(out.read_text())
    validate_manifest(m)
    assert _env(m)["VISIONFLEET_DB"] == {"secretKeyRef": {"name": "vf-db", "key": "url"}}
    r = runner.invoke(app, ["serve", "config", "--kuberay", "--image", "vf:1", "--store", "/mnt/x"])
    assert r.exit_code != 0 and "Got '/mnt/x' for --store; expected s3://bucket/prefix" in r.output
    r = runner.invoke(app, ["serve", "config", "--store", "s3://vf-bucket/p"])
    assert r.exit_code != 0 and "--store without --kuberay" in r.output
