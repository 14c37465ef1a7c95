"""Memory scoring computes in the precision the service runs at, and an adapter says which one calibrated it."""

from __future__ import annotations

import warnings

import pytest
import torch

from clipshot.features import Features
from clipshot.memory_branch import MemoryBank, memory_precision


@pytest.mark.parametrize(("device", "precision", "expected"), [
    ("cpu", "fp32", "fp32"), ("cpu", "bf16", "fp32"),  # half matmuls are slow on CPU
    ("cuda", "fp32", "fp32"),  # a GPU service told fp32 scores in fp32 (it used to be fp16 on any GPU)
    ("cuda", "bf16", "fp16"), ("cuda", "fp16", "fp16"),  # fp16, not bf16: cosine error ~1e-3
])
def test_memory_precision_follows_device_and_backbone_precision(device, precision, expected):
    assert memory_precision(torch.device(device), precision) == expected


def test_distances_compute_in_the_precision_asked_for():
    torch.manual_seed(0)
    bank = MemoryBank([torch.nn.functional.normalize(torch.randn(64, 32), dim=-1)])
    query = Features(cls=None, patches=[torch.nn.functional.normalize(torch.randn(1, 16, 32), dim=-1)], grid=(4, 4))
    full, half = bank.distances(query, "fp32"), bank.distances(query, "fp16")
    assert torch.equal(full, bank.distances(query))  # CPU default: fp32
    # fp16 rounds the cosines (10-bit mantissa: ~1e-3), so the two differ, but only by that much
    assert not torch.equal(full, half) and torch.allclose(full, half, atol=2e-3)


def test_an_adapter_records_its_memory_precision_and_a_mismatch_warns_once(tiny_detector, good_images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = tiny_detector.fit_memory(good_images[:4], category="prec", text=False, calibration_views=0)
    assert adapter.backbone["memory_precision"] == tiny_detector.memory_precision == "fp32"
    pixels = tiny_detector.backbone.preprocess(good_images[:1], adapter.geometry)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_detector.forward(pixels, adapter)
        assert not caught  # calibrated the way this service scores
        adapter.backbone["memory_precision"] = "fp16"  # as if calibrated on a half-precision GPU
        tiny_detector.forward(pixels, adapter)
        tiny_detector.forward(pixels, adapter)
    assert len(caught) == 1 and "calibrated with memory scores computed in fp16" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_detector.refit_memory(adapter, good_images[:4], calibration_views=0)
    assert adapter.backbone["memory_precision"] == "fp32"  # re-calibrated here, so recorded as this service's
