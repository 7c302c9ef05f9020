"""serve_apps.runner: the in-process model cache and the per-request batch contract.

Real registry, real ONNX files and ONNX Runtime sessions (toy graphs from
test_edge_bundle); no Ray.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_edge_bundle import SIZE, toy_registry

from serve_apps.runner import LocalModels, load_for_serving, run_requests
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
    direct = load_for_serving(registry, RuntimeOptions(threads=1), "toy:2").run(x)[0]

    async def go() -> None:
        out = await models.run("toy:2", x, pool)
        assert out.error is None and out.status == 200 and out.batch_size == 1
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


def test_run_requests_splits_one_call_back_into_requests(registry, pool) -> None:
    model = load_for_serving(registry, RuntimeOptions(threads=1), "toy:1")
    a, b = _images(2, seed=1), _images(1, seed=2)
    bad = np.zeros((1, SIZE, SIZE, 3), np.float32)

    async def go():
        return await run_requests(model, "toy:1", [a, bad, b], pool)

    results, images = asyncio.run(go())
    assert images == 3
    assert results[1].status == 400 and results[1].outputs is None
    assert np.allclose(results[0].outputs[0], model.run(a)[0], atol=1e-6)
    assert np.allclose(results[2].outputs[0], model.run(b)[0], atol=1e-6)
    assert results[0].batch_size == results[2].batch_size == 2


def test_capacity_must_be_positive(registry) -> None:
    with pytest.raises(ValueError, match="capacity"):
        LocalModels(registry, RuntimeOptions(), capacity=0)
