"""The register call's geometry fields -> a validated ``clipshot.geometry.Geometry``, or a 400.

Kept apart from the registry so the rules are in one place: fields given = rebuild the geometry from them
(the rest by the auto rule); none given = keep what the category stores, or choose from the shots when it
is new. Every check runs against every shot (stored and new) before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.errors import BadRequestError
from clipshot.detector import Detector
from clipshot.geometry import TILE_OVERLAP, Geometry, GeometryError


def invalid_geometry(message: str) -> BadRequestError:
    return BadRequestError(message, code="invalid_geometry")


@dataclass(frozen=True)
class GeometryRequest:
    """What the engineer asked for; ``None`` fields are left to the auto rule."""

    resize: str | None = None
    roi: tuple[int, int, int, int] | None = None
    tile: int | None = None
    tile_overlap: float | None = None

    @classmethod
    def parse(cls, *, resize: str | None = None, roi: str | None = None, tile: int | None = None,
              tile_overlap: float | None = None) -> GeometryRequest:
        """Form fields -> request; ``roi`` is ``left,top,right,bottom`` (integers, right/bottom exclusive)."""
        box = None
        if roi is not None and roi.strip():
            parts = [p.strip() for p in roi.split(",")]
            try:
                values = [int(p) for p in parts]
            except ValueError:
                values = []
            if len(values) != 4:
                raise invalid_geometry(f"roi must be four integers left,top,right,bottom; got {roi!r}")
            box = (values[0], values[1], values[2], values[3])
        return cls(None if resize == "auto" else resize, box, tile, tile_overlap)

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.resize, self.roi, self.tile, self.tile_overlap))

    def plan(self, detector: Detector, sizes: Sequence[tuple[int, int]], stored: Geometry | None) -> Geometry:
        """The geometry to fit with, checked against every shot size (width, height); 400 if it cannot apply."""
        try:
            if not self.given and stored is not None:
                return detector.resolve_geometry(stored, sizes)
            overlap = TILE_OVERLAP if self.tile_overlap is None else self.tile_overlap
            return detector.plan_geometry(sizes, resize=self.resize, roi=self.roi, tile=self.tile,
                                          tile_overlap=overlap)
        except GeometryError as exc:
            raise invalid_geometry(f"{exc}; nothing was stored") from exc
