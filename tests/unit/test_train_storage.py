"""Where Ray Train runs and keeps state (train.scaling): the GPU decision from a cluster's
resources, and RunConfig storage for a local folder or the S3 server (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.scaling import decide_workers, parse_gpu_setting, ray_storage


@pytest.mark.parametrize(
    ("cluster", "workers", "gpu", "use_gpu"),
    [
        ({"CPU": 2.0}, 2, None, False),  # this machine: no GPU key at all
        ({"CPU": 16.0, "GPU": 0.0}, 1, None, False),
        ({"CPU": 16.0, "GPU": 1.0}, 2, None, False),  # one GPU cannot give two workers one each
        ({"CPU": 16.0, "GPU": 2.0}, 2, None, True),
        ({"CPU": 64.0, "GPU": 8.0}, 4, None, True),
        ({"CPU": 16.0, "GPU": 2.0}, 2, False, False),  # --no-gpu wins
    ],
)
def test_use_gpu_follows_the_cluster(cluster: dict, workers: int, gpu: bool | None, use_gpu: bool) -> None:
    plan = decide_workers(cluster, num_workers=workers, cpus_per_worker=0.5, gpu=gpu)
    assert plan.use_gpu is use_gpu and plan.num_workers == workers
    expected = {"CPU": 0.5, "GPU": 1.0} if use_gpu else {"CPU": 0.5}
    assert plan.resources_per_worker == expected
    assert plan.why


def test_fractional_gpus_and_explicit_gpu() -> None:
    plan = decide_workers({"GPU": 1.0}, num_workers=2, cpus_per_worker=1, gpus_per_worker=0.5)
    assert plan.use_gpu and plan.resources_per_worker == {"CPU": 1, "GPU": 0.5}
    assert decide_workers({"GPU": 2.0}, num_workers=2, cpus_per_worker=1, gpu=True).use_gpu
    with pytest.raises(ValueError, match=r"Got --gpu with 0 GPU\(s\) in the cluster; expected at least 2"):
        decide_workers({"CPU": 8.0}, num_workers=2, cpus_per_worker=1, gpu=True)
    with pytest.raises(ValueError, match="Got 0 for num_workers; expected >= 1"):
        decide_workers({}, num_workers=0, cpus_per_worker=1)
    with pytest.raises(ValueError, match="Got 0 for cpus_per_worker"):
        decide_workers({}, num_workers=1, cpus_per_worker=0)


def test_gpu_setting() -> None:
    assert parse_gpu_setting(None) is None and parse_gpu_setting("auto") is None
    assert parse_gpu_setting("on") is True and parse_gpu_setting("OFF") is False
    with pytest.raises(ValueError, match="Got 'maybe' for \\$VISIONFLEET_TRAIN_GPU; expected auto, on or off"):
        parse_gpu_setting("maybe")


def test_storage_local_stays_a_path(tmp_path: Path) -> None:
    path, fs = ray_storage(tmp_path / "runs" / "_ray")
    assert path == str(tmp_path / "runs" / "_ray") and fs is None


def test_storage_on_s3_strips_the_scheme_and_uses_the_endpoint(s3_env: str) -> None:
    import pyarrow.fs as pafs

    path, fs = ray_storage(f"{s3_env}/runs/_ray")
    assert path == f"{s3_env[len('s3://'):]}/runs/_ray"
    assert isinstance(fs, pafs.S3FileSystem)
    with fs.open_output_stream(f"{path}/probe.txt") as f:  # the server behind AWS_ENDPOINT_URL answers
        f.write(b"ok")
    with fs.open_input_stream(f"{path}/probe.txt") as f:
        assert f.read() == b"ok"


def test_train_config_refuses_bad_failure_settings(tmp_path: Path) -> None:
    from train.loop import TrainConfig

    assert TrainConfig(dataset=str(tmp_path)).max_failures == 1
    with pytest.raises(ValueError, match="Got -1 for max_failures; expected >= 0"):
        TrainConfig(dataset=str(tmp_path), max_failures=-1)
    with pytest.raises(ValueError, match="Got 0 for checkpoint_every; expected >= 1"):
        TrainConfig(dataset=str(tmp_path), checkpoint_every=0)
