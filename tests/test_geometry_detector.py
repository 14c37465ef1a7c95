"""Geometry through the real models: a planted defect on a non-square frame is found where it is (with an
ROI and with tiles, on the offline EfficientNet), and the CLIP path runs non-square grids and tiles."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from clipshot.geometry import Geometry, GeometryError
from model_store import AdapterStore
from model_store.adapters import load_adapter, save_adapter

WIDTH, HEIGHT = 360, 150  # a wide camera frame (aspect 2.4)
DEFECT = (250, 60, 270, 80)  # left, top, right, bottom of the planted dark blotch
ROI = (20, 10, 340, 140)


def surface(seed: int) -> np.ndarray:
    """A machined-looking surface: fine periodic grooves plus sensor noise, the same for every good part."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    grey = 0.55 + 0.15 * np.sin(2 * np.pi * xx / 9.0) + 0.05 * np.sin(2 * np.pi * yy / 23.0)
    grey = grey + rng.normal(0, 0.02, grey.shape)
    return (np.clip(np.repeat(grey[..., None], 3, axis=-1), 0, 1) * 255).astype(np.uint8)


def defective(seed: int = 99) -> Image.Image:
    arr = surface(seed)
    left, top, right, bottom = DEFECT
    arr[top:bottom, left:right] = (40, 20, 20)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def effnet() -> Detector:
    return Detector(load_backbone("imagenet:efficientnet-lite0", image_size=128))


@pytest.fixture(scope="module")
def good() -> list[Image.Image]:
    return [Image.fromarray(surface(seed)) for seed in range(4)]


def peak(amap: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
    return int(x), int(y)


# The map's peak must fall on the defect itself, widened by this margin: one 8-px feature cell of the
# 128-px frame is 2.5-3 upload pixels here, and the Gaussian smoothing can pull the peak by about a cell.
MARGIN_PX = 6


@pytest.mark.parametrize("geometry", [
    None,  # the auto rule: native frame for this aspect
    Geometry(roi=ROI),
    Geometry(resize="letterbox", roi=ROI),
    Geometry(roi=ROI, tiles=(1, 3), tile_size=(1.0, 130 / 320)),
], ids=["auto-native", "roi", "roi-letterbox", "roi-tiles"])
def test_planted_defect_is_found_where_it_is(effnet, good, geometry):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = effnet.fit_memory(good, category="shaft", geometry=geometry, calibration_views=0)
    bad, ok = effnet.predict([defective(), Image.fromarray(surface(7))], adapter)
    assert bad.anomaly_map.shape == (HEIGHT, WIDTH)
    x, y = peak(bad.anomaly_map)
    left, top, right, bottom = DEFECT
    assert left - MARGIN_PX <= x < right + MARGIN_PX and top - MARGIN_PX <= y < bottom + MARGIN_PX, (x, y)
    assert bad.score > ok.score
    if adapter.geometry.roi is not None:
        l0, t0, r0, b0 = adapter.geometry.roi
        outside = np.ones_like(bad.anomaly_map, bool)
        outside[t0:b0, l0:r0] = False
        assert bad.anomaly_map[outside].max() == 0.0  # not inspected


def test_auto_geometry_is_native_and_non_square(effnet, good):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = effnet.fit_memory(good, category="shaft", calibration_views=0)
    h, w = adapter.geometry.frame
    assert adapter.geometry.resize == "native" and w > h
    feats = effnet.features_of(good[:1], adapter)
    assert feats.grid == (h // 8, w // 8)  # EfficientNet is fully convolutional: the grid follows the frame


def test_prediction_image_outside_the_roi_is_refused(effnet, good):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = effnet.fit_memory(good, category="shaft", geometry=Geometry(roi=ROI), calibration_views=0)
    with pytest.raises(GeometryError, match="outside"):
        effnet.predict([Image.fromarray(surface(1)[:100, :300])], adapter)


def test_geometry_round_trips_through_the_bundle(tmp_path, effnet, good):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = effnet.fit_memory(good, category="shaft", geometry=Geometry(roi=ROI, tiles=(1, 3),
                                                                              tile_size=(1.0, 130 / 320)))
    store = AdapterStore(tmp_path)
    save_adapter(store, effnet, adapter)
    loaded, manifest = load_adapter(store, effnet, "shaft")
    assert loaded.geometry == adapter.geometry and manifest.adapter["geometry"]["tiles"] == [1, 3]
    before, after = effnet.predict([defective()], adapter)[0], effnet.predict([defective()], loaded)[0]
    assert after.score == pytest.approx(before.score, rel=1e-3)  # the bank is stored fp16


# -- CLIP: the same geometry, structurally (random tiny weights) -----------------------------------------
def test_clip_position_embeddings_interpolate_to_non_square_grids(tiny_backbone):
    assert tiny_backbone.positions(tiny_backbone.grid) is tiny_backbone.visual.positional_embedding
    rows, cols = tiny_backbone.grid
    table = tiny_backbone.positions((rows // 2, cols * 2))
    assert table.shape == (1 + rows * cols, tiny_backbone.visual.positional_embedding.shape[1])
    assert torch.equal(table[0], tiny_backbone.visual.positional_embedding[0])  # CLS keeps its position
    size, patch = tiny_backbone.image_size, tiny_backbone.frame_multiple
    feats = tiny_backbone.extract(torch.zeros(2, 3, size // 2, size * 2))
    assert feats.grid == (size // 2 // patch, size * 2 // patch)
    assert feats.patches[0].shape[1] == feats.grid[0] * feats.grid[1]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_backbone.extract(torch.zeros(1, 3, size, size + 3))


@pytest.mark.parametrize("geometry", [
    None, Geometry(resize="native", frame=(32, 128)), Geometry(roi=ROI, tiles=(2, 3), tile_size=(0.6, 0.4)),
], ids=["auto", "native", "roi-tiles"])
def test_clip_serves_every_geometry(tiny_detector, good, geometry):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = tiny_detector.fit_memory(good, category="shaft", geometry=geometry)
    frame = adapter.geometry.frame
    views = adapter.geometry.views_per_image
    pixels = tiny_detector.backbone.preprocess(good[:2], adapter.geometry)
    assert pixels.shape == (2 * views, 3, *frame)
    scores, maps = tiny_detector.forward(pixels.reshape(2, views, 3, *frame), adapter)
    assert scores.shape == (2,) and maps.shape == (2, views * frame[0], frame[1])
    pred = tiny_detector.predict(good[:1], adapter)[0]
    assert pred.anomaly_map.shape == (HEIGHT, WIDTH) and np.isfinite(pred.score)
    assert pred.score == pytest.approx(float(scores[0]), rel=1e-5)  # the views of one image score as one
