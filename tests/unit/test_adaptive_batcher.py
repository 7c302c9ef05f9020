"""serve_apps.batching.AdaptiveBatcher: batches form from the queue, not from a timer."""

from __future__ import annotations

import asyncio

import pytest

from serve_apps.batching import AdaptiveBatcher


class Recorder:
    """A batch function that records its calls and how many run at once."""

    def __init__(self, delay: float = 0.0, fail_on: object = None, wrong_count: bool = False) -> None:
        self.calls: list[tuple[object, list]] = []
        self.delay = delay
        self.running = 0
        self.max_running = 0
        self.fail_on = fail_on
        self.wrong_count = wrong_count

    async def __call__(self, key, items):
        self.calls.append((key, list(items)))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(self.delay)
            if self.fail_on is not None and self.fail_on in items:
                raise ValueError(f"bad item {self.fail_on}")
            out = [(key, i * 10) for i in items]
            return out[:-1] if self.wrong_count else out
        finally:
            self.running -= 1


def run(coro):
    return asyncio.run(coro)


def test_a_lone_request_goes_at_once_without_waiting():
    rec = Recorder()
    b = AdaptiveBatcher(rec, max_batch_size=16)

    result = run(b.submit("m:1", 3))
    assert result == ("m:1", 30)
    assert rec.calls == [("m:1", [3])]
    assert b.batch_wait_timeout_s == 0.0  # the default: no timer holds a lone request back


def test_batches_grow_from_what_queues_while_slots_are_busy():
    rec = Recorder(delay=0.05)
    b = AdaptiveBatcher(rec, max_batch_size=8, max_concurrent=1)

    async def go():
        first = asyncio.ensure_future(b.submit("m:1", 0))
        await asyncio.sleep(0.01)  # the first request is alone in the queue: it leaves at once
        return [await first, *await asyncio.gather(*(b.submit("m:1", i) for i in range(1, 20)))]

    results = run(go())
    assert results == [("m:1", i * 10) for i in range(20)]  # every caller gets its own item's result
    sizes = [len(items) for _, items in rec.calls]
    assert sum(sizes) == 20
    assert max(sizes) == 8 and sizes[0] == 1  # the first went alone, the rest queued behind it
    assert sizes == [1, 8, 8, 3]
    assert rec.max_running == 1
    assert b.calls == 4 and b.items == 20 and b.avg_batch_size == 5.0
    flat = [i for _, items in rec.calls for i in items]
    assert flat == list(range(20))  # arrival order kept


def test_two_slots_pipeline_calls():
    rec = Recorder(delay=0.05)
    b = AdaptiveBatcher(rec, max_batch_size=4, max_concurrent=2)

    async def go():
        return await asyncio.gather(*(b.submit("k", i) for i in range(10)))

    assert run(go()) == [("k", i * 10) for i in range(10)]
    assert rec.max_running == 2
    assert max(len(items) for _, items in rec.calls) <= 4


def test_one_call_per_key_in_a_batch():
    rec = Recorder(delay=0.02)
    b = AdaptiveBatcher(rec, max_batch_size=16, max_concurrent=1)

    async def go():
        first = asyncio.ensure_future(b.submit("a:1", 0))
        await asyncio.sleep(0)  # the first batch leaves alone; the rest queue behind it
        rest = [b.submit("a:1" if i % 2 else "b:1", i) for i in range(1, 7)]
        return [await first, *await asyncio.gather(*rest)]

    results = run(go())
    assert results == [("a:1", 0)] + [("a:1" if i % 2 else "b:1", i * 10) for i in range(1, 7)]
    assert rec.calls[0] == ("a:1", [0])
    later = dict(rec.calls[1:])
    assert later == {"a:1": [1, 3, 5], "b:1": [2, 4, 6]}


def test_an_error_reaches_every_caller_of_that_call_only():
    rec = Recorder(delay=0.02, fail_on=5)
    b = AdaptiveBatcher(rec, max_batch_size=4, max_concurrent=1)

    async def go():
        return await asyncio.gather(*(b.submit("k", i) for i in range(9)), return_exceptions=True)

    results = run(go())
    failed_call = next(items for _, items in rec.calls if 5 in items)
    for i, r in enumerate(results):
        if i in failed_call:
            assert isinstance(r, ValueError) and "bad item 5" in str(r)
        else:
            assert r == ("k", i * 10)


