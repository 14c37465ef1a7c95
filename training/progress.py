"""Progress reports and cooperative cancellation shared by every trainer.

Why: the HTTP service runs training as background jobs on one device worker and the CLI shows a progress bar;
both need the same small vocabulary (what phase, which step, how long left) and a way to stop a job cleanly
between steps without killing the thread that owns the device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["CancelToken", "Cancelled", "Progress", "ProgressCallback"]


@dataclass
class Progress:
    """One progress report; ``step``/``total_steps`` count optimisation steps (``total_steps`` is None when the
    budget is in seconds only), ``elapsed`` is seconds spent inside training steps (not time the device worker
    spent on other jobs between them) and ``eta_seconds`` the estimated remainder of the training phase."""

    phase: str
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    eta_seconds: float | None = None

    def to_dict(self) -> dict:
        return {
            "phase": self.phase, "step": self.step, "total_steps": self.total_steps, "loss": self.loss,
            "parts": dict(self.parts), "elapsed": self.elapsed, "eta_seconds": self.eta_seconds,
        }


ProgressCallback = Callable[[Progress], None]


class Cancelled(Exception):
    """Training was cancelled through its ``CancelToken``; nothing was written and the backbone is clean."""


class CancelToken:
    """Thread-safe cancel flag (a thin ``threading.Event``): the API thread cancels, the device worker checks."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self, what: str = "training") -> None:
        if self._event.is_set():
            raise Cancelled(f"{what} cancelled")
