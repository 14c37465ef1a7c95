"""The pure model: backbone + adapter -> image scores and heatmaps. No HTTP, no files, no training loop."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipshot import lora, mixed_batch
from clipshot import scoring_selection as selection
from clipshot.adapter import Adapter
from clipshot.anomaly_map import pixel_map
from clipshot.backbone import Backbone, ClipBackbone
from clipshot.calibration import Calibration, DecisionPolicy, calibrate, light_views
from clipshot.features import Features
from clipshot.fusion import ScoringConfig, fuse_maps, image_score, map_threshold
from clipshot.geometry import TILE_OVERLAP, Geometry, GeometryError, build_geometry
from clipshot.memory_branch import MemoryBank
from clipshot.prompts import handcrafted_embeddings
from clipshot.synthetic import AnomalySynthesizer
from clipshot.text_branch import text_maps, text_scores

RECOMMENDED_MIN_SHOTS = 4
FEATURE_BATCH = 32
ZERO_SHOT_IMAGE_SCORE = "peak"  # text-only adapters keep the map maximum: see ``Detector.text_adapter``
SYNTHETIC_DEFECTS = 32  # calibration's synthetic defects per fit, spread evenly over the shots


@dataclass
class _Evidence:
    """What calibration scores, as features: the shots, their light views (``per_shot`` each), the synthetic
    defects with their masks and source shots."""

    feats: Features
    views: Features | None
    per_shot: int
    synthetic: Features | None
    masks: torch.Tensor | None
    sources: list[int]


@dataclass
class Prediction:
    score: float
    threshold: float | None
    is_anomalous: bool | None
    anomaly_map: np.ndarray | None  # float32 (H, W)
    map_threshold: float | None = None  # map pixels above it made the verdict (``fusion.map_threshold``)


class Detector:
    """Scores images against a product's adapter on one shared frozen backbone."""

    def __init__(self, backbone: Backbone, *, merge_lora: bool = False,
                 mixed_lora: mixed_batch.MixedLora = "gather"):
        self.backbone = backbone
        # Fold the active product's LoRA into the weights (see clipshot.lora): fewer kernels per forward, at
        # the price of a weight copy whenever the product changes. Pays off where launches dominate (GPUs).
        self.merge_lora = merge_lora
        # How a batch mixing several LoRA products runs: per-sample deltas ("gather" / "group") or "split".
        if mixed_lora not in ("gather", "group", "split"):
            raise ValueError(f"mixed_lora must be 'gather', 'group' or 'split', got {mixed_lora!r}")
        self.mixed_lora = mixed_lora

    # -- layout checks ---------------------------------------------------------------------------
    def layout(self) -> dict:
        """Backbone facts an adapter's tensors depend on (recorded in every adapter)."""
        return {
            "spec": self.backbone.spec,
            "image_size": self.backbone.image_size,
            "layers": list(self.backbone.layers),
            "dpam_layers": list(getattr(self.backbone, "dpam_layers", ())),
        }

    def check_compatible(self, adapter: Adapter) -> None:
        recorded = adapter.backbone
        current = self.layout()
        for key in ("image_size", "layers"):
            if recorded and recorded.get(key) != current[key]:
                raise ValueError(
                    f"adapter {adapter.category!r} was built with backbone {key}={recorded.get(key)}, "
                    f"this service runs {key}={current[key]}; re-register the category or change the settings"
                )
        if adapter.text is not None and not self.backbone.supports_text:
            raise ValueError(f"adapter {adapter.category!r} has a text branch; {self.backbone.spec} has no text tower")

    # -- LoRA residency --------------------------------------------------------------------------
    def _require_clip(self, what: str) -> ClipBackbone:
        if not isinstance(self.backbone, ClipBackbone):
            raise ValueError(f"{what} needs a CLIP backbone; {self.backbone.spec} supports the memory branch only")
        return self.backbone

    def resident(self) -> set[str]:
        if not isinstance(self.backbone, ClipBackbone):
            return set()
        return lora.resident_adapters(self.backbone.visual)

    def attach(self, adapter: Adapter) -> None:
        """Make the adapter's LoRA resident on the device (no-op for adapters without LoRA)."""
        if adapter.lora is None or adapter.uid in self.resident():
            return
        backbone = self._require_clip("LoRA")
        lora.add_adapter(backbone.visual, adapter.uid, adapter.lora, adapter.lora_state)

    def detach(self, adapter: Adapter | str) -> None:
        uid = adapter if isinstance(adapter, str) else adapter.uid
        if uid in self.resident():
            lora.remove_adapter(self.backbone.visual, uid)

    @contextmanager
    def using(self, adapter: Adapter | None) -> Iterator[None]:
        """Route the backbone through the adapter's LoRA for the duration (callers serialise device work)."""
        if isinstance(self.backbone, ClipBackbone):
            if adapter is not None and adapter.lora is not None:
                self.attach(adapter)
                lora.activate(self.backbone.visual, adapter.uid, merge=self.merge_lora)
            else:
                lora.activate(self.backbone.visual, None)
        try:
            yield
        finally:
            if isinstance(self.backbone, ClipBackbone) and not self.merge_lora:
                lora.activate(self.backbone.visual, None)  # folded weights stay until another activation

    # -- features and scoring --------------------------------------------------------------------
    def features(self, pixels: torch.Tensor, adapter: Adapter | None, *, dpam: bool = False) -> Features:
        with self.using(adapter):
            return self.backbone.extract(pixels, dpam=dpam)

    def features_of(self, images: Sequence[Image.Image], adapter: Adapter | None, *, dpam: bool = False) -> Features:
        """Features of many images through the adapter's geometry, in bounded batches, one row per image."""
        geometry = adapter.geometry if adapter is not None else Geometry()
        views = geometry.views_per_image
        step = max(1, FEATURE_BATCH // views)
        return Features.cat([
            self.features(self.backbone.preprocess(images[i : i + step], geometry), adapter, dpam=dpam)
            .per_image(views)
            for i in range(0, len(images), step)
        ])

    def score_features(self, features: Features, adapter: Adapter,
                       memory: MemoryBank | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,), maps (B, views * H, W)) at the model frame's resolution; ``memory`` overrides the bank.

        With tiles (``features.views`` > 1) each map holds the image's tiles stacked vertically, so the image
        score is taken over all of them."""
        cfg = adapter.scoring
        bank = memory if memory is not None else adapter.memory
        t_map = None if adapter.text is None else text_maps(features, adapter.text, cfg.temperature)
        m_map = None if bank is None else bank.distances(features)
        frame = adapter.geometry.frame_of(self.backbone.image_size)
        maps = pixel_map(fuse_maps(t_map, m_map, cfg), frame, cfg.sigma, views=features.views)
        cls = None
        if adapter.text is not None and features.cls is not None:
            cls = text_scores(features, adapter.text, cfg.temperature)
        return image_score(cls, maps, cfg), maps

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
        """Device work for one batch of (B, 3, H, W) or, one image's views together, (B, views, 3, H, W)
        pixels; the service calls this from its single device worker."""
        self.check_compatible(adapter)
        views = adapter.geometry.views_per_image
        if pixels.ndim == 5:
            pixels = pixels.flatten(0, 1)
        feats = self.features(pixels, adapter, dpam=adapter.scoring.dpam).per_image(views)
        return self.score_features(feats, adapter)

    def forward_mixed(self, pixels: torch.Tensor, adapters: Sequence[Adapter]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample i scored by ``adapters[i]`` in as few backbone forwards as possible (``clipshot.mixed_batch``)."""
        return mixed_batch.forward_mixed(self, pixels, adapters)

    def predict(self, images: Sequence[Image.Image], adapter: Adapter,
                *, map_size: tuple[int, int] | str | None = "input") -> list[Prediction]:
        """Score PIL images; ``map_size`` = "input" (each image's own size), (H, W), or None (no map)."""
        out: list[Prediction] = []
        for start in range(0, len(images), FEATURE_BATCH):
            chunk = images[start : start + FEATURE_BATCH]
            scores, maps = self.forward(self.backbone.preprocess(chunk, adapter.geometry), adapter)
            for image, score, heat in zip(chunk, scores.tolist(), maps, strict=True):
                out.append(self.make_prediction(score, heat, adapter, image.size, map_size))
        return out

    @staticmethod
    def make_prediction(score: float, heat: torch.Tensor, adapter: Adapter, image_size: tuple[int, int],
                        map_size: tuple[int, int] | str | None) -> Prediction:
        """Verdict plus the heatmap mapped back onto the image (CPU post-processing, off the device worker).

        ``heat`` is the (views * H, W) frame-resolution map; the result covers the whole image at ``map_size``."""
        threshold = adapter.threshold
        heatmap = None
        if map_size is not None:
            size = (image_size[1], image_size[0]) if map_size == "input" else tuple(map_size)
            if adapter.geometry.is_plain:
                heatmap = F.interpolate(heat[None, None].float().cpu(), size=size, mode="bilinear",
                                        align_corners=False)[0, 0].numpy()
            else:  # a legacy frame-less geometry is square: the map's width is its side
                heatmap = adapter.geometry.map_back(heat, image_size, heat.shape[-1], size)
        verdict = None if threshold is None else bool(score > threshold)
        return Prediction(float(score), threshold, verdict, heatmap, map_threshold(threshold, heat, adapter.scoring))

    # -- adapters without training -----------------------------------------------------------------
    def text_adapter(self, *, category: str, object_name: str | None = None,
                     scoring: ScoringConfig | None = None) -> Adapter:
        """Zero-shot adapter from the handcrafted prompt ensemble (no shots, so no calibration).

        Without ``scoring`` it keeps the map maximum (``ZERO_SHOT_IMAGE_SCORE``): the peak-mean image score was
        chosen by measuring the memory branch, and no CLIP weights are available here to measure a text map."""
        backbone = self._require_clip("the text branch")
        with torch.inference_mode():
            text = handcrafted_embeddings(backbone.model, object_name)
        scoring = scoring or ScoringConfig(image_score=ZERO_SHOT_IMAGE_SCORE)
        return Adapter(category=category, scoring=scoring, text=text, object_name=object_name,
                       backbone=self.layout())

    def fit_memory(self, shots: Sequence[Image.Image], *, category: str, text: bool | None = None,
                   object_name: str | None = None, coreset_ratio: float | None = None,
                   scoring: ScoringConfig | None = None, calibration_views: int = 2,
                   defects: Sequence[Image.Image] = (), policy: DecisionPolicy | None = None,
                   geometry: Geometry | None = None) -> Adapter:
        """Memory adapter (plus handcrafted text on CLIP when ``text``), calibrated: usable immediately.

        ``defects`` are operator-confirmed defect photos (validation evidence, never memory); ``policy`` the
        decision policy (default: the automatic rule); ``geometry`` None = chosen from the shots by
        ``clipshot.geometry.build_geometry``'s rule."""
        if not shots:
            raise ValueError("fit_memory needs at least one normal image")
        geometry = self.resolve_geometry(geometry, [img.size for img in shots])
        if len(shots) < RECOMMENDED_MIN_SHOTS:
            warnings.warn(f"{len(shots)} shot(s) given; {RECOMMENDED_MIN_SHOTS}-16 give reliable memory and "
                          "calibration", stacklevel=2)
        use_text = self.backbone.supports_text if text is None else text
        choose = scoring is None
        scoring = scoring or ScoringConfig()
        adapter = self.text_adapter(category=category, object_name=object_name, scoring=scoring) if use_text \
            else Adapter(category=category, scoring=scoring, object_name=object_name, backbone=self.layout())
        adapter.geometry = geometry
        adapter.selection = {} if choose else None  # filled by calibration: the product's own choice
        return self.refit_memory(adapter, shots, coreset_ratio=coreset_ratio, calibration_views=calibration_views,
                                 defects=defects, policy=policy)

    def plan_geometry(self, sizes: Sequence[tuple[int, int]], *, resize: str | None = None,
                      roi: tuple[int, int, int, int] | None = None, tile: int | None = None,
                      tile_overlap: float = TILE_OVERLAP) -> Geometry:
        """Geometry for shots of ``sizes`` on this backbone: explicit choices, the auto rule for the rest."""
        return build_geometry(sizes, size=self.backbone.image_size, multiple=self.backbone.frame_multiple,
                              resize=resize, roi=roi, tile=tile, tile_overlap=tile_overlap)

    def resolve_geometry(self, geometry: Geometry | None, sizes: Sequence[tuple[int, int]]) -> Geometry:
        """The auto geometry for shots of ``sizes``, or ``geometry`` checked against them with its frame filled."""
        size, multiple = self.backbone.image_size, self.backbone.frame_multiple
        if geometry is None:
            return build_geometry(sizes, size=size, multiple=multiple)
        geometry = replace(geometry, frame=geometry.frame_of(size))
        if any(side % multiple for side in geometry.frame):
            raise GeometryError(f"frame {list(geometry.frame)} must be multiples of {multiple} on {self.backbone.spec}")
        for image_size in sizes:
            geometry.views(image_size, size)  # ROI and tiles must fit every shot
        return geometry

    @torch.inference_mode()
    def refit_memory(self, adapter: Adapter, shots: Sequence[Image.Image], *, coreset_ratio: float | None = None,
                     calibration_views: int = 2, defects: Sequence[Image.Image] = (),
                     policy: DecisionPolicy | None = None) -> Adapter:
        """(Re)build the memory bank through the adapter's own LoRA, then calibrate the full scorer.

        Without ``policy`` the adapter keeps the policy it had (a manual threshold stays manual), so re-fits
        after feedback or fine-tuning never silently undo an operator's choice."""
        if policy is None:
            policy = adapter.calibration.policy_spec() if adapter.calibration is not None else DecisionPolicy()
        dpam = adapter.scoring.dpam
        feats = self.features_of(list(shots), adapter, dpam=dpam)
        adapter.memory = self.memory_bank(feats, adapter, coreset_ratio)
        adapter.calibration = self._calibrate(adapter, list(shots), feats, calibration_views, list(defects), policy,
                                              coreset_ratio)
        return adapter

    def memory_bank(self, feats: Features, adapter: Adapter, coreset_ratio: float | None = None) -> MemoryBank:
        """A bank of ``feats`` scored the way ``adapter.scoring`` says (centre, per-stage cosines)."""
        stages = self.backbone.stage_dims if adapter.scoring.memory_stages else None
        return MemoryBank.from_features(feats, coreset_ratio, center=adapter.scoring.memory_center, stages=stages)

    def score_images(self, images: Sequence[Image.Image], adapter: Adapter) -> list[float]:
        """Image scores only (no maps): validation evidence such as confirmed defects."""
        return [p.score for p in self.predict(list(images), adapter, map_size=None)] if images else []

    def _calibrate(self, adapter: Adapter, shots: list[Image.Image], feats: Features, views: int,
                   defects: list[Image.Image], policy: DecisionPolicy,
                   coreset_ratio: float | None = None) -> Calibration:
        """Leave-one-out evidence: each shot, light variants of it and synthetic defects made from it are scored
        against a memory of the *other* shots, i.e. as a part the memory has never seen.

        With ``adapter.selection`` set (a product that chooses its own scoring) every candidate of
        ``clipshot.scoring_selection`` is scored on the same features and the adapter keeps the one that best
        separates its synthetic defects from its unseen normals; the choice and all candidates' evidence are
        recorded in ``adapter.selection``."""
        evidence = self._evidence(adapter, shots, feats, views)
        if adapter.selection is not None and adapter.memory is not None:
            normal, synthetic = self.select_scoring(adapter, evidence)
            adapter.memory = self.memory_bank(feats, adapter, coreset_ratio)  # the served bank, the chosen way
        else:
            normal, synthetic, _, _ = self._leave_one_out(adapter, evidence)
        method = "leave-one-out" if len(shots) > 1 else "single-shot-augmented"
        return calibrate(normal, synthetic, shots=len(shots), policy=policy, method=method,
                         validation_defect_scores=self.score_images(defects, adapter))

    def select_scoring(self, adapter: Adapter, evidence: _Evidence) -> tuple[list[float], list[float]]:
        """Score ``evidence`` under every candidate of ``clipshot.scoring_selection``, set the adapter's scoring
        to the one that separates its synthetic defects from its unseen normals best, record the choice and all
        candidates in ``adapter.selection``, and return the chosen one's (normal, synthetic) scores."""
        staged = self.backbone.stage_dims is not None
        found, runs = [], []
        for name, cfg in selection.candidates(adapter.scoring, staged=staged):
            normal, synthetic, normal_maps, synth_maps = self._leave_one_out(replace(adapter, scoring=cfg), evidence)
            pixel = None if evidence.masks is None else selection.pixel_separation(synth_maps, evidence.masks,
                                                                                   normal_maps)
            found.append(selection.CandidateEvidence(name, cfg, selection.image_separation(normal, synthetic), pixel))
            runs.append((normal, synthetic))
        best = selection.choose(found)
        adapter.scoring = found[best].scoring
        adapter.selection = selection.selection_record(found, best)
        return runs[best]

    def _evidence(self, adapter: Adapter, shots: list[Image.Image], feats: Features, views: int) -> _Evidence:
        """Features of everything calibration scores, extracted once (every candidate scoring re-uses them)."""
        dpam = adapter.scoring.dpam
        view_feats = None
        if views:
            all_views = [view for img in shots for view in light_views(img, views)]
            view_feats = self.features_of(all_views, adapter, dpam=dpam)
        made, masks, sources = self._synthetic_defects(shots, adapter)
        synth_feats = self._unit_features(made, adapter) if len(made) else None
        return _Evidence(feats, view_feats, views, synth_feats, masks if len(made) else None, sources)

    def _leave_one_out(self, adapter: Adapter, ev: _Evidence
                       ) -> tuple[list[float], list[float], torch.Tensor, torch.Tensor]:
        """(normal scores, synthetic-defect scores, normal maps, synthetic maps) of ``ev`` under the adapter's
        scoring, each shot's evidence against a bank of the other shots."""
        n = ev.feats.batch_size
        normal: list[float] = []
        synthetic: list[float] = []
        normal_maps: list[torch.Tensor] = []
        synth_maps: list[torch.Tensor] = []
        order: list[int] = []
        for i in range(n):
            rest = [j for j in range(n) if j != i] or [i]
            bank = self.memory_bank(ev.feats.select(torch.tensor(rest)), adapter)
            parts = [ev.feats.select(slice(i, i + 1))] if n > 1 or ev.views is None else []
            if ev.views is not None:
                parts.append(ev.views.select(slice(i * ev.per_shot, (i + 1) * ev.per_shot)))
            scores, maps = self.score_features(Features.cat(parts), adapter, bank)
            normal.extend(scores.tolist())
            normal_maps.append(maps)
            mine = [k for k, src in enumerate(ev.sources) if src == i]
            if ev.synthetic is not None and mine:
                scores, maps = self.score_features(ev.synthetic.select(torch.tensor(mine)), adapter, bank)
                synthetic.extend(scores.tolist())
                synth_maps.append(maps)
                order.extend(mine)
        synth = torch.cat(synth_maps) if synth_maps else torch.zeros(0)
        if order:  # back in the order of ``ev.masks``
            synth = synth[torch.argsort(torch.tensor(order))]
        return normal, [synthetic[k] for k in np.argsort(order)] if order else [], torch.cat(normal_maps), synth

    def _synthetic_defects(self, shots: list[Image.Image], adapter: Adapter
                           ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(N, views, 3, H, W) unit-range synthetic defects (CutPaste, scar, Perlin) made from the shots in the
        adapter's geometry (one view of each damaged, the rest as they are), their (N, views * H, W) masks laid
        out like the maps (views stacked vertically), and the shot each was made from.
        A fixed seed: the same shots calibrate the same way."""
        geometry = adapter.geometry
        views = geometry.views_per_image
        units = geometry.unit_pixels(shots, self.backbone.image_size)
        units = units.reshape(len(shots), views, *units.shape[1:])
        height, width = units.shape[-2:]
        per_shot = max(1, math.ceil(SYNTHETIC_DEFECTS / len(shots)))
        generator = torch.Generator().manual_seed(0)
        synthesizer = AnomalySynthesizer(p=1.0)
        made: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        sources: list[int] = []
        for i in range(len(shots)):
            for _ in range(per_shot):
                view = int(torch.randint(views, (), generator=generator))
                image, mask, label = synthesizer(units[i, view], list(units[:, view]), generator)
                if label:  # a flat shot can refuse every kind: no defect then, rather than a fake one
                    damaged = units[i].clone()
                    damaged[view] = image
                    full = torch.zeros(views * height, width)
                    full[view * height : (view + 1) * height] = mask[0]
                    made.append(damaged)
                    masks.append(full)
                    sources.append(i)
        if not made:
            return units[:0], torch.zeros(0, views * height, width), sources
        return torch.stack(made), torch.stack(masks), sources

    def _unit_features(self, units: torch.Tensor, adapter: Adapter) -> Features:
        """Features of (N, views, 3, H, W) images already cut into the geometry's views, in [0, 1] (no second
        resize), one row per image."""
        views = units.shape[1]
        flat = units.flatten(0, 1)
        step = max(1, FEATURE_BATCH // views) * views
        return Features.cat([
            self.features(self.backbone.normalise(flat[i : i + step]), adapter, dpam=adapter.scoring.dpam)
            .per_image(views)
            for i in range(0, len(flat), step)
        ])
