"""``clipshot eval --feedback N``: an operator correcting the first N wrong verdicts, measured on unseen images.

Rule (documented so anybody can redo it by hand): within each defect type (``good`` included) the test images
are sorted by file name; even positions (0, 2, 4, ...) form the *operator half*, odd positions the *held-out
half*. The operator walks the operator half in order of position, round-robin over the types (position 0 of
every type, then position 2, ...), and corrects the first N wrong verdicts: false alarms are confirmed good
(they join the normal memory), missed defects are confirmed defects (they join the validation evidence).
Decision metrics are reported on the held-out half before and after, so the gain is not measured on the very
images that were fed back.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

from PIL import Image

from .dataset import Sample


class RefineAdapter(Protocol):
    """Re-fit ``adapter`` with confirmed goods (memory) and confirmed defects (validation evidence)."""

    def __call__(self, adapter: Any, shots: list[Image.Image], goods: list[Image.Image],
                 defects: list[Image.Image]) -> Any: ...


def split_halves(samples: Sequence[Sample]) -> tuple[list[int], list[int]]:
    """(operator half in feedback order, held-out half) as indices into ``samples`` (see the module rule)."""
    by_type: dict[str, list[int]] = defaultdict(list)
    for i in sorted(range(len(samples)), key=lambda i: samples[i].name):
        by_type[samples[i].defect].append(i)
    operator: list[tuple[int, str, int]] = []
    held: list[int] = []
    for defect, indices in by_type.items():
        for position, i in enumerate(indices):
            if position % 2 == 0:
                operator.append((position, defect, i))
            else:
                held.append(i)
    return [i for _, _, i in sorted(operator)], sorted(held)


def wrong_verdicts(order: Sequence[int], labels: Sequence[int], scores: Sequence[float], threshold: float,
                   limit: int) -> list[int]:
    """The first ``limit`` indices of ``order`` whose verdict at ``threshold`` disagrees with the label."""
    wrong = [i for i in order if (scores[i] > threshold) != bool(labels[i])]
    return wrong[:limit]
