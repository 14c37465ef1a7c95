"""Tensor (de)serialisation: safetensors only, never pickle, validated before anything touches disk."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from .errors import BundleCorrupt, InvalidInput


def _packed(name: str, value: object, seen: set[int]) -> torch.Tensor:
    """A detached, contiguous CPU tensor that owns its storage (safetensors rejects views/shared memory)."""
    if not isinstance(value, torch.Tensor):
        raise InvalidInput(f"tensor {name!r} is a {type(value).__name__}, expected torch.Tensor")
    if value.layout != torch.strided:
        raise InvalidInput(f"tensor {name!r} has layout {value.layout}; convert it with .to_dense() first")
    tensor = value.detach().cpu().contiguous()
    if tensor.numel():
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or storage.nbytes() != tensor.nbytes:
            tensor = tensor.clone()
            ptr = tensor.untyped_storage().data_ptr()
        seen.add(ptr)
    return tensor


def serialize_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Validate and serialise to safetensors bytes in memory, so invalid input never creates files."""
    if not isinstance(tensors, dict):
        raise InvalidInput(f"tensors must be a dict[str, torch.Tensor], got {type(tensors).__name__}")
    seen: set[int] = set()
    packed: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"tensor names must be non-empty strings, got {name!r}")
        packed[name] = _packed(name, value, seen)
    try:
        return serialize(packed, metadata={"format": "pt"})
    except Exception as exc:  # safetensors raises ValueError/RuntimeError/SafetensorError variously
        raise InvalidInput(f"tensors cannot be stored as safetensors: {exc}") from exc


def load_tensors(path: Path, *, device: str | torch.device, where: str) -> dict[str, torch.Tensor]:
    """Load with ``safetensors.torch.load_file`` (no code execution possible, unlike torch.load).

    Parsing happens on CPU so a parse failure (corruption) is never confused with a device error.
    """
    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:
        raise BundleCorrupt(
            f"{where}: adapter.safetensors cannot be read ({exc}); re-save the bundle"
        ) from exc
    if torch.device(device).type != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return tensors
