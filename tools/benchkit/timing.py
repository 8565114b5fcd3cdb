"""Timed loops: every lap synchronises the device before and after, warm-up laps are not counted."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); a no-op elsewhere."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates laps of work on ``device``: ``with watch.lap(counted=i >= warmup): ...``."""

    def __init__(self, device="cpu") -> None:
        self.device = device
        self.laps: list[float] = []

    @contextlib.contextmanager
    def lap(self, counted: bool = True) -> Iterator[None]:
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        if counted:
            self.laps.append(time.perf_counter() - start)

    @property
    def total(self) -> float:
        return sum(self.laps)

    @property
    def median(self) -> float:
        return statistics.median(self.laps) if self.laps else float("nan")


def time_calls(fn: Callable[[], Any], device="cpu", repeats: int = 3, warmup: int = 1) -> tuple[Any, Stopwatch]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; (last output, the stopwatch)."""
    watch, out = Stopwatch(device), None
    for i in range(warmup + repeats):
        with watch.lap(counted=i >= warmup):
            out = fn()
    return out, watch


def interleaved(names: list[str], rounds: int, run: Callable[[str], Any]) -> dict[str, list[Any]]:
    """``run(name)`` for every name, ``rounds`` times over, round by round with odd rounds in reverse order:
    a machine that speeds up or slows down during the run hits every name alike, and the median over rounds
    keeps one slow stretch of a shared machine from deciding a ratio. Returns name -> results in round order."""
    results: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(max(1, rounds)):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(run(name))
    return results
