"""Tests for training losses: hand-computed values, limiting cases and autograd behaviour.

Numeric tolerances: float64 closed-form comparisons use 1e-12 (pure rounding); float32 ones use 1e-6
(about 8 ulps of the values involved). gradcheck runs in float64 with its default tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    LossWeights,
    alignment_loss,
    binary_focal_loss,
    combine_losses,
    compute_loss_parts,
    dice_loss,
    margin_loss,
)

# ---------------------------------------------------------------- focal


def test_focal_matches_hand_computed_two_element_example() -> None:
    p = torch.tensor([0.9, 0.2], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # positive: -0.25 * (1 - 0.9)^2 * ln 0.9 ; negative: -0.75 * 0.2^2 * ln 0.8
    pos = -0.25 * 0.1**2 * math.log(0.9)
    neg = -0.75 * 0.2**2 * math.log(0.8)
    assert abs(binary_focal_loss(p, y).item() - (pos + neg) / 2) < 1e-12
    assert abs(binary_focal_loss(p, y, reduction="sum").item() - (pos + neg)) < 1e-12
    logits = torch.log(p / (1 - p))
    assert abs(binary_focal_loss(logits, y, from_logits=True).item() - (pos + neg) / 2) < 1e-12


def test_focal_with_gamma0_alpha_half_is_half_bce() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.rand(64, generator=g) * 0.98 + 0.01
    y = (torch.rand(64, generator=g) > 0.5).float()
    focal = binary_focal_loss(p, y, alpha=0.5, gamma=0.0)
    assert torch.allclose(focal, 0.5 * F.binary_cross_entropy(p, y), atol=1e-6)
    x = torch.randn(64, generator=g) * 3
    focal_logits = binary_focal_loss(x, y, alpha=0.5, gamma=0.0, from_logits=True)
    assert torch.allclose(focal_logits, 0.5 * F.binary_cross_entropy_with_logits(x, y), atol=1e-6)


def test_focal_downweights_easy_examples_and_is_finite_for_extreme_logits() -> None:
    y = torch.tensor([1.0])
    easy, hard = binary_focal_loss(torch.tensor([0.95]), y), binary_focal_loss(torch.tensor([0.3]), y)
    ratio_focal = (easy / hard).item()
    bce = F.binary_cross_entropy
    ratio_bce = (bce(torch.tensor([0.95]), y) / bce(torch.tensor([0.3]), y)).item()
    assert ratio_focal < ratio_bce / 10  # (0.05/0.7)^2 ~ 0.005: focusing must be much stronger than BCE
    x = torch.tensor([-200.0, 200.0], requires_grad=True)
    loss = binary_focal_loss(x, torch.tensor([1.0, 0.0]), from_logits=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("from_logits", [False, True])
def test_focal_gradcheck(from_logits: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, generator=g, dtype=torch.float64) * 0.8 + 0.1
    if from_logits:
        x = torch.randn(6, generator=g, dtype=torch.float64)
    x.requires_grad_(True)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.3, 0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: binary_focal_loss(t, y, from_logits=from_logits), (x,))


# ---------------------------------------------------------------- dice


def test_dice_perfect_is_zero_disjoint_is_one_empty_is_zero() -> None:
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 2:5] = 1.0
    assert dice_loss(mask.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.zeros_like(mask)
    other[:, :, 6:, 6:] = 1.0
    # eps=1e-6 over |P|+|T| = 13 pixels: deviation from 1 is ~1e-7.
    assert dice_loss(other, mask).item() == pytest.approx(1.0, abs=1e-6)
    empty = torch.zeros_like(mask)
    assert dice_loss(empty, empty).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_half_overlap_and_gradcheck() -> None:
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert dice_loss(p, t).item() == pytest.approx(0.5, abs=1e-6)  # 1 - 2*1/(2+2)
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(2, 1, 3, 3, dtype=torch.float64) > 0.5).double()
    assert torch.autograd.gradcheck(lambda z: dice_loss(z, m, from_logits=True), (x,))


# ---------------------------------------------------------------- margin


def test_margin_zero_when_separated_by_more_than_m() -> None:
    n = torch.tensor([0.0, 0.1], requires_grad=True)
    a = torch.tensor([0.7, 0.9], requires_grad=True)  # min gap 0.6 > m = 0.5
    loss = margin_loss(n, a, m=0.5)
    loss.backward()
    assert loss.item() == 0.0 and not n.grad.any() and not a.grad.any()


def test_margin_hand_value_and_gradient_direction() -> None:
    n = torch.tensor([0.4], requires_grad=True)
    a = torch.tensor([0.6, 1.0], requires_grad=True)
    loss = margin_loss(n, a, m=0.5)  # pairs: relu(0.5 - 0.2) = 0.3, relu(0.5 - 0.6) = 0 -> mean 0.15
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    loss.backward()
    assert n.grad.item() > 0 and a.grad[0].item() < 0 and a.grad[1].item() == 0


def test_margin_empty_side_is_zero_and_differentiable() -> None:
    n = torch.tensor([0.3, 0.2], requires_grad=True)
    loss = margin_loss(n, torch.empty(0), m=0.5)
    loss.backward()
    assert loss.item() == 0.0 and n.grad is not None


# ---------------------------------------------------------------- alignment


def test_alignment_hand_values() -> None:
    t_n, t_a = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    # On the normal prompt: 1 - 1 = 0 and relu(0 - 1 + 0.1) = 0.
    assert alignment_loss(t_n[None], t_n, t_a, margin=0.1).item() == pytest.approx(0.0, abs=1e-6)
    # On the anomalous prompt: (1 - 0) + relu(1 - 0 + 0.1) = 2.1.
    assert alignment_loss(t_a[None], t_n, t_a, margin=0.1).item() == pytest.approx(2.1, abs=1e-6)


def test_alignment_sgd_step_pulls_features_toward_normal_prompt() -> None:
    g = torch.Generator().manual_seed(2)
    t_n = F.normalize(torch.randn(16, generator=g), dim=0)
    t_a = F.normalize(torch.randn(16, generator=g), dim=0)
    f = F.normalize(torch.randn(8, 16, generator=g), dim=1).requires_grad_(True)
    loss0 = alignment_loss(f, t_n, t_a)
    loss0.backward()
    with torch.no_grad():
        cos0 = F.cosine_similarity(f, t_n[None]).mean()
        f1 = f - 0.1 * f.grad
        cos1 = F.cosine_similarity(f1, t_n[None]).mean()
        loss1 = alignment_loss(f1, t_n, t_a)
    assert loss1 < loss0 and cos1 > cos0


def test_alignment_accepts_prompt_ensembles() -> None:
    t_n = torch.tensor([[1.0, 0.1, 0.0], [1.0, -0.1, 0.0]])  # ensemble averages to e1
    t_a = torch.tensor([0.0, 1.0, 0.0])
    f = torch.tensor([[1.0, 0.0, 0.0]])
    assert alignment_loss(f, t_n, t_a).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- combination


def test_combine_applies_weights_and_logs_floats() -> None:
    values = {"image_focal": 1.0, "margin": 2.0, "pixel_focal": 3.0, "pixel_dice": 4.0, "alignment": 5.0}
    parts = {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}
    w = LossWeights(alignment=0.5)
    total, log = combine_losses(parts, w)
    assert total.item() == pytest.approx(1.0 + 0.1 * 2.0 + 4.0 * (3.0 + 4.0) + 0.5 * 5.0)
    assert log["total"] == pytest.approx(total.item()) and log["margin"] == 2.0
    assert all(isinstance(v, float) for v in log.values())
    total.backward()
    assert parts["pixel_dice"].grad.item() == 4.0 and parts["margin"].grad.item() == pytest.approx(0.1)


def test_combine_rejects_unknown_or_empty_parts() -> None:
    with pytest.raises(KeyError):
        combine_losses({"pixel_focla": torch.tensor(1.0)})
    with pytest.raises(ValueError):
        combine_losses({})


def test_compute_loss_parts_end_to_end_backward() -> None:
    g = torch.Generator().manual_seed(3)
    img_logits = torch.randn(4, generator=g, requires_grad=True)
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    px_logits = torch.randn(4, 1, 8, 8, generator=g, requires_grad=True)
    masks = (torch.rand(4, 1, 8, 8, generator=g) > 0.8).float()
    feats = torch.randn(5, 16, generator=g, requires_grad=True)
    t_n, t_a = torch.randn(16, generator=g), torch.randn(16, generator=g)
    parts = compute_loss_parts(
        image_scores=img_logits,
        labels=labels,
        pixel_scores=px_logits,
        masks=masks,
        features=feats,
        t_normal=t_n,
        t_anomalous=t_a,
        from_logits=True,
    )
    assert set(parts) == {"image_focal", "margin", "pixel_focal", "pixel_dice", "alignment"}
    total, _ = combine_losses(parts)
    total.backward()
    for x in (img_logits, px_logits, feats):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    image_only = compute_loss_parts(image_scores=img_logits.sigmoid(), labels=labels)
    assert set(image_only) == {"image_focal", "margin"}
