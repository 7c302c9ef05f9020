"""One shared local Ray per test run, a tiny trained model and the Serve app over HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

ADMIN_TOKEN = "test-admin-token-0123456789"


@dataclass
class Trained:
    card: object
    result: object
    dataset: Path


@pytest.fixture(scope="session")
def vf_home(tmp_path_factory: pytest.TempPathFactory):
    """The integration tier's state dir, exported as $VISIONFLEET_HOME until the session ends (then restored)."""
    home = tmp_path_factory.mktemp("vfhome")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISIONFLEET_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def settings(vf_home: Path):
    from visionfleet.settings import Settings

    return Settings.from_env(vf_home).ensure()


@pytest.fixture(scope="session")
def metrics_port() -> int:
    from cluster.local import free_port

    return free_port()


@pytest.fixture(scope="session")
def ray_session(settings, metrics_port):
    import ray

    from cluster.local import init_embedded

    init_embedded(settings, num_cpus=2, metrics_port=metrics_port)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(settings) -> Path:
    from visionfleet.datasets.store import synthesize

    path = settings.datasets_dir / "tiny"
    synthesize(path, n_train=600, n_holdout=160, size=32, seed=3)
    return path


@pytest.fixture(scope="session")
def trained(ray_session, settings, tiny_dataset) -> Trained:
    from train.loop import TrainConfig, fit
    from train.pipeline import register_checkpoint
    from visionfleet.datasets.store import load_arrays
    from visionfleet.registry import Registry

    cfg = TrainConfig(
        dataset=str(tiny_dataset),
        arch={"arch": "resnet", "width": 8, "stem_stride": 2},
        input_size=32,
        epochs=2,
        batch_size=64,
        wandb=True,
        run_name="it-train",
    )
    result = fit(cfg, runs_dir=settings.runs_dir, wandb_dir=settings.home / "wandb")
    parity, _ = load_arrays(tiny_dataset, "holdout", (32, 32), limit=32)
    card = register_checkpoint(result.checkpoint, Registry(settings.registry_dir), "tiny", parity_images=parity, run_id=result.run_id)
    return Trained(card=card, result=result, dataset=tiny_dataset)


@pytest.fixture(scope="session")
def serve_url(ray_session, settings, trained) -> str:
    from ray import serve

    from cluster.local import free_port, wait_http
    from serve_apps.config import AppConfig, ReplicaConfig
    from serve_apps.deploy import deploy

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = AppConfig(
        home=str(settings.home),
        default_model="tiny",
        max_body_bytes=2 * 1024 * 1024,
        max_pixels=4_000_000,
        admin_token=ADMIN_TOKEN,
        replica=ReplicaConfig(ort_threads=1, num_cpus=0.25),
    )
    deploy(cfg, http={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    assert wait_http(f"{url}/healthz", timeout=120)
    return url


@pytest.fixture(scope="session")
def ab_model(ray_session, settings) -> tuple[int, int]:
    """Register abm:1 (systematically wrong: class outputs rotated) and abm:2 (trained, 48 px)."""
    import torch

    from train.loop import TrainConfig, fit
    from train.pipeline import register_checkpoint
    from visionfleet.datasets.store import load_arrays, synthesize
    from visionfleet.registry import Registry

    ds = settings.datasets_dir / "ab"
    synthesize(ds, n_train=3000, n_holdout=300, size=48, seed=21)
    cfg = TrainConfig(dataset=str(ds), arch={"arch": "resnet", "width": 16, "stem_stride": 2}, input_size=48,
                      epochs=8, batch_size=64, wandb=False, run_name="it-ab-good")
    good = fit(cfg, runs_dir=settings.runs_dir, wandb_dir=settings.home / "wandb")
    blob = torch.load(good.checkpoint, weights_only=True)
    for k in ("fc.weight", "fc.bias"):  # predict class c+1 where the model believes c
        blob["state_dict"][k] = torch.roll(blob["state_dict"][k], shifts=1, dims=0)
    bad_path = Path(good.run_dir) / "rotated.pt"
    torch.save(blob, bad_path)
    parity, _ = load_arrays(ds, "holdout", (48, 48), limit=32)
    reg = Registry(settings.registry_dir)
    v_bad = register_checkpoint(bad_path, reg, "abm", parity_images=parity, run_id="rotated").version
    v_good = register_checkpoint(good.checkpoint, reg, "abm", parity_images=parity, run_id=good.run_id).version
    assert reg.aliases("abm")["production"] == v_bad
    return v_bad, v_good
