"""The checks an upload of good images must pass before anything is written: name, counts, every image, the
product-wide limit and the geometry.

Kept apart from ``CategoryService`` because they read the upload, the settings and the category's ledger only,
never the store's write side: registration, ``check_register`` (the 202 path that must fail with a 4xx the same
way) and feedback all run them first, so a refused upload leaves the store byte-for-byte unchanged.
"""

from __future__ import annotations

from app.categories.geometry import GeometryRequest
from app.categories.shot_ledger import Ledger, stored_sizes
from app.core.config import Settings
from app.errors import BadRequestError, ClipshotHTTPError, ConflictError
from app.serving.images import decode_image
from clipshot.detector import Detector
from clipshot.geometry import Geometry
from model_store import AdapterStore, InvalidName, validate_category


def category_name(category: str) -> str:
    """Validated category slug, or 400 before the name ever touches a path."""
    try:
        return validate_category(category)
    except InvalidName as exc:
        raise BadRequestError(str(exc), code="invalid_category") from exc


def validate_upload(settings: Settings, category: str, files: list[tuple[str, bytes]], *,
                    minimum: int | None = None) -> tuple[str, list[str], list[tuple[int, int]]]:
    """Checks of the upload itself (name, counts, every image); returns (name, content hashes, sizes)."""
    name = category_name(category)
    s = settings
    least = s.min_shots if minimum is None else minimum
    if len(files) < least:
        raise BadRequestError(f"too few images: got {len(files)}, need at least {least}",
                              code="too_few_shots")
    if len(files) > s.max_shots:
        raise BadRequestError(f"too many images: got {len(files)}, at most {s.max_shots} per upload",
                              code="too_many_shots")
    hashes, sizes = [], []
    for filename, data in files:
        try:
            decoded = decode_image(data, max_pixels=s.max_image_pixels, max_bytes=s.max_upload_bytes)
        except ClipshotHTTPError as exc:  # name the offending file: uploads hold up to 16 of them
            exc.message = f"{filename or 'unnamed file'}: {exc.message}"
            raise
        hashes.append(decoded.sha256)
        sizes.append(decoded.size)
    return name, hashes, sizes


def plan_geometry(store: AdapterStore, detector: Detector, settings: Settings, name: str, ledger: Ledger,
                  sizes: list[tuple[int, int]], request: GeometryRequest) -> Geometry:
    """The geometry for all the category's good images (listed + new), checked before anything is written."""
    stored_sizes_ = stored_sizes(store, name, ledger.goods, settings)  # headers: nothing decoded
    try:
        stored = Geometry.from_dict(ledger.manifest.adapter.get("geometry")) if ledger.manifest else None
    except (ValueError, TypeError):
        stored = None
    return request.plan(detector, stored_sizes_ + sizes, stored)


def check_total(settings: Settings, ledger: Ledger, hashes: list[str]) -> list[str]:
    """The category-wide limit (listed + new, deduplicated); checked under the category lock. Returns the
    registration's notes (duplicates in the upload, fewer shots than recommended)."""
    s = settings
    conflict = ledger.defect_hashes & set(hashes)
    if conflict:
        raise ConflictError(f"{len(conflict)} image(s) are confirmed defects of this product; a defect "
                            "cannot also be a good shot", code="label_conflict")
    total = len(ledger.good_hashes | set(hashes))
    if total > s.max_category_images:
        raise BadRequestError(
            f"too many good images: the product would hold {total}, at most {s.max_category_images}; "
            "remove some with DELETE /v1/categories/{category}/shots/{sha256}", code="too_many_shots")
    notes = []
    if len(set(hashes)) < len(hashes):
        notes.append(f"{len(hashes) - len(set(hashes))} duplicate image(s) in the upload were stored once")
    if total < s.recommended_min_shots:
        notes.append(f"only {total} shot(s); {s.recommended_min_shots}-{s.max_shots} good photos give reliable "
                     "thresholds (and fine-tuning needs at least 4 to validate itself)")
    return notes
