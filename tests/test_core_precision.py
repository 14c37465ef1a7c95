"""Half precision on CPU: CI has no GPU, so the GPU's mixed-precision code path (half backbone, fp32 LoRA and
prompt master weights under autocast, fp16 loss scaling) is exercised here with CPU autocast. A dtype mix-up
anywhere in extract -> score -> train -> save -> load fails these tests the way it would fail on CUDA."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import textured
from PIL import Image

from clipshot import lora
from clipshot.backbone import load_backbone
from clipshot.backbone.base import resolve_precision
from clipshot.detector import Detector
from clipshot.lora import LoraSpec
from model_store import AdapterStore
from model_store.adapters import load_adapter, save_adapter
from training.fewshot import FewShotConfig, train_fewshot

pytestmark = pytest.mark.usefixtures("single_thread")

HALF = ["bf16", "fp16"]


def half_backbone(precision: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "usually slower than fp32 on CPU": expected here
        return load_backbone("test:tiny-clip", precision=precision)


def images(n: int, offset: int = 0) -> list[Image.Image]:
    return [Image.fromarray(textured(offset + i)) for i in range(n)]


def with_defect(seed: int) -> Image.Image:
    pixels = textured(seed).copy()
    pixels[20:32, 36:48] = (250, 20, 20)
    return Image.fromarray(pixels)


def base_weights(detector: Detector) -> dict[str, torch.Tensor]:
    """The backbone's own weights, under their original names (peft wraps a layer as ``base_layer``)."""
    return {k.replace("base_layer.", ""): v.clone() for k, v in detector.backbone.model.state_dict().items()
            if "lora_" not in k}


def test_auto_precision_is_fp32_on_cpu_and_bad_names_are_refused():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert load_backbone("test:tiny-clip").dtype == torch.float32  # the default is auto
    with pytest.warns(UserWarning, match="slower than fp32"):
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="auto, fp32, fp16, bf16"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("precision", HALF)
def test_half_backbone_features_follow_fp32(tiny_backbone, precision):
    """Same weights, half compute: features must agree in direction (cos > 0.99; half keeps ~3 significant
    digits, a wrong cast or a layer skipped gives far lower) and come out as fp32 unit vectors."""
    half = half_backbone(precision)
    assert half.weights_sha256 == tiny_backbone.weights_sha256
    assert next(half.visual.parameters()).dtype == half.dtype
    pixels = tiny_backbone.preprocess(images(3))
    ref, got = tiny_backbone.extract(pixels), half.extract(pixels)
    for a, b in zip([ref.cls, *ref.patches], [got.cls, *got.patches], strict=True):
        assert b.dtype == torch.float32 and torch.allclose(b.norm(dim=-1), torch.ones(()), atol=1e-4)
        assert F.cosine_similarity(a, b, dim=-1).min() > 0.99


@pytest.mark.parametrize("precision", HALF)
def test_half_precision_scoring_finds_the_defect(tiny_backbone, precision):
    detector = Detector(half_backbone(precision))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = detector.fit_memory(images(4), category="widget", calibration_views=0)
    good, bad = detector.predict([Image.fromarray(textured(40)), with_defect(41)], adapter)
    assert bad.score > good.score
    row, col = np.unravel_index(bad.anomaly_map.argmax(), bad.anomaly_map.shape)
    assert 14 <= row <= 38 and 30 <= col <= 54  # the planted 12x12 square (rows 20-32, cols 36-48) +- 6 px


@pytest.mark.parametrize("precision", HALF)
def test_half_precision_fine_tune_trains_fp32_adapters_that_load_anywhere(tiny_backbone, precision, tmp_path):
    """LoRA/prompt master weights stay fp32 (AdamW cannot update fp16 weights reliably), fp16 turns loss scaling
    on, the frozen half weights do not move, and the bundle scores on an fp32 backbone too."""
    detector = Detector(half_backbone(precision))
    frozen = base_weights(detector)
    # 12 steps: fp16 loss scaling skips its first steps on overflow while it backs off (2 here, from 2^10)
    config = FewShotConfig(steps=12, batch_size=4, lora=LoraSpec(rank=2), holdout=1, val_anomalies_per_shot=1,
                           val_normal_views=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_fewshot(detector, images(4), category="widget", config=config)
    adapter, metrics = result.adapter, result.metrics
    assert metrics["steps"] == 12 and np.isfinite([metrics["loss_first"], metrics["loss_last"]]).all()
    assert adapter.lora_state and all(t.dtype == torch.float32 for t in adapter.lora_state.values())
    assert any(t.abs().sum() > 0 for name, t in adapter.lora_state.items() if "lora_B" in name)  # B still 0: no step
    assert adapter.prompt_state and all(t.dtype == torch.float32 for t in adapter.prompt_state.values())
    after = base_weights(detector)
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert not lora.resident_adapters(detector.backbone.visual)  # the trainer cleaned up after itself
    store = AdapterStore(tmp_path)
    version = save_adapter(store, detector, adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(store, detector, "widget", version)  # same precision: silent
    assert not [w for w in caught if "calibrated at" in str(w.message)]
    with pytest.warns(UserWarning, match=f"calibrated at {precision} but this backbone runs fp32"):
        restored, manifest = load_adapter(store, Detector(tiny_backbone), "widget", version)
    assert manifest.backbone.precision == precision
    pred = Detector(tiny_backbone).predict([with_defect(50)], restored)[0]
    assert np.isfinite(pred.score) and pred.anomaly_map.shape == (64, 64)
