"""Runtimes end to end on the tiny CLIP: LoRA folded into the export (with and without DPAM, square and non-square
frames), the tiny DINOv2-style ViT (square, non-square and tiled frames), the service under CLIPSHOT_RUNTIME
(registration, prediction, what the bundle and version facts record), ``clipshot export`` into the cache the service
reads, and the start-up refusals.

The tiny models have random weights: these check structure and parity, never accuracy."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import torch
from fastapi.testclient import TestClient

from app.cli.main import main
from app.main import StartupError, create_app, feature_runtime
from clipshot import lora
from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from clipshot.geometry import Geometry
from clipshot.runtimes import FeatureRuntime
from model_store import AdapterStore
from model_store.adapters import load_adapter
from tests.helpers.decisions import manifest, register
from tests.helpers.predict import CLIENT, good, png
from tests.helpers.runtimes import SCORE_TOL, assert_parity
from tests.helpers.serving import fit, settings_for
from tests.helpers.vit import tiny_vit_spec, tiny_vit_weights

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def backbone():
    """A private tiny CLIP: the LoRA these tests inject must not reach the session's shared backbone."""
    return load_backbone("test:tiny-clip")


def _with_lora(detector: Detector, adapter, seed: int):
    """``adapter`` plus a random non-zero LoRA (zero-initialised B would leave the features unchanged)."""
    spec = lora.LoraSpec(rank=2)
    visual = load_backbone("test:tiny-clip").visual
    lora.add_adapter(visual, "shape", spec)
    gen = torch.Generator().manual_seed(seed)
    state = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in lora.state(visual, "shape").items()}
    return dataclasses.replace(adapter, lora=spec, lora_state=state, uid=uuid.uuid4().hex)  # new content, new uid


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_clip_export_folds_the_lora_and_matches_torch(backbone, tmp_path, runtime):
    reference = Detector(backbone)
    served = Detector(backbone, runtime=FeatureRuntime(runtime, tmp_path))
    adapter = _with_lora(reference, fit(reference, "widget"), seed=1)
    images = [good(s) for s in range(20, 23)]
    for variant in (adapter, dataclasses.replace(adapter, scoring=dataclasses.replace(adapter.scoring, dpam=True)),
                    dataclasses.replace(adapter, geometry=Geometry(resize="squash", frame=(48, 96)),
                                        baseline=None)):  # a position baseline belongs to its own frame
        assert_parity(reference, served, backbone.preprocess(images, variant.geometry), variant)
    # One graph per (frame, DPAM) with this LoRA; the LoRA is folded only while exporting: torch sees the base.
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(served.runtime.format)]) == 3
    assert lora.folded_adapter(backbone.visual) is None
    other = _with_lora(reference, adapter, seed=2)
    assert_parity(reference, served, backbone.preprocess(images, other.geometry), other)  # another LoRA: own graph
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(served.runtime.format)]) == 4


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_vit_export_matches_torch_on_every_frame(tmp_path, runtime):
    """The ViT's position table is resampled per frame and the export holds it as a constant, so each frame gets its
    own graph; square, non-square and tiled views are each within the feature and score tolerances of PyTorch."""
    pytest.importorskip("timm")
    vit = load_backbone(tiny_vit_spec(tiny_vit_weights(tmp_path / "tiny.safetensors")))
    reference = Detector(vit)
    served = Detector(vit, runtime=FeatureRuntime(runtime, tmp_path / "cache"))
    adapter = fit(reference, "widget")
    images = [good(s) for s in range(20, 23)]
    for geometry in (adapter.geometry, Geometry(resize="squash", frame=(42, 98)),
                     Geometry(tiles=(1, 2), tile_size=(1.0, 0.6))):
        own = geometry is adapter.geometry  # a position baseline belongs to the frame it was fitted at
        variant = dataclasses.replace(adapter, geometry=reference.resolve_geometry(geometry, [(64, 64)]),
                                      baseline=adapter.baseline if own else None)
        assert_parity(reference, served, vit.preprocess(images, variant.geometry), variant)
    # two frames: the tiles are cut to the default square frame, so they share the square view's graph
    assert len(list((tmp_path / "cache").glob(f"*-{served.runtime.format}"))) == 2


def test_service_on_onnxruntime_registers_predicts_and_records_the_runtime(backbone, tmp_path):
    settings = settings_for(tmp_path, runtime="onnxruntime")
    with TestClient(create_app(settings, backbone=backbone)) as client:
        register(client)
        r = client.post("/v1/categories/widget/predict?heatmap=none", headers=CLIENT,
                        files=[("files", ("a.png", png(good(30)), "image/png"))])
        assert r.status_code == 200, r.text
        served = r.json()["predictions"][0]["score"]
        facts = client.get("/v1/categories/widget", headers=CLIENT).json()["versions"][0]
    assert facts["runtime"] == "onnxruntime"
    assert manifest(tmp_path, "widget", 1)["backbone"]["runtime"] == "onnxruntime"
    assert any(p.name.endswith("-onnx") for p in settings.runtime_cache_dir.iterdir())
    # The same bundle scored by PyTorch: the runtime changed the score by float noise only.
    detector = Detector(backbone)
    adapter, _ = load_adapter(AdapterStore(tmp_path), detector, "widget")
    assert abs(detector.predict([good(30)], adapter, map_size=None)[0].score - served) <= SCORE_TOL


def test_clipshot_export_fills_the_cache_and_names_bad_input(backbone, tmp_path, capsys):
    store = tmp_path / "store"
    with TestClient(create_app(settings_for(store), backbone=backbone)) as client:
        register(client)
    cache = tmp_path / "cache"
    args = ["export", "--category", "widget", "--format", "openvino", "--store", str(store)]
    assert main([*args, "--runtime-cache", str(cache)]) == 0
    out = capsys.readouterr().out
    graphs = list(cache.glob("*-openvino/model.xml"))
    assert len(graphs) == 1 and str(graphs[0]) in out and "64x64" in out
    assert main([*args, "--runtime-cache", str(cache)]) == 0  # cached: the same folder, nothing new
    assert list(cache.glob("*-openvino/model.xml")) == graphs
    assert main(["export", "--category", "nope", "--format", "onnx", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["export", "--category", "widget", "--format", "tensorrt", "--store", str(store)])


def test_a_runtime_refuses_a_backbone_it_cannot_serve(tmp_path):
    with pytest.warns(UserWarning, match="autocast"):  # bf16 on CPU: allowed, with a warning
        half = load_backbone("test:tiny-clip", precision="bf16")
    with pytest.raises(StartupError, match="fp32 CPU"):
        feature_runtime(settings_for(tmp_path, runtime="openvino"), half)
    assert feature_runtime(settings_for(tmp_path), half) is None  # torch: nothing to refuse
