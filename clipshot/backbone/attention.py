"""Attention with separate q/k/v/out projections, and the V-V attention that DPAM uses.

open_clip's blocks use ``nn.MultiheadAttention``, which packs q/k/v into one parameter and reads
``out_proj.weight`` directly, so peft LoRA cannot attach to q, k, v or out. ``SplitAttention`` carries the
very same weights as four ``nn.Linear`` layers and computes the same function (tested to 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitAttention(nn.Module):
    """Drop-in for the ``nn.MultiheadAttention`` of an open_clip ``ResidualAttentionBlock``."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only plain self-attention blocks can be split")
        dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * dim : (i + 1) * dim])
                proj.bias.copy_(mha.in_proj_bias[i * dim : (i + 1) * dim])
        self.out_proj = nn.Linear(dim, dim)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        return x.view(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        batch, heads, tokens, head_dim = x.shape
        return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):  # noqa: ARG002
        """Self-attention; the signature mirrors ``nn.MultiheadAttention`` so open_clip's block calls it unchanged.

        A float ``attn_mask`` is added to the logits by both. A boolean one is refused: ``nn.MultiheadAttention``
        reads True as "masked out" while ``scaled_dot_product_attention`` reads True as "may attend", so passing it
        through would silently invert the mask."""
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            raise ValueError("SplitAttention takes no boolean attn_mask (nn.MultiheadAttention and "
                             "scaled_dot_product_attention give True opposite meanings); pass an additive float mask")
        x = query if self.batch_first else query.transpose(0, 1)
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(self._merge(out))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def value_value(self, x: torch.Tensor) -> torch.Tensor:
        """V-V self-attention (batch-first): each token attends by value similarity, which keeps patch
        tokens local instead of collapsing onto the global/CLS pattern (CLIP Surgery / AnomalyCLIP DPAM)."""
        v = self._heads(self.v_proj(x))
        return self.out_proj(self._merge(F.scaled_dot_product_attention(v, v, v)))


def split_attention(blocks: nn.ModuleList) -> None:
    """Replace each block's ``nn.MultiheadAttention`` by an equivalent ``SplitAttention`` in place."""
    for block in blocks:
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = SplitAttention(block.attn)
        elif not isinstance(block.attn, SplitAttention):
            raise ValueError(f"unsupported attention module {type(block.attn).__name__} in open_clip block")
