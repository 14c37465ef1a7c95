"""Mixed-product batches (``Detector.forward_mixed``): one backbone forward for a batch mixing products, LoRA
products included (per-sample low-rank deltas), and every sample scored exactly as its own product's path."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import textured
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from clipshot import lora
from clipshot.backbone import load_backbone
from clipshot.detector import Detector

pytestmark = pytest.mark.usefixtures("single_thread")
# fp32; the batched path multiplies in other groupings than per-sample calls (batched GEMM blocking, W x + sum of
# deltas): observed differences are ~1e-6, two orders below any effect a product's adapter has (see assertions)
ATOL = 1e-4


def fit(detector: Detector, seeds, category: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return detector.fit_memory([Image.fromarray(textured(s)) for s in seeds], category=category,
                                   calibration_views=0)


@pytest.fixture(scope="module")
def clip_products():
    """A private tiny CLIP and five products: two memory-only, two LoRA (ranks 4 and 8), one DPAM."""
    backbone = load_backbone("test:tiny-clip")
    detector = Detector(backbone)
    m1, m2 = fit(detector, range(4), "m1"), fit(detector, range(10, 14), "m2")
    gen = torch.Generator().manual_seed(0)
    loras = []
    for uid, rank in (("x", 4), ("y", 8)):
        spec = lora.LoraSpec(rank=rank)
        lora.add_adapter(backbone.visual, "shape", spec)
        shapes = lora.state(backbone.visual, "shape")
        lora.remove_adapter(backbone.visual, "shape")
        loras.append(dataclasses.replace(m1, category=uid, lora=spec, uid=uid, lora_state={
            k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in shapes.items()}))
    dpam = dataclasses.replace(m2, category="d", uid="d", scoring=dataclasses.replace(m2.scoring, dpam=True))
    pixels = backbone.preprocess([Image.fromarray(textured(20 + i, jitter=0.1)) for i in range(8)])
    x, y = loras
    return backbone, {"m1": m1, "m2": m2, "x": x, "y": y, "d": dpam}, pixels


def reference(detector: Detector, pixels: torch.Tensor, adapters) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-product path: each sample alone through ``forward`` with its own adapter."""
    outs = [detector.forward(pixels[i : i + 1], a) for i, a in enumerate(adapters)]
    return torch.cat([s for s, _ in outs]), torch.cat([m for _, m in outs])


@pytest.mark.parametrize("mixed_lora", ["group", "gather", "split"])
@pytest.mark.parametrize("merge", [False, True])
def test_mixed_batch_equals_the_per_product_path(clip_products, mixed_lora, merge):
    backbone, p, pixels = clip_products
    detector = Detector(backbone, merge_lora=merge, mixed_lora=mixed_lora)
    order = [p["m1"], p["x"], p["m2"], p["y"], p["x"], p["m1"], p["d"], p["y"]]
    want_scores, want_maps = reference(Detector(backbone), pixels, order)
    scores, maps = detector.forward_mixed(pixels, order)
    assert torch.allclose(scores, want_scores, atol=ATOL) and torch.allclose(maps, want_maps, atol=ATOL)
    # the LoRA really matters: sample 1 scored by m1 (x's memory and calibration, no LoRA) is far from x's score
    without_lora = detector.forward(pixels[1:2], p["m1"])[1]
    assert (without_lora - want_maps[1:2]).abs().max() > 100 * ATOL
    # no hook, fold or activation leaks out: a plain forward afterwards is the frozen model's again
    assert all(not m._forward_hooks for m in backbone.visual.modules())
    assert torch.allclose(Detector(backbone).forward(pixels[:1], p["m1"])[1], want_maps[:1], atol=ATOL)


def test_mixed_batch_runs_one_backbone_forward(clip_products, monkeypatch):
    backbone, p, pixels = clip_products
    calls: list[int] = []
    extract = backbone.extract
    monkeypatch.setattr(backbone, "extract", lambda px, **kw: calls.append(px.shape[0]) or extract(px, **kw))
    order = [p["m1"], p["x"], p["m2"], p["y"]] * 2
    Detector(backbone, mixed_lora="group").forward_mixed(pixels, order)
    assert calls == [8]  # four products incl. two LoRAs, one forward over all 8 images
    calls.clear()
    Detector(backbone, mixed_lora="split").forward_mixed(pixels, order)
    assert sorted(calls) == [2, 2, 4]  # the grouping fallback: x, y, and the two memory products together
    calls.clear()
    Detector(backbone).forward_mixed(pixels, [p["m1"], p["d"]] * 4)
    assert calls == [4, 4]  # DPAM is another forward: split by it, nothing else


