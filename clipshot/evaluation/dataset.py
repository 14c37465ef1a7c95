"""Reading a dataset laid out like MVTec AD.

Layout: ``<root>/<category>/train/good/*``, ``<root>/<category>/test/<defect>/*`` and
``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``; ``test/good`` has no masks.
Listings are sorted by file name so that shot selection and reports do not depend on the order
the file system returns entries in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MaskSize = Literal["full"] | int


class DatasetError(ValueError):
    """The root does not look like an MVTec-AD-layout dataset; the message says what is missing."""


@dataclass(frozen=True)
class Sample:
    """One test image: label 0 for ``good``, 1 otherwise; ``mask_path`` is None for good images."""

    path: Path
    defect: str
    label: int
    mask_path: Path | None

    @property
    def name(self) -> str:
        """``<defect>/<file name>``: unique within a category, used in titles and reports."""
        return f"{self.defect}/{self.path.name}"


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: p.name)


def _category_dir(root: str | Path, category: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a directory")
    folder = root / category
    if not folder.is_dir():
        raise DatasetError(f"category {category!r} not found under {root} "
                           f"(available: {', '.join(list_categories(root)) or 'none'})")
    return folder


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of sub-folders that have both ``train/good`` and ``test``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a directory")
    found = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and (p / "train" / "good").is_dir() and (p / "test").is_dir())
    if not found:
        raise DatasetError(f"no category under {root}: expected <root>/<category>/train/good and "
                           "<root>/<category>/test/<defect>")
    return found


def list_train_good(root: str | Path, category: str) -> list[Path]:
    """Normal training images of a category, sorted by file name (the pool shots are drawn from)."""
    folder = _category_dir(root, category) / "train" / "good"
    if not folder.is_dir():
        raise DatasetError(f"missing folder {folder}")
    files = _images_in(folder)
    if not files:
        raise DatasetError(f"no images in {folder}")
    return files


def list_test_samples(root: str | Path, category: str) -> list[Sample]:
    """All test images sorted by (defect, file name), each with its label and mask path.

    Every non-good image must have ``ground_truth/<defect>/<stem>_mask.png``; a missing mask is an
    error rather than a silent all-normal mask, which would corrupt the pixel metrics.
    """
    cat_dir = _category_dir(root, category)
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"missing folder {test_dir}")
    samples: list[Sample] = []
    for defect_dir in sorted((p for p in test_dir.iterdir() if p.is_dir()), key=lambda p: p.name):
        defect = defect_dir.name
        for path in _images_in(defect_dir):
            if defect == "good":
                samples.append(Sample(path, defect, 0, None))
                continue
            mask_path = cat_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
            if not mask_path.is_file():
                raise DatasetError(f"missing ground-truth mask {mask_path} for test image {path}")
            samples.append(Sample(path, defect, 1, mask_path))
    if not samples:
        raise DatasetError(f"no test images under {test_dir}")
    return samples


def load_image(path: str | Path) -> Image.Image:
    """RGB image fully read into memory (so the file handle is closed at once)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def parse_mask_size(value: str | int) -> MaskSize:
    """CLI value -> ``"full"`` or a positive int side length."""
    if value == "full":
        return "full"
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"mask size must be 'full' or a positive integer, got {value!r}") from None
    if size <= 0:
        raise ValueError(f"mask size must be positive, got {size}")
    return size


def mask_shape(sample: Sample, size: MaskSize) -> tuple[int, int]:
    """(H, W) at which the sample's mask (and so its anomaly map) is evaluated."""
    if size != "full":
        return (int(size), int(size))
    with Image.open(sample.mask_path or sample.path) as img:  # reads only the header
        return (img.height, img.width)


def load_mask(sample: Sample, size: MaskSize = "full") -> np.ndarray:
    """Ground truth as a bool (H, W) array.

    ``"full"`` keeps the native mask resolution (for good images: the image's own size); an int
    gives a square ``size x size`` mask by nearest-neighbour resizing, which keeps it binary.
    Pixels >= 128 count as anomalous.
    """
    if sample.mask_path is None:
        return np.zeros(mask_shape(sample, size), dtype=bool)
    with Image.open(sample.mask_path) as img:
        mask = img.convert("L")
    if size != "full":
        mask = mask.resize((int(size), int(size)), Image.Resampling.NEAREST)
    return np.asarray(mask) >= 128
