"""Memory scoring computes in the precision the service chooses (bf16 on CPUs that multiply it natively), and a
product keeps being scored in the precision its calibration was scored in."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from clipshot.detector import Detector
from clipshot.features import Features
from clipshot.memory_branch import MemoryBank, memory_precision, native_bf16

# bf16 keeps 8 significant bits: each input is rounded by at most 2^-8 of itself, so a product of two moves by at
# most ~2 * 2^-8 of itself and a cosine of unit vectors (the sum of |products| is at most 1, Cauchy-Schwarz) by
# at most 2^-7; the shifted result (cosine - 1) is rounded once more by 2^-8 of itself, at most 2 * 2^-8. A
# distance is (1 - cosine) / 2, so it can move by at most 2^-8 + 2^-8 = 2^-7: the bound the tests hold bf16 to.
BF16_DISTANCE_BOUND = 2.0**-7


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    return set(flags.split(":", 1)[1].split())


def test_native_bf16_on_cpu_is_what_the_cpu_reports():
    """The rule reads the CPU's own flags: AVX512-BF16 dot products or AMX tiles."""
    flags = _cpu_flags()
    assert native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)


@pytest.mark.parametrize(("device", "precision", "requested", "expected"), [
    ("cpu", "fp32", "fp32", "fp32"), ("cpu", "fp32", "bf16", "bf16"),  # an explicit choice is kept on CPU
    ("cuda", "fp32", "auto", "fp32"),  # a GPU service told fp32 scores in fp32
    ("cuda", "bf16", "auto", "fp16"), ("cuda", "fp16", "auto", "fp16"),  # fp16, not bf16: cosine error ~1e-3
    ("cuda", "bf16", "bf16", "bf16"), ("cuda", "fp32", "fp16", "fp16"),
])
def test_memory_precision_follows_the_request_device_and_backbone_precision(device, precision, requested,
                                                                            expected):
    assert memory_precision(torch.device(device), precision, requested) == expected


def test_auto_on_cpu_is_bf16_exactly_where_the_cpu_multiplies_it_natively():
    expected = "bf16" if native_bf16("cpu") else "fp32"
    assert memory_precision("cpu", "fp32") == memory_precision("cpu", "bf16") == expected


@pytest.mark.parametrize(("requested", "message"), [("fp16", "needs an accelerator"), ("int8", "must be one of")])
def test_memory_precisions_a_cpu_cannot_or_does_not_know_are_refused(tiny_backbone, requested, message):
    with pytest.raises(ValueError, match=message):
        memory_precision("cpu", "fp32", requested)
    with pytest.raises(ValueError, match=message):
        Detector(tiny_backbone, memory_precision=requested)


def _bank_and_query(seed: int, near: bool) -> tuple[MemoryBank, Features]:
    torch.manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(256, 48), dim=-1)
    # near: queries close to bank rows, cosines near 1, where rounding the cosine itself would hurt most
    query = bank[:64] + 0.02 * torch.randn(64, 48) if near else torch.randn(64, 48)
    query = torch.nn.functional.normalize(query, dim=-1).view(1, 64, 48)
    return MemoryBank([bank], stages=[16, 32]), Features(cls=None, patches=[query], grid=(8, 8))


@pytest.mark.parametrize("near", [False, True])
def test_distances_compute_in_the_precision_asked_for_within_its_rounding_bound(near):
    bank, query = _bank_and_query(0, near)
    full, bf16 = bank.distances(query, "fp32"), bank.distances(query, "bf16")
    half = bank.distances(query, "fp16")
    assert not torch.equal(full, bf16) and not torch.equal(full, half)  # each really computed in its own dtype
    assert float((full - bf16).abs().max()) <= BF16_DISTANCE_BOUND
    # fp16 keeps 11 significant bits, 8x finer than bf16's 8: the GPU path's ~1e-3 claim
    assert torch.allclose(full, half, atol=2e-3)


def test_an_adapter_is_scored_in_the_precision_it_was_calibrated_in(tiny_backbone, good_images):
    fp32, bf16 = Detector(tiny_backbone, memory_precision="fp32"), Detector(tiny_backbone, memory_precision="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shot-count warning
        exact = fp32.fit_memory(good_images[:4], category="exact", text=False, calibration_views=0)
        halved = bf16.fit_memory(good_images[:4], category="halved", text=False, calibration_views=0)
    assert exact.backbone["memory_precision"] == "fp32" and halved.backbone["memory_precision"] == "bf16"
    pixels = tiny_backbone.preprocess(good_images[4:], exact.geometry)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a bf16 service keeps scoring an fp32 product exactly as it was calibrated
        assert torch.equal(bf16.forward(pixels, exact)[1], fp32.forward(pixels, exact)[1])
        if native_bf16("cpu"):  # and an fp32 service on a bf16 CPU scores a bf16 product in bf16
            assert torch.equal(fp32.forward(pixels, halved)[1], bf16.forward(pixels, halved)[1])
            assert not caught
    assert bf16.scoring_precision(exact) == "fp32"


def test_a_precision_this_machine_cannot_compute_falls_back_with_one_warning(tiny_backbone, good_images):
    detector = Detector(tiny_backbone, memory_precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = detector.fit_memory(good_images[:4], category="gpu", text=False, calibration_views=0)
    gpu_made = copy.copy(adapter)
    gpu_made.backbone = {**adapter.backbone, "memory_precision": "fp16"}  # as if calibrated on a half-precision GPU
    pixels = tiny_backbone.preprocess(good_images[:1], adapter.geometry)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = [detector.forward(pixels, gpu_made)[1] for _ in range(2)]
    assert len(caught) == 1 and "calibrated with memory scores computed in fp16" in str(caught[0].message)
    assert torch.equal(maps[0], detector.forward(pixels, adapter)[1])  # scored in this service's fp32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Detector(tiny_backbone, memory_precision="bf16").refit_memory(gpu_made, good_images[:4], calibration_views=0)
    assert gpu_made.backbone["memory_precision"] == "bf16"  # re-calibrated there, so recorded as that service's
