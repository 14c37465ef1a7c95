"""Everything one product needs at inference, and its flat tensor form for safetensors bundles."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

import torch

from clipshot.calibration import Calibration
from clipshot.fusion import ScoringConfig
from clipshot.geometry import Geometry
from clipshot.lora import LoraSpec
from clipshot.memory_branch import MemoryBank
from clipshot.prompts import PromptSpec


def adapter_uid(kind: str, name: str, version: int | None) -> str:
    """A peft-safe adapter name (peft keys adapters in ModuleDicts: no '.' allowed) that cannot collide
    between a category called "generic" and the generic bundle."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{kind}_{name}_v{version}")


@dataclass
class Adapter:
    """A product's adapter: cached text embeddings, memory bank, LoRA, prompts, calibration.

    ``backbone`` records the layer/resolution layout the tensors were made with, so a bundle is never
    applied to features of another shape; ``geometry`` says which pixels of an upload the model sees.
    """

    category: str
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    text: torch.Tensor | None = None
    memory: MemoryBank | None = None
    lora: LoraSpec | None = None
    lora_state: dict[str, torch.Tensor] | None = None
    prompt: PromptSpec | None = None
    prompt_state: dict[str, torch.Tensor] | None = None
    calibration: Calibration | None = None
    object_name: str | None = None
    backbone: dict = field(default_factory=dict)
    geometry: Geometry = field(default_factory=Geometry)
    # None: the scoring was fixed by whoever built the adapter; a dict: the product chose it from its own shots
    # at calibration (``clipshot.scoring_selection``: the rule, the choice, every candidate's evidence).
    selection: dict | None = None
    # The (views * H, W) normal level its maps are divided by (``clipshot.position_baseline``), or None; and the
    # evidence that decided it (None: the product never weighed one).
    baseline: torch.Tensor | None = None
    baseline_choice: dict | None = None
    # What the shots looked like (median size, colour): lets a server tell an upload unlike them; None = unknown
    shot_images: dict | None = None
    version: int | None = None
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def threshold(self) -> float | None:
        """The verdict's threshold; None when uncalibrated or when the evidence supports no verdict yet
        (``Calibration.verdicts``: predictions then carry the score only)."""
        cal = self.calibration
        return None if cal is None or not cal.verdicts else cal.threshold

    @property
    def branches(self) -> list[str]:
        return [name for name, part in (("text", self.text), ("memory", self.memory)) if part is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of the adapter's tensors (memory bank, text embeddings, LoRA and prompt state): what holding
        it costs a cache tier."""
        loose = [self.text, *(self.lora_state or {}).values(), *(self.prompt_state or {}).values()]
        loose.append(self.baseline)
        return (0 if self.memory is None else self.memory.nbytes) + sum(
            t.numel() * t.element_size() for t in loose if t is not None)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        if self.text is not None:
            tensors["text.embeddings"] = self.text.detach().cpu().float().contiguous()
        if self.memory is not None:
            for i, layer in enumerate(self.memory.layers):
                tensors[f"memory.layer{i}"] = layer.detach().cpu().contiguous()
            for i, center in enumerate(self.memory.centers or []):
                tensors[f"memory.center{i}"] = center.detach().cpu().float().contiguous()
        if self.baseline is not None:
            tensors["memory.baseline"] = self.baseline.detach().cpu().float().contiguous()
        for key, value in (self.lora_state or {}).items():
            tensors[f"lora.{key}"] = value.detach().cpu().float().contiguous()
        for key, value in (self.prompt_state or {}).items():
            tensors[key] = value.detach().cpu().float().contiguous()
        return tensors

    def config(self) -> dict:
        return {
            "scoring": self.scoring.to_dict(),
            "lora": None if self.lora is None else self.lora.to_dict(),
            "prompt": None if self.prompt is None else self.prompt.to_dict(),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "memory_layers": 0 if self.memory is None else len(self.memory.layers),
            "memory_centered": self.memory is not None and self.memory.centered,
            "memory_stages": None if self.memory is None else self.memory.stages,
            "memory_stage_pools": None if self.memory is None else self.memory.pools,
            "object_name": self.object_name,
            "backbone": self.backbone,
            "geometry": self.geometry.to_dict(),
            "scoring_selection": self.selection,
            "position_baseline": self.baseline_choice,
            "shot_images": self.shot_images,
        }

    @classmethod
    def from_tensors(cls, category: str, tensors: dict[str, torch.Tensor], config: dict,
                     version: int | None = None) -> Adapter:
        """Inverse of ``to_tensors``/``config``; a missing tensor the config promises is a corrupt bundle."""
        layers = int(config.get("memory_layers", 0))
        try:
            centers = ([tensors[f"memory.center{i}"] for i in range(layers)]
                       if layers and config.get("memory_centered") else None)
            memory = (MemoryBank([tensors[f"memory.layer{i}"] for i in range(layers)], centers,
                                 config.get("memory_stages"), config.get("memory_stage_pools")) if layers else None)
        except KeyError as exc:
            raise ValueError(f"bundle config promises {layers} memory layers but {exc} is missing") from exc
        scoring = dict(config.get("scoring", {}))
        # Written before these settings existed: keep scoring exactly as the bundle was calibrated.
        scoring.setdefault("memory_center", False)
        scoring.setdefault("image_score", "peak")
        scoring.setdefault("memory_stages", False)
        scoring.setdefault("position_baseline", "off")
        scoring.setdefault("memory_stage_grids", False)
        choice = config.get("position_baseline")
        baseline = tensors.get("memory.baseline")
        if choice and choice.get("chosen") == "divided" and baseline is None:
            raise ValueError("bundle config divides maps by a position baseline but memory.baseline is missing")
        lora_state = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
        prompt_state = {k: v for k, v in tensors.items() if k.startswith("prompt.")}
        if config.get("lora") and not lora_state:
            raise ValueError("bundle config has a LoRA spec but no LoRA tensors")
        cal = config.get("calibration")
        return cls(
            category=category,
            scoring=ScoringConfig(**scoring),
            text=tensors.get("text.embeddings"),
            memory=memory,
            lora=LoraSpec(**config["lora"]) if config.get("lora") else None,
            lora_state=lora_state or None,
            prompt=PromptSpec(**config["prompt"]) if config.get("prompt") else None,
            prompt_state=prompt_state or None,
            calibration=Calibration.from_dict(cal) if cal else None,
            object_name=config.get("object_name"),
            backbone=dict(config.get("backbone", {})),
            geometry=Geometry.from_dict(config.get("geometry")),
            selection=config.get("scoring_selection"),
            baseline=baseline,
            baseline_choice=choice,
            shot_images=config.get("shot_images"),
            version=version,
            uid=adapter_uid("c", category, version) if version is not None else uuid.uuid4().hex,
        )
