"""Dynamic batching forms real batches, and its knobs change at run time without a restart."""

from __future__ import annotations

import concurrent.futures as cf

import httpx

from visionfleet.datasets.synth import render_sample
from visionfleet.imaging import encode_image


def _burst(url: str, n: int, concurrency: int) -> list[int]:
    data = encode_image(render_sample(8, 8, 32)[0], "png")

    def one(_: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.post("/v1/predict", content=data, headers={"Content-Type": "image/png"}).status_code

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def test_batches_form_and_knobs_change_in_place(serve_url, settings) -> None:
    from serve_apps.deploy import apply_batching

    with httpx.Client(base_url=serve_url, timeout=30) as c:
        before = c.get("/v1/stats").json()
        assert set(_burst(serve_url, 160, 16)) == {200}
        after = c.get("/v1/stats").json()
        calls = after["ingress"]["replica_calls"] - before["ingress"]["replica_calls"]
        reqs = after["ingress"]["requests"] - before["ingress"]["requests"]
        assert reqs >= 160 and reqs / calls > 1.0, (reqs, calls)  # grouped: fewer model calls than requests
        # the replica runs each batch as it comes: one ONNX Runtime run per ingress call
        ran = after["replica"]["batches"] - before["replica"]["batches"]
        assert ran == calls and after["replica"]["images"] - before["replica"]["images"] == reqs
        doc = apply_batching(settings.home, max_batch_size=1, batch_wait_timeout_s=0.0)
        assert doc["ingress"]["max_batch_size"] == 1
        s1 = c.get("/v1/stats").json()
        assert s1["ingress"]["max_batch_size"] == 1
        # same replica processes (counters kept): reconfigured in place, not restarted
        assert s1["ingress"]["replica_calls"] >= after["ingress"]["replica_calls"]
        assert set(_burst(serve_url, 48, 16)) == {200}
        s2 = c.get("/v1/stats").json()
        assert s2["ingress"]["requests"] - s1["ingress"]["requests"] == s2["ingress"]["replica_calls"] - s1["ingress"]["replica_calls"]
        # an explicit wait and more calls in flight, then back to the defaults
        doc = apply_batching(settings.home, max_batch_size=16, batch_wait_timeout_s=0.002, max_concurrent_batches=3)
        assert doc["ingress"]["max_concurrent_batches"] == 3
        s3 = c.get("/v1/stats").json()["ingress"]
        assert (s3["max_batch_size"], s3["batch_wait_timeout_s"], s3["max_concurrent_batches"]) == (16, 0.002, 3)
        assert set(_burst(serve_url, 48, 16)) == {200}
        apply_batching(settings.home, max_batch_size=16, batch_wait_timeout_s=0.0, max_concurrent_batches=2)
        s4 = c.get("/v1/stats").json()["ingress"]
        assert (s4["max_batch_size"], s4["batch_wait_timeout_s"], s4["max_concurrent_batches"]) == (16, 0.0, 2)


def test_many_image_batch_requests_are_not_merged_past_the_cap(serve_url) -> None:
    """The cap counts images: concurrent 40-image requests (cap 16) each go alone, never merged into one big call."""
    import base64

    imgs = [base64.b64encode(encode_image(render_sample(9, i, 32)[0], "png")).decode() for i in range(40)]

    def one(_: int) -> int:
        with httpx.Client(base_url=serve_url, timeout=60) as c:
            return c.post("/v1/predict/batch", json={"images": imgs}).status_code

    with httpx.Client(base_url=serve_url, timeout=30) as c:
        before = c.get("/v1/stats").json()
        with cf.ThreadPoolExecutor(6) as pool:
            assert set(pool.map(one, range(12))) == {200}
        after = c.get("/v1/stats").json()
    calls = after["ingress"]["replica_calls"] - before["ingress"]["replica_calls"]
    images = after["ingress"]["images"] - before["ingress"]["images"]
    # each 40-image request exceeds the cap of 16 images, so each goes alone: 12 calls of 40
    assert (calls, images) == (12, 480)


def test_the_replica_keeps_max_models_per_replica_versions(serve_url, settings, trained) -> None:
    """ReplicaConfig.max_models_per_replica (4 by default) is the replica's LRU size (Serve's
    @serve.multiplexed used to be hard-coded to 8): six versions round robin evict and reload."""
    from visionfleet.registry import Registry

    reg = Registry(settings.registry_dir)
    src = reg.local_dir("tiny", trained.card.version) / "model.onnx"
    if "mux" not in reg.list_models():
        for _ in range(6):
            reg.register(trained.card.model_copy(update={"name": "mux", "version": None}), {"onnx": src})
    data = encode_image(render_sample(8, 1, 32)[0], "png")
    with httpx.Client(base_url=serve_url, timeout=60) as c:
        before = c.get("/v1/stats").json()["replica"]
        assert before["max_models"] == 4
        for _ in range(2):
            for v in range(1, 7):
                r = c.post(f"/v1/predict?model=mux:{v}", content=data, headers={"Content-Type": "image/png"})
                assert r.status_code == 200, r.text
        after = c.get("/v1/stats").json()["replica"]
    # an LRU of 4 over 6 versions in turn misses every time: 12 loads (an LRU of 8 would load 6)
    assert after["loads"] - before["loads"] == 12
