"""Polling for something another thread or process will make true (a broker delivery, a watched file)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout: float) -> bool:
    """True as soon as ``condition()`` is truthy, False if ``timeout`` seconds pass first (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
