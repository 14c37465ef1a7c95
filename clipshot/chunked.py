"""Long device work written as generators that yield between bounded chunks.

Why: the service runs all device work on one thread, and a fit (features of every shot, light views,
synthetic defects, leave-one-out calibration, coreset) can take minutes on large shots. Written as a generator
that yields after each bounded chunk (one feature batch, one leave-one-out fold, a slice of the coreset loop),
the same code runs to the end in one call for the CLI and evaluation (``finish``), while the service's device
worker runs one chunk per task so prediction batches overtake between chunks.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any, TypeVar

T = TypeVar("T")

Steps = Generator[None, None, T]  # yields None between chunks; returns the result


def finish(steps: Generator[Any, None, T]) -> T:
    """Run ``steps`` to the end in this call and return its result (the plain, blocking form)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def timed(steps: Generator[Any, None, T]) -> Steps[tuple[T, float]]:
    """``steps`` yielding where it yields, returning (its result, seconds spent inside its own chunks): the cost
    of the work itself, without the time other tasks ran between its chunks."""
    seconds = 0.0
    try:
        while True:
            started = time.perf_counter()
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value, seconds + time.perf_counter() - started
            seconds += time.perf_counter() - started
            yield
    finally:
        steps.close()
