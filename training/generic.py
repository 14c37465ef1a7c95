"""Zero-shot generic adapter (AnomalyCLIP-style): object-agnostic prompts learned on an auxiliary labelled set.

Why: a product with no shots yet still needs a detector. Prompts that say "object" / "damaged object" instead of
a product name, trained on real defects with pixel masks from OTHER products (an MVTec-layout dataset's test
split), transfer to unseen products. DPAM keeps patch tokens local, so the text map localises. The result has
text embeddings (and optionally a LoRA) but no memory bank: there are no normal shots to remember.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipshot import lora
from clipshot.adapter import Adapter
from clipshot.backbone.base import square_resize
from clipshot.detector import ZERO_SHOT_IMAGE_SCORE, Detector
from clipshot.evaluation.dataset import list_categories, list_test_samples, load_image, load_mask
from clipshot.fusion import ScoringConfig
from clipshot.lora import LoraSpec
from clipshot.prompts import GENERIC_OBJECT, PromptSpec
from clipshot.synthetic.augment import color_jitter
from training.progress import CancelToken, Progress, ProgressCallback
from training.step import StepEngine, TrainConfig, require_clip

__all__ = ["GenericConfig", "GenericResult", "GenericTrainer", "load_auxiliary", "train_generic"]


@dataclass
class GenericConfig(TrainConfig):
    """``TrainConfig`` with AnomalyCLIP defaults: object-agnostic prompts, DPAM, no LoRA unless asked for."""

    lora: LoraSpec | None = None
    prompt: PromptSpec = field(default_factory=lambda: PromptSpec(n_ctx=12, object_name=GENERIC_OBJECT))
    dpam: bool = True
    jitter: float = 0.05  # colour jitter only: geometric augmentation would have to move the masks too
    max_per_category: int | None = None  # cap images per category (memory/time); None = all

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt.object_name != GENERIC_OBJECT:
            raise ValueError(f"generic prompts must be object-agnostic (object_name={GENERIC_OBJECT!r})")


@dataclass
class GenericResult:
    adapter: Adapter
    metrics: dict
    seconds: float
    config: dict


@dataclass
class Auxiliary:
    """Auxiliary training set at model resolution: uint8 images (N,3,S,S), bool masks (N,1,S,S), labels (N,)."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    categories: list[str]


def _to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    array = np.asarray(square_resize(image, size), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_auxiliary(root: str | Path, categories: Sequence[str] | None, size: int, *,
                   max_per_category: int | None = None, seed: int = 0) -> Auxiliary:
    """Read the TEST split (images + masks) of an MVTec-layout dataset; stored as uint8 to bound memory."""
    names = list(categories) if categories else list_categories(root)
    images, masks, labels = [], [], []
    for name in names:
        samples = list_test_samples(root, name)
        if max_per_category is not None and len(samples) > max_per_category:
            pick = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:max_per_category]
            samples = [samples[i] for i in sorted(pick.tolist())]
        for sample in samples:
            images.append(_to_uint8(load_image(sample.path), size))
            masks.append(torch.from_numpy(load_mask(sample, size))[None])
            labels.append(sample.label)
    if not images:
        raise ValueError(f"no auxiliary images found under {root}")
    if len(set(labels)) < 2:
        raise ValueError("the auxiliary set needs both good and defective test images")
    return Auxiliary(torch.stack(images), torch.stack(masks), torch.tensor(labels, dtype=torch.float32), names)


class GenericTrainer:
    """Same protocol as ``FewShotTrainer``: ``steps()`` (one update per ``next()``), ``result()``, ``run()``."""

    def __init__(self, detector: Detector, data: Auxiliary, *, config: GenericConfig | None = None,
                 progress: ProgressCallback | None = None, cancel: CancelToken | None = None):
        cfg = config or GenericConfig()
        backbone = require_clip(detector, "generic (zero-shot) training")
        if data.images.shape[-1] != backbone.image_size:
            raise ValueError(f"auxiliary images are {data.images.shape[-1]} px, the backbone takes "
                             f"{backbone.image_size}")
        self.detector, self.config, self.data = detector, cfg, data
        self.engine = StepEngine(detector, cfg, cfg.prompt, dpam=cfg.dpam, progress=progress, cancel=cancel,
                                 tag="generic")
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.seconds = 0.0

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, data = self.config, self.data
        picks = torch.randint(len(data.labels), (cfg.batch_size,), generator=self.generator)
        images = data.images[picks].float().div(255.0)
        if cfg.jitter > 0:
            images = torch.stack([color_jitter(img, self.generator, cfg.jitter, cfg.jitter, cfg.jitter)
                                  for img in images])
        return images, data.masks[picks].float(), data.labels[picks]

    def steps(self) -> Iterator[Progress]:
        """One optimisation step per ``next()``; the temporary LoRA is removed on any early exit."""
        engine = self.engine
        try:
            while not engine.finished():
                engine.check_cancel()
                before = engine.elapsed
                progress = engine.step(*self._batch())
                self.seconds += engine.elapsed - before
                yield progress
        except BaseException:
            engine.close()
            raise

    def result(self) -> GenericResult:
        """Package prompts (cached embeddings + state) and the optional LoRA into a memory-less adapter."""
        if not self.engine.finished():
            raise RuntimeError("training is not finished: iterate steps() to the end (or call run()) first")
        engine, cfg = self.engine, self.config
        started = time.perf_counter()
        try:
            engine.check_cancel()
            adapter = Adapter(
                category="generic", scoring=ScoringConfig(dpam=cfg.dpam, temperature=cfg.temperature,
                                                        image_score=ZERO_SHOT_IMAGE_SCORE),
                text=engine.text_embeddings(), lora=cfg.lora,
                lora_state=lora.state(engine.visual, engine.name) if engine.resident() else None,
                prompt=cfg.prompt, prompt_state=engine.prompts.state(), backbone=self.detector.layout(),
            )
        finally:
            engine.close()
        self.seconds += time.perf_counter() - started
        losses = engine.losses
        k = max(1, min(10, len(losses) // 4))
        metrics = {
            "categories": list(self.data.categories), "images": len(self.data.labels),
            "anomalous": int(self.data.labels.sum()), "steps": engine.step_index,
            "loss_first": sum(losses[:k]) / k if losses else None,
            "loss_last": sum(losses[-k:]) / k if losses else None,
        }
        engine.report("done", losses[-1] if losses else None)
        return GenericResult(adapter, metrics, self.seconds, cfg.to_dict())

    def run(self) -> GenericResult:
        for _ in self.steps():
            pass
        return self.result()

    def close(self) -> None:
        self.engine.close()


def train_generic(detector: Detector, data_root: str | Path, categories: Sequence[str] | None = None, *,
                  config: GenericConfig | None = None, progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None) -> GenericResult:
    """Load the auxiliary set and train a generic adapter in one call (CLI and scripts)."""
    cfg = config or GenericConfig()
    backbone = require_clip(detector, "generic (zero-shot) training")
    data = load_auxiliary(data_root, categories, backbone.image_size, max_per_category=cfg.max_per_category,
                          seed=cfg.seed)
    return GenericTrainer(detector, data, config=cfg, progress=progress, cancel=cancel).run()
