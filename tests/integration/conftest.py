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


# The demo model as `make demo` trains it (tests/data/README.md: 0.964 holdout top-1).
SHIPPED_DEMO = Path(__file__).resolve().parents[1] / "data" / "demo64.pt"


@pytest.fixture(scope="session")
def ab_model(ray_session, settings) -> tuple[int, int]:
    """Register abm:1 (systematically wrong: class outputs rotated) and abm:2 (the shipped demo model, 64 px).

    The good version is tests/data/demo64.pt rather than a model trained here: training one
    for this fixture (3,000 images, 8 epochs) took ~50 s of every run, and only its being
    clearly better than its rotated copy matters to these tests.
    """
    import numpy as np
    import torch

    from train.pipeline import register_checkpoint
    from visionfleet.datasets.synth import render_sample
    from visionfleet.registry import Registry

    work = settings.home / "ab-ckpt"
    work.mkdir(parents=True, exist_ok=True)
    blob = torch.load(SHIPPED_DEMO, weights_only=True)
    good_path = work / "demo64.pt"
    torch.save(blob, good_path)
    for k in ("fc.weight", "fc.bias"):  # predict class c+1 where the model believes c
        blob["state_dict"][k] = torch.roll(blob["state_dict"][k], shifts=1, dims=0)
    bad_path = work / "rotated.pt"
    torch.save(blob, bad_path)
    parity = np.stack([render_sample(21, i, 64)[0] for i in range(32)])
    reg = Registry(settings.registry_dir)
    v_bad = register_checkpoint(bad_path, reg, "abm", parity_images=parity, run_id="rotated").version
    v_good = register_checkpoint(good_path, reg, "abm", parity_images=parity, run_id="demo64").version
    assert reg.aliases("abm")["production"] == v_bad
    return v_bad, v_good
