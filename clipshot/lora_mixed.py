"""Several products' LoRAs in ONE forward: the batched base forward plus per-sample low-rank deltas.

Why: a batch that mixes products would otherwise need one backbone forward per LoRA adapter, and a GPU at
small batches is bound by kernel launches, not arithmetic. The frozen base weights run once over the whole
batch; each LoRA layer then adds ``B_a(A_a(x_i)) * scale_a`` for sample i's adapter a (the S-LoRA / Punica idea
for LLMs). Two ways to compute the deltas, picked by measurement (``benchmarks/mixed_batches.py``):

* ``group``: per adapter present, gather its samples (``index_select``), two small matmuls, ``index_add`` back;
  cost grows with the number of distinct adapters in the batch.
* ``gather``: every resident adapter's A/B stacked per layer (rank zero-padded, kept on the device until the
  resident adapters change), one slot index per sample copied to the device once per batch; each layer gathers
  one A/B per sample and runs two batched matmuls (``bmm``); cost grows with the batch, not with the adapters.

Samples whose name is ``None`` get no delta (memory / prompt adapters share the plain base forward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from clipshot.lora import activate, layer_cache, lora_weights

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
    layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
    device = next(module.parameters()).device
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None:
            groups.setdefault(name, []).append(i)
    missing = set(groups) - {n for layer in layers for n in layer.lora_A}
    if missing:
        raise ValueError(f"LoRA adapters {sorted(missing)} are not resident")
    if mode == "gather":
        # Every resident adapter has a slot, so the stacks outlive this batch; an adapter being trained (its
        # tensors change every step) only when this batch uses it. One slot index for all layers: one copy to
        # the device per batch.
        order = sorted(n for n in {n for layer in layers for n in layer.lora_A}
                       if n in groups or not _training(layers, n))
        slot = {name: k for k, name in enumerate(order, start=1)}
        sample = torch.tensor([slot[n] if n is not None else 0 for n in names], device=device)
        hooks = [(layer, _gather_hook(layer, order, sample, device)) for layer in layers
                 if any(name in layer.lora_A for name in groups)]
    else:
        index = {name: torch.tensor(rows, device=device) for name, rows in groups.items()}
        hooks = [(layer, _group_hook(present, index)) for layer in layers
                 if (present := [name for name in groups if name in layer.lora_A])]
    handles = [layer.register_forward_hook(hook) for layer, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _training(layers: Sequence[LoraLayer], name: str) -> bool:
    """Whether adapter ``name``'s tensors are trainable (a fine-tune in progress)."""
    layer = next(layer for layer in layers if name in layer.lora_A)
    return lora_weights(layer, name)[0].requires_grad


def _group_hook(present: list[str], index: dict[str, torch.Tensor]) -> Callable:
    rows = torch.cat([index[name] for name in present])  # every delta lands with ONE in-place index_add_

    def hook(layer: LoraLayer, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        deltas = []
        for name in present:
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            sub = x.index_select(0, index[name]).to(lora_a.weight.dtype)
            deltas.append(lora_b(lora_a(layer.lora_dropout[name](sub))) * layer.scaling[name])
        return out.index_add_(0, rows, torch.cat(deltas).to(out.dtype))

    return hook


def _stacks(layer: LoraLayer, order: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B * scale) of every adapter in ``order`` stacked for ``layer``, row 0 (and any adapter without this
    layer) all zeros; built once and kept on the layer until the resident adapters or their tensors change."""
    weights = {n: lora_weights(layer, n) for n in order if n in layer.lora_A}
    key = (tuple(order), str(device), *(_version(a) + _version(b) for a, b in weights.values()))
    cached = layer_cache(layer).get("gather")
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    present = list(weights)
    rank = max(a.shape[0] for a, _ in weights.values())
    a0, b0 = weights[present[0]]
    a = torch.zeros(len(order) + 1, rank, a0.shape[1], device=device, dtype=a0.dtype)
    b = torch.zeros(len(order) + 1, b0.shape[0], rank, device=device, dtype=b0.dtype)
    for k, name in enumerate(order, start=1):
        if name in weights:
            lora_a, lora_b = weights[name]
            r = lora_a.shape[0]
            a[k, :r] = lora_a
            b[k, :, :r] = lora_b * layer.scaling[name]
    layer_cache(layer)["gather"] = (key, a, b)
    return a, b


def _version(tensor: torch.Tensor) -> tuple[int, int]:
    """Identity and in-place version of a LoRA tensor (inference tensors keep no version; their only writer,
    ``lora.load_state``, empties the cache)."""
    try:
        return id(tensor), tensor._version
    except RuntimeError:
        return id(tensor), -1


def _gather_hook(layer: LoraLayer, order: list[str], sample: torch.Tensor, device: torch.device) -> Callable:
    a, b = _stacks(layer, order, device)
    a_s, b_s = a[sample].transpose(1, 2), b[sample].transpose(1, 2)

    def hook(_: LoraLayer, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0].to(a_s.dtype)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, tokens, D_in): batch-first, any middle dims
        delta = torch.bmm(torch.bmm(flat, a_s), b_s)
        return out + delta.reshape(*out.shape).to(out.dtype)

    return hook
