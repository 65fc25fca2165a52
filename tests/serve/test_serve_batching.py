"""The dynamic batcher on its own: batches form, keys never mix, one thread runs everything."""

from __future__ import annotations

import threading
import time

import pytest

from captioner.serve.batching import BatcherBusy, BatcherClosed, DynamicBatcher


class Recorder:
    """A run_batch that records its calls, can be held at the gate, and checks it never overlaps."""

    def __init__(self, fail_on: object = None) -> None:
        self.calls: list[tuple[object, list[int]]] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on = fail_on
        self._running = False

    def __call__(self, key: object, items: list[int]) -> list[tuple[object, int]]:
        assert not self._running, "run_batch called concurrently"
        self._running = True
        try:
            self.threads.add(threading.get_ident())
            self.calls.append((key, list(items)))
            self.entered.set()
            self.gate.wait(10)
            if key == self.fail_on:
                raise ValueError(f"cannot run {key}")
            return [(key, item * 10) for item in items]
        finally:
            self._running = False


def hold_first_batch(batcher: DynamicBatcher, recorder: Recorder) -> object:
    """Submit one item and keep its batch running, so what is submitted next piles up."""
    recorder.gate.clear()
    future = batcher.submit("warm", 0)
    assert recorder.entered.wait(5)
    return future


def test_single_item_waits_at_most_the_window() -> None:
    recorder = Recorder()
    with DynamicBatcher(recorder, max_batch=8, wait_s=0.05) as batcher:
        start = time.monotonic()
        result = batcher.submit("k", 4).result(timeout=5)
        elapsed = time.monotonic() - start
    assert result.value == ("k", 40)
    assert result.batch_size == 1
    assert 0.04 <= elapsed < 2.0
    assert result.queued_s >= 0.04


def test_items_queued_while_the_model_is_busy_run_as_one_batch() -> None:
    recorder = Recorder()
    with DynamicBatcher(recorder, max_batch=16, wait_s=0.0) as batcher:
        first = hold_first_batch(batcher, recorder)
        futures = [batcher.submit("k", i) for i in range(1, 11)]
        recorder.gate.set()
        results = [f.result(timeout=5) for f in futures]
        first.result(timeout=5)
        stats = batcher.stats()
    assert [r.value for r in results] == [("k", i * 10) for i in range(1, 11)]
    assert {r.batch_size for r in results} == {10}
    assert recorder.calls[1] == ("k", list(range(1, 11)))
    assert stats.batches == 2 and stats.items == 11 and stats.largest == 10
    assert stats.sizes == {1: 1, 10: 1}


def test_concurrent_submitters_within_the_window_share_a_batch() -> None:
    recorder = Recorder()
    results: dict[int, object] = {}
    barrier = threading.Barrier(12)
    with DynamicBatcher(recorder, max_batch=32, wait_s=0.2) as batcher:

        def client(i: int) -> None:
            barrier.wait()
            results[i] = batcher.submit("k", i).result(timeout=10)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = batcher.stats()
    assert {i: r.value for i, r in results.items()} == {i: ("k", i * 10) for i in range(12)}
    assert stats.items == 12
    assert stats.batches < 12
    assert stats.largest > 1


def test_different_keys_are_never_mixed_and_oldest_key_goes_first() -> None:
    recorder = Recorder()
    with DynamicBatcher(recorder, max_batch=16, wait_s=0.0) as batcher:
        first = hold_first_batch(batcher, recorder)
        order = ["a", "b", "a", "c", "b", "a", "c", "a"]
        futures = [batcher.submit(key, i) for i, key in enumerate(order)]
        recorder.gate.set()
        values = [f.result(timeout=5).value for f in futures]
        first.result(timeout=5)
    assert values == [(key, i * 10) for i, key in enumerate(order)]
    batches = recorder.calls[1:]
    assert batches == [("a", [0, 2, 5, 7]), ("b", [1, 4]), ("c", [3, 6])]


