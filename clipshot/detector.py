"""The pure model: backbone + adapter -> image scores and heatmaps. No HTTP, no files, no training loop."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from PIL import Image

from clipshot import lora, mixed_batch, position_baseline
from clipshot.adapter import Adapter
from clipshot.anomaly_map import pixel_map
from clipshot.backbone import Backbone, ClipBackbone
from clipshot.calibration import DecisionPolicy
from clipshot.calibration_fit import calibrate_steps
from clipshot.chunked import Steps, finish, staged
from clipshot.features import FEATURE_BATCH, Features
from clipshot.fusion import ScoringConfig, fuse_maps, image_score
from clipshot.geometry import TILE_OVERLAP, Geometry, GeometryError, build_geometry, check_usable
from clipshot.memory_branch import MemoryBank, native_bf16
from clipshot.memory_branch import memory_precision as choose_memory_precision
from clipshot.prediction import Prediction, make_prediction
from clipshot.prompts import handcrafted_embeddings
from clipshot.runtimes import FeatureRuntime
from clipshot.text_branch import text_maps, text_scores

RECOMMENDED_MIN_SHOTS = 4
ZERO_SHOT_IMAGE_SCORE = "peak"  # text-only adapters keep the map maximum: see ``Detector.text_adapter``


class Detector:
    """Scores images against a product's adapter on one shared frozen backbone."""

    def __init__(self, backbone: Backbone, *, merge_lora: bool = False,
                 mixed_lora: mixed_batch.MixedLora = "gather", runtime: FeatureRuntime | None = None,
                 memory_precision: str = "auto"):
        self.backbone = backbone
        # Feature forwards through ONNX Runtime / OpenVINO instead of PyTorch (``clipshot.runtimes``); scoring stays
        # here. A runtime graph has one LoRA folded in, so batches mixing LoRA products run one forward per product.
        self.runtime = runtime
        if runtime is not None:
            runtime.check_backbone(backbone)
            mixed_lora = "split"
        # Fold the active product's LoRA into the weights (see clipshot.lora): fewer kernels per forward, at
        # the price of a weight copy whenever the product changes. Pays off where launches dominate (GPUs).
        self.merge_lora = merge_lora
        # How a batch mixing several LoRA products runs: per-sample deltas ("gather" / "group") or "split".
        if mixed_lora not in ("gather", "group", "split"):
            raise ValueError(f"mixed_lora must be 'gather', 'group' or 'split', got {mixed_lora!r}")
        self.mixed_lora = mixed_lora
        # What memory scoring computes in for adapters fitted here (``memory_branch.memory_precision``): recorded in
        # every adapter, since its calibration was scored that way (see ``scoring_precision``).
        self.memory_precision = choose_memory_precision(getattr(backbone, "device", "cpu"),
                                                        getattr(backbone, "precision", "fp32"), memory_precision)
        self._precision_warned: set[str] = set()

    # -- layout checks ---------------------------------------------------------------------------
    def layout(self) -> dict:
        """Backbone facts an adapter's tensors depend on (recorded in every adapter)."""
        return {
            "spec": self.backbone.spec,
            "image_size": self.backbone.image_size,
            "layers": list(self.backbone.layers),
            "dpam_layers": list(getattr(self.backbone, "dpam_layers", ())),
            "memory_precision": self.memory_precision,
            "runtime": self.runtime.name if self.runtime is not None else "torch",
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

    def scoring_precision(self, adapter: Adapter) -> str:
        """What ``adapter``'s memory distances are computed in: the precision its calibration was scored in, where
        this device computes it natively, so moving a bundle between machines keeps its scores; otherwise this
        service's own, with a warning once per adapter (its scores can then differ from its calibration by ~1e-3).

        fp32 runs anywhere; bf16 where ``native_bf16`` (elsewhere it is emulated, slower than fp32); fp16 only on
        an accelerator."""
        fitted = adapter.backbone.get("memory_precision") if adapter.backbone else None
        if not fitted or fitted == self.memory_precision:
            return self.memory_precision
        device = getattr(self.backbone, "device", torch.device("cpu"))
        if fitted == "fp32" or (fitted == "bf16" and native_bf16(device)) or (
                fitted == "fp16" and torch.device(device).type != "cpu"):
            return fitted
        if adapter.uid not in self._precision_warned:
            self._precision_warned.add(adapter.uid)  # once per adapter: this runs for every batch
            warnings.warn(f"adapter {adapter.category!r} was calibrated with memory scores computed in {fitted}; "
                          f"this machine cannot compute them so, so they run in {self.memory_precision} and can "
                          "differ from its calibration by ~1e-3; re-register or send feedback to recalibrate",
                          stacklevel=2)
        return self.memory_precision

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
            lora.remove_adapter(self._require_clip("LoRA").visual, uid)  # resident only on a CLIP backbone

    @contextmanager
    def using(self, adapter: Adapter | None) -> Iterator[None]:
        """Route the backbone through the adapter's LoRA for the duration (callers serialise device work)."""
        if isinstance(self.backbone, ClipBackbone):
            if adapter is not None and adapter.lora is not None:
                self.attach(adapter)
                lora.activate(self.backbone.visual, adapter.uid, merge=self.merge_lora, master=adapter.lora_state)
            else:
                lora.activate(self.backbone.visual, None)
        try:
            yield
        finally:
            if isinstance(self.backbone, ClipBackbone) and not self.merge_lora:
                lora.activate(self.backbone.visual, None)  # folded weights stay until another activation

    # -- features and scoring --------------------------------------------------------------------
    def features(self, pixels: torch.Tensor, adapter: Adapter | None, *, dpam: bool = False) -> Features:
        if self.runtime is not None:
            return self.runtime.adapter_features(self, pixels, adapter, dpam=dpam)
        with self.using(adapter):
            return self.backbone.extract(pixels, dpam=dpam)

    def features_of(self, images: Sequence[Image.Image], adapter: Adapter | None, *, dpam: bool = False) -> Features:
        """Features of many images through the adapter's geometry, in bounded batches, one row per image."""
        return finish(self.features_steps(images, adapter, dpam=dpam))

    def features_steps(self, images: Sequence[Image.Image], adapter: Adapter | None, *,
                       dpam: bool = False) -> Steps[Features]:
        """``features_of`` yielding after each batch (``clipshot.chunked``)."""
        geometry = adapter.geometry if adapter is not None else Geometry()
        views = geometry.views_per_image
        step = max(1, FEATURE_BATCH // views)
        parts = []
        for i in range(0, len(images), step):
            pixels = self.backbone.preprocess(images[i : i + step], geometry)
            parts.append(self.features(pixels, adapter, dpam=dpam).per_image(views))
            yield
        return Features.cat(parts)

    def score_features(self, features: Features, adapter: Adapter,
                       memory: MemoryBank | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,), maps (B, views * H, W)) at the model frame's resolution; ``memory`` overrides the bank.

        With tiles (``features.views`` > 1) each map holds the image's tiles stacked vertically, so the image
        score is taken over all of them."""
        if not features.batch_size:  # nothing to score (e.g. no synthetic defect came out): empty results
            fh, fw = adapter.geometry.frame_of(self.backbone.image_size)
            return torch.empty(0), torch.empty(0, features.views * fh, fw)
        return self.score_rows(features, [adapter] * features.batch_size, memory=memory)

    def score_rows(self, features: Features, adapters: Sequence[Adapter],
                   *, memory: MemoryBank | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``score_features`` with row i scored by ``adapters[i]``: the one scoring path of lone and mixed batches.

        Each product's branches run over its own rows; the map smoothing (upsample + Gaussian, the costly part of
        scoring on small models) runs once over all rows that share a sigma. All rows share one model frame and
        one view count (a batch of one pixel shape); ``memory`` needs a single product."""
        owners: dict[str, list[int]] = {}
        for i, adapter in enumerate(adapters):
            owners.setdefault(adapter.uid, []).append(i)
        unique = {uid: adapters[rows[0]] for uid, rows in owners.items()}
        frames = {a.geometry.frame_of(self.backbone.image_size) for a in unique.values()}
        if len(frames) != 1 or (memory is not None and len(unique) > 1):
            raise ValueError(f"score_rows takes one model frame (got {sorted(frames)}) and a memory override "
                             "for one product only")
        frame, device = frames.pop(), features.patches[0].device

        def rows_of(keep: list[int]) -> slice | torch.Tensor:  # a slice keeps a lone product's tensors uncopied
            return slice(None) if len(keep) == len(adapters) else torch.tensor(keep, device=device)

        fused: torch.Tensor | None = None
        cls: dict[str, torch.Tensor | None] = {}
        scores = torch.empty(len(adapters), device=device)
        maps = torch.empty(len(adapters), features.views * frame[0], frame[1], device=device)
        for uid, adapter in unique.items():
            rows, cfg = rows_of(owners[uid]), adapter.scoring
            bank = memory if memory is not None else adapter.memory
            part = features.select(rows)
            t_map = None if adapter.text is None else text_maps(part, adapter.text, cfg.temperature)
            m_map = None if bank is None else bank.distances(part, self.scoring_precision(adapter))
            fused_rows = fuse_maps(t_map, m_map, cfg)
            fused = fused_rows.new_empty((len(adapters), *fused_rows.shape[1:])) if fused is None else fused
            fused[rows] = fused_rows
            text = adapter.text if part.cls is not None else None
            cls[uid] = None if text is None else text_scores(part, text, cfg.temperature)
        if fused is None:  # unreachable: one frame above means at least one product
            raise ValueError("score_rows needs at least one row")
        for sigma in {a.scoring.sigma for a in unique.values()}:
            rows = rows_of([i for i, a in enumerate(adapters) if a.scoring.sigma == sigma])
            maps[rows] = pixel_map(fused[rows], frame, sigma, views=features.views)
        for uid, adapter in unique.items():
            rows = rows_of(owners[uid])
            if adapter.baseline is not None:
                maps[rows] = position_baseline.apply(maps[rows], adapter.baseline)
            scores[rows] = image_score(cls[uid], maps[rows], adapter.scoring).to(scores.dtype)
        return scores, maps

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

    @torch.inference_mode()
    def forward_mixed(self, pixels: torch.Tensor, adapters: Sequence[Adapter]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample i scored by ``adapters[i]`` in as few backbone forwards as possible (``clipshot.mixed_batch``);
        one product = ``forward``. Pixels as ``forward`` takes them; every adapter must cut its images into the
        same frame and number of views, so the batch is one pixel shape and one map shape."""
        if len(adapters) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(adapters)} adapters")
        unique = {a.uid: a for a in adapters}
        for adapter in unique.values():
            self.check_compatible(adapter)
        if len(unique) == 1:
            return self.forward(pixels, adapters[0])  # single product: LoRA folding applies where enabled
        shapes = {(a.geometry.views_per_image, a.geometry.frame_of(self.backbone.image_size))
                  for a in unique.values()}
        if len(shapes) != 1:
            raise ValueError("a mixed batch needs one model frame and one view count, got (views, frame) "
                             f"{sorted(shapes)}; group the images by geometry first")
        views, frame = shapes.pop()
        flat = pixels.flatten(0, 1) if pixels.ndim == 5 else pixels
        if flat.shape[0] != len(adapters) * views or tuple(flat.shape[-2:]) != frame:
            raise ValueError(f"pixels {list(pixels.shape)} do not hold {views} view(s) of {list(frame)} per image")
        feats = mixed_batch.mixed_features(self, flat, adapters, views)
        return self.score_rows(feats, adapters)

    def predict(self, images: Sequence[Image.Image], adapter: Adapter,
                *, map_size: tuple[int, int] | str | None = "input") -> list[Prediction]:
        """Score PIL images; ``map_size`` = "input" (each image's own size), (H, W), or None (no map)."""
        out: list[Prediction] = []
        for start in range(0, len(images), FEATURE_BATCH):
            chunk = images[start : start + FEATURE_BATCH]
            scores, maps = self.forward(self.backbone.preprocess(chunk, adapter.geometry), adapter)
            for image, score, heat in zip(chunk, scores.tolist(), maps, strict=True):
                out.append(make_prediction(score, heat, adapter, image.size, map_size))
        return out

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
                   geometry: Geometry | None = None, choose_scoring: bool = False) -> Adapter:
        """Memory adapter (plus handcrafted text on CLIP when ``text``), calibrated: usable immediately.

        ``defects`` are operator-confirmed defect photos (validation evidence, never memory); ``policy`` the
        decision policy (default: the automatic rule); ``geometry`` None = chosen from the shots by
        ``clipshot.geometry.build_geometry``'s rule; ``choose_scoring``: the product picks its memory scoring
        from its own shots (``clipshot.scoring_selection``, starting from ``scoring``) instead of keeping it."""
        if 0 < len(shots) < RECOMMENDED_MIN_SHOTS:
            warnings.warn(f"{len(shots)} shot(s) given; {RECOMMENDED_MIN_SHOTS}-16 give reliable memory and "
                          "calibration", stacklevel=2)
        return finish(self.fit_memory_steps(shots, category=category, text=text, object_name=object_name,
                                            coreset_ratio=coreset_ratio, scoring=scoring,
                                            calibration_views=calibration_views, defects=defects, policy=policy,
                                            geometry=geometry, choose_scoring=choose_scoring))

    def fit_memory_steps(self, shots: Sequence[Image.Image], *, category: str, text: bool | None = None,
                         object_name: str | None = None, coreset_ratio: float | None = None,
                         scoring: ScoringConfig | None = None, calibration_views: int = 2,
                         defects: Sequence[Image.Image] = (), policy: DecisionPolicy | None = None,
                         geometry: Geometry | None = None, choose_scoring: bool = False,
                         confirmed: Sequence[int] = ()) -> Steps[Adapter]:
        """``fit_memory`` in bounded chunks of device work (``clipshot.chunked``), without the shot-count
        warning (callers that run chunks report it their own way)."""
        if not shots:
            raise ValueError("fit_memory needs at least one normal image")
        geometry = self.resolve_geometry(geometry, [img.size for img in shots])
        use_text = self.backbone.supports_text if text is None else text
        scoring = scoring or ScoringConfig()
        adapter = self.text_adapter(category=category, object_name=object_name, scoring=scoring) if use_text \
            else Adapter(category=category, scoring=scoring, object_name=object_name, backbone=self.layout())
        adapter.geometry = geometry
        adapter.selection = {} if choose_scoring else None  # filled by calibration: the product's own choice
        yield
        return (yield from self.refit_memory_steps(adapter, shots, coreset_ratio=coreset_ratio,
                                                   calibration_views=calibration_views, defects=defects,
                                                   policy=policy, confirmed=confirmed))

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
        frame = geometry.frame_of(size)
        geometry = replace(geometry, frame=frame)
        if any(side % multiple for side in frame):
            raise GeometryError(f"frame {list(frame)} must be multiples of {multiple} on {self.backbone.spec}")
        check_usable(geometry, sizes, size)  # ROI and tiles must fit every shot, within the model's limits
        return geometry

    def refit_memory(self, adapter: Adapter, shots: Sequence[Image.Image], *, coreset_ratio: float | None = None,
                     calibration_views: int = 2, defects: Sequence[Image.Image] = (),
                     policy: DecisionPolicy | None = None, confirmed: Sequence[int] = ()) -> Adapter:
        """(Re)build the memory bank through the adapter's own LoRA, then calibrate the full scorer.

        Without ``policy`` the adapter keeps the policy it had (a manual threshold stays manual), so re-fits
        after feedback or fine-tuning never silently undo an operator's choice. ``confirmed``: indices of the
        shots that are operator-confirmed goods (``clipshot.calibration.floor``)."""
        return finish(self.refit_memory_steps(adapter, shots, coreset_ratio=coreset_ratio,
                                              calibration_views=calibration_views, defects=defects, policy=policy,
                                              confirmed=confirmed))

    @torch.inference_mode()
    def refit_memory_steps(self, adapter: Adapter, shots: Sequence[Image.Image], *,
                           coreset_ratio: float | None = None, calibration_views: int = 2,
                           defects: Sequence[Image.Image] = (), policy: DecisionPolicy | None = None,
                           confirmed: Sequence[int] = ()) -> Steps[Adapter]:
        """``refit_memory`` in bounded chunks: one feature batch, one coreset slice, one leave-one-out fold
        (``clipshot.chunked``). Each chunk routes its own forwards through the adapter's LoRA, so other work
        may use the backbone between chunks."""
        if policy is None:
            policy = adapter.calibration.policy_spec() if adapter.calibration is not None else DecisionPolicy()
        shots = list(shots)
        if adapter.backbone:  # the calibration below is scored at this service's memory precision, on its features
            kept = {k: v for k, v in adapter.backbone.items() if k not in ("quantize", "calibration")}
            adapter.backbone = {**kept, "memory_precision": self.memory_precision,
                                "runtime": self.layout()["runtime"]}
        if self.runtime is not None and self.runtime.quantize:  # its int8 graph, calibrated on these shots only
            self.runtime.calibrate_adapter(adapter, self.backbone.preprocess(shots, adapter.geometry))
        per_batch = max(1, FEATURE_BATCH // adapter.geometry.views_per_image)
        feats = yield from staged("embedding shots", len(shots),
                                  self.features_steps(shots, adapter, dpam=adapter.scoring.dpam), per_chunk=per_batch)
        adapter.memory = yield from staged("building memory bank", 1,
                                           self.memory_bank_steps(feats, adapter, coreset_ratio), per_chunk=0)
        adapter.calibration = yield from calibrate_steps(self, adapter, shots, feats, calibration_views,
                                                         list(defects), policy, coreset_ratio, confirmed)
        adapter.memory.kept = None  # calibration is done with the coreset's rows; the bank needs only itself
        return adapter

    def memory_bank(self, feats: Features, adapter: Adapter, coreset_ratio: float | None = None, *,
                    keep: Sequence[torch.Tensor] | None = None) -> MemoryBank:
        """A bank of ``feats`` scored the way ``adapter.scoring`` says (centre, per-stage cosines); ``keep``:
        per-layer rows to keep instead of a coreset (``MemoryBank.from_features_steps``)."""
        return finish(self.memory_bank_steps(feats, adapter, coreset_ratio, keep=keep))

    def memory_bank_steps(self, feats: Features, adapter: Adapter, coreset_ratio: float | None = None, *,
                          keep: Sequence[torch.Tensor] | None = None) -> Steps[MemoryBank]:
        """``memory_bank`` with the coreset's loop in bounded chunks."""
        stages = self.backbone.stage_dims if adapter.scoring.memory_stages else None
        pools = self.backbone.stage_pools if stages is not None and adapter.scoring.memory_stage_grids else None
        return MemoryBank.from_features_steps(feats, coreset_ratio, center=adapter.scoring.memory_center,
                                              stages=stages, pools=pools, keep=keep)

    def score_images(self, images: Sequence[Image.Image], adapter: Adapter) -> list[float]:
        """Image scores only (no maps): validation evidence such as confirmed defects."""
        return [p.score for p in self.predict(list(images), adapter, map_size=None)] if images else []
