"""Where tensors live: every test runs on CPU and, where a GPU exists, on CUDA at the precision ``auto`` picks.

CI has no GPU, so there these tests check the logic on CPU; on a GPU machine ``python -m pytest -q
tests/test_device_placement.py`` is the CUDA smoke test: backbone, memory bank, LoRA, cache tiers,
training and the HTTP service all on the device, and a real out-of-memory error answered with 503.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.errors import OverloadedError
from app.main import create_app
from app.metrics import Metrics
from app.serving.adapter_cache import AdapterCache
from app.serving.device_worker import DeviceWorker
from clipshot import lora
from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from clipshot.lora import LoraSpec
from model_store import AdapterStore
from tests.helpers.predict import ADMIN, CLIENT, KEYS, defect, files, good, png
from training.fewshot import FewShotConfig, train_fewshot

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(scope="module", params=DEVICES)
def detector(request) -> Detector:
    return Detector(load_backbone("test:tiny-clip", device=request.param, precision="auto"))


def on(device: torch.device, *tensors: torch.Tensor) -> bool:
    return all(t.device.type == device.type for t in tensors)


def memory_fit(detector: Detector, category: str = "widget"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "4 shots" is fine here
        return detector.fit_memory([good(s) for s in range(4)], category=category, calibration_views=0)


def test_backbone_and_features_live_on_the_device(detector):
    backbone = detector.backbone
    assert on(backbone.device, *backbone.model.parameters())
    expected = torch.float32 if backbone.device.type == "cpu" else torch.bfloat16 if \
        torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert backbone.dtype == expected
    feats = backbone.extract(backbone.preprocess([good()]).to(backbone.device))
    assert on(backbone.device, feats.cls, *feats.patches)
    assert all(t.dtype == torch.float32 for t in (feats.cls, *feats.patches))


def test_memory_adapter_is_built_on_the_device_and_finds_the_defect(detector):
    adapter = memory_fit(detector)
    assert on(detector.backbone.device, *adapter.memory.layers, adapter.text)
    normal, bad = detector.predict([good(30), defect(31)], adapter)
    assert bad.score > normal.score and bad.is_anomalous and not normal.is_anomalous
    row, col = np.unravel_index(bad.anomaly_map.argmax(), bad.anomaly_map.shape)
    assert 14 <= row <= 46 and 14 <= col <= 46  # the planted 20x20 square (20..40) +- 6 px


def test_fine_tune_trains_on_the_device(detector):
    """During training the injected LoRA sits on the device with fp32 master weights; the result is on CPU
    (bundles are written from there) and the backbone is left LoRA-free."""
    visual, seen = detector.backbone.visual, []

    def progress(p):
        if p.phase == "train":
            params = [t for name in lora.resident_adapters(visual)
                      for t in lora.adapter_parameters(visual, name).values()]
            seen.append(bool(params) and on(detector.backbone.device, *params)
                        and all(t.dtype == torch.float32 for t in params))

    config = FewShotConfig(steps=3, batch_size=4, lora=LoraSpec(rank=2), holdout=1, val_anomalies_per_shot=1,
                           val_normal_views=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_fewshot(detector, [good(s) for s in range(4)], category="widget", config=config,
                               progress=progress)
    assert seen == [True] * 3
    assert all(t.device.type == "cpu" for t in result.adapter.lora_state.values())
    assert lora.resident_adapters(visual) == set()


def test_cache_tiers_move_every_tensor(detector, tmp_path):
    """Device tier: LoRA attached and memory/text on the device; evicted to the CPU tier: all of it back."""
    spec = LoraSpec(rank=2)
    lora.add_adapter(detector.backbone.visual, "scratch", spec)
    state = {k: (v + 0.01).cpu() for k, v in lora.state(detector.backbone.visual, "scratch").items()}
    lora.remove_adapter(detector.backbone.visual, "scratch")
    adapter = dataclasses.replace(memory_fit(detector), lora=spec, lora_state=state)
    cache = AdapterCache(AdapterStore(tmp_path), detector, Metrics(), DeviceWorker(), device_capacity=1,
                         cpu_capacity=4)
    device = detector.backbone.device
    cache.ensure_resident(adapter)
    resident = lora.adapter_parameters(detector.backbone.visual, adapter.uid).values()
    assert adapter.uid in detector.resident() and on(device, *resident)
    assert on(device, *adapter.memory.layers, adapter.text)
    cache.trim_device(0)
    assert detector.resident() == set()
    assert on(torch.device("cpu"), *adapter.memory.layers, adapter.text)


@pytest.mark.parametrize("device", DEVICES)
def test_service_registers_and_predicts_on_the_device(device, tmp_path):
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device=device, store=tmp_path,
                        max_batch_wait_ms=1, **KEYS)
    with TestClient(create_app(settings)) as c:
        shots = files(*[(f"{s}.png", png(good(s))) for s in range(4)])
        r = c.post("/v1/categories/widget/shots", headers=ADMIN, files=shots, data={"finetune": "false"})
        assert r.status_code == 201, r.text
        r = c.post("/v1/categories/widget/predict", headers=CLIENT,
                   files=files(("good.png", png(good(40))), ("bad.png", png(defect(41)))))
        assert r.status_code == 200, r.text
        normal, bad = r.json()["predictions"]
        assert bad["score"] > normal["score"] and bad["heatmap"]["shape"] == [64, 64]
        assert c.app.state.detector.backbone.device.type == device
        metrics = c.get("/metrics").text
        if device == "cuda":
            assert 'clipshot_device_memory_bytes{kind="allocated"}' in metrics


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real device out-of-memory needs CUDA")
def test_real_device_oom_is_a_503_and_the_worker_survives():
    worker = DeviceWorker()
    worker.start()
    try:
        free, _ = torch.cuda.mem_get_info()
        with pytest.raises(OverloadedError) as info:
            worker.submit(lambda: torch.empty(int(free) * 4, dtype=torch.uint8, device="cuda")).result(timeout=60)
        assert info.value.status_code == 503
        assert worker.submit(lambda: float(torch.ones(4, device="cuda").sum())).result(timeout=60) == 4.0
    finally:
        worker.stop()


def test_folding_a_lora_on_the_device_matches_the_branch_and_restores(detector):
    """On the GPU the service folds LoRAs by default: folded features follow the LoRA branch (half precision:
    cos > 0.999), and the frozen weights come back bit-exactly."""
    visual, spec = detector.backbone.visual, LoraSpec(rank=2)
    lora.add_adapter(visual, "shape", spec)
    state = {k: torch.full_like(v, 0.02) for k, v in lora.state(visual, "shape").items()}
    lora.remove_adapter(visual, "shape")
    base = memory_fit(detector)
    tuned = dataclasses.replace(base, lora=spec, lora_state=state, uid="fold-me")
    weights = {k: v.clone() for k, v in detector.backbone.model.state_dict().items() if "lora_" not in k}
    pixels = detector.backbone.preprocess([good()]).to(detector.backbone.device)
    try:
        branch = detector.features(pixels, tuned).cls
        detector.merge_lora = True
        folded = detector.features(pixels, tuned).cls
        assert lora.folded_adapter(visual) == "fold-me" and on(detector.backbone.device, folded)
        assert torch.nn.functional.cosine_similarity(branch, folded).min() > 0.999
        detector.features(pixels, base)  # unfolds
    finally:
        detector.merge_lora = False
        detector.detach(tuned)
    after = {k: v for k, v in detector.backbone.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(weights[k], after[k]) for k in weights)