def test_max_batch_is_respected() -> None:
    recorder = Recorder()
    with DynamicBatcher(recorder, max_batch=4, wait_s=0.0) as batcher:
        first = hold_first_batch(batcher, recorder)
        futures = [batcher.submit("k", i) for i in range(10)]
        recorder.gate.set()
        sizes = [f.result(timeout=5).batch_size for f in futures]
        first.result(timeout=5)
    assert [len(items) for _, items in recorder.calls[1:]] == [4, 4, 2]
    assert sizes == [4] * 8 + [2] * 2


def test_a_full_batch_does_not_wait_for_the_window() -> None:
    recorder = Recorder()
    with DynamicBatcher(recorder, max_batch=3, wait_s=30.0) as batcher:
        start = time.monotonic()
        futures = [batcher.submit("k", i) for i in range(3)]
        assert [f.result(timeout=5).value for f in futures] == [("k", 0), ("k", 10), ("k", 20)]
        assert time.monotonic() - start < 5


def test_one_worker_thread_runs_every_batch() -> None:
    recorder = Recorder()
    with DynamicBatcher(recorder, max_batch=2, wait_s=0.001) as batcher:
        futures = []
        threads = [threading.Thread(target=lambda i=i: futures.append(batcher.submit(i % 3, i))) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for future in futures:
            future.result(timeout=5)
    assert len(recorder.threads) == 1
    assert threading.get_ident() not in recorder.threads


def test_a_failing_batch_fails_its_requests_only() -> None:
    recorder = Recorder(fail_on="bad")
    with DynamicBatcher(recorder, max_batch=8, wait_s=0.0) as batcher:
        first = hold_first_batch(batcher, recorder)
        bad = [batcher.submit("bad", i) for i in range(3)]
        good = batcher.submit("good", 7)
        recorder.gate.set()
        for future in bad:
            with pytest.raises(ValueError, match="cannot run bad"):
                future.result(timeout=5)
        assert good.result(timeout=5).value == ("good", 70)
        assert batcher.submit("good", 1).result(timeout=5).value == ("good", 10)  # still serving
        first.result(timeout=5)
        assert batcher.stats().failed_batches == 1


def test_cancelled_requests_are_skipped() -> None:
    recorder = Recorder()
    with DynamicBatcher(recorder, max_batch=8, wait_s=0.0) as batcher:
        first = hold_first_batch(batcher, recorder)
        futures = [batcher.submit("k", i) for i in range(4)]
        assert futures[1].cancel()
        recorder.gate.set()
        assert [futures[i].result(timeout=5).value for i in (0, 2, 3)] == [("k", 0), ("k", 20), ("k", 30)]
        first.result(timeout=5)
    assert recorder.calls[1] == ("k", [0, 2, 3])


def test_too_many_pending_requests_are_refused() -> None:
    recorder = Recorder()
    with DynamicBatcher(recorder, max_batch=8, wait_s=0.0, max_pending=3) as batcher:
        first = hold_first_batch(batcher, recorder)
        futures = [batcher.submit("k", i) for i in range(3)]
        with pytest.raises(BatcherBusy):
            batcher.submit("k", 99)
        recorder.gate.set()
        for future in futures:
            future.result(timeout=5)
        first.result(timeout=5)


def test_stop_runs_what_is_queued_then_refuses_new_work() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch=8, wait_s=5.0)
    with pytest.raises(BatcherClosed):
        batcher.submit("k", 1)  # not started
    batcher.start()
    futures = [batcher.submit("k", i) for i in range(3)]
    batcher.stop()
    assert [f.result(timeout=5).value for f in futures] == [("k", 0), ("k", 10), ("k", 20)]
    assert not batcher.running
    with pytest.raises(BatcherClosed):
        batcher.submit("k", 1)


def test_stats_are_json_ready() -> None:
    recorder = Recorder()
    with DynamicBatcher(recorder, max_batch=8, wait_s=0.0) as batcher:
        batcher.submit("k", 1).result(timeout=5)
        stats = batcher.stats().to_dict()
    assert stats["batches"] == 1 and stats["images"] == 1 and stats["sizes"] == {"1": 1}
    assert stats["pending"] == 0 and stats["failed_batches"] == 0
