"""How preprocessed pixels cross to the device: as uint8 (a quarter of float32's bytes, from page-locked memory)
on a CUDA backbone, normalised there; float32 on CPU, where there is no copy to save. The uint8 form must give the
backbone exactly the input the float form gives."""

from __future__ import annotations

import torch
from conftest import textured
from PIL import Image

from app.serving.batcher import on_device, ships_bytes
from clipshot.detector import Detector
from clipshot.geometry import Geometry


def test_uint8_pixels_normalise_on_the_device_to_the_float_input(tiny_detector: Detector):
    backbone = tiny_detector.backbone
    images = [Image.fromarray(textured(s)) for s in range(3)]
    for geometry in (Geometry(), Geometry(resize="native")):
        as_float = backbone.preprocess(images, geometry)
        as_bytes = geometry.unit_bytes(images, backbone.image_size)
        assert as_bytes.dtype == torch.uint8 and as_bytes.shape == as_float.shape
        assert as_bytes.element_size() * 4 == as_float.element_size()
        assert torch.equal(on_device(as_bytes, tiny_detector), as_float)  # the same values, bit for bit
        assert on_device(as_float, tiny_detector) is as_float  # float batches pass through untouched (CPU)


def test_only_a_cuda_device_gets_bytes():
    assert ships_bytes(torch.device("cuda", 0)) and ships_bytes(torch.device("cuda"))
    assert not ships_bytes(torch.device("cpu"))
