"""Adaptive (queue-driven) dynamic batching for the ingress-to-replica hop.

Ray Serve's ``@serve.batch`` forms a batch by *waiting*: after the first request it
waits up to ``batch_wait_timeout_s`` for more, then hands the batch to a task that
queues for a concurrency slot. On a small CPU with a cheap model that wait is pure loss
at low load, and at high load it synchronizes clients into convoys: every request of a
batch answers at once, the clients send again at once, and the ingress and the replica
take turns instead of working side by side (measured: batching on gave 0.54x–0.84x of
batching off; docs/performance.md#serving).

:class:`AdaptiveBatcher` batches the way Triton's dynamic batcher does with no queue
delay: a batch leaves **as soon as a dispatch slot is free**, carrying everything that
queued up while the slots were busy (up to ``max_batch_size``). At low load every
request goes alone and at once; under load batches grow by themselves to the size the
replica's speed calls for. ``max_concurrent`` slots (2 by default) keep one batch
computing on the replica while the next one travels, so the hop is pipelined. An
optional ``batch_wait_timeout_s`` > 0 adds Serve's wait on top, for models where a
bigger batch is worth the latency. ``max_batch_size == 1`` turns batching off: every
request is sent at once, with no slot limit (the "batching off" of the benchmarks).

Requests are grouped by key (the model id): a batch carries one key, and the
``max_concurrent`` slots are shared by every key, so the cap on calls in flight holds
however many versions are served. The batch cap counts ``size(item)`` (the ingress
passes the number of images a request carries), so many multi-image requests never
merge into one oversized call; a single item larger than the cap goes alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Awaitable, Callable, Hashable

__all__ = ["AdaptiveBatcher"]

BatchFn = Callable[[Hashable, list[Any]], Awaitable[list[Any]]]
SizeFn = Callable[[Any], int]


def _one(_: Any) -> int:
    return 1


class AdaptiveBatcher:
    """Queue-driven batching of ``submit(key, item)`` calls into ``fn(key, items)`` calls.

    ``fn`` must return one result per item, in order; an exception it raises becomes the
    result of every item of that call (raised to each caller).
    """

    def __init__(self, fn: BatchFn, *, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.0,
                 max_concurrent: int = 2, size: SizeFn = _one) -> None:
        self._fn = fn
        self._size = size
        self.set_max_batch_size(max_batch_size)
        self.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.set_max_concurrent(max_concurrent)
        self._queue: deque[tuple[Hashable, Any, asyncio.Future]] = deque()
        self._in_flight = 0
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # running batches (asyncio keeps only weak references)
        self.calls = 0  # fn calls made
        self.items = 0  # items carried by them
        self.units = 0  # their total size (images, for the ingress)

    # ------------------------------------------------------------------ knobs
    def set_max_batch_size(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"Got {n} for max_batch_size; expected >= 1")
        self.max_batch_size = int(n)

    def set_batch_wait_timeout_s(self, s: float) -> None:
        if float(s) < 0:
            raise ValueError(f"Got {s} for batch_wait_timeout_s; expected >= 0")
        self.batch_wait_timeout_s = float(s)

    def set_max_concurrent(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"Got {n} for max_concurrent; expected >= 1")
        self.max_concurrent = int(n)

    @property
    def avg_batch_size(self) -> float:
        return self.items / self.calls if self.calls else 0.0

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ use
    async def submit(self, key: Hashable, item: Any) -> Any:
        """Queue ``item`` under ``key``; returns its result once its batch has run."""
        if self.max_batch_size == 1:  # batching off: no queue, no slot limit
            self.calls += 1
            self.items += 1
            self.units += self._size(item)
            (result,) = await self._call(key, [item])
            if isinstance(result, BaseException):
                raise result
            return result
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._queue.append((key, item, fut))
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = loop.create_task(self._dispatch_loop(self._wake))
        self._wake.set()  # type: ignore[union-attr]
        return await fut

    async def _call(self, key: Hashable, items: list[Any]) -> list[Any]:
        try:
            results = await self._fn(key, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            return list(results)
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
            return [exc] * len(items)

    async def _dispatch_loop(self, wake: asyncio.Event) -> None:
        while True:
            while not self._queue:
                wake.clear()
                await wake.wait()
            while self._in_flight >= self.max_concurrent:
                wake.clear()
                await wake.wait()
            if self.batch_wait_timeout_s > 0 and self._queued_units() < self.max_batch_size:
                deadline = time.monotonic() + self.batch_wait_timeout_s
                while self._queued_units() < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    wake.clear()
                    # asyncio.wait, not wait_for: wait_for on Python 3.11 can hold a
                    # cancelled caller until its timeout when the event fired meanwhile
                    waiter = asyncio.ensure_future(wake.wait())
                    done, _ = await asyncio.wait({waiter}, timeout=left)
                    if not done:
                        waiter.cancel()
                        break
            self._launch(self._take())

    def _queued_units(self) -> int:
        return sum(self._size(item) for _, item, _ in self._queue)

    def _take(self) -> tuple[Hashable, list[tuple[Any, asyncio.Future]]] | None:
        """The next batch: the oldest item's key, and its queued items up to max_batch_size units.

        Items of other keys keep their place in the queue (arrival order kept per key).
        """
        key = None
        taken: list[tuple[Any, asyncio.Future]] = []
        rest: deque[tuple[Hashable, Any, asyncio.Future]] = deque()
        units, full = 0, False
        for entry in self._queue:
            k, item, fut = entry
            if fut.cancelled():
                continue
            if key is None:
                key = k
            if full or k != key:
                rest.append(entry)
                continue
            n = self._size(item)
            if taken and units + n > self.max_batch_size:
                full = True  # the key's later items wait too: its order is kept
                rest.append(entry)
                continue
            taken.append((item, fut))
            units += n
            full = units >= self.max_batch_size
        self._queue = rest
        return (key, taken) if taken else None

    def _launch(self, batch: tuple[Hashable, list[tuple[Any, asyncio.Future]]] | None) -> None:
        if batch is None:
            return
        key, entries = batch
        self._in_flight += 1
        self.calls += 1
        self.items += len(entries)
        self.units += sum(self._size(item) for item, _ in entries)
        task = asyncio.get_running_loop().create_task(self._run(key, entries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Hashable, entries: list[tuple[Any, asyncio.Future]]) -> None:
        results: list[Any] | None = None
        try:
            results = await self._call(key, [item for item, _ in entries])
        finally:  # also when cancelled: no caller is left waiting forever
            self._in_flight -= 1
            for i, (_, fut) in enumerate(entries):
                if fut.done():
                    continue
                res = results[i] if results is not None else RuntimeError("the batch was cancelled")
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
            if self._wake is not None:
                self._wake.set()
