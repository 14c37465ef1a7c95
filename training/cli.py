"""``clipshot train fewshot|generic`` handlers (parsers: ``app/cli/train.py``): train an adapter, save a bundle.

Why a CLI next to the service: registering a product offline (on a GPU box, from a folder of photos) and building
the generic zero-shot adapter from an auxiliary dataset are batch jobs; the bundle they write is what the service
loads. Bad input fails fast with one line, before any model is loaded where possible.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from clipshot.backbone import ClipBackbone, load_backbone
from clipshot.detector import Detector
from clipshot.evaluation.dataset import IMAGE_SUFFIXES
from model_store import AdapterStore, StoreError, validate_category
from model_store.adapters import save_adapter
from training.fewshot import MAX_SHOTS, MIN_SHOTS, FewShotConfig, FewShotTrainer
from training.generic import GenericConfig, GenericTrainer, load_auxiliary
from training.progress import Progress

__all__ = ["run_fewshot", "run_generic"]

class InputError(ValueError):
    """Bad command-line input; the message is printed as one line."""


# -- input checks -------------------------------------------------------------------------------------------
def collect_shots(items: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); every path must exist."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"shot path {item} does not exist")
    if not paths:
        raise InputError(f"no images found in {' '.join(items)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(paths) < MIN_SHOTS or len(paths) > MAX_SHOTS:
        raise InputError(f"{len(paths)} shots given; few-shot training takes {MIN_SHOTS}-{MAX_SHOTS} normal images")
    return paths


def read_images(paths: list[Path]) -> tuple[list[Image.Image], list[bytes]]:
    images, blobs = [], []
    for path in paths:
        data = path.read_bytes()
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InputError(f"cannot read image {path}: {exc}") from exc
        blobs.append(data)
    return images, blobs


def make_detector(args: argparse.Namespace, what: str) -> Detector:
    try:
        backbone = load_backbone(args.backbone, device=args.device, precision=args.precision)
    except (ValueError, RuntimeError) as exc:  # BackboneSpecError / BackboneLoadError / bad device
        raise InputError(f"backbone {args.backbone!r}: {exc}") from exc
    if not isinstance(backbone, ClipBackbone):
        raise InputError(f"{what} needs a CLIP backbone; {backbone.spec} supports the memory branch only "
                         "(register the product through the service's memory adapter instead)")
    return Detector(backbone)


def budget(args: argparse.Namespace) -> dict:
    if args.steps is not None and args.steps < 1:
        raise InputError("--steps must be >= 1")
    if args.seconds is not None and args.seconds <= 0:
        raise InputError("--seconds must be > 0")
    out: dict = {"seed": args.seed}
    if args.steps is not None or args.seconds is not None:
        out.update(steps=args.steps, seconds=args.seconds)
    return out


class Bar:
    """tqdm bar fed by ``Progress`` callbacks (loss and ETA in the postfix)."""

    def __init__(self, total: int | None, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, progress: Progress) -> None:
        if progress.phase == "train":
            self.bar.update(progress.step - self.bar.n)
            eta = "?" if progress.eta_seconds is None else f"{progress.eta_seconds:.0f}s"
            self.bar.set_postfix(loss=f"{progress.loss:.4f}", eta=eta, refresh=False)
        else:
            self.bar.set_description_str(progress.phase)

    def close(self) -> None:
        self.bar.close()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# -- handlers -------------------------------------------------------------------------------------------------
def run_fewshot(args: argparse.Namespace) -> int:
    """Train, then save: fine-tuned active if promotable; otherwise it is saved inactive and the memory adapter
    becomes active only when the category has no active version yet (never demote what already serves)."""
    try:
        category = validate_category(args.category)
        paths = collect_shots(args.shots)
        images, blobs = read_images(paths)
        config = FewShotConfig(**budget(args))
        detector = make_detector(args, "few-shot fine-tuning")
        store = AdapterStore(args.store)
    except (InputError, StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar = Bar(config.steps, f"train {category}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = FewShotTrainer(detector, images, category=category, object_name=args.object_name,
                                     config=config, progress=bar)
        result = trainer.run()
    except KeyboardInterrupt:
        print("\ncancelled; nothing was written", file=sys.stderr)
        return 130
    finally:
        bar.close()
    names = store.save_shots(category, [(path.name, blob) for path, blob in zip(paths, blobs, strict=True)])
    shots = [{"name": name, "sha256": hashlib.sha256(b).hexdigest()} for name, b in zip(names, blobs, strict=True)]
    training = {"config": result.config, "seconds": result.seconds, "kind": "fewshot"}
    had_active = store.active_version(category) is not None
    version = save_adapter(store, detector, result.adapter, activate=result.promotable, shots=shots,
                           training=training, metrics=result.metrics, promotable=result.promotable)
    m = result.metrics
    print(f"saved {category} v{version} ({'active' if result.promotable else 'inactive'}) "
          f"under {Path(args.store) / 'categories' / category / f'v{version}'}")
    if not result.promotable and not had_active:
        mem_version = save_adapter(store, detector, result.memory_adapter, activate=True, shots=shots,
                                   training={"config": {"kind": "memory"}, "seconds": 0.0, "kind": "memory"},
                                   metrics={"auroc_memory": m.get("auroc_memory")}, promotable=False)
        print(f"saved memory adapter {category} v{mem_version} (active)")
    print(f"validation AUROC: memory-only {_fmt(m.get('auroc_memory'))}, fine-tuned {_fmt(m.get('auroc_finetuned'))}"
          f" ({m['holdout']} held-out shot(s), {m['val_normals']} normal / {m['val_anomalies']} synthetic images); "
          f"promotable: {result.promotable}; {result.seconds:.1f}s")
    return 0


def run_generic(args: argparse.Namespace) -> int:
    """Train the generic adapter and save it as the active generic bundle (there is no baseline to beat)."""
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    try:
        if not Path(args.data).is_dir():
            raise InputError(f"dataset root {args.data} does not exist or is not a directory")
        config = GenericConfig(**budget(args))
        detector = make_detector(args, "generic (zero-shot) training")
        store = AdapterStore(args.store)
        data = load_auxiliary(args.data, categories, detector.backbone.image_size,
                              max_per_category=config.max_per_category, seed=config.seed)
    except (InputError, StoreError, ValueError) as exc:  # DatasetError is a ValueError: bad dataset layout
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar = Bar(config.steps, "train generic")
    try:
        result = GenericTrainer(detector, data, config=config, progress=bar).run()
    except KeyboardInterrupt:
        print("\ncancelled; nothing was written", file=sys.stderr)
        return 130
    finally:
        bar.close()
    version = save_adapter(store, detector, result.adapter, activate=True, generic=True,
                           training={"config": result.config, "seconds": result.seconds, "kind": "generic"},
                           metrics=result.metrics, promotable=True)
    m = result.metrics
    print(f"saved generic v{version} (active) under {Path(args.store) / 'generic' / f'v{version}'}")
    print(f"trained on {m['images']} images ({m['anomalous']} defective) from {len(m['categories'])} categories; "
          f"loss {_fmt(m['loss_first'])} -> {_fmt(m['loss_last'])}; {result.seconds:.1f}s")
    return 0
