"""Text side: handcrafted prompt ensembles and learnable (CoOp / deep) prompts, both ending in two embeddings.

Everything here runs once per adapter; the two resulting vectors (normal, anomalous) are cached in the
bundle, so inference never runs the text encoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of the {}.", "a photo of a {}.",
    "a blurry photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a photo of the small {}.", "a photo of the large {}.", "there is a {} in the scene.",
    "this is a {} in the scene.", "this is one {} in the scene.", "a jpeg corrupted photo of the {}.",
)
GENERIC_OBJECT = "object"


def _text_model(model: nn.Module) -> open_clip.CLIP:
    if not hasattr(model, "token_embedding") or not hasattr(model, "ln_final"):
        raise ValueError("learnable prompts need an open_clip CLIP model with the built-in text tower")
    return model


def tokenizer_for(model: open_clip.CLIP) -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's BPE tokenizer; it ships its vocabulary, so it works offline."""
    return open_clip.get_tokenizer("ViT-B-16", context_length=model.context_length)


@torch.no_grad()
def handcrafted_embeddings(model: open_clip.CLIP, object_name: str | None = None) -> torch.Tensor:
    """WinCLIP-style compositional ensemble: states x templates, averaged per state -> (2, D)."""
    name = (object_name or GENERIC_OBJECT).strip() or GENERIC_OBJECT
    tokenizer = tokenizer_for(model)
    device = model.token_embedding.weight.device
    rows = []
    for states in (NORMAL_STATES, ANOMALOUS_STATES):
        sentences = [t.format(s.format(name)) for s in states for t in TEMPLATES]
        emb = F.normalize(model.encode_text(tokenizer(sentences).to(device)).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


@dataclass
class PromptSpec:
    """Learnable prompt layout: ``[ctx_1..ctx_n] {object}.`` and ``[ctx_1..ctx_n] damaged {object}.``"""

    n_ctx: int = 8
    init: str | None = None  # phrase whose token embeddings initialise the context (e.g. "a photo of a")
    object_name: str = GENERIC_OBJECT  # "object" = object-agnostic (AnomalyCLIP)
    deep_tokens: int = 0  # tokens replaced at the input of each deep layer
    deep_layers: int = 0  # how many text layers (after the first) get their own deep tokens

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.deep_tokens < 0 or self.deep_layers < 0:
            raise ValueError("n_ctx must be >= 1 and deep prompt sizes >= 0")
        if self.deep_tokens > self.n_ctx:
            raise ValueError("deep_tokens must not exceed n_ctx (they replace the context positions)")

    def to_dict(self) -> dict:
        return asdict(self)


class PromptLearner(nn.Module):
    """CoOp context vectors (one set per state) plus optional deep prompts, encoded by the frozen text tower."""

    tokens: torch.Tensor  # buffers, registered in __init__
    base_embeddings: torch.Tensor

    def __init__(self, model: open_clip.CLIP, spec: PromptSpec):
        super().__init__()
        self.clip = [_text_model(model)]  # a list keeps the frozen model out of this module's parameters
        self.spec = spec
        width = model.token_embedding.weight.shape[1]
        if spec.deep_layers >= len(model.transformer.resblocks):
            raise ValueError(f"deep_layers must be < {len(model.transformer.resblocks)} text layers")
        tokenizer = tokenizer_for(model)
        placeholder = " ".join(["X"] * spec.n_ctx)
        texts = [f"{placeholder} {spec.object_name}.", f"{placeholder} damaged {spec.object_name}."]
        device = model.token_embedding.weight.device
        self.register_buffer("tokens", tokenizer(texts).to(device), persistent=False)
        with torch.no_grad():
            base = model.token_embedding(self.tokens).float()
        self.register_buffer("base_embeddings", base, persistent=False)
        ctx = torch.empty(2, spec.n_ctx, width, device=device).normal_(std=0.02)
        if spec.init:
            init_tokens = tokenizer([spec.init]).to(device)
            count = int((init_tokens[0] > 0).sum()) - 2  # minus start/end tokens
            if count != spec.n_ctx:
                raise ValueError(f"init phrase {spec.init!r} has {count} tokens but n_ctx is {spec.n_ctx}")
            with torch.no_grad():
                ctx[:] = model.token_embedding(init_tokens)[0, 1 : 1 + count].float()
        self.ctx = nn.Parameter(ctx)
        deep = torch.empty(max(spec.deep_layers, 0), 2, spec.deep_tokens, width, device=device).normal_(std=0.02)
        self.deep = nn.Parameter(deep) if spec.deep_layers and spec.deep_tokens else None

    def forward(self) -> torch.Tensor:
        """(2, D) L2-normalised embeddings of the normal and the anomalous prompt."""
        model = self.clip[0]
        n = self.spec.n_ctx
        x = torch.cat([self.base_embeddings[:, :1], self.ctx, self.base_embeddings[:, 1 + n :]], dim=1)
        cast = model.transformer.get_cast_dtype()
        x = (x + model.positional_embedding).to(cast)
        mask = model.attn_mask
        for index, block in enumerate(model.transformer.resblocks):
            if self.deep is not None and 1 <= index <= self.spec.deep_layers:
                k = self.spec.deep_tokens
                x = torch.cat([x[:, :1], self.deep[index - 1].to(cast), x[:, 1 + k :]], dim=1)
            x = block(x, attn_mask=mask)
        x = model.ln_final(x)
        eos = getattr(model, "text_eos_id", None)
        pooled = text_global_pool(x, self.tokens, model.text_pool_type, eos_token_id=eos)
        projection = model.text_projection
        pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        return F.normalize(pooled.float(), dim=-1)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"prompt.ctx": self.ctx.detach().cpu().float().clone()}
        if self.deep is not None:
            out["prompt.deep"] = self.deep.detach().cpu().float().clone()
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.ctx.copy_(tensors["prompt.ctx"])
            if self.deep is not None:
                self.deep.copy_(tensors["prompt.deep"])
