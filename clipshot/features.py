"""The one data structure that flows from a backbone into the scoring branches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FEATURE_BATCH = 32  # images (views, for tiles) per backbone forward when extracting many: bounded memory


@dataclass
class Features:
    """Per-image embeddings of one batch.

    ``cls`` lives in the joint image-text space (``None`` for vision-only backbones); ``patches`` holds one
    L2-normalised ``(B, h*w, D)`` tensor per selected layer, all on the same ``grid``. With ``views`` > 1
    (tiles) each row holds one image's views stacked vertically: ``grid`` is then (views * h, w), so
    per-image code (memory, calibration, image score) sees an image with all its tiles.
    """

    cls: torch.Tensor | None
    patches: list[torch.Tensor]
    grid: tuple[int, int]
    views: int = 1

    @property
    def batch_size(self) -> int:
        return self.patches[0].shape[0]

    @classmethod
    def cat(cls, parts: list[Features]) -> Features:
        """Concatenate batches (same layers and grid) back into one."""
        clses = [p.cls for p in parts if p.cls is not None]  # one backbone: every part has a CLS, or none
        return cls(
            cls=torch.cat(clses) if len(clses) == len(parts) else None,
            patches=[torch.cat([p.patches[i] for p in parts]) for i in range(len(parts[0].patches))],
            grid=parts[0].grid,
            views=parts[0].views,
        )

    def select(self, index: torch.Tensor | slice) -> Features:
        """Rows ``index`` of every tensor, so callers can split a batch without knowing the layout."""
        return Features(
            cls=None if self.cls is None else self.cls[index],
            patches=[p[index] for p in self.patches],
            grid=self.grid,
            views=self.views,
        )

    def per_image(self, views: int) -> Features:
        """Group ``views`` consecutive rows (one image's tiles) into one row; CLS = their normalised mean."""
        if views == 1:
            return self
        n = self.batch_size // views
        cls = None if self.cls is None else torch.nn.functional.normalize(
            self.cls.reshape(n, views, -1).mean(dim=1), dim=-1)
        patches = [p.reshape(n, views * p.shape[1], p.shape[2]) for p in self.patches]
        return Features(cls=cls, patches=patches, grid=(views * self.grid[0], self.grid[1]), views=views)
