"""Training losses for the few-shot adapter.

Why these terms:
- focal loss: synthetic anomalies cover a few percent of pixels, so plain BCE is dominated by easy
  normal pixels; focal down-weights confident predictions.
- dice loss: overlap-based, insensitive to the normal/anomalous pixel imbalance; complements focal.
- margin loss: the service thresholds image scores, so we want anomalous scores to exceed normal ones
  by a fixed gap, not just be ranked correctly on average.
- alignment loss (PromptAD-style): with only normal shots, features are pulled to the "normal" prompt
  and explicitly kept a margin away from the "anomalous" prompt, so text prompts stay discriminative.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "LossWeights",
    "alignment_loss",
    "binary_focal_loss",
    "combine_losses",
    "compute_loss_parts",
    "dice_loss",
    "margin_loss",
]

_EPS = 1e-6


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def binary_focal_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    from_logits: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary focal loss ``-a_t (1 - p_t)^g log p_t`` on probabilities (default) or logits.

    Written in the two-term form ``-[a y (1-p)^g log p + (1-a)(1-y) p^g log(1-p)]``, which equals the
    classic form for hard labels and also accepts soft targets. With ``gamma=0, alpha=0.5`` it is exactly
    ``0.5 * BCE``. The logits path uses ``logsigmoid`` so large logits do not produce inf/NaN.
    """
    target = target.to(pred.dtype)
    if from_logits:
        log_p, log_1mp = F.logsigmoid(pred), F.logsigmoid(-pred)
        p = torch.sigmoid(pred)
    else:
        p = pred.clamp(_EPS, 1.0 - _EPS)
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
    pos = alpha * target * (1.0 - p).pow(gamma) * log_p
    neg = (1.0 - alpha) * (1.0 - target) * p.pow(gamma) * log_1mp
    return _reduce(-(pos + neg), reduction)


def dice_loss(
    pred: torch.Tensor, target: torch.Tensor, *, from_logits: bool = False, eps: float = _EPS
) -> torch.Tensor:
    """Soft dice loss ``1 - (2|P.T| + eps) / (|P| + |T| + eps)`` per sample, averaged over the batch.

    Shapes (B, ...) with the first dim the batch. ``eps`` is tiny so a disjoint prediction scores ~1
    while an all-empty prediction on an all-empty (normal) mask scores 0, not 1.
    """
    p = torch.sigmoid(pred) if from_logits else pred
    p = p.reshape(p.shape[0], -1)
    t = target.to(p.dtype).reshape(target.shape[0], -1)
    inter = (p * t).sum(1)
    dice = (2.0 * inter + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1.0 - dice).mean()


def margin_loss(normal_scores: torch.Tensor, anomalous_scores: torch.Tensor, m: float = 0.5) -> torch.Tensor:
    """Pairwise hinge ``mean_{i,j} relu(m - (a_j - n_i))`` over all normal/anomalous pairs.

    Zero iff every anomalous score exceeds every normal score by at least ``m``. Returns a zero that is
    still attached to the graph when either side is empty (e.g. a batch with no synthetic anomalies).
    """
    n, a = normal_scores.reshape(-1), anomalous_scores.reshape(-1)
    if n.numel() == 0 or a.numel() == 0:
        return (n.sum() + a.sum()) * 0.0
    return F.relu(m - (a[None, :] - n[:, None])).mean()


def _prompt(t: torch.Tensor) -> torch.Tensor:
    """(D,) or an ensemble (K, D) of prompt embeddings -> one unit vector (D,)."""
    t = F.normalize(t, dim=-1)
    return F.normalize(t.mean(0), dim=0) if t.ndim == 2 else t


