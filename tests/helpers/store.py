"""Shared by the test modules (first written for tests/test_model_store.py)."""

from __future__ import annotations

import torch

SPEC = "test:tiny-clip"
SHA = "a" * 64


def manifest_in(**extra) -> dict:
    base = {
        "backbone": {"spec": SPEC, "sha256": SHA},
        "adapter": {"layers": [6, 12, 18, 24], "resolution": 518, "scoring": {"k": 1}},
        "shots": [{"name": "b" * 64 + ".png", "sha256": "b" * 64}],
        "training": {"config": {"lr": 1e-3, "epochs": 5}, "seconds": 12.5},
        "metrics": {"image_auroc": 0.97, "pixel_pro": 0.9},
        "promotable": True,
    }
    base.update(extra)
    return base


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "lora.A": torch.randn(8, 64, generator=gen).half(),
        "lora.B": torch.randn(64, 8, generator=gen),
        "prompts": torch.randn(2, 12, 768, generator=gen),
        "memory.idx": torch.randint(-(2**40), 2**40, (5, 3), generator=gen, dtype=torch.int64),
        "calib.threshold": torch.tensor(0.5),  # 0-d
        "empty": torch.zeros(0, 4),
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
        "bf16": torch.randn(3, generator=gen).bfloat16(),
        "mask": torch.tensor([True, False]),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous: stored contiguous
    }
