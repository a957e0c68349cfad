"""Dynamic batching: images from concurrent requests run through the model together.

Requests put their (already decoded and preprocessed) images into one bounded queue. A single worker task takes the
oldest image, waits until ``max_wait_s`` after that image arrived for more to come (or until ``max_batch`` are
there), and runs them as one model call in a dedicated thread, so that the event loop keeps reading requests while
the model computes. While a batch runs, new images queue up; the next batch starts as soon as the model is free.
Images of different kinds (classification, or rollout with given options) are batched separately, in arrival order.

The queue is bounded in images: when a request's images do not fit, :class:`QueueFull` is raised at once (the server
answers 503 with ``Retry-After``), so memory and latency stay bounded under any load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import InvalidValueError


class QueueFull(Exception):
    """The queue has no room for the request's images; ``retry_after`` is a suggested wait in whole seconds."""

    def __init__(self, waiting: int, limit: int, retry_after: int):
        super().__init__(f"server busy: {waiting} images queued (limit {limit}); retry in {retry_after} s")
        self.retry_after = retry_after


class BatcherClosed(Exception):
    """The server is shutting down and takes no new work."""


@dataclass
class _Item:
    key: Hashable
    image: torch.Tensor
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


# a batch function gets the key and a (B, C, H, W) tensor and returns one result per image (any objects)
BatchFunction = Callable[[Hashable, torch.Tensor], Sequence[object]]


class Batcher:
    """Collects images into batches of at most ``max_batch``, waiting at most ``max_wait_s`` after the first, and
    runs ``run_batch`` on them in one background thread. At most ``max_queue`` images wait at any time.

    ``on_batch(size, seconds)`` and ``on_queue(length)`` report to metrics. Use from one event loop; the worker starts
    on the first :meth:`submit` (or :meth:`start`) and :meth:`close` lets it finish everything accepted."""

    def __init__(self, run_batch: BatchFunction, *, max_batch: int = 16, max_wait_s: float = 0.005,
                 max_queue: int = 128, on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise InvalidValueError("max_batch and max_queue must be positive and max_wait_s not negative")
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.on_batch, self.on_queue = on_batch, on_queue
        self._queue: deque[_Item] = deque()
        self._arrival: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closing = False
        self.batch_seconds = 0.0  # moving average of a model call, for Retry-After

    @property
    def waiting(self) -> int:
        """Images queued and not yet in a running batch."""
        return len(self._queue)

    def start(self) -> None:
        """Start the worker on the running event loop (idempotent)."""
        if self._worker is None or self._worker.done():
            if self._closing:
                raise BatcherClosed("the server is shutting down")
            self._arrival = asyncio.Event()
            self._executor = self._executor or concurrent.futures.ThreadPoolExecutor(1, "vitlab-model")
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="vitlab-batcher")

    def check_room(self, count: int) -> None:
        """Raise :class:`QueueFull` now if ``count`` more images would not fit (before any work is spent on them)."""
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if self.waiting + count > self.max_queue:
            batches = math.ceil((self.waiting + count) / self.max_batch)
            retry = max(1, math.ceil(batches * max(self.batch_seconds, self.max_wait_s)))
            raise QueueFull(self.waiting, self.max_queue, retry)

    async def submit(self, key: Hashable, images: torch.Tensor) -> list[object]:
        """Queue the images (N, C, H, W) of one request under ``key``; returns their N results in order."""
        self.check_room(images.shape[0])
        self.start()
        loop = asyncio.get_running_loop()
        items = [_Item(key, image, loop.create_future()) for image in images]
        self._queue.extend(items)
        self._report_queue()
        self._arrival.set()
        return list(await asyncio.gather(*(item.future for item in items)))

    def _report_queue(self) -> None:
        if self.on_queue is not None:
            self.on_queue(len(self._queue))

    def _take_batch(self) -> list[_Item]:
        """The oldest item and the next ones of its kind, up to ``max_batch``; others keep their places."""
        key = self._queue[0].key
        batch, rest = [], deque()
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            (batch if item.key == key else rest).append(item)
        self._queue.extendleft(reversed(rest))
        return batch

    def _ready(self) -> int:
        key = self._queue[0].key
        return sum(1 for item in self._queue if item.key == key)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._arrival.clear()
                await self._arrival.wait()
            deadline = self._queue[0].arrived + self.max_wait_s
            while not self._closing and self._ready() < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            self._report_queue()
            batch = [item for item in batch if not item.future.done()]  # a cancelled request's images are skipped
            if not batch:
                continue
            images = torch.stack([item.image for item in batch])
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, batch[0].key, images)
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} images")
            except Exception as exc:  # the requests get the error; the worker keeps serving
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                seconds = time.perf_counter() - start
                self.batch_seconds = seconds if not self.batch_seconds else 0.8 * self.batch_seconds + 0.2 * seconds
                if self.on_batch is not None:
                    self.on_batch(len(batch), seconds)
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(result)

    async def run_once(self, key: Hashable, images: torch.Tensor) -> list[object]:
        """Run one batch outside the queue (start-up warm-up) in the model thread."""
        self.start()
        return list(await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, key, images))

    async def close(self) -> None:
        """Stop taking work, finish every image already accepted, then stop the worker and its thread."""
        self._closing = True
        if self._worker is not None and not self._worker.done():
            self._arrival.set()
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
