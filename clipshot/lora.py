"""LoRA on the image encoder through peft, with several named adapters resident at once.

Several products share one frozen backbone: each product's LoRA is injected under its own adapter name and
switched on per batch, so hot-swapping a product costs a pointer flip, not a weight copy.

Optionally (``activate(..., merge=True)``) the active adapter is *folded* into the base weights instead: the
forward pass then runs no LoRA kernels at all (about 45% fewer ops per ViT forward), which matters where
batch-1 latency is bound by kernel launches (GPUs). At most one adapter is folded at a time; the untouched
weights are kept aside and copied back bit-exactly before anything else runs on the base weights, so any
activation without ``merge`` (training, another product, the plain backbone) sees the frozen model.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")


@dataclass
class LoraSpec:
    """Hyper-parameters of one LoRA adapter (stored in the bundle manifest)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        unknown = set(self.targets) - set(DEFAULT_TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {DEFAULT_TARGETS}, got {self.targets}")
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"invalid LoRA hyper-parameters rank={self.rank} alpha={self.alpha} dropout={self.dropout}"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    def peft_config(self) -> LoraConfig:
        # B starts at zero (peft's default init), so an untrained adapter is exactly the frozen model.
        return LoraConfig(
            # peft annotates lora_alpha as int but only divides by it (alpha / r): a float alpha is valid
            r=self.rank, lora_alpha=self.alpha,  # type: ignore[arg-type]
            lora_dropout=self.dropout, target_modules=list(self.targets)
        )


@dataclass
class _Folded:
    """Which adapter is folded into the base weights, and the pristine copies of every weight ever folded."""

    name: str | None = None
    pristine: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # id -> (weight, copy)


_FOLDED_ATTR = "_clipshot_folded"
_CACHE_ATTR = "_clipshot_lora_cache"


def lora_weights(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter ``name``'s A (rank, in) and B (out, rank) weights in ``layer`` (peft makes both bias-free Linears)."""
    return cast(nn.Linear, layer.lora_A[name]).weight, cast(nn.Linear, layer.lora_B[name]).weight


def layer_cache(layer: LoraLayer) -> dict:
    """Per-layer scratch for tensors derived from its resident adapters (the mixed-batch stacks): a plain
    attribute (never in ``state_dict``), emptied whenever an adapter is added, removed or reloaded, so nothing
    derived from an evicted or replaced adapter outlives it."""
    return layer.__dict__.setdefault(_CACHE_ATTR, {})


def _bump(module: nn.Module) -> None:
    for layer in _tuner_layers(module):
        layer_cache(layer).clear()


def _folded(module: nn.Module) -> _Folded:
    state = module.__dict__.get(_FOLDED_ATTR)
    if state is None:
        state = _Folded()
        module.__dict__[_FOLDED_ATTR] = state  # a plain attribute: never part of state_dict or .to()
    return state


def folded_adapter(module: nn.Module) -> str | None:
    """The adapter currently folded into the base weights (None: they are the frozen originals)."""
    return _folded(module).name


def _unfold(module: nn.Module) -> None:
    state = _folded(module)
    if state.name is None:
        return
    with torch.no_grad():
        for weight, original in state.pristine.values():
            weight.copy_(original)
    state.name = None


def _fold(module: nn.Module, name: str, master: dict[str, torch.Tensor] | None = None) -> None:
    """Fold adapter ``name`` into the base weights: ``W + scale * B @ A`` computed in fp32, cast to the weight's
    dtype once.

    Why fp32: in bf16 the delta would be rounded three times (``B @ A``, the scaling, the sum), and a delta near
    half a bf16 step of ``W`` (what a fine-tune mostly learns) would round away or double. ``master`` (the
    adapter's own fp32 tensors, keyed as ``adapter_parameters``) is used instead of the resident copies, which a
    half backbone holds in its own dtype."""
    state = _folded(module)
    if state.name == name:
        return
    _unfold(module)
    with torch.no_grad():
        for prefix, layer in _named_tuner_layers(module):
            if name not in layer.lora_A:
                continue
            weight = cast(nn.Linear, layer.get_base_layer()).weight  # every target (DEFAULT_TARGETS) is a Linear
            if id(weight) not in state.pristine:
                with torch.inference_mode(False):  # a normal tensor, so restoring works in any mode
                    state.pristine[id(weight)] = (weight, weight.detach().clone())
            a, b = (_fp32(layer, part, name, f"{prefix}.{part}.weight", master, weight.device)
                    for part in ("lora_A", "lora_B"))
            delta = (b @ a) * float(layer.scaling[name])
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            weight.copy_((weight.float() + delta).to(weight.dtype))
    state.name = name


def _fp32(layer: LoraLayer, part: str, name: str, key: str, master: dict[str, torch.Tensor] | None,
          device: torch.device) -> torch.Tensor:
    """The fp32 ``lora_A``/``lora_B`` weight of ``layer``: from ``master`` when it has it, else the resident one."""
    tensor = master.get(key) if master is not None else None
    if tensor is None:
        tensor = getattr(layer, part)[name].weight
    return tensor.to(device, torch.float32)


def _named_tuner_layers(module: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def _tuner_layers(module: nn.Module) -> list[LoraLayer]:
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def resident_adapters(module: nn.Module) -> set[str]:
    names: set[str] = set()
    for layer in _tuner_layers(module):
        names.update(layer.lora_A.keys())
    return names


def park(module: nn.Module) -> None:
    """Make no adapter peft-"active" without setting any ``requires_grad`` to True.

    peft re-selects (and marks trainable) an active adapter on inject, enable and delete; adapters loaded
    under ``torch.inference_mode`` hold inference tensors, on which that raises outside inference mode.
    """
    for layer in _tuner_layers(module):
        layer.set_adapter([], inference_mode=True)


def add_adapter(module: nn.Module, name: str, spec: LoraSpec, state: dict[str, torch.Tensor] | None = None) -> int:
    """Inject adapter ``name`` (optionally with trained tensors); returns its parameter count."""
    if name in resident_adapters(module):
        raise ValueError(f"LoRA adapter {name!r} is already resident")
    park(module)
    with warnings.catch_warnings():  # several adapters in one model is the point here, not a mistake
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(spec.peft_config(), module, adapter_name=name)
    _bump(module)
    try:
        params = adapter_parameters(module, name)
        if state is not None:
            load_state(module, name, state)
    except BaseException:  # e.g. device OOM or a bad state dict: never leave a half-loaded adapter resident
        if name in resident_adapters(module):
            remove_adapter(module, name)
        raise
    activate(module, None)
    return sum(p.numel() for p in params.values())


def adapter_parameters(module: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter tensors keyed without the adapter name, so a bundle loads under any name."""
    marker = f".{name}."
    return {
        key.replace(marker, "."): param
        for key, param in module.named_parameters()
        if ("lora_A" in key or "lora_B" in key) and marker in key
    }


def state(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: p.detach().to("cpu", torch.float32).clone() for k, p in adapter_parameters(module, name).items()}


def load_state(module: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    if folded_adapter(module) == name:
        _unfold(module)  # the folded copy would go stale
    _bump(module)
    params = adapter_parameters(module, name)
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors))[:3], sorted(set(tensors) - set(params))[:3]
        raise ValueError(f"LoRA tensors do not match the adapter layout (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for key, param in params.items():
            if param.shape != tensors[key].shape:
                got, want = tuple(tensors[key].shape), tuple(param.shape)
                raise ValueError(f"LoRA tensor {key} has shape {got}, expected {want}")
            param.copy_(tensors[key])


def activate(module: nn.Module, name: str | None, *, merge: bool = False,
             master: dict[str, torch.Tensor] | None = None) -> None:
    """Route every LoRA layer through adapter ``name``; ``None`` runs the plain frozen backbone.

    ``merge``: fold ``name`` into the base weights (kept folded until another activation) instead of running
    its LoRA branch; without it any folded adapter is unfolded first. ``master``: the adapter's fp32 tensors
    (``state``'s keys), folded from instead of the resident copies (which a half backbone rounds to its dtype).
    """
    if merge and name is not None:
        _fold(module, name, master)
        name = None  # the base weights now carry the adapter
    else:
        _unfold(module)
    for layer in _tuner_layers(module):
        if name is None or name not in layer.lora_A:
            layer.set_adapter([], inference_mode=True)
            layer.enable_adapters(False)
        else:
            layer.set_adapter(name, inference_mode=True)  # frozen: set_trainable opts in explicitly
            layer._disable_adapters = False  # enable_adapters(True) would mark the adapter trainable


def set_trainable(module: nn.Module, name: str) -> list[nn.Parameter]:
    """Make exactly adapter ``name``'s tensors trainable and return them."""
    activate(module, name)
    params = list(adapter_parameters(module, name).values())
    for param in params:
        param.requires_grad_(True)
    return params


def remove_adapter(module: nn.Module, name: str) -> None:
    park(module)  # deleting the active adapter would make peft pick (and mark trainable) another one
    for layer in _tuner_layers(module):
        if name in layer.lora_A:
            layer.delete_adapter(name)
    _bump(module)
    activate(module, None)
