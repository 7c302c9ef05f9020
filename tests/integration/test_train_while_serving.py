"""A Ray Train fit runs while the Serve app keeps answering (2 cores hold both)."""

from __future__ import annotations

import threading
import time

import httpx

from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image


def test_fit_while_serving(serve_url, settings, tiny_dataset) -> None:
    from train.loop import TrainConfig, fit

    data = encode_image(render_sample(5, 5, 48)[0], "jpeg")
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=serve_url, timeout=30) as c:
            while not stop.is_set():
                try:
                    statuses.append(c.post("/v1/predict", content=data, headers={"Content-Type": "image/jpeg"}).status_code)
                except httpx.HTTPError:
                    statuses.append(-1)
                time.sleep(0.05)

    t = threading.Thread(target=load)
    t.start()
    try:
        cfg = TrainConfig(
            dataset=str(tiny_dataset),
            arch={"arch": "mobilenetv3", "width": 8, "stem_stride": 2},
            input_size=32,
            epochs=1,
            batch_size=64,
            limit_train=256,
            wandb=False,
            run_name="it-train-while-serving",
        )
        result = fit(cfg, runs_dir=settings.runs_dir, wandb_dir=settings.home / "wandb")
    finally:
        stop.set()
        t.join()
    assert result.checkpoint.is_file() and result.metrics["epoch"] == 1
    assert len(statuses) >= 10
    assert set(statuses) == {200}, f"failed requests during training: {[s for s in statuses if s != 200]}"
