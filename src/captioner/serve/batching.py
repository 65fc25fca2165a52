"""Dynamic batching: requests that arrive close together run through the model as one batch.

:class:`DynamicBatcher` owns one worker thread, the only thread that runs the model. ``submit(key,
item)`` queues an item and returns a :class:`concurrent.futures.Future`; the worker waits up to
``wait_s`` after the oldest queued item arrived (or until ``max_batch`` items with its key are
queued), then takes the oldest item's key and up to ``max_batch`` queued items with that same key,
oldest first, and calls ``run_batch(key, items)`` once for all of them. Items with different keys
(different decoding settings) are never mixed in one call. Each future receives a :class:`Batched`
result: its own output plus how big its batch was and how long it queued and ran.

When the model is busy, requests pile up; the oldest has then already waited ``wait_s``, so the
next batch starts as soon as the model is free, with everything queued meanwhile. Under load,
batches grow on their own; alone, a request waits at most ``wait_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Sequence, TypeVar

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")


class BatcherBusy(Exception):
    """Too many requests are already waiting for the model."""


class BatcherClosed(Exception):
    """The batcher was stopped (the server is shutting down)."""


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One item's result, and the batch it ran in."""

    value: R
    batch_size: int
    queued_s: float  # from submit to the start of its batch
    run_s: float  # how long its batch took


@dataclass
class _Pending(Generic[K, I]):
    key: K
    item: I
    future: Future
    submitted: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchStats:
    """A snapshot of what the batcher did so far."""

    batches: int  # run_batch calls
    items: int  # items run in them
    largest: int  # the largest batch
    sizes: dict[int, int]  # batch size -> how many batches had it
    failed_batches: int  # run_batch calls that raised
    pending: int  # items waiting now
    busy_s: float  # total time spent in run_batch

    def to_dict(self) -> dict[str, object]:
        return {
            "batches": self.batches,
            "images": self.items,
            "largest": self.largest,
            "mean_size": round(self.items / self.batches, 3) if self.batches else 0.0,
            "sizes": {str(size): count for size, count in sorted(self.sizes.items())},
            "failed_batches": self.failed_batches,
            "pending": self.pending,
            "busy_s": round(self.busy_s, 3),
        }


class DynamicBatcher(Generic[K, I, R]):
    """Collects submitted items into batches of equal key and runs them on one worker thread.

    >>> batcher = DynamicBatcher(lambda key, items: [key * x for x in items], max_batch=8, wait_s=0.01)
    >>> with batcher:
    ...     batcher.submit(10, 4).result().value
    40
    """

    def __init__(
        self,
        run_batch: Callable[[K, list[I]], Sequence[R]],
        *,
        max_batch: int,
        wait_s: float,
        max_pending: int = 1024,
        name: str = "captioner-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, not {wait_s}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_pending = max_pending
        self._name = name
        self._pending: list[_Pending[K, I]] = []
        self._condition = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._sizes: Counter[int] = Counter()
        self._failed = 0
        self._busy_s = 0.0

    # ----- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "DynamicBatcher[K, I, R]":
        with self._condition:
            if self._thread is not None:
                return self
            self._closing = False
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Run what is queued, then end the worker. Items submitted afterwards are refused."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._condition:
            self._thread = None
            leftover, self._pending = self._pending, []
        for pending in leftover:  # only if the worker did not finish in time
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(BatcherClosed("the server is shutting down"))

    def __enter__(self) -> "DynamicBatcher[K, I, R]":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._closing

    # ----- submitting --------------------------------------------------------------------------
    def submit(self, key: K, item: I) -> "Future[Batched[R]]":
        """Queue ``item``; the future gets its :class:`Batched` result or ``run_batch``'s exception."""
        future: Future[Batched[R]] = Future()
        with self._condition:
            if self._closing or self._thread is None:
                raise BatcherClosed("the server is not running")
            if len(self._pending) >= self.max_pending:
                raise BatcherBusy(f"{len(self._pending)} requests are already waiting for the model")
            self._pending.append(_Pending(key, item, future))
            self._condition.notify_all()
        return future

    def stats(self) -> BatchStats:
        with self._condition:
            return BatchStats(
                batches=sum(self._sizes.values()),
                items=sum(size * count for size, count in self._sizes.items()),
                largest=max(self._sizes, default=0),
                sizes=dict(self._sizes),
                failed_batches=self._failed,
                pending=len(self._pending),
                busy_s=self._busy_s,
            )

    # ----- the worker --------------------------------------------------------------------------
    def _next_batch(self) -> list[_Pending[K, I]] | None:
        """Wait for the next batch (the oldest item's key, up to ``max_batch`` items); None: stop."""
        with self._condition:
            while not self._pending:
                if self._closing:
                    return None
                self._condition.wait()
            deadline = self._pending[0].submitted + self.wait_s
            while not self._closing:
                key = self._pending[0].key
                if sum(1 for p in self._pending if p.key == key) >= self.max_batch:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            key = self._pending[0].key
            batch: list[_Pending[K, I]] = []
            rest: list[_Pending[K, I]] = []
            for pending in self._pending:
                (batch if pending.key == key and len(batch) < self.max_batch else rest).append(pending)
            self._pending = rest
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]  # drop cancelled ones
            if live:
                self._run(live)

    def _run(self, batch: list[_Pending[K, I]]) -> None:
        start = time.monotonic()
        try:
            outputs = list(self._run_batch(batch[0].key, [p.item for p in batch]))
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} results for {len(batch)} items")
        except BaseException as error:  # every waiting request must hear about it
            run_s = time.monotonic() - start
            with self._condition:
                self._sizes[len(batch)] += 1
                self._failed += 1
                self._busy_s += run_s
            logger.exception("a batch of %d failed", len(batch))
            for pending in batch:
                pending.future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        run_s = time.monotonic() - start
        with self._condition:
            self._sizes[len(batch)] += 1
            self._busy_s += run_s
        for pending, output in zip(batch, outputs):
            pending.future.set_result(Batched(output, len(batch), start - pending.submitted, run_s))
