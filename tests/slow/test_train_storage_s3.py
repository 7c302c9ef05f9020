"""Ray Train on the S3 server (moto): the dataset read from the store area `datasets` (each worker
copies it into its node's cache), checkpoints and run state in the store area `runs`, and a
worker killed mid-fit resumes from the checkpoint on S3. Slow: it starts its own Ray (the
workers must inherit the AWS variables) and trains twice over."""

from __future__ import annotations

import pytest

from tests.integration.test_train_storage import SNAPSHOT, check_resumed, fit_with_a_kill

pytestmark = pytest.mark.slow


def test_fit_on_s3_storage_resumes_after_a_worker_dies(s3_env: str, tmp_path, monkeypatch) -> None:
    import ray

    from cluster.local import init_embedded
    from train.loop import TrainConfig
    from visionfleet.datasets.store import publish_dataset, synthesize
    from visionfleet.settings import Settings
    from visionfleet.store import open_store

    home = tmp_path / "home"
    monkeypatch.setenv("VISIONFLEET_HOME", str(home))
    monkeypatch.setenv("VISIONFLEET_STORE", f"{s3_env}/vf")
    settings = Settings.from_env().ensure()
    staged = tmp_path / "writer" / "tiny"  # written elsewhere: this home's cache has no copy
    synthesize(staged, n_train=600, n_holdout=160, size=32, seed=3)
    dataset = f"{settings.store_uri('datasets')}/tiny"
    publish_dataset(staged, dataset)
    storage = f"{settings.store_uri('runs')}/_ray"
    runs = open_store(storage)

    init_embedded(settings, num_cpus=2)  # started after s3_env: workers see AWS_ENDPOINT_URL and the keys
    try:
        epochs = 8
        cfg = TrainConfig(dataset=dataset, arch={"arch": "resnet", "width": 8, "stem_stride": 2}, input_size=32,
                          epochs=epochs, batch_size=64, wandb=False, run_name="s3-resume", max_failures=1)
        result, box = fit_with_a_kill(cfg, runs_dir=settings.runs_dir, storage=storage,
                                      checkpoint_registered=lambda: runs.exists(f"s3-resume/{SNAPSHOT}"))
    finally:
        ray.shutdown()
    check_resumed(result, box, epochs)
    keys = [k for k, _, is_dir in runs.list("s3-resume", recursive=True) if not is_dir]
    assert any(k.endswith("/model.pt") for k in keys), keys  # the final checkpoint is on S3
    assert not (settings.runs_dir / "_ray").exists()  # nothing of Ray Train's state on the local disk
    assert len(list((settings.cache_dir / "datasets").iterdir())) == 1  # the workers' copy of the dataset
