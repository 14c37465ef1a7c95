"""ONNX Runtime and OpenVINO against PyTorch on real photos (../shared): features, scores and maps within the
stated tolerances (tests/helpers/runtimes.py says why those), verdicts identical, and a drifted export caught.

The offline EfficientNet-Lite0 is the backbone (the one that installs offline); each set's adapter is fitted in
PyTorch on 4 shots (the eval's rule, seed 0) and a spread of its test images, good and defective, is compared.
Skipped without ../shared on a developer box, failed under CI (tests/helpers/data.py)."""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

from clipshot.evaluation import list_test_samples, list_train_good, select_shots
from tests.conftest import REPO
from tests.helpers.data import require_data
from tests.helpers.runtimes import FEATURE_TOL, SCORE_TOL, assert_parity, parity

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

SHARED = REPO.parent / "shared" / "data"
DATASETS = {"bottle": SHARED / "mvtec_ad", "ball_screw": SHARED / "bsdata", "paper_brg01_rl": SHARED / "piped"}
RUNTIMES = ("onnxruntime", "openvino")
SAMPLE = 8  # test images per set, evenly spaced over the (defect, name)-sorted list: good and defective ones


@pytest.fixture(scope="module")
def backbone():
    from clipshot.backbone import load_backbone

    return load_backbone("imagenet:efficientnet-lite0")


@pytest.fixture(scope="module")
def detectors(backbone, tmp_path_factory):
    """The PyTorch detector and one per runtime, all on the one backbone object, graphs in a fresh cache. They
    score memory in fp32, so predictions compare at the export's own tolerance (``parity`` checks bf16 too)."""
    from clipshot.detector import Detector
    from clipshot.runtimes import FeatureRuntime

    cache = tmp_path_factory.mktemp("runtime-cache")
    return {"torch": Detector(backbone, memory_precision="fp32"),
            **{name: Detector(backbone, runtime=FeatureRuntime(name, cache), memory_precision="fp32")
               for name in RUNTIMES}}


@functools.cache
def _fitted(detector, category: str) -> tuple:
    """(adapter fitted in PyTorch with the shipped defaults, sampled test images)."""
    root = DATASETS[category]
    require_data(root / category / "test")
    shots = [Image.open(p).convert("RGB") for p in select_shots(list_train_good(root, category), 4,
                                                                  category=category, seed=0)]
    adapter = detector.fit_memory(shots, category=category)
    samples = list_test_samples(root, category)
    step = max(1, len(samples) // SAMPLE)
    images = [Image.open(s.path).convert("RGB") for s in samples[::step][:SAMPLE]]
    return adapter, images


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("category", DATASETS)
def test_runtime_features_scores_maps_and_verdicts_match_torch(detectors, category, runtime):
    reference, served = detectors["torch"], detectors[runtime]
    adapter, images = _fitted(reference, category)
    pixels = reference.backbone.preprocess(images, adapter.geometry)
    assert_parity(reference, served, pixels, adapter)
    want = reference.predict(images, adapter, map_size=None)
    got = served.predict(images, adapter, map_size=None)
    assert [p.is_anomalous for p in got] == [p.is_anomalous for p in want]
    assert max(abs(g.score - w.score) for g, w in zip(got, want, strict=True)) <= SCORE_TOL
    # The sample must hold both verdicts, or "identical" would say nothing about the threshold's side.
    assert {p.is_anomalous for p in want} == {True, False}, category


def test_registering_through_a_runtime_calibrates_as_torch_does(detectors):
    """Fitting runs shots and synthetic defects through the runtime: the memory and threshold it calibrates are
    PyTorch's within the score tolerance, and the adapter records which runtime made them."""
    reference = detectors["torch"]
    adapter, _ = _fitted(reference, "bottle")
    root = DATASETS["bottle"]
    shots = [Image.open(p).convert("RGB") for p in select_shots(list_train_good(root, "bottle"), 4,
                                                                  category="bottle", seed=0)]
    fitted = detectors["onnxruntime"].fit_memory(shots, category="bottle")
    assert abs(fitted.threshold - adapter.threshold) <= SCORE_TOL
    assert fitted.backbone["runtime"] == "onnxruntime" and adapter.backbone["runtime"] == "torch"


def test_a_drifted_export_fails_the_parity_check(detectors, backbone, tmp_path):
    """An export made from other weights than the ones serving (a stale file under the right key) must fail the
    parity check above: one stem weight is nudged while the graph is exported, then put back bit-exactly."""
    from clipshot.detector import Detector
    from clipshot.runtimes import FeatureRuntime

    reference = detectors["torch"]
    adapter, images = _fitted(reference, "bottle")
    drifted = Detector(backbone, runtime=FeatureRuntime("onnxruntime", tmp_path))
    weight = backbone.model._conv_stem.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0, 0, 0] += 0.5
    try:
        drifted.runtime.prepare_adapter(drifted, adapter)  # the export's own check passes: it sees these weights
    finally:
        with torch.no_grad():
            weight.copy_(original)
    pixels = backbone.preprocess(images[:2], adapter.geometry)
    worst = parity(reference, drifted, pixels, adapter)
    assert worst["features"] > 10 * FEATURE_TOL, worst  # far outside the bar, not at its edge
    with pytest.raises(AssertionError):
        assert_parity(reference, drifted, pixels, adapter)
