"""Several products' LoRAs in ONE forward: the batched base forward plus per-sample low-rank deltas.

Why: a batch that mixes products would otherwise need one backbone forward per LoRA adapter, and a GPU at
small batches is bound by kernel launches, not arithmetic. The frozen base weights run once over the whole
batch; each LoRA layer then adds ``B_a(A_a(x_i)) * scale_a`` for sample i's adapter a (the S-LoRA / Punica idea
for LLMs). Two ways to compute the deltas, picked by measurement (``benchmarks/mixed_batches.py``):

* ``group``: per adapter present, gather its samples (``index_select``), two small matmuls, ``index_add`` back;
  cost grows with the number of distinct adapters in the batch.
* ``gather``: stack every adapter's A/B once per batch (rank zero-padded), gather one A/B per sample and run two
  batched matmuls (``bmm``) for all samples at once; cost grows with the batch, not with the adapters.

Samples whose name is ``None`` get no delta (memory / prompt adapters share the plain base forward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from clipshot.lora import activate

MixedMode = Literal["group", "gather"]
MIXED_MODES: tuple[str, ...] = ("group", "gather")


@contextmanager
def mixed_batch(module: nn.Module, names: Sequence[str | None], *, mode: MixedMode = "group") -> Iterator[None]:
    """Inside the block, sample i of each forward through ``module`` runs with LoRA ``names[i]`` (None: none).

    Every named adapter must be resident (``lora.add_adapter``). The base weights are unfolded first: the
    deltas are added to the frozen model's outputs.
    """
    if mode not in MIXED_MODES:
        raise ValueError(f"mode must be one of {MIXED_MODES}, got {mode!r}")
    activate(module, None)  # plain base path in every layer; the hooks below add the deltas
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    device = next(module.parameters()).device
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None:
            groups.setdefault(name, []).append(i)
    missing = set(groups) - {n for layer in layers for n in layer.lora_A}
    if missing:
        raise ValueError(f"LoRA adapters {sorted(missing)} are not resident")
    index = {name: torch.tensor(rows, device=device) for name, rows in groups.items()}
    handles = []
    for layer in layers:
        present = [name for name in groups if name in layer.lora_A]
        if present:
            hook = _group_hook(present, index) if mode == "group" else _gather_hook(layer, present, names, device)
            handles.append(layer.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _group_hook(present: list[str], index: dict[str, torch.Tensor]) -> Callable:
    rows = torch.cat([index[name] for name in present])  # every delta lands with ONE in-place index_add_

    def hook(layer: BaseTunerLayer, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        deltas = []
        for name in present:
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            sub = x.index_select(0, index[name]).to(lora_a.weight.dtype)
            deltas.append(lora_b(lora_a(layer.lora_dropout[name](sub))) * layer.scaling[name])
        return out.index_add_(0, rows, torch.cat(deltas).to(out.dtype))

    return hook


def _gather_hook(layer: BaseTunerLayer, present: list[str], names: Sequence[str | None],
                 device: torch.device) -> Callable:
    rank = max(layer.lora_A[n].weight.shape[0] for n in present)
    a0, b0 = layer.lora_A[present[0]].weight, layer.lora_B[present[0]].weight
    # Row 0 of each stack is all zeros: samples without an adapter (or without one in this layer) gather it.
    a = torch.zeros(len(present) + 1, rank, a0.shape[1], device=device, dtype=a0.dtype)
    b = torch.zeros(len(present) + 1, b0.shape[0], rank, device=device, dtype=b0.dtype)
    scale = torch.zeros(len(present) + 1, device=device, dtype=a0.dtype)
    for k, name in enumerate(present, start=1):
        r = layer.lora_A[name].weight.shape[0]
        a[k, :r] = layer.lora_A[name].weight
        b[k, :, :r] = layer.lora_B[name].weight
        scale[k] = layer.scaling[name]
    slot = {name: k for k, name in enumerate(present, start=1)}
    sample = torch.tensor([slot.get(n, 0) if n is not None else 0 for n in names], device=device)
    a_s, b_s = a[sample].transpose(1, 2), (b[sample] * scale[sample, None, None]).transpose(1, 2)

    def hook(_: BaseTunerLayer, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0].to(a_s.dtype)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, tokens, D_in): batch-first, any middle dims
        delta = torch.bmm(torch.bmm(flat, a_s), b_s)
        return out + delta.reshape(*out.shape).to(out.dtype)

    return hook
