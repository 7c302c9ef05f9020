"""serve_apps.runner: the in-process model cache and the per-batch contract.

Real registry, real ONNX files and ONNX Runtime sessions (toy graphs from
test_edge_bundle); no Ray.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_edge_bundle import SIZE, toy_registry

from serve_apps.runner import LocalModels, load_version, run_batch
from visionfleet.inference import RuntimeOptions


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    reg, _ = toy_registry(tmp_path_factory.mktemp("localmodels"), versions=3)
    return reg


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(1) as p:
        yield p


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_cache_loads_once_under_concurrency_and_evicts_least_recently_used(registry) -> None:
    models = LocalModels(registry, RuntimeOptions(threads=1), capacity=2)

    async def go() -> None:
        first = await asyncio.gather(*[models.get("toy:1") for _ in range(5)])
        assert all(m is first[0] for m in first) and models.loads == 1
        await models.get("toy:2")
        await models.get("toy:1")  # toy:1 is now the most recently used
        await models.get("toy:3")  # evicts toy:2
        assert models.loaded == ["toy:1", "toy:3"] and models.evictions == 1 and models.loads == 3
        await models.get("toy:2")
        assert models.loaded == ["toy:3", "toy:2"] and models.loads == 4

    asyncio.run(go())


def test_run_matches_onnx_runtime_and_errors_are_per_request(registry, pool) -> None:
    models = LocalModels(registry, RuntimeOptions(threads=1))
    x = _images(3)
    direct = load_version(registry, RuntimeOptions(threads=1), "toy:2").run(x)[0]

    async def go() -> None:
        out = await models.run("toy:2", x, pool)
        assert out.error is None and out.status == 200
        assert np.allclose(out.outputs[0], direct, atol=1e-6)
        missing = await models.run("toy:99", x, pool)
        assert missing.status == 404 and missing.outputs is None and "toy" in missing.error
        bad_id = await models.run("toy:latest", x, pool)
        assert bad_id.status == 400 and "NAME:VERSION" in bad_id.error
        wrong = await models.run("toy:2", np.zeros((1, SIZE + 1, SIZE, 3), np.uint8), pool)
        assert wrong.status == 400 and f"[k, {SIZE}, {SIZE}, 3]" in wrong.error
        assert models.loaded == ["toy:2"]  # failed loads are not cached
        assert (models.runs, models.images) == (1, 3)  # only the successful call counts

    asyncio.run(go())


def test_run_batch_is_one_onnx_runtime_call_and_refuses_malformed_batches(registry, pool) -> None:
    model = load_version(registry, RuntimeOptions(threads=1), "toy:1")
    a = _images(5, seed=1)

    async def go():
        return (await run_batch(model, "toy:1", a, pool),
                await run_batch(model, "toy:1", a.astype(np.float32), pool),
                await run_batch(model, "toy:1", a[0], pool))

    ok, as_float, one_image = asyncio.run(go())
    assert ok.error is None and np.allclose(ok.outputs[0], model.run(a)[0], atol=1e-6)
    for bad in (as_float, one_image):
        assert bad.status == 400 and bad.outputs is None and f"[k, {SIZE}, {SIZE}, 3]" in bad.error


def test_a_version_that_does_not_load_is_a_server_error_not_a_client_error(registry, pool, tmp_path) -> None:
    from serve_apps.runner import failure
    from visionfleet.registry import NotFound

    assert failure(NotFound("no toy:7"), "toy:7").status == 404
    assert failure(ValueError("Got model id 'x'; expected NAME:VERSION"), "x").status == 400
    broken = failure(ValueError("Got a detection model d:1 without outputs ['boxes']"), "d:1")
    assert broken.status == 500 and "could not be loaded" in broken.error


def test_capacity_must_be_positive(registry) -> None:
    with pytest.raises(ValueError, match="capacity"):
        LocalModels(registry, RuntimeOptions(), capacity=0)
