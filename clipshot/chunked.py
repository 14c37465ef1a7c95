"""Long device work written as generators that yield between bounded chunks.

Why: the service runs all device work on one thread, and a fit (features of every shot, light views,
synthetic defects, leave-one-out calibration, coreset) can take minutes on large shots. Written as a generator
that yields after each bounded chunk (one feature batch, one leave-one-out fold, a slice of the coreset loop),
the same code runs to the end in one call for the CLI and evaluation (``finish``), while the service's device
worker runs one chunk per task so prediction batches overtake between chunks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Stage:
    """Where a chunked fit stands: ``done`` of ``total`` units (images, folds) of the stage called ``name``.

    Yielded between chunks by the parts of a fit that know their size, so a caller that runs the chunks one by
    one can show real progress without the fit knowing who watches (``reporting``)."""

    name: str
    done: int
    total: int


# Yields between chunks: None, or a Stage where the fit knows its progress (Any: a bare ``yield`` stays valid);
# returns the result.
Steps = Generator[Any, None, T]


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
                value = next(steps)
            except StopIteration as stop:
                return stop.value, seconds + time.perf_counter() - started
            seconds += time.perf_counter() - started
            yield value
    finally:
        steps.close()


def staged(name: str, total: int, steps: Generator[Any, None, T], *, per_chunk: int = 1) -> Steps[T]:
    """``steps`` announcing its progress: ``Stage(name, 0, total)`` first, then after each of its chunks
    ``done`` = chunks x ``per_chunk`` (capped at ``total``), and ``total`` of ``total`` when it ends (with
    ``per_chunk=0`` that is the only progress a stage of unknown length reports)."""
    done = 0
    yield Stage(name, 0, total)
    try:
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                result: T = stop.value
                break
            done = min(total, done + per_chunk)
            yield Stage(name, done, total)
    finally:
        steps.close()
    if done < total:
        yield Stage(name, total, total)
    return result


def reporting(steps: Generator[Any, None, T], report: Callable[[Stage], None]) -> Steps[T]:
    """``steps`` unchanged, handing every ``Stage`` it yields to ``report`` (on the thread that runs the chunk,
    so ``report`` must only remember it, never block)."""
    try:
        while True:
            try:
                value = next(steps)
            except StopIteration as stop:
                return stop.value
            if isinstance(value, Stage):
                report(value)
            yield value
    finally:
        steps.close()
