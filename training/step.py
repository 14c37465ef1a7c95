"""The optimisation machinery both trainers share: budget, seeding, temporary LoRA, prompts, one step.

Why one engine: the few-shot and the generic (zero-shot) trainer differ only in where batches come from and
what they build at the end; the step itself (features through the temporary LoRA, learnable prompts, text
losses, clipping, cosine schedule) must behave identically, and must survive being interleaved with
prediction batches of other adapters on the same backbone.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from sklearn.metrics import roc_auc_score

from clipshot import lora
from clipshot.anomaly_map import upsample
from clipshot.backbone import ClipBackbone
from clipshot.detector import Detector
from clipshot.lora import LoraSpec
from clipshot.prompts import PromptLearner, PromptSpec
from training.losses import LossWeights, combine_losses, compute_loss_parts
from training.progress import CancelToken, Progress, ProgressCallback

__all__ = ["Budget", "StepEngine", "TrainConfig", "auroc", "require_clip", "seeded"]


@dataclass
class TrainConfig:
    """Settings every trainer shares. ``seconds`` counts time inside training steps only; with ``steps``
    also set, whichever runs out first ends training (a seconds budget makes the run non-deterministic)."""

    steps: int | None = 300
    seconds: float | None = None
    batch_size: int = 8
    lr: float = 1e-3
    prompt_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.01
    optimizer: str = "adamw"  # "adamw" | "sgd"
    momentum: float = 0.9  # sgd only
    warmup: float = 0.05  # fraction of the budget with a linear warm-up
    grad_clip: float | None = 1.0
    lora: LoraSpec | None = field(default_factory=LoraSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    losses: LossWeights = field(default_factory=LossWeights)
    temperature: float = 100.0  # must match ScoringConfig.temperature of the adapter built
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is None and self.seconds is None:
            raise ValueError("give a budget: steps and/or seconds")
        if (self.steps is not None and self.steps < 1) or (self.seconds is not None and self.seconds <= 0):
            raise ValueError("steps must be >= 1 and seconds > 0")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.batch_size < 1 or self.lr <= 0 or not 0 <= self.warmup < 1:
            raise ValueError("batch_size must be >= 1, lr > 0 and warmup in [0, 1)")

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists) so it can go straight into a bundle manifest."""
        return json.loads(json.dumps(asdict(self)))


def require_clip(detector: Detector, what: str) -> ClipBackbone:
    if not isinstance(detector.backbone, ClipBackbone):
        raise ValueError(f"{what} needs a CLIP backbone (text tower + attention for LoRA); "
                         f"{detector.backbone.spec} supports the memory branch only")
    return detector.backbone


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch's global RNG for code that only uses it (peft/prompt init, dropout) without disturbing the
    caller's RNG stream: the service's other jobs must not see their randomness shift because we trained."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Image AUROC, or None when only one class is present (undefined)."""
    if len(set(labels)) < 2:
        return None
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores, dtype=np.float64)))


class Budget:
    """Steps and/or seconds: when to stop, how far along (for the cosine schedule), and the ETA."""

    def __init__(self, steps: int | None, seconds: float | None):
        self.steps, self.seconds = steps, seconds

    def done(self, step: int, elapsed: float) -> bool:
        return (self.steps is not None and step >= self.steps) or (self.seconds is not None and elapsed >= self.seconds)

    def fraction(self, step: int, elapsed: float) -> float:
        parts = [step / self.steps] if self.steps else []
        if self.seconds:
            parts.append(elapsed / self.seconds)
        return min(1.0, max(parts))

    def eta(self, step: int, elapsed: float) -> float | None:
        etas = []
        if self.steps is not None and step > 0:
            etas.append(elapsed / step * max(0, self.steps - step))
        if self.seconds is not None:
            etas.append(max(0.0, self.seconds - elapsed))
        return min(etas) if etas else None


