"""Folding the active LoRA into the base weights (``merge_lora``): same features as the LoRA branch, far fewer
ops, and the frozen weights always come back bit-exactly before anything else runs on them."""

from __future__ import annotations

import dataclasses
import warnings

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


@pytest.fixture()
def setup():
    """A private backbone (folding edits its weights), a memory adapter and two LoRA variants of it."""
    backbone = load_backbone("test:tiny-clip")
    plain, folding = Detector(backbone), Detector(backbone, merge_lora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = plain.fit_memory([Image.fromarray(textured(s)) for s in range(4)], category="w", calibration_views=0)
    spec = lora.LoraSpec(rank=4)
    lora.add_adapter(backbone.visual, "shape", spec)
    shapes = lora.state(backbone.visual, "shape")
    lora.remove_adapter(backbone.visual, "shape")
    gen = torch.Generator().manual_seed(0)
    x, y = (dataclasses.replace(base, lora=spec, uid=uid, lora_state={
        k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in shapes.items()}) for uid in ("x", "y"))
    pixels = backbone.preprocess([Image.fromarray(textured(9))])
    return backbone, plain, folding, base, x, y, pixels


def frozen(backbone) -> dict[str, torch.Tensor]:
    return {k.replace("base_layer.", ""): v.clone() for k, v in backbone.model.state_dict().items() if "lora_" not in k}


def test_folded_adapter_gives_the_lora_branchs_features(setup):
    backbone, plain, folding, base, x, _, pixels = setup
    original = plain.features(pixels, base).cls
    branch = plain.features(pixels, x)
    folded = folding.features(pixels, x)
    assert lora.folded_adapter(backbone.visual) == "x"  # stays folded after the batch: no copy per batch
    assert not torch.allclose(branch.cls, original, atol=1e-4)  # the adapter really changes the output
    for a, b in zip([branch.cls, *branch.patches], [folded.cls, *folded.patches], strict=True):
        assert torch.allclose(a, b, atol=1e-5)  # fp32: W + BA vs W x + B(A x) differ by rounding only
    assert torch.equal(plain.features(pixels, base).cls, original)  # unfolded again, bit-exactly


def test_switching_products_restores_the_frozen_weights_bit_exactly(setup):
    backbone, plain, folding, base, x, y, pixels = setup
    before = frozen(backbone)
    for adapter in (x, y, x):
        folding.features(pixels, adapter)
        assert lora.folded_adapter(backbone.visual) == adapter.uid
        assert any(not torch.equal(before[k], v) for k, v in frozen(backbone).items())  # really folded in
    folding.features(pixels, base)  # a product without LoRA runs on the frozen weights
    assert lora.folded_adapter(backbone.visual) is None
    after = frozen(backbone)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_any_unmerged_use_unfolds_first(setup):
    """Training (set_trainable), reloading the folded adapter's tensors and evicting it all see frozen weights."""
    backbone, plain, folding, base, x, y, pixels = setup
    before = frozen(backbone)

    def unchanged() -> bool:
        return all(torch.equal(before[k], v) for k, v in frozen(backbone).items())

    folding.features(pixels, x)
    lora.add_adapter(backbone.visual, "trainee", lora.LoraSpec(rank=2))
    lora.set_trainable(backbone.visual, "trainee")
    assert lora.folded_adapter(backbone.visual) is None and unchanged()
    lora.remove_adapter(backbone.visual, "trainee")
    folding.features(pixels, x)
    lora.load_state(backbone.visual, "x", x.lora_state)
    assert lora.folded_adapter(backbone.visual) is None and unchanged()
    folding.features(pixels, y)
    folding.detach(y)
    assert lora.folded_adapter(backbone.visual) is None and unchanged()


def top_level_ops(detector: Detector, pixels: torch.Tensor, adapter) -> int:
    with torch.inference_mode():
        detector.forward(pixels, adapter)  # warm: folding happens here, not in the profiled call
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            detector.forward(pixels, adapter)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))


def test_a_folded_forward_runs_exactly_the_plain_backbones_ops(setup):
    """The point of folding: per batch, a LoRA product costs what the frozen backbone costs."""
    _, plain, folding, base, x, _, pixels = setup
    frozen_ops, branch_ops, folded_ops = (top_level_ops(d, pixels, a) for d, a in
                                          ((plain, base), (plain, x), (folding, x)))
    assert folded_ops == frozen_ops < branch_ops


def test_fine_tune_between_folded_predictions_trains_exactly_as_alone(setup):
    """The service interleaves a job's training steps with predictions of other products; with folding on, every
    step must still see the frozen weights: same seed, bit-identical LoRA whether or not predictions ran between."""
    from training.fewshot import FewShotConfig, FewShotTrainer

    backbone, _, folding, _, x, _, pixels = setup
    shots = [Image.fromarray(textured(20 + s)) for s in range(4)]
    config = FewShotConfig(steps=4, batch_size=4, lora=lora.LoraSpec(rank=2), holdout=1, val_anomalies_per_shot=1,
                           val_normal_views=0)

    def train(interleave: bool) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = FewShotTrainer(folding, shots, category="job", config=config)
            for _ in trainer.steps():
                if interleave:
                    folding.features(pixels, x)  # another product's batch, folded in between steps
            return trainer.result().adapter.lora_state

    alone, interleaved = train(False), train(True)
    assert alone.keys() == interleaved.keys() and all(torch.equal(alone[k], interleaved[k]) for k in alone)


def test_bf16_fold_is_the_correctly_rounded_fp32_sum_and_matches_the_branch():
    """On a bf16 backbone every folded weight is ``W + scale * B @ A`` computed in fp32 from the adapter's own fp32
    tensors and rounded once; rounding the LoRA to bf16, then the delta, then the sum left ~2 % of the weights a
    step or more off (up to hundreds of steps where W is near zero)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on CPU warns that it is slow
        backbone = load_backbone("test:tiny-clip", precision="bf16")
        plain, folding = Detector(backbone), Detector(backbone, merge_lora=True)
        base = plain.fit_memory([Image.fromarray(textured(s)) for s in range(4)], category="w",
                                calibration_views=0)
    spec = lora.LoraSpec(rank=4)
    lora.add_adapter(backbone.visual, "shape", spec)
    shapes = lora.state(backbone.visual, "shape")
    lora.remove_adapter(backbone.visual, "shape")
    gen = torch.Generator().manual_seed(0)
    # 0.01: a delta of a few bf16 steps of the weights, the size where double rounding shows
    master = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in shapes.items()}
    x = dataclasses.replace(base, lora=spec, uid="x", lora_state=master)
    pixels = backbone.preprocess([Image.fromarray(textured(9))])
    branch = plain.features(pixels, x)
    layers = {n: m for n, m in backbone.visual.named_modules() if isinstance(m, BaseTunerLayer)}
    frozen_weights = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    folded = folding.features(pixels, x)
    assert lora.folded_adapter(backbone.visual) == "x"
    for name, layer in layers.items():
        delta = master[f"{name}.lora_B.weight"] @ master[f"{name}.lora_A.weight"] * layer.scaling["x"]
        expected = (frozen_weights[name].float() + delta).to(torch.bfloat16)
        assert torch.equal(layer.get_base_layer().weight, expected), name
    # bf16 activations: folded vs branch differ by 0.8-0.9 % of the largest feature here (measured, as does the
    # branch vs an fp32 reference); 2 % leaves room for another CPU's kernels, far below the adapter's own effect
    for a, b in zip([branch.cls, *branch.patches], [folded.cls, *folded.patches], strict=True):
        assert float((a.float() - b.float()).abs().max()) <= 0.02 * float(a.float().abs().max())
