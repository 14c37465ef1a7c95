"""Text branch: how much more each patch (and the whole image) resembles "anomalous" than "normal"."""

from __future__ import annotations

import torch

from clipshot.features import Features

DEFAULT_TEMPERATURE = 100.0  # CLIP's logit scale: cosine gaps of a few hundredths become decisive


def anomaly_probability(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(tau * [cos(x, t_normal), cos(x, t_anomalous)])[anomalous] for L2-normalised inputs."""
    logits = temperature * embeddings.float() @ text.float().t()
    return logits.softmax(dim=-1)[..., 1]


def text_maps(features: Features, text: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """(B, h, w) patch anomaly probability averaged over layers."""
    h, w = features.grid
    text = text.to(features.patches[0].device)
    maps = torch.stack([anomaly_probability(p, text, temperature) for p in features.patches]).mean(0)
    return maps.view(-1, h, w)


def text_scores(features: Features, text: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """(B,) image-level anomaly probability from the CLS embedding."""
    if features.cls is None:
        raise ValueError("this backbone has no image-text embedding; the text branch needs a CLIP backbone")
    return anomaly_probability(features.cls, text.to(features.cls.device), temperature)