class StepEngine:
    """Owns the temporary training LoRA, the prompt learner and the optimiser; ``step`` does one update.

    The LoRA lives under a unique name on the shared backbone until ``close``; every step re-selects it as the
    only trainable adapter, because prediction batches between steps switch (and freeze) adapters.
    """

    def __init__(self, detector: Detector, config: TrainConfig, prompt: PromptSpec, *, dpam: bool,
                 progress: ProgressCallback | None = None, cancel: CancelToken | None = None, tag: str = "train"):
        self.detector = detector
        self.backbone = require_clip(detector, "training")
        self.config, self.dpam = config, dpam
        self.name = f"{tag}-{uuid.uuid4().hex[:12]}"
        self.callback, self.cancel = progress, cancel
        self.budget = Budget(config.steps, config.seconds)
        with torch.inference_mode(False), seeded(config.seed, self.backbone.device):  # trainable even if the
            self.prompts = PromptLearner(self.backbone.model, prompt)  # caller runs under inference_mode
        self.lora_params: list[torch.nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.step_index, self.elapsed = 0, 0.0
        self.losses: list[float] = []

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def visual(self) -> torch.nn.Module:
        return self.backbone.visual

    def start(self) -> None:
        """Inject the zero-initialised LoRA (B = 0: step 0 is exactly the frozen model) and build the optimiser."""
        if self.optimizer is not None:
            return
        cfg = self.config
        if cfg.lora is not None:
            with seeded(cfg.seed + 1, self.backbone.device):
                lora.add_adapter(self.visual, self.name, cfg.lora)
            # peft casts adapters to the base dtype; a half backbone would leave fp16 master weights, which
            # AdamW cannot update reliably, so train in fp32 under autocast.
            self.lora_params = list(lora.adapter_parameters(self.visual, self.name).values())
            for param in self.lora_params:
                param.data = param.data.float()
        groups = [{"params": list(self.prompts.parameters()), "lr": cfg.prompt_lr or cfg.lr}]
        if self.lora_params:
            groups.append({"params": self.lora_params, "lr": cfg.lr})
        for group in groups:
            group["base_lr"] = group["lr"]
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none. The losses work on
        # tau-scaled logits, so gradients are large: torch's default start (2^16, growing every 2000 steps) skips
        # the first ~8 steps on overflow, a real share of a few-hundred-step budget. Start at 2^10, grow sooner.
        self.scaler = torch.amp.GradScaler(self.backbone.device.type, init_scale=2.0**10, growth_interval=100,
                                           enabled=self.backbone.dtype == torch.float16)

    def resident(self) -> bool:
        return self.name in lora.resident_adapters(self.visual)

    def close(self) -> None:
        """Remove the temporary LoRA (idempotent); the shared backbone is left as it was found."""
        if self.resident():
            lora.remove_adapter(self.visual, self.name)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.cancelled:
            self.close()
            self.cancel.raise_if_cancelled()

    def report(self, phase: str, loss: float | None = None, parts: dict[str, float] | None = None) -> Progress:
        eta = self.budget.eta(self.step_index, self.elapsed) if phase == "train" else None
        progress = Progress(phase, self.step_index, self.config.steps, loss, dict(parts or {}), self.elapsed, eta)
        if self.callback is not None:
            self.callback(progress)
        return progress

    def finished(self) -> bool:
        return self.budget.done(self.step_index, self.elapsed)

    # -- one optimisation step -----------------------------------------------------------------------
    @contextmanager
    def _training_mode(self) -> Iterator[list[torch.nn.Parameter]]:
        """Our LoRA active and trainable, its dropout in train mode, everything else untouched; undone after."""
        dropouts = [m.lora_dropout[self.name] for m in self.visual.modules()
                    if isinstance(m, LoraLayer) and self.name in m.lora_dropout]
        params = lora.set_trainable(self.visual, self.name) if self.lora_params else []
        for module in dropouts:
            module.train()
        try:
            yield params
        finally:
            for module in dropouts:
                module.eval()
            lora.activate(self.visual, None)
            for param in params:
                param.requires_grad_(False)

    def text_embeddings(self) -> torch.Tensor:
        """Current (2, D) normal/anomalous prompt embeddings, detached (what an adapter caches)."""
        with torch.inference_mode(False), torch.no_grad():
            return self.prompts().detach().float().clone()

    def loss(self, pixels01: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Image focal + margin on the CLS text score, pixel focal + dice on each layer's upsampled text map of the
        anomalous images, and alignment of normal images' CLS/patch features to the normal prompt.

        Everything is computed on logits ``tau * (cos_anomalous - cos_normal)`` (whose sigmoid is exactly the
        inference-time ``anomaly_probability``): at tau = 100 probabilities saturate, and a clamped saturated
        probability has zero gradient, which would freeze a wrong prediction forever.
        """
        backbone, cfg = self.backbone, self.config
        feats = backbone.extract(backbone.normalise(pixels01), dpam=self.dpam)
        if feats.cls is None:  # a CLIP backbone always returns its CLS embedding
            raise ValueError(f"{backbone.spec} returned no CLS embedding")
        text = self.prompts().float()
        direction = cfg.temperature * (text[1] - text[0])
        labels = labels.to(backbone.device).float()
        parts = compute_loss_parts(cfg.losses, image_scores=feats.cls.float() @ direction, labels=labels,
                                   from_logits=True)
        anomalous = labels > 0.5
        if anomalous.any():
            h, w = feats.grid
            size = (pixels01.shape[-2], pixels01.shape[-1])
            target = masks.to(backbone.device)[anomalous]
            layer_parts = [
                compute_loss_parts(cfg.losses, pixel_scores=upsample((p[anomalous].float() @ direction).view(-1, h, w),
                                                                     size)[:, None],
                                   masks=target, from_logits=True)
                for p in feats.patches
            ]
            parts.update({k: torch.stack([lp[k] for lp in layer_parts]).mean() for k in layer_parts[0]})
        if cfg.losses.alignment > 0 and (~anomalous).any():
            normal = torch.cat([feats.cls[~anomalous][:, None]] + [p[~anomalous] for p in feats.patches], dim=1)
            parts.update(compute_loss_parts(cfg.losses, features=normal, t_normal=text[0], t_anomalous=text[1]))
        return combine_losses(parts, cfg.losses)

    def step(self, pixels01: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> Progress:
        """One update on a batch: (B,3,S,S) images in [0,1], (B,1,S,S) masks, (B,) labels."""
        self.check_cancel()
        started = time.perf_counter()
        with torch.inference_mode(False):  # tensors made under inference_mode could never require grad
            self.start()
        cfg, optimizer, scaler = self.config, self.optimizer, self.scaler
        assert optimizer is not None and scaler is not None
        frac = self.budget.fraction(self.step_index, self.elapsed)
        first = 1.0 / cfg.steps if cfg.steps else 0.01  # so the very first warm-up step does not get lr = 0
        warm = min(1.0, (frac + first) / cfg.warmup) if cfg.warmup else 1.0
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * warm * 0.5 * (1 + math.cos(math.pi * frac))
        with torch.inference_mode(False), torch.enable_grad(), self._training_mode(), \
                seeded(cfg.seed + 7919 * (self.step_index + 1), self.backbone.device):
            self.prompts.train()
            optimizer.zero_grad(set_to_none=True)
            total, parts = self.loss(pixels01, masks, labels)
            scaler.scale(total).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            self.prompts.eval()
        self.step_index += 1
        self.elapsed += time.perf_counter() - started
        self.losses.append(parts["total"])
        return self.report("train", parts["total"], parts)
