"""Serve config, RayService manifest and cluster-launcher example: checked with Ray's own schemas (no Ray started)."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cluster.kuberay import RayServiceOptions, manifest_yaml, rayservice_manifest, serve_config_of
from cluster.multinode import ClusterInfo, ClusterSpec, NodeRecord, client_env, client_environ
from cluster.serve_config import (
    IMPORT_PATH,
    ProxyLocation,
    ServeConfigOptions,
    app_config_from_serve_config,
    options_from,
    serve_config,
    to_yaml,
    validate_serve_config,
)
from serve_apps.config import (
    AppConfig,
    ArmConfig,
    ExperimentConfig,
    IngressConfig,
    IngressUserConfig,
    ReplicaConfig,
)

REPO = Path(__file__).resolve().parents[2]
HOME = "/srv/visionfleet"


def _app(**replica) -> AppConfig:
    return AppConfig(
        home=HOME,
        default_model="demo",
        admin_token=None,
        replica=ReplicaConfig(num_replicas=3, num_cpus=0.5, ort_threads=1, **replica),
        ingress=IngressConfig(num_cpus=0.25, request_timeout_s=20),
    )


def _experiment(name: str = "int8-vs-fp32", model: str = "demo") -> ExperimentConfig:
    return ExperimentConfig(
        name=name,
        model=model,
        arms=[ArmConfig(name="control", model=f"{model}:1", weight=90),
              ArmConfig(name="treatment", model=f"{model}:2", weight=10)],
        auto_decide=True,
    )


def _deployments(doc: dict) -> dict[str, dict]:
    return {d["name"]: d for d in doc["applications"][0]["deployments"]}


def test_generated_config_validates_with_rays_schema_and_carries_the_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    opts = ServeConfigOptions(host="0.0.0.0", port=8123, request_timeout_s=45, proxy_location=ProxyLocation.HEAD_ONLY)
    doc = serve_config(_app(max_replicas_per_node=1, health_check_period_s=5), opts)
    schema = ServeDeploySchema.model_validate(doc)  # Ray's own check, as `serve deploy` runs it
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8123
    assert schema.http_options.request_timeout_s == 45
    assert schema.proxy_location.value == "HeadOnly"
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH == "serve_apps.app:app_builder" and app.route_prefix == "/"
    assert app.runtime_env["env_vars"]["VISIONFLEET_HOME"] == HOME
    assert app.runtime_env["env_vars"]["WANDB_MODE"] == "offline"
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {"Ingress", "ModelReplica"}
    assert deps["ModelReplica"].num_replicas == 3 and deps["ModelReplica"].max_replicas_per_node == 1
    assert deps["ModelReplica"].ray_actor_options.num_cpus == 0.5
    assert deps["ModelReplica"].health_check_period_s == 5
    assert deps["Ingress"].ray_actor_options.num_cpus == 0.25
    # the deployment names are the ones the app registers
    from serve_apps.app import APP_NAME
    from serve_apps.ingress import Ingress
    from serve_apps.replica import ModelReplica

    assert app.name == APP_NAME and Ingress.name == "Ingress" and ModelReplica.name == "ModelReplica"


@pytest.mark.parametrize("replica", [{}, {"max_replicas_per_node": 2}])
def test_args_parse_back_to_the_same_app_config_through_yaml(replica: dict) -> None:
    app = _app(**replica)
    doc = serve_config(app)
    back = yaml.safe_load(to_yaml(doc))
    assert back == doc
    assert app_config_from_serve_config(back) == app
    # exactly what app_builder does with the args
    assert AppConfig.model_validate(back["applications"][0]["args"]) == app
    # the deployment override says what args say
    assert _deployments(back)["ModelReplica"].get("max_replicas_per_node") == replica.get("max_replicas_per_node")


def test_experiments_and_batching_knobs_go_to_the_ingress_user_config() -> None:
    exp = _experiment()
    doc = serve_config(_app(), user=IngressUserConfig(experiments=[exp], max_batch_size=8, batch_wait_timeout_s=0.01))
    back = yaml.safe_load(to_yaml(doc))
    deps = _deployments(back)
    ingress_user = IngressUserConfig.model_validate(deps["Ingress"]["user_config"])
    assert ingress_user.experiments == [exp] and (ingress_user.max_batch_size, ingress_user.batch_wait_timeout_s) == (8, 0.01)
    # one batcher: the ModelReplica has no runtime knobs, and a file that gives it some is refused
    assert "user_config" not in deps["ModelReplica"]
    deps["ModelReplica"]["user_config"] = {"max_batch_size": 32}
    with pytest.raises(ValueError, match="Got a user_config for ModelReplica; expected none"):
        validate_serve_config(back)
    # runtime state stays out of args: changing it must not change Serve's code version
    assert "user_config" not in doc["applications"][0]["args"]


@pytest.mark.parametrize(
    "build,needle",
    [
        (lambda: options_from(ServeConfigOptions, port=70000),
         "Got 70000 for port; expected less than or equal to 65535"),
        (lambda: options_from(ServeConfigOptions, proxy_location="Nowhere"), "Got 'Nowhere' for proxy_location"),
        (lambda: options_from(ServeConfigOptions, route_prefix="api"), "route_prefix"),
        (lambda: serve_config(_app(), ServeConfigOptions(request_timeout_s=20)), "more, so the ingress answers"),
        (lambda: serve_config(_app(), user=IngressUserConfig(experiments=[_experiment("a"), _experiment("b")])),
         "two running experiments on one model"),
        (lambda: serve_config(_app(), ServeConfigOptions(env={"VISIONFLEET_HOME": "/elsewhere"})), "VISIONFLEET_HOME"),
        (lambda: options_from(AppConfig, home="relative/path"), "expected an absolute path"),
    ],
)
def test_bad_serve_options_give_clear_errors(build, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        build()


def test_documents_that_rays_schema_or_our_models_refuse_are_reported() -> None:
    doc = serve_config(_app())
    bad = json.loads(json.dumps(doc))
    _deployments(bad)["ModelReplica"]["num_replicas"] = 0
    with pytest.raises(ValueError, match="ServeDeploySchema"):
        validate_serve_config(bad)
    bad = json.loads(json.dumps(doc))
    bad["applications"][0]["args"]["replica"]["num_cpu"] = 1  # a typo Ray's lenient schema lets through
    with pytest.raises(ValueError, match="AppConfig refuses"):
        validate_serve_config(bad)
    bad = json.loads(json.dumps(doc))
    _deployments(bad)["Ingress"]["user_config"] = {"experiments": [{"name": "x"}]}
    with pytest.raises(ValueError, match="invalid user_config for Ingress"):
        validate_serve_config(bad)


def test_rayservice_manifest_embeds_the_same_config_with_head_and_worker_groups() -> None:
    doc = serve_config(_app(max_replicas_per_node=1), user=IngressUserConfig(experiments=[_experiment()]))
    opts = RayServiceOptions(image="registry.example.com/vf:1", pvc="vf-state", workers=3, max_workers=5,
                             worker_cpus=2, worker_memory="4Gi", head_cpus=1, head_memory="2Gi", name="vf")
    m = rayservice_manifest(doc, opts)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService" and m["metadata"]["name"] == "vf"
    assert isinstance(m["spec"]["serveConfigV2"], str)
    assert serve_config_of(m) == doc
    rc = m["spec"]["rayClusterConfig"]
    from importlib.metadata import version

    assert rc["rayVersion"] == version("ray") and rc["authOptions"] == {"mode": "token"}
    assert rc["enableInTreeAutoscaling"] is True
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0" and head["rayStartParams"]["num-cpus"] == "0"
    (hc,) = head["template"]["spec"]["containers"]
    assert hc["image"] == "registry.example.com/vf:1"
    assert {p["containerPort"] for p in hc["ports"]} == {6379, 8265, 10001, 8000}
    assert hc["resources"]["limits"] == {"cpu": "1", "memory": "2Gi"}
    (wg,) = rc["workerGroupSpecs"]
    assert (wg["replicas"], wg["minReplicas"], wg["maxReplicas"]) == (3, 3, 5)
    (wc,) = wg["template"]["spec"]["containers"]
    assert wc["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    for spec in (head["template"]["spec"], wg["template"]["spec"]):
        (vol,) = spec["volumes"]
        assert vol["persistentVolumeClaim"]["claimName"] == "vf-state"
        (mount,) = spec["containers"][0]["volumeMounts"]
        assert mount["name"] == vol["name"] and mount["mountPath"] == HOME
        assert {"name": "VISIONFLEET_HOME", "value": HOME} in spec["containers"][0]["env"]
    # the YAML form: serveConfigV2 is a literal block, no anchors, and parses back to the manifest
    text = manifest_yaml(m)
    assert "serveConfigV2: |" in text and "&id" not in text
    assert yaml.safe_load(text) == m


@pytest.mark.parametrize(
    "opts,needle",
    [
        ({"workers": 1}, "at most 1 replicas"),  # 3 replicas, 1 per node, 1 worker
        ({"workers": 3, "min_workers": 4}, "min ≤ workers ≤ max"),
        ({"workers": 3, "worker_cpus": 0.25}, "CPUs per replica"),
        ({"workers": 0}, "at least one pod"),
        ({"image": ""}, "for image"),
        ({"worker_memory": "lots"}, "worker_memory"),
        ({"name": "Not_A_DNS_Name"}, "for name"),
    ],
)
def test_bad_manifest_options_give_clear_errors(opts: dict, needle: str) -> None:
    doc = serve_config(_app(max_replicas_per_node=1))
    with pytest.raises(ValueError, match=needle):
        rayservice_manifest(doc, options_from(RayServiceOptions, **{"image": "vf:1", **opts}))


def test_cluster_launcher_example_has_the_keys_and_passes_rays_schema() -> None:
    import importlib.util

    import jsonschema

    cfg = yaml.safe_load((REPO / "cluster" / "examples" / "cluster-launcher.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg.get(key), key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("pip install" in c and ".[cluster]" in c for c in cfg["setup_commands"])
    assert "." in cfg["file_mounts"].values()  # the repository travels to every node
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    # the JSON schema `ray up` validates against, shipped inside the ray package
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    jsonschema.validate(cfg, json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))


def test_local_cluster_spec_and_client_env_without_ray(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whole number"):
        ClusterSpec(worker_cpus=0.5)
    with pytest.raises(ValueError, match="workers"):
        ClusterSpec(workers=-1)
    assert ClusterSpec(head_cpus=0).head_cpus == 0
    info = ClusterInfo(name="vf-x", gcs_address="127.0.0.1:6000", dashboard_url="http://127.0.0.1:6001",
                       temp_dir="/tmp/vf-cluster-x", token_path=str(tmp_path / "tok"), object_store_mb=256,
                       started_at="now", nodes=(NodeRecord("vf-head", "head", 1, 6002),))
    assert ClusterInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    env = client_environ(info, {"PATH": "/bin", "RAY_AUTH_TOKEN": "someone-elses", "RAY_ADDRESS": "10.0.0.1:6379"})
    assert env["PATH"] == "/bin" and "RAY_AUTH_TOKEN" not in env
    assert {k: env[k] for k in client_env(info)} == {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok"), "RAY_ADDRESS": "127.0.0.1:6000",
        "RAY_DASHBOARD_ADDRESS": "http://127.0.0.1:6001", "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:6001",
    }


def test_temp_dir_fits_socket_paths_and_processes_match_whole_paths(tmp_path: Path) -> None:
    import subprocess
    import sys

    from cluster.multinode import _temp_dir, cluster_processes
    from visionfleet.settings import Settings

    deep = Settings.from_env(tmp_path / ("d" * 80) / "home")
    assert len(str(_temp_dir(deep))) <= 40 and str(_temp_dir(deep)).startswith("/tmp/vf-cluster-")
    assert _temp_dir(deep) != _temp_dir(Settings.from_env(tmp_path / "other"))
    # a process naming /tmp/x-longer must not count as one of /tmp/x's
    target = str(tmp_path / "x")
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", arg])
             for arg in (f"--temp-dir={target}", f"--temp-dir={target}-longer")]
    try:
        assert {p.pid for p in cluster_processes(target)} == {procs[0].pid}
    finally:
        for p in procs:
            p.kill()
            p.wait()


runner = CliRunner()


def test_serve_config_command_prints_yaml_and_a_manifest(home: Path, tmp_path: Path) -> None:
    from visionfleet.cli import app

    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(_experiment().model_dump(mode="json", exclude_none=True)))
    r = runner.invoke(app, ["serve", "config", "--model", "demo", "--port", "8000", "--replicas", "2",
                            "--max-replicas-per-node", "1", "--home", HOME, "--experiment", str(exp)],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(r.stdout)
    validate_serve_config(doc)
    assert app_config_from_serve_config(doc).home == HOME
    assert _deployments(doc)["ModelReplica"]["max_replicas_per_node"] == 1
    assert IngressUserConfig.model_validate(_deployments(doc)["Ingress"]["user_config"]).experiments == [_experiment()]

    r = runner.invoke(app, ["serve", "config", "--inference-in", "ingress", "--home", HOME], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(r.stdout)
    assert set(_deployments(doc)) == {"Ingress"} and app_config_from_serve_config(doc).ingress.inference_in == "ingress"

    out = tmp_path / "rs.yaml"
    r = runner.invoke(app, ["serve", "config", "--kuberay", "--image", "vf:1", "--pvc", "vf-state", "--workers", "2",
                            "--replicas", "2", "--max-replicas-per-node", "1", "--home", HOME, "--admin-token",
                            "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = yaml.safe_load(out.read_text())
    assert m["kind"] == "RayService" and serve_config_of(m)["applications"][0]["args"]["admin_token"]
    assert os.stat(out).st_mode & 0o077 == 0  # it holds the admin token


@pytest.mark.parametrize(
    "args,needle",
    [
        (("serve", "config", "--image", "vf:1"), "without --kuberay"),
        (("serve", "config", "--kuberay"), "without --image"),
        (("serve", "config", "--port", "0"), "for port"),
        (("serve", "config", "--kuberay", "--image", "vf:1", "--workers", "1", "--replicas", "3",
          "--max-replicas-per-node", "1"), "at most 1 replicas"),
        (("serve", "config", "--inference-in", "gpu"), "--inference-in"),
        (("serve", "up", "--inference-in", "gpu"), "--inference-in"),
        (("cluster", "up", "--worker-cpus", "0.5"), "whole number"),
        (("cluster", "up", "--workers", "-1"), "workers"),
    ],
)
def test_bad_cluster_arguments_exit_2_before_starting_anything(home: Path, args: tuple[str, ...], needle: str) -> None:
    from visionfleet.cli import app

    r = runner.invoke(app, list(args), catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and needle in r.output and "Traceback" not in r.output
    assert not (home / "ray" / "cluster.json").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (("serve", "config", "--inference-in", "ingress", "--replicas", "3"), "Got --replicas 3 with --inference-in ingress"),
        (("serve", "config", "--inference-in", "ingress", "--max-replicas-per-node", "1"),
         "Got --max-replicas-per-node 1 with --inference-in ingress"),
        (("serve", "config", "--inference-in", "ingress", "--replicas", "2", "--max-replicas-per-node", "1"),
         "Got --replicas 2, --max-replicas-per-node 1"),
        (("serve", "up", "--inference-in", "ingress", "--replicas", "2"), "Got --replicas 2 with --inference-in ingress"),
    ],
)
def test_replica_flags_with_models_in_the_ingress_exit_2(home: Path, args: tuple[str, ...], needle: str) -> None:
    from visionfleet.cli import app

    r = runner.invoke(app, list(args), catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "Traceback" not in r.output
    text = " ".join(r.output.split())  # rich wraps long lines
    assert needle in text and "--inference-in replicas" in text
    assert not (home / "ray" / "head.json").exists()  # serve up refused before starting a head


def test_replica_flags_at_their_defaults_pass_with_models_in_the_ingress(home: Path) -> None:
    from visionfleet.cli import app

    r = runner.invoke(app, ["serve", "config", "--inference-in", "ingress", "--replicas", "1", "--home", HOME],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert set(_deployments(yaml.safe_load(r.stdout))) == {"Ingress"}


def test_serve_config_refuses_replica_settings_it_would_drop() -> None:
    app = AppConfig(home=HOME, replica=ReplicaConfig(max_replicas_per_node=2), ingress=IngressConfig(inference_in="ingress"))
    with pytest.raises(ValueError, match="Got replica.max_replicas_per_node=2 with ingress.inference_in='ingress'"):
        serve_config(app)


def test_cluster_status_without_a_cluster(home: Path) -> None:
    from visionfleet.cli import app

    r = runner.invoke(app, ["cluster", "status", "--json"], catch_exceptions=False)
    assert r.exit_code == 0 and json.loads(r.stdout)["cluster"] is None
    r = runner.invoke(app, ["cluster", "status"], catch_exceptions=False)
    assert r.exit_code == 1 and "no cluster" in r.output
    r = runner.invoke(app, ["cluster", "down"], catch_exceptions=False)
    assert r.exit_code == 0 and "nothing to stop" in r.output


def test_docs_example_writes_a_valid_config_and_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["serve_config.py", str(tmp_path)])
    runpy.run_path(str(REPO / "docs" / "examples" / "serve_config.py"), run_name="__main__")
    assert "RayService: visionfleet workers 2 to 4" in capsys.readouterr().out
    doc = yaml.safe_load((tmp_path / "serve.yaml").read_text())
    validate_serve_config(doc)
    assert serve_config_of(yaml.safe_load((tmp_path / "rayservice.yaml").read_text())) == doc
