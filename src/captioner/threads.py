"""How many CPU threads a phase of captioning uses: chosen for the machine as it is at that moment.

PyTorch runs every parallel operation on a fixed team of OpenMP threads, one per core, and each
operation ends with the team waiting for its slowest member. When other programs keep the cores
busy, one member is often descheduled and the rest wait a whole scheduler slice for it, at every
operation: a beam-3 caption that takes 0.3 s on a quiet machine took 6.7 s beside two busy
processes. So each phase takes only the cores that are free right now (the cores this process may
use minus the other runnable tasks, ``/proc/loadavg``'s instantaneous count), and never more than
PyTorch's own setting (``torch.set_num_threads``, ``OMP_NUM_THREADS``): on a quiet machine nothing
changes; on a busy one a phase runs on fewer threads instead of waiting for preempted ones.

Training takes the same choice step by step (looked up again every :data:`TRAINING_LOOK_S`), and so
does building a feature cache batch by batch: beside two busy processes the README's shapes training
took 124 s on PyTorch's threads and 44 s this way, 15 s quiet (``benchmarks/busy.py``, 2 cores).
Loading a model is one phase too (:func:`one_phase`).

``CAPTIONER_THREADS=N`` fixes the count for every phase (``CAPTIONER_THREADS=torch`` leaves
PyTorch's setting alone, as before this module existed).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import ParamSpec, TypeVar

from captioner.errors import ConfigError

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

ENV = "CAPTIONER_THREADS"
MAX_THREADS = 1024
LOADAVG = "/proc/loadavg"
SECOND_LOOK_S = 0.001  # seen busy: look again after this long before giving a core up
TRAINING_LOOK_S = 0.5  # training steps and cache batches: how often the free cores are looked up again


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def other_runnable_tasks(path: str = LOADAVG) -> int | None:
    """Threads of other processes that are running or waiting to run right now: the machine's count
    (the fourth field of ``/proc/loadavg``, "running/total") less this process's own running threads
    (the asking one, and PyTorch's workers still spinning after the last operation); None where
    either cannot be read (not Linux)."""
    try:
        with open(path, encoding="ascii") as handle:
            running = int(handle.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that just ended
                with open(f"/proc/self/task/{task}/stat", encoding="ascii", errors="replace") as handle:
                    own += handle.read().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - max(own, 1))


def fixed_threads() -> int | str | None:
    """``CAPTIONER_THREADS`` as a count, ``"torch"``, or None when unset; a bad value is one line."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if value == "torch":
        return value
    if not value.isdigit() or not 1 <= int(value) <= MAX_THREADS:
        raise ConfigError(f"{ENV} must be a whole number from 1 to {MAX_THREADS}, or 'torch', not {value[:40]!r}")
    return int(value)


def threads_now(ceiling: int) -> int:
    """The threads a phase starting now gets: the free cores, at least 1, at most ``ceiling``."""
    fixed = fixed_threads()
    if fixed == "torch":
        return ceiling
    if isinstance(fixed, int):
        return fixed
    others = other_runnable_tasks()
    if others is None:
        return ceiling
    if others:  # a program that keeps a core busy is still runnable a moment later; a passing blip is not
        time.sleep(SECOND_LOOK_S)
        others = min(others, other_runnable_tasks() or 0)
    return max(1, min(ceiling, usable_cores() - others))


@contextlib.contextmanager
def phases_threads(every_s: float = 0.0) -> Iterator[Callable[[], int]]:
    """For a block that runs phase after phase (training steps, batches of a feature cache): yields
    ``next_phase()``, which gives the phase about to start :func:`threads_now` threads of PyTorch's
    setting at entry, looked up again once ``every_s`` seconds have passed since the last look (the
    load changes over seconds; a look costs a millisecond when others run). PyTorch's own setting
    is put back when the block ends. The setting is the calling thread's (OpenMP keeps one per
    thread), so phases in other threads neither see nor undo it."""
    import torch

    ceiling = torch.get_num_threads()
    looked = -math.inf
    threads = ceiling

    def next_phase() -> int:
        nonlocal looked, threads
        if time.monotonic() - looked >= every_s:
            threads, looked = threads_now(ceiling), time.monotonic()
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return threads

    try:
        yield next_phase
    finally:
        if torch.get_num_threads() != ceiling:
            torch.set_num_threads(ceiling)


def on_free_cores(items: Iterable[T], every_s: float = TRAINING_LOOK_S) -> Iterator[T]:
    """``items`` one by one, each phase they start (a training step, a batch to encode) given the
    free cores (:func:`phases_threads`); PyTorch's setting is back when the loop ends, breaks or
    raises (the generator is closed)."""
    with phases_threads(every_s) as next_phase:
        for item in items:
            next_phase()
            yield item


@contextlib.contextmanager
def phase_threads() -> Iterator[int]:
    """Run the block, one phase, on :func:`threads_now` threads; PyTorch's own setting is put back after it."""
    with phases_threads() as next_phase:
        yield next_phase()


def one_phase(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` runs as one phase (:func:`phase_threads`): for work such as loading a model,
    whose few large operations (checking and converting weights) collapse on a busy machine as
    decoding does (profiled beside two busy processes: 3.3 s of a cold caption's 8 s; 0.3 s quiet)."""

    @functools.wraps(function)
    def in_one_phase(*args: P.args, **kwargs: P.kwargs) -> R:
        with phase_threads():
            return function(*args, **kwargs)

    return in_one_phase