def alignment_loss(
    features: torch.Tensor, t_normal: torch.Tensor, t_anomalous: torch.Tensor, margin: float = 0.1
) -> torch.Tensor:
    """PromptAD-style ``mean(1 - cos(f, t_n)) + mean(relu(cos(f, t_a) - cos(f, t_n) + margin))``.

    ``features`` (N, D) are normal image/patch features (re-normalised here; a no-op if already unit).
    The first term pulls normals to the normal prompt; the second keeps them at least ``margin`` closer
    to it than to the anomalous prompt.
    """
    f = F.normalize(features.reshape(-1, features.shape[-1]), dim=-1)
    cos_n = f @ _prompt(t_normal)
    cos_a = f @ _prompt(t_anomalous)
    return (1.0 - cos_n).mean() + F.relu(cos_a - cos_n + margin).mean()


@dataclass(frozen=True)
class LossWeights:
    """Weights of the combined objective.

    total = image_focal * L_focal(img) + margin_beta * L_margin + pixel_lambda * (L_focal(px) + L_dice)
            + alignment * L_align
    """

    image_focal: float = 1.0
    margin_beta: float = 0.1
    margin_m: float = 0.5
    pixel_lambda: float = 4.0
    alignment: float = 1.0
    align_margin: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def factor(self, part: str) -> float:
        """Weight applied to a named loss part (see ``combine_losses``)."""
        table = {
            "image_focal": self.image_focal,
            "margin": self.margin_beta,
            "pixel_focal": self.pixel_lambda,
            "pixel_dice": self.pixel_lambda,
            "alignment": self.alignment,
        }
        if part not in table:
            raise KeyError(f"unknown loss part {part!r}; expected one of {sorted(table)}")
        return table[part]


def compute_loss_parts(
    weights: LossWeights | None = None,
    *,
    image_scores: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pixel_scores: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    t_normal: torch.Tensor | None = None,
    t_anomalous: torch.Tensor | None = None,
    from_logits: bool = False,
) -> dict[str, torch.Tensor]:
    """Compute the parts ``combine_losses`` expects, using the focal/margin settings in ``weights``.

    Image terms need ``image_scores`` (B,) + ``labels`` (B,); pixel terms need ``pixel_scores`` + ``masks``
    (B, 1, H, W); alignment needs normal ``features`` + both prompts. Missing inputs skip their terms.
    Margin uses sigmoid(logits) when ``from_logits`` so ``margin_m`` is always on the probability scale.
    """
    w = weights or LossWeights()
    parts: dict[str, torch.Tensor] = {}
    if image_scores is not None and labels is not None:
        parts["image_focal"] = binary_focal_loss(
            image_scores, labels, w.focal_alpha, w.focal_gamma, from_logits=from_logits
        )
        probs = torch.sigmoid(image_scores) if from_logits else image_scores
        is_anom = labels.reshape(-1) > 0.5
        parts["margin"] = margin_loss(probs.reshape(-1)[~is_anom], probs.reshape(-1)[is_anom], w.margin_m)
    if pixel_scores is not None and masks is not None:
        parts["pixel_focal"] = binary_focal_loss(
            pixel_scores, masks, w.focal_alpha, w.focal_gamma, from_logits=from_logits
        )
        parts["pixel_dice"] = dice_loss(pixel_scores, masks, from_logits=from_logits)
    if features is not None and t_normal is not None and t_anomalous is not None:
        parts["alignment"] = alignment_loss(features, t_normal, t_anomalous, w.align_margin)
    return parts


def combine_losses(
    parts: Mapping[str, torch.Tensor], weights: LossWeights | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of already-computed scalar loss parts, plus plain floats for logging.

    Accepted keys: image_focal, margin, pixel_focal, pixel_dice, alignment; any subset may be present
    (e.g. no pixel terms for zero-shot fine-tuning). Unknown keys raise, so a typo cannot silently drop
    a term. The log dict holds each unweighted part and ``total``.
    """
    weights = weights or LossWeights()
    if not parts:
        raise ValueError("no loss parts given")
    total: torch.Tensor | None = None
    log: dict[str, float] = {}
    for name, value in parts.items():
        if value.numel() != 1:
            raise ValueError(f"loss part {name!r} must be a scalar, got shape {tuple(value.shape)}")
        term = weights.factor(name) * value.reshape(())
        total = term if total is None else total + term
        log[name] = float(value.detach())
    assert total is not None
    log["total"] = float(total.detach())
    return total, log
