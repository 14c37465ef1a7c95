"""Few-shot registration: fine-tune LoRA + learnable prompts on a new product's 1-16 normal photos.

Why this shape: the memory adapter (no training) is already usable, so fine-tuning is only worth promoting
when it measurably beats it. With no defect photos, the comparison uses held-out shots plus synthetic
anomalies of them (never test data); the final adapter is then rebuilt from ALL shots through the LoRA.
``steps()`` does exactly one optimisation step per ``next()`` so the service's single device worker can
interleave training with prediction batches.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from clipshot import lora
from clipshot.adapter import Adapter
from clipshot.calibration import DecisionPolicy
from clipshot.chunked import Steps, finish, timed
from clipshot.detector import RECOMMENDED_MIN_SHOTS, Detector
from clipshot.fusion import ScoringConfig
from clipshot.geometry import Geometry
from clipshot.memory_branch import MemoryBank
from clipshot.prompts import GENERIC_OBJECT
from clipshot.synthetic.anomalies import AnomalySynthesizer
from clipshot.synthetic.augment import NormalAugment
from training.progress import CancelToken, Progress, ProgressCallback
from training.step import StepEngine, TrainConfig, require_clip
from training.validation import adapter_auroc, synthetic_validation_set

__all__ = ["FewShotConfig", "FewShotResult", "FewShotTrainer", "default_holdout", "train_fewshot"]

MIN_SHOTS = 1
MAX_SHOTS = 16


@dataclass
class FewShotConfig(TrainConfig):
    """Few-shot recipe on top of ``TrainConfig`` (budget, optimiser, LoRA, prompts, loss weights, seed)."""

    anomalies: AnomalySynthesizer = field(default_factory=AnomalySynthesizer)  # .p = share made anomalous
    augment: NormalAugment = field(default_factory=NormalAugment)
    holdout: int | None = None  # None: default_holdout(n)
    val_anomalies_per_shot: int = 4
    val_normal_views: int = 3  # normal-preserving augmentations of each held-out shot, also scored as normal
    min_gain: float = 0.0  # fine-tuned AUROC must exceed memory-only AUROC by more than this
    text_weight: float = 0.5  # ScoringConfig.text_weight of the fine-tuned adapter
    coreset_ratio: float | None = None
    policy: DecisionPolicy | None = None  # decision policy of the result (None: the automatic rule)
    confirmed: tuple[int, ...] = ()  # shots (indices) that are operator-confirmed goods: calibration.floor
    max_shots: int = MAX_SHOTS

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.anomalies.p <= 1:
            raise ValueError("anomalies.p must be in (0, 1]: training needs synthetic anomalies")
        if self.val_anomalies_per_shot < 1 or self.val_normal_views < 0:
            raise ValueError("val_anomalies_per_shot must be >= 1 and val_normal_views >= 0")


def default_holdout(n: int) -> int:
    """max(1, n // 4) held-out shots from 4 shots up; below that every shot is needed for training."""
    return max(1, n // 4) if n >= RECOMMENDED_MIN_SHOTS else 0


@dataclass
class FewShotResult:
    """``adapter`` = fine-tuned (promote only if ``promotable``); ``memory_adapter`` = no-training baseline on
    all shots, the safe fallback."""

    adapter: Adapter
    memory_adapter: Adapter
    metrics: dict
    seconds: float
    promotable: bool
    config: dict


class FewShotTrainer:
    """Trains one product's LoRA + prompts; see the module docstring for the protocol."""

    def __init__(self, detector: Detector, shots: Sequence[Image.Image], *, category: str,
                 object_name: str | None = None, config: FewShotConfig | None = None,
                 progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                 defects: Sequence[Image.Image] = (), geometry: Geometry | None = None,
                 baseline: Adapter | None = None):
        cfg = config or FewShotConfig()
        # The memory adapter already fitted on exactly these shots, defects, policy and geometry (the service's
        # serving memory version): the result reuses it instead of fitting its twin on the device again.
        self.baseline = baseline
        self.defects = list(defects)  # operator-confirmed defects: validation evidence, never trained on
        shots = list(shots)
        if len(shots) < MIN_SHOTS:
            raise ValueError("few-shot training needs at least one normal image")
        if len(shots) > cfg.max_shots:
            raise ValueError(f"{len(shots)} shots given; use at most {cfg.max_shots} (the most representative)")
        if len(shots) < RECOMMENDED_MIN_SHOTS:
            warnings.warn(f"{len(shots)} shot(s): with fewer than {RECOMMENDED_MIN_SHOTS} nothing can be held out "
                          "for validation, so the fine-tuned adapter is never marked promotable", stacklevel=2)
        backbone = require_clip(detector, "few-shot fine-tuning")
        holdout = default_holdout(len(shots)) if cfg.holdout is None else cfg.holdout
        if not 0 <= holdout < len(shots):
            raise ValueError(f"holdout must be in [0, {len(shots) - 1}] for {len(shots)} shots, got {holdout}")
        self.detector, self.config, self.category = detector, cfg, category
        self.object_name = object_name
        self.shots = shots
        order = torch.randperm(len(shots), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        self.held_index, self.train_index = sorted(order[:holdout]), sorted(order[holdout:])
        size = backbone.image_size
        # the category's geometry (auto from the shots when None): training sees the views prediction sees,
        # one training image per view (tile)
        self.geometry = detector.resolve_geometry(geometry, [img.size for img in shots])
        self.train_unit = self.geometry.unit_pixels([shots[i] for i in self.train_index], size)
        name = object_name or category.replace("_", " ").replace("-", " ").strip() or GENERIC_OBJECT
        self.prompt_spec = replace(cfg.prompt, object_name=name) if cfg.prompt.object_name == GENERIC_OBJECT \
            else cfg.prompt
        self.engine = StepEngine(detector, cfg, self.prompt_spec, dpam=False, progress=progress, cancel=cancel,
                                 tag="fewshot")
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.synth = cfg.anomalies
        self.validation = synthetic_validation_set(
            self.geometry.unit_pixels([shots[i] for i in self.held_index], size), list(self.train_unit),
            synthesizer=self.synth,
            augment=cfg.augment, anomalies_per_shot=cfg.val_anomalies_per_shot, normal_views=cfg.val_normal_views,
            seed=cfg.seed + 2) if holdout else None
        self.metrics: dict = {
            "shots": len(shots), "train_shots": len(self.train_index), "holdout": holdout,
            "val_normals": self.validation.normals if self.validation else 0,
            "val_anomalies": self.validation.anomalies if self.validation else 0,
        }
        self.seconds = 0.0

    # -- data and scoring -----------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g, cfg = self.generator, self.config
        picks = torch.randint(len(self.train_unit), (cfg.batch_size,), generator=g).tolist()
        sources = list(self.train_unit)
        images, masks, labels = [], [], []
        for i in picks:
            out, mask, label = self.synth(cfg.augment(self.train_unit[i], g), sources, g)
            images.append(out)
            masks.append(mask)
            labels.append(label)
        return torch.stack(images), torch.stack(masks), torch.tensor(labels, dtype=torch.float32)

    @torch.inference_mode()
    def _bank(self, adapter: Adapter) -> MemoryBank:
        """Memory of the TRAINING shots only, so held-out shots stay unseen during validation."""
        feats = self.detector.features_of([self.shots[i] for i in self.train_index], adapter)
        return self.detector.memory_bank(feats, adapter, self.config.coreset_ratio)

    def _baseline(self) -> None:
        """Memory-only (handcrafted text + memory, no training) and untrained-prompt text AUROCs."""
        if self.validation is None:
            return
        memory = self.detector.text_adapter(category=self.category, object_name=self.object_name,
                                            scoring=self._scoring())
        memory.geometry = self.geometry
        memory.memory = self._bank(memory)
        untrained = Adapter(category=self.category, scoring=self._scoring(), text=self.engine.text_embeddings(),
                            geometry=self.geometry)
        self.metrics.update(auroc_memory=self._auroc(memory), text_auroc_initial=self._auroc(untrained))

    def _auroc(self, adapter: Adapter) -> float | None:
        return None if self.validation is None else adapter_auroc(self.detector, adapter, self.validation)

    def _scoring(self) -> ScoringConfig:
        return ScoringConfig(text_weight=self.config.text_weight, temperature=self.config.temperature)

    # -- protocol -------------------------------------------------------------------------------------
    def steps(self) -> Iterator[Progress]:
        """One optimisation step per ``next()``; cancellation is checked before each. On any exit other than
        exhaustion (cancel, error, ``close()`` of the generator) the temporary LoRA is removed."""
        engine = self.engine
        try:
            while not engine.finished():
                engine.check_cancel()
                if engine.step_index == 0 and "auroc_memory" not in self.metrics:
                    started = time.perf_counter()
                    self._baseline()
                    self.seconds += time.perf_counter() - started
                batch = self._batch()
                before = engine.elapsed
                progress = engine.step(*batch)
                self.seconds += engine.elapsed - before
                yield progress
        except BaseException:
            engine.close()
            raise

    def result(self) -> FewShotResult:
        """Validate, rebuild memory + calibration from all shots through the LoRA, and package the adapter."""
        return finish(self.result_steps())

    def result_steps(self) -> Steps[FewShotResult]:
        """``result`` in bounded chunks of device work (``clipshot.chunked``): the service runs one per task.
        Its seconds count only its own chunks, not the predictions that ran between them."""
        if not self.engine.finished():
            raise RuntimeError("training is not finished: iterate steps() to the end (or call run()) first")
        (adapter, memory_adapter), seconds = yield from timed(self._final_adapters())
        self.seconds += seconds
        engine, cfg = self.engine, self.config
        ft, mem = self.metrics.get("auroc_finetuned"), self.metrics.get("auroc_memory")
        promotable = ft is not None and mem is not None and ft > mem + cfg.min_gain
        rule = (f"auroc_finetuned > auroc_memory + {cfg.min_gain}" if self.validation is not None
                else "no held-out shot (fewer than 4 shots): never promotable")
        if self.defects:  # real defects outrank synthetic ones: the fine-tune must not catch fewer of them
            ft_recall, mem_recall = _recall(adapter), _recall(memory_adapter)
            self.metrics.update(recall_finetuned=ft_recall, recall_memory=mem_recall,
                                confirmed_defects=len(self.defects))
            promotable = promotable and ft_recall >= mem_recall
            rule += " and recall_finetuned >= recall_memory on the confirmed defects"
        k = max(1, min(10, len(engine.losses) // 4))
        self.metrics.update(
            steps=engine.step_index, loss_first=_mean(engine.losses[:k]), loss_last=_mean(engine.losses[-k:]),
            promotable_rule=rule,
        )
        engine.report("done", engine.losses[-1] if engine.losses else None)
        return FewShotResult(adapter, memory_adapter, dict(self.metrics), self.seconds, promotable, cfg.to_dict())

    def _final_adapters(self) -> Steps[tuple[Adapter, Adapter]]:
        """(fine-tuned adapter rebuilt from all shots through the LoRA, memory-only baseline), after validating
        the fine-tune on the held-out shots; the temporary LoRA is dropped however it ends."""
        engine, detector, cfg = self.engine, self.detector, self.config
        try:
            engine.check_cancel()
            engine.report("validate")
            adapter = Adapter(
                category=self.category, scoring=self._scoring(), text=engine.text_embeddings(),
                lora=cfg.lora, lora_state=lora.state(engine.visual, engine.name) if engine.resident() else None,
                prompt=self.prompt_spec, prompt_state=engine.prompts.state(), object_name=self.object_name,
                backbone=detector.layout(), uid=engine.name,  # routes features through the resident training LoRA
                geometry=self.geometry,
            )
            if self.validation is not None:
                adapter.memory = self._bank(adapter)
                yield
                self.metrics.update(auroc_finetuned=self._auroc(adapter))
                yield
                self.metrics.update(text_auroc=self._auroc(replace(adapter, memory=None)))
                yield
            engine.check_cancel()
            engine.report("finalize")
            yield from detector.refit_memory_steps(adapter, self.shots, coreset_ratio=cfg.coreset_ratio,
                                                   policy=cfg.policy, defects=self.defects, confirmed=cfg.confirmed)
            memory_adapter = self.baseline
            if memory_adapter is None:
                memory_adapter = yield from detector.fit_memory_steps(
                    self.shots, category=self.category, object_name=self.object_name,
                    coreset_ratio=cfg.coreset_ratio, policy=cfg.policy, defects=self.defects, geometry=self.geometry,
                    confirmed=cfg.confirmed)
        finally:
            engine.close()
        adapter.uid = uuid.uuid4().hex  # the training LoRA is gone; attach() must inject this one afresh
        return adapter, memory_adapter

    def run(self) -> FewShotResult:
        for _ in self.steps():
            pass
        return self.result()

    def close(self) -> None:
        """Drop the temporary LoRA without building anything (for callers that abandon a job)."""
        self.engine.close()


def _recall(adapter: Adapter) -> float:
    """Share of the confirmed defects above the adapter's own threshold (its calibration scored them)."""
    cal = adapter.calibration
    if cal is None or not cal.validation_defect_scores:
        return 0.0
    scores = cal.validation_defect_scores
    return sum(s > cal.threshold for s in scores) / len(scores)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def train_fewshot(detector: Detector, shots: Sequence[Image.Image], *, category: str,
                  object_name: str | None = None, config: FewShotConfig | None = None,
                  progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                  defects: Sequence[Image.Image] = (), geometry: Geometry | None = None) -> FewShotResult:
    """One-call few-shot training (CLI and scripts); the service drives ``FewShotTrainer.steps`` itself."""
    return FewShotTrainer(detector, shots, category=category, object_name=object_name, config=config,
                          progress=progress, cancel=cancel, defects=defects, geometry=geometry).run()