def test_a_wrong_result_count_is_an_error_not_a_mixup():
    b = AdaptiveBatcher(Recorder(wrong_count=True), max_batch_size=4)
    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        run(b.submit("k", 1))


def test_max_batch_size_one_is_batching_off_with_no_slot_limit():
    rec = Recorder(delay=0.05)
    b = AdaptiveBatcher(rec, max_batch_size=1, max_concurrent=1)

    async def go():
        return await asyncio.gather(*(b.submit("k", i) for i in range(10)))

    assert run(go()) == [("k", i * 10) for i in range(10)]
    assert [len(items) for _, items in rec.calls] == [1] * 10
    assert rec.max_running == 10  # all sent at once, as without a batcher


def test_wait_timeout_collects_late_arrivals():
    rec = Recorder()
    b = AdaptiveBatcher(rec, max_batch_size=8, batch_wait_timeout_s=0.3, max_concurrent=1)

    async def go():
        first = asyncio.ensure_future(b.submit("k", 1))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(b.submit("k", 2))
        return await asyncio.gather(first, second)

    assert run(go()) == [("k", 10), ("k", 20)]
    assert rec.calls == [("k", [1, 2])]


def test_a_cancelled_caller_is_skipped_and_the_others_are_served():
    rec = Recorder(delay=0.05)
    b = AdaptiveBatcher(rec, max_batch_size=8, max_concurrent=1)

    async def go():
        tasks = [asyncio.ensure_future(b.submit("k", 0))]
        await asyncio.sleep(0.01)  # item 0 is running alone
        tasks += [asyncio.ensure_future(b.submit("k", i)) for i in range(1, 5)]
        await asyncio.sleep(0.01)  # 1..4 are queued behind it
        tasks[2].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return done

    done = run(go())
    assert isinstance(done[2], asyncio.CancelledError)
    assert [d for i, d in enumerate(done) if i != 2] == [("k", 0), ("k", 10), ("k", 30), ("k", 40)]
    assert all(2 not in items for _, items in rec.calls)


def test_knobs_change_at_run_time_and_are_checked():
    b = AdaptiveBatcher(Recorder(), max_batch_size=4)
    b.set_max_batch_size(32)
    b.set_batch_wait_timeout_s(0.01)
    b.set_max_concurrent(3)
    assert (b.max_batch_size, b.batch_wait_timeout_s, b.max_concurrent) == (32, 0.01, 3)
    for bad in (lambda: b.set_max_batch_size(0), lambda: b.set_batch_wait_timeout_s(-1), lambda: b.set_max_concurrent(0)):
        with pytest.raises(ValueError, match="expected"):
            bad()


def test_the_concurrency_cap_holds_across_model_keys():
    """Requests for several versions at once never put more than max_concurrent calls in flight."""
    rec = Recorder(delay=0.03)
    b = AdaptiveBatcher(rec, max_batch_size=8, max_concurrent=2)

    async def go():
        return await asyncio.gather(*(b.submit(f"m:{i % 5}", i) for i in range(40)))

    assert run(go()) == [(f"m:{i % 5}", i * 10) for i in range(40)]
    assert rec.max_running == 2
    assert all(len({k}) == 1 for k, _ in rec.calls)  # one key per call
    for key in {f"m:{i}" for i in range(5)}:  # each key's items in arrival order
        flat = [i for k, items in rec.calls if k == key for i in items]
        assert flat == sorted(flat)


def test_the_batch_cap_counts_images_not_requests():
    """Sixteen 64-image requests never become one 1,024-image call."""
    import numpy as np

    seen: list[int] = []
    running = 0
    peak = 0

    async def fn(key, arrays):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        seen.append(sum(len(a) for a in arrays))
        await asyncio.sleep(0.02)
        running -= 1
        return [len(a) for a in arrays]

    b = AdaptiveBatcher(fn, max_batch_size=128, max_concurrent=1, size=len)

    async def go():
        reqs = [np.zeros((64, 2, 2, 3), np.uint8) for _ in range(16)] + [np.zeros((200, 2, 2, 3), np.uint8)]
        return await asyncio.gather(*(b.submit("m:1", r) for r in reqs))

    out = run(go())
    assert out == [64] * 16 + [200]
    assert max(seen[:-1]) <= 128 and seen[-1] == 200  # an oversized request goes alone, not merged
    assert sum(seen) == 16 * 64 + 200
    assert b.units == 16 * 64 + 200 and b.items == 17
    assert peak == 1
