"""Dynamic micro-batching: concurrent requests that can share a forward pass run as one batch.

Every request is split into *items* (one image to caption, one (image, question) pair, ...) submitted with a
*key* naming everything the items of one batch must share (the task and its settings: labels and template
for classification, prompt and decoding settings for captioning). The batcher keeps one queue per key and
runs the oldest queue's items together as soon as it holds ``max_batch`` items or its first item has waited
``max_wait_ms``. While a batch runs, new requests keep arriving, so under load batches fill up by themselves
and an idle server adds at most ``max_wait_ms`` to a request.

Batches run one at a time on a single worker thread (the model is shared; parallel forward passes would
only compete for the same cores). If a batch fails, its items are retried one by one, so a bad input fails
its own request and nothing else. Items whose request gave up (a timeout) are dropped before they run.

The pipeline computes every item of a batch as it would alone (left padding for decoder-only prompts, no
cross-row interaction), so batched results equal unbatched ones; tests check it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vlkit.errors import VlkitError

RunBatch = Callable[[Hashable, list[Any]], list[Any]]


class Overloaded(VlkitError):
    """Too many requests are waiting; the client should retry later (HTTP 503)."""


@dataclass
class _Item:
    payload: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Counters of what the batcher did (exposed on ``/healthz``)."""

    items: int = 0
    batches: int = 0
    largest: int = 0
    dropped: int = 0
    retried: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "batches": self.batches,
            "largest_batch": self.largest,
            "dropped": self.dropped,
            "retried_one_by_one": self.retried,
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


class MicroBatcher:
    """Gathers items per key and runs them in batches on one worker thread.

    Args:
        run: ``run(key, payloads) -> results``, one result per payload in order; called on the worker thread.
        max_batch: most items per batch (1 = no batching).
        max_wait_ms: how long the first item of a batch waits for more.
        max_queue: most items waiting at once; :meth:`submit` raises :class:`Overloaded` beyond it.
    """

    def __init__(self, run: RunBatch, *, max_batch: int = 8, max_wait_ms: float = 5.0, max_queue: int = 1024):
        if max_batch < 1:
            raise VlkitError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise VlkitError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run = run
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.stats = BatchStats()
        self._groups: dict[Hashable, list[_Item]] = {}
        self._waiting = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlkit-model")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop; waiting items fail with :class:`Overloaded`."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for group in self._groups.values():
            for item in group:
                if not item.future.done():
                    item.future.set_exception(Overloaded("the server is shutting down"))
        self._groups.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, key: Hashable, payload: Any) -> Any:
        """Queue one item and wait for its result (exceptions of its run are raised here)."""
        if self._task is None:
            raise VlkitError("the batcher is not running (call start() first)")
        if self._waiting >= self.max_queue:
            raise Overloaded(f"{self._waiting} requests are already waiting; retry later")
        future = asyncio.get_running_loop().create_future()
        self._groups.setdefault(key, []).append(_Item(payload, future))
        self._waiting += 1
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._groups:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key = min(self._groups, key=lambda k: self._groups[k][0].arrived)
            group = self._groups[key]
            deadline = group[0].arrived + self.max_wait
            while len(group) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = group[: self.max_batch]
            del group[: self.max_batch]
            if not group:
                del self._groups[key]
            self._waiting -= len(batch)
            live = [item for item in batch if not item.future.done()]  # a timed-out request cancelled its future
            self.stats.dropped += len(batch) - len(live)
            if live:
                await self._run(loop, key, live)

    async def _run(self, loop: asyncio.AbstractEventLoop, key: Hashable, items: list[_Item]) -> None:
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.largest = max(self.stats.largest, len(items))
        self.stats.sizes[len(items)] = self.stats.sizes.get(len(items), 0) + 1
        try:
            results = await loop.run_in_executor(self._executor, self._call, key, [i.payload for i in items])
        except Exception as err:
            if len(items) == 1:
                _settle(items[0].future, error=err)
                return
            # One bad input must not fail the others: run each item alone.
            self.stats.retried += 1
            for item in items:
                if item.future.done():
                    continue
                try:
                    (result,) = await loop.run_in_executor(self._executor, self._call, key, [item.payload])
                except Exception as single_err:
                    _settle(item.future, error=single_err)
                else:
                    _settle(item.future, result=result)
            return
        for item, result in zip(items, results):
            _settle(item.future, result=result)

    def _call(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        results = list(self.run(key, payloads))
        if len(results) != len(payloads):
            raise VlkitError(f"batch of {len(payloads)} items returned {len(results)} results")
        return results


def _settle(future: asyncio.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # the request gave up meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
