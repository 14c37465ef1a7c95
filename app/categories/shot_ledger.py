"""Which images belong to a category: the ones its active version lists, never whatever lies in ``shots/``.

Why: a crash between writing shot files and saving the version that uses them used to leave files that the
next fit silently included (issue 13, item 6). Now the active version's manifest is the ledger: ``shots``
are the good images (registration shots and confirmed goods) the memory was fitted on, ``validation`` the
operator-confirmed defects. Files no version lists are invisible and swept at start-up. Rolling back to
an older version therefore also rolls back the image set, so the served model and the listing always agree.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from app.core.config import Settings
from app.serving.images import decode_image, upright_size
from clipshot.geometry import Geometry
from model_store import AdapterStore, StoreError
from model_store.manifest import Manifest

if TYPE_CHECKING:
    from clipshot.adapter import Adapter

THUMBNAIL_QUALITY = 85  # JPEG quality of shot thumbnails: small files, no visible blocking at 256 px


@dataclass
class Ledger:
    """The category's evidence as of its active version (empty before the first version)."""

    goods: list[dict[str, Any]] = field(default_factory=list)
    defects: list[dict[str, Any]] = field(default_factory=list)
    manifest: Manifest | None = None
    active: int | None = None  # the active version when read: what an edit's compare-and-set expects

    @property
    def good_hashes(self) -> set[str]:
        return {r["sha256"] for r in self.goods}

    @property
    def defect_hashes(self) -> set[str]:
        return {r["sha256"] for r in self.defects}


def _refs(refs: list[Any]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in refs]


def current_ledger(store: AdapterStore, category: str) -> Ledger:
    """The active version's image lists; a category without a readable active version has none."""
    try:
        active = store.active_version(category)
    except StoreError:  # an unreadable pointer: the store's compare-and-set counts it as none
        return Ledger()
    return ledger_at(store, category, active)


def ledger_at(store: AdapterStore, category: str, version: int | None) -> Ledger:
    """The image lists of one version (``version`` is what ``active`` reports, even if unreadable)."""
    if version is None:
        return Ledger()
    try:
        manifest = store.manifest(category, version)
    except StoreError:
        return Ledger(active=version)
    return Ledger(_refs(manifest.shots), _refs(manifest.validation), manifest, version)


def new_refs(stored: list[str], files: list[tuple[str, bytes]], *, source: str, label: str = "good",
             defect_type: str | None = None, note: str | None = None,
             skip: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Manifest entries for freshly stored files, one per distinct image not in ``skip`` (upload order)."""
    now = datetime.now(UTC).isoformat()
    refs, seen = [], set(skip)
    for name, (file_name, _) in zip(stored, files, strict=True):
        digest = name.split(".", 1)[0]
        if digest in seen:
            continue
        seen.add(digest)
        ref = {"name": name, "sha256": digest, "file_name": (file_name or None) and file_name[:255],
               "added_at": now, "source": source, "label": label}
        if defect_type is not None:
            ref["defect_type"] = defect_type
        if note is not None:
            ref["note"] = note
        refs.append(ref)
    return refs


def _read(store: AdapterStore, category: str, ref: dict[str, Any]) -> bytes:
    try:
        return store.shot_path(category, ref["name"]).read_bytes()
    except FileNotFoundError as exc:
        raise StoreError(f"category {category!r}: image {ref['name']} listed by the active version is "
                         "missing from shots/; restore it or activate another version") from exc


def shot_thumbnail(store: AdapterStore, category: str, sha256: str, size: int) -> bytes | None:
    """A JPEG, longer side at most ``size`` px and upright (EXIF applied), of an image the active version lists
    (a good shot or a confirmed defect); None for any other hash. Only listed images are ever read: a hash the
    ledger does not name never becomes a file path."""
    ledger = current_ledger(store, category)
    ref = next((r for r in ledger.goods + ledger.defects if r["sha256"] == sha256), None)
    if ref is None:
        return None
    with Image.open(io.BytesIO(_read(store, category, ref))) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for large frames
        small = ImageOps.exif_transpose(image).convert("RGB")
    small.thumbnail((size, size))
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def decode_refs(store: AdapterStore, category: str, refs: list[dict[str, Any]], settings: Settings, *,
                reduce: int = 1) -> list[Image.Image]:
    """Decode the stored bytes of ``refs`` (same limits as uploads); a missing file is a damaged store.

    ``reduce`` > 1 box-reduces each image right after its decode (``Geometry.working_factor``), so a fit
    over many large shots holds one full-size image at a time, never all of them."""
    images = []
    for ref in refs:
        image = decode_image(_read(store, category, ref), max_pixels=settings.max_image_pixels,
                             max_bytes=settings.max_upload_bytes).image
        if reduce > 1:
            image = image.reduce(reduce)
        images.append(image)
    return images


def stored_sizes(store: AdapterStore, category: str, refs: list[dict[str, Any]],
                 settings: Settings) -> list[tuple[int, int]]:
    """(width, height) of every ref as decoded (EXIF orientation applied), read from headers only."""
    return [upright_size(_read(store, category, ref), max_pixels=settings.max_image_pixels,
                         max_bytes=settings.max_upload_bytes) for ref in refs]


def decode_for_fit(store: AdapterStore, category: str, goods: list[dict[str, Any]],
                   defects: list[dict[str, Any]], settings: Settings, geometry: Geometry | None,
                   default_size: int) -> tuple[list[Image.Image], list[Image.Image], Geometry | None]:
    """(goods, defects, geometry to fit with): the images at working size and the geometry scaled to them.

    The caller fits with the returned geometry and stores ``geometry`` itself, which predictions apply to
    full-size uploads. Without a geometry (a bundle from before geometry: the fit chooses one from the
    image sizes) the images are decoded at full size."""
    factor = 1
    if geometry is not None:
        sizes = stored_sizes(store, category, goods + defects, settings)
        factor = geometry.working_factor(sizes, default_size)
    good_images = decode_refs(store, category, goods, settings, reduce=factor)
    defect_images = decode_refs(store, category, defects, settings, reduce=factor)
    return good_images, defect_images, None if geometry is None else geometry.scaled(factor)


def adapter_facts(adapter: Adapter, kind: str) -> dict[str, Any]:
    """What listings need about a bundle without loading its tensors (kept in the manifest's metrics)."""
    return {"kind": kind, "branches": adapter.branches, "lora": adapter.lora is not None,
            "threshold": adapter.threshold}


def memory_coreset(n_images: int, budget: int) -> float | None:
    """Coreset ratio that keeps the memory near ``budget`` images' worth of patches (None: keep all).

    Why: confirmed goods keep arriving, and memory size sets the cost of every prediction."""
    return None if n_images <= budget else budget / n_images


def validation_facts(calibration: dict[str, Any] | None, goods: int, defects: int) -> dict[str, Any]:
    """What a version measures on the operator-confirmed images (``validation`` in the API).

    ``recall``: share of confirmed defects scoring above the threshold. ``false_alarm_rate``: share of the
    leave-one-out scores of the good images (shots and confirmed goods, each scored against a memory
    without it) above the threshold; reported once there is at least one confirmed good.
    """
    cal = calibration or {}
    threshold = cal.get("threshold")
    scores = cal.get("validation_defect_scores") or []
    normal = cal.get("normal_scores") or []
    recall = None
    if threshold is not None and defects and scores:
        recall = sum(s > threshold for s in scores) / len(scores)
    far = None
    if threshold is not None and goods and normal:
        far = sum(s > threshold for s in normal) / len(normal)
    return {"defects": defects, "recall": recall, "goods": goods, "false_alarm_rate": far}