def test_mixed_batch_on_the_offline_backbone():
    backbone = load_backbone("imagenet:efficientnet-lite0", image_size=64)
    detector = Detector(backbone)
    a = fit(detector, range(4), "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # product b: the inverted pattern, so its memory disagrees with a's
        b = detector.fit_memory([Image.fromarray(255 - textured(s)) for s in range(4)], category="b",
                                calibration_views=0)
    pixels = backbone.preprocess([Image.fromarray(textured(40 + i, jitter=0.1)) for i in range(4)])
    order = [a, b, b, a]
    scores, maps = detector.forward_mixed(pixels, order)
    want_scores, want_maps = reference(detector, pixels, order)
    assert torch.allclose(scores, want_scores, atol=ATOL) and torch.allclose(maps, want_maps, atol=ATOL)
    assert (detector.forward(pixels[1:2], a)[1] - want_maps[1:2]).abs().max() > 100 * ATOL  # b's rows are b's


def test_mixed_batch_rejects_a_length_mismatch(clip_products):
    backbone, p, pixels = clip_products
    with pytest.raises(ValueError, match="8 images but 2 adapters"):
        Detector(backbone).forward_mixed(pixels, [p["m1"], p["x"]])


@pytest.mark.parametrize("layout", [{"resize": "native"}, {"resize": "squash", "tile": 50}])
def test_mixed_batch_in_a_non_square_or_tiled_frame_equals_each_alone(clip_products, layout):
    """Two products cutting 150x60 parts into the same native frame (or the same tiles) share one forward, and each
    image scores as its product alone; products of different frames are refused, not scored in the wrong one."""
    backbone, p, _ = clip_products
    detector = Detector(backbone)
    wide = [Image.fromarray(textured(s)).resize((150, 60)) for s in range(8)]
    geometry = detector.plan_geometry([im.size for im in wide], **layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = detector.fit_memory(wide[:4], category="a", geometry=geometry, calibration_views=0)
        b = detector.fit_memory([Image.fromarray(255 - np.asarray(im)) for im in wide[:4]], category="b",
                                geometry=geometry, calibration_views=0)
    views = geometry.views_per_image
    pixels = backbone.preprocess(wide[4:], geometry)
    pixels = pixels.reshape(4, views, *pixels.shape[1:]) if views > 1 else pixels
    assert tuple(pixels.shape[-2:]) != (backbone.image_size, backbone.image_size) or views > 1
    order = [a, b, b, a]
    scores, maps = detector.forward_mixed(pixels, order)
    want_scores, want_maps = reference(detector, pixels, order)
    assert maps.shape == want_maps.shape == (4, views * geometry.frame[0], geometry.frame[1])
    assert torch.allclose(scores, want_scores, atol=ATOL) and torch.allclose(maps, want_maps, atol=ATOL)
    assert (detector.forward(pixels[1:2], a)[1] - want_maps[1:2]).abs().max() > 100 * ATOL  # b's rows are b's
    with pytest.raises(ValueError, match="one model frame and one view count"):
        detector.forward_mixed(pixels[:2], [a, p["m1"]])


def _zeros_allocated(detector: Detector, pixels: torch.Tensor, order) -> int:
    """``aten::zeros`` calls in one mixed batch: the gather stacks are zero-padded tensors, so each rebuild shows."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        detector.forward_mixed(pixels, order)
    return sum(1 for e in prof.events() if e.name == "aten::zeros")


def test_gather_stacks_are_built_once_and_rebuilt_only_when_an_adapter_changes(clip_products):
    """The per-sample A/B stacks stay on the device across batches: a second batch with the same resident
    adapters allocates no stack at all (before: two zero-padded stacks and a scale vector per LoRA layer per
    batch, each filled from the adapters); reloading an adapter's tensors rebuilds them, and the result follows."""
    backbone, p, pixels = clip_products
    detector = Detector(backbone, mixed_lora="gather")
    order = [p["m1"], p["x"], p["m2"], p["y"]] * 2
    layers = sum(1 for m in backbone.visual.modules() if isinstance(m, BaseTunerLayer))
    detector.forward_mixed(pixels, order)  # x and y resident (earlier tests may have built stacks already)
    with torch.inference_mode():  # reloading x's own tensors: every cached stack is dropped
        lora.load_state(backbone.visual, "x", p["x"].lora_state)
    first = _zeros_allocated(detector, pixels, order)
    again = _zeros_allocated(detector, pixels, order)  # the scoring's own allocations, no stack
    assert first - again == 2 * layers  # only the first batch builds the A and B stacks of every LoRA layer
    assert _zeros_allocated(detector, pixels, order[4:] + order[:4]) == again  # other order, same adapters
    gen = torch.Generator().manual_seed(1)
    retrained = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in p["x"].lora_state.items()}
    try:
        with torch.inference_mode():  # the adapter was attached under inference mode, as the service does
            lora.load_state(backbone.visual, "x", retrained)
        fresh = dataclasses.replace(p["x"], lora_state=retrained)
        reloaded = [fresh if a is p["x"] else a for a in order]
        assert _zeros_allocated(detector, pixels, reloaded) - again == 2 * layers  # stale stacks were dropped
        want_scores, want_maps = reference(Detector(backbone), pixels, reloaded)
        scores, maps = detector.forward_mixed(pixels, reloaded)
        assert torch.allclose(scores, want_scores, atol=ATOL) and torch.allclose(maps, want_maps, atol=ATOL)
    finally:
        with torch.inference_mode():
            lora.load_state(backbone.visual, "x", p["x"].lora_state)
