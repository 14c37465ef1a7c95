"""Memory / text branches, fusion, maps, calibration and adapter persistence on the tiny random CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipshot.anomaly_map import gaussian_blur
from clipshot.features import Features
from clipshot.fusion import ScoringConfig
from clipshot.memory_branch import MemoryBank, greedy_coreset
from model_store import AdapterStore, BackboneMismatch, BundleCorrupt
from model_store.adapters import load_adapter, save_adapter
from tests.conftest import textured


def test_image_equal_to_a_shot_scores_about_zero(tiny_detector, good_images):
    # Plain distances (no division by a position level, which would rescale them): what the memory measures.
    adapter = tiny_detector.fit_memory(good_images, category="tex", text=False,
                                       scoring=ScoringConfig(position_baseline="off"))
    score = tiny_detector.predict([good_images[2]], adapter)[0].score
    # fp16 memory bank: cosine of a vector with itself is 1 within ~1e-3, so the distance is ~0.
    assert score < 2e-3


def test_planted_square_defect_peaks_at_the_square(tiny_detector, good_images):
    adapter = tiny_detector.fit_memory(good_images, category="tex", text=False)
    defect = textured(99).copy()
    defect[36:52, 12:28] = [255, 0, 255]
    pred = tiny_detector.predict([Image.fromarray(defect)], adapter)[0]
    row, col = np.unravel_index(pred.anomaly_map.argmax(), pred.anomaly_map.shape)
    assert 36 - 8 <= row < 52 + 8 and 12 - 8 <= col < 28 + 8  # within one 8-px patch of the square
    normal = tiny_detector.predict([Image.fromarray(textured(98))], adapter)[0]
    assert pred.score > normal.score
    # No verdict assertion here: a random network's calibration says nothing; the bottle test checks verdicts.


def test_heatmap_has_each_inputs_size(tiny_detector, good_images):
    adapter = tiny_detector.fit_memory(good_images, category="tex", text=False)
    images = [Image.fromarray(textured(1)).resize((90, 50)), Image.fromarray(textured(2)).resize((33, 77))]
    preds = tiny_detector.predict(images, adapter)
    assert [p.anomaly_map.shape for p in preds] == [(50, 90), (77, 33)]
    assert tiny_detector.predict(images, adapter, map_size=None)[0].anomaly_map is None


def test_memory_distance_is_nearest_neighbour():
    bank = MemoryBank([torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)])
    query = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]]), dim=-1)
    dist = bank.distances(Features(cls=None, patches=[query], grid=(2, 2))).flatten()
    # (1 - max cos) / 2: exact hit 0; 45 degrees (1 - 0.7071)/2; opposite of one and orthogonal to the other 0.5.
    expected = torch.tensor([0.0, (1 - 2**-0.5) / 2, 0.5, 0.5])
    assert torch.allclose(dist, expected, atol=1e-3)


def test_coreset_keeps_the_outlier():
    points = torch.cat([torch.zeros(50, 4) + 0.01 * torch.randn(50, 4), torch.tensor([[10.0, 10, 10, 10]])])
    keep = greedy_coreset(points, ratio=0.05)
    assert len(keep) == 3 and 50 in keep.tolist()  # k-center greedy must pick the far point


def test_gaussian_blur_preserves_mass_and_spreads_peak():
    impulse = torch.zeros(1, 41, 41)
    impulse[0, 20, 20] = 1
    blurred = gaussian_blur(impulse, 4.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-3)
    # Peak of a normalised 2-D Gaussian with sigma 4 is 1 / (2 pi sigma^2) = 0.00995.
    assert blurred.max().item() == pytest.approx(1 / (2 * np.pi * 16), rel=0.02)


def test_fused_adapter_has_both_branches_and_calibration(tiny_detector, good_images):
    adapter = tiny_detector.fit_memory(good_images, category="tex", object_name="tile")
    assert adapter.branches == ["text", "memory"]
    assert adapter.calibration.count == len(good_images) * 3  # each shot + 2 light views, leave-one-out
    assert adapter.calibration.threshold >= adapter.calibration.max_normal


def test_bundle_round_trip_is_bit_exact_and_scores_identically(tmp_path, tiny_detector, good_images):
    adapter = tiny_detector.fit_memory(good_images, category="tex")
    store = AdapterStore(tmp_path)
    version = save_adapter(store, tiny_detector, adapter)
    loaded, manifest = load_adapter(store, tiny_detector, "tex")
    assert manifest.version == version == 1
    original, restored = adapter.to_tensors(), loaded.to_tensors()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) and original[k].dtype == restored[k].dtype for k in original)
    assert loaded.calibration == adapter.calibration
    probe = [Image.fromarray(textured(50))]
    assert tiny_detector.predict(probe, loaded)[0].score == tiny_detector.predict(probe, adapter)[0].score


def test_bundle_rejects_flipped_byte_and_wrong_backbone(tmp_path, tiny_detector, good_images):
    from clipshot.backbone import load_backbone
    from clipshot.detector import Detector

    store = AdapterStore(tmp_path)
    save_adapter(store, tiny_detector, tiny_detector.fit_memory(good_images, category="tex"))
    other = Detector(load_backbone("imagenet:efficientnet-lite0", image_size=64))
    with pytest.raises(BackboneMismatch):
        load_adapter(store, other, "tex")
    tensor_file = next(tmp_path.rglob("adapter.safetensors"))
    data = bytearray(tensor_file.read_bytes())
    data[-10] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(BundleCorrupt):
        load_adapter(store, tiny_detector, "tex")
