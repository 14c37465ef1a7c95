"""The service under ``runtime_quantize=int8``: one int8 graph per product, calibrated on exactly its shots.

Two products registered over the service's HTTP routes with different shots: each records its own calibration
digest and gets its own graph, and its predictions equal those of a fresh ``FeatureRuntime`` calibrated on its shots
alone; a batch mixing both scores each row as its own product's batch does; a restart on the same store with the
runtime cache deleted re-makes the graphs from the stored shots and serves the same scores; with the shots gone the
predict is refused with a clear error; int8 on PyTorch is a settings error.

Tiny CLIP (random weights, 64x64 images): structure only, never accuracy."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.main import create_app
from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from clipshot.runtimes import FeatureRuntime
from model_store import AdapterStore
from model_store.adapters import load_adapter
from tests.helpers.decisions import manifest, register
from tests.helpers.int8 import PROBES, SAME, decoded, reference, served_scores
from tests.helpers.predict import CLIENT, good, png
from tests.helpers.serving import settings_for

pytest.importorskip("onnxruntime")

SHOTS = {"alpha": range(4), "beta": range(40, 44)}  # two products, no shot in common


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("test:tiny-clip")


@pytest.fixture(scope="module")
def served(backbone, tmp_path_factory):
    """A store with both products registered on an int8 service, and the scores that service gave."""
    store = tmp_path_factory.mktemp("int8-store")
    settings = settings_for(store, runtime="onnxruntime", runtime_quantize="int8")
    with TestClient(create_app(settings, backbone=backbone)) as client:
        for category, seeds in SHOTS.items():
            register(client, seeds=seeds, category=category)
        scores = {category: served_scores(client, category) for category in SHOTS}
        state = client.app.state
        adapters = [state.adapter_cache.get(category) for category in SHOTS]
        mixed = torch.stack([backbone.preprocess([image], adapters[0].geometry)[0] for image in PROBES[:2]])
        mixed_scores, _ = state.detector.forward_mixed(mixed, adapters)  # row 0 alpha, row 1 beta
    return store, settings, scores, mixed_scores.tolist()


def test_each_product_is_served_by_its_own_graph_calibrated_on_its_shots(backbone, served, tmp_path):
    store, settings, scores, _ = served
    recorded = {c: manifest(store, c, 1)["adapter"]["backbone"] for c in SHOTS}
    assert all(r["quantize"] == "int8" and r["runtime"] == "onnxruntime" for r in recorded.values())
    assert recorded["alpha"]["calibration"] != recorded["beta"]["calibration"]
    graphs = {p.name.rsplit("-", 1)[1] for p in settings.runtime_cache_dir.glob("*-int8-*")}
    assert graphs == {r["calibration"] for r in recorded.values()}  # one graph per product, no other
    for category in SHOTS:
        expected, digest = reference(backbone, store, category, decoded(SHOTS[category]), tmp_path / category)
        assert digest == recorded[category]["calibration"]  # exactly its shots, at its geometry
        assert max(abs(a - b) for a, b in zip(scores[category], expected, strict=True)) <= SAME, category
    # The two graphs really differ: alpha's probes through beta's calibration score otherwise.
    runtime = FeatureRuntime("onnxruntime", tmp_path / "swap", quantize="int8")
    detector = Detector(backbone, runtime=runtime)
    alpha, _ = load_adapter(AdapterStore(store), detector, "alpha")
    runtime.calibrate(backbone.preprocess(decoded(SHOTS["beta"]), alpha.geometry))
    alpha.backbone = {k: v for k, v in alpha.backbone.items() if k != "calibration"}  # serve on beta's shots
    swapped = [p.score for p in detector.predict(PROBES, alpha, map_size=None)]
    assert max(abs(a - b) for a, b in zip(scores["alpha"], swapped, strict=True)) > 100 * SAME


def test_a_mixed_batch_scores_each_row_through_its_own_products_graph(served):
    _, _, scores, mixed = served
    assert abs(mixed[0] - scores["alpha"][0]) <= SAME and abs(mixed[1] - scores["beta"][1]) <= SAME


def test_a_restart_with_an_empty_cache_remakes_the_graphs_from_the_stored_shots(backbone, served):
    store, settings, scores, _ = served
    shutil.rmtree(settings.runtime_cache_dir)
    with TestClient(create_app(settings, backbone=backbone)) as client:
        again = {category: served_scores(client, category) for category in SHOTS}
    for category in SHOTS:
        assert max(abs(a - b) for a, b in zip(scores[category], again[category], strict=True)) <= SAME, category
    recorded = {manifest(store, c, 1)["adapter"]["backbone"]["calibration"] for c in SHOTS}
    assert {p.name.rsplit("-", 1)[1] for p in settings.runtime_cache_dir.glob("*-int8-*")} == recorded


def test_shots_gone_and_graph_gone_is_a_clear_error(backbone, served, tmp_path):
    store, settings, _, _ = served
    copy = tmp_path / "store"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("runtime-cache"))
    for shot in (copy / "categories" / "alpha" / "shots").iterdir():
        shot.unlink()
    with TestClient(create_app(settings_for(copy, runtime="onnxruntime", runtime_quantize="int8"),
                               backbone=backbone)) as client:
        r = client.post("/v1/categories/alpha/predict?heatmap=none", headers=CLIENT,
                        files=[("files", ("a.png", png(PROBES[0]), "image/png"))])
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "int8_graph_unavailable" and "missing from shots/" in error["message"], error
        assert len(served_scores(client, "beta")) == len(PROBES)  # the other product is untouched
    alpha = manifest(copy, "alpha", 1)["adapter"]["backbone"]["calibration"]
    assert not list((copy / "runtime-cache").glob(f"*-int8-{alpha}"))  # never made from anything else


def test_a_bundle_fitted_on_the_other_precision_is_served_with_one_warning(backbone, served, tmp_path):
    store, _, scores, _ = served
    fp32 = Detector(backbone, runtime=FeatureRuntime("onnxruntime", tmp_path / "fp32"))
    alpha, _ = load_adapter(AdapterStore(store), fp32, "alpha")
    with pytest.warns(UserWarning, match="fitted on int8 features") as caught:
        fp32.predict(PROBES[:1], alpha, map_size=None)
        fp32.predict(PROBES[:1], alpha, map_size=None)
    assert len([w for w in caught if "int8" in str(w.message)]) == 1
    int8 = Detector(backbone, runtime=FeatureRuntime("onnxruntime", tmp_path / "int8", quantize="int8"))
    plain = int8.fit_memory([good(s) for s in range(4)], category="plain", text=False, calibration_views=0)
    plain.backbone = {k: v for k, v in plain.backbone.items() if k not in ("quantize", "calibration")}
    plain.version = 1  # as loaded from a store: a job's unstored adapters are served fp32 without a warning
    with pytest.warns(UserWarning, match="fitted on fp32 features"):
        served_plain = int8.predict(PROBES[:1], plain, map_size=None)[0].score
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fp32 graph it is served by: PyTorch's features within 1e-4
        fp32_score = fp32.predict(PROBES[:1], plain, map_size=None)[0].score
    assert abs(served_plain - fp32_score) <= SAME
    # fitted on fp32: no int8 graph for it (the one made while fitting it was its own, before the record was cut)
    assert len(list((tmp_path / "int8").glob("*-int8-*"))) == 1


def test_int8_needs_an_onnx_runtime_or_openvino(tmp_path):
    with pytest.raises(ValidationError, match="runtime_quantize=int8 needs runtime onnxruntime or openvino"):
        settings_for(tmp_path, runtime_quantize="int8")
    with pytest.raises(ValidationError, match="runtime_quantize"):
        settings_for(tmp_path, runtime="openvino", runtime_quantize="int4")


def test_turning_int8_on_warns_that_it_fails_the_accuracy_gate(backbone, tmp_path, caplog):
    """int8 failed the suite's 1-point rule (docs/results/int8): whoever turns it on is told at start-up."""
    from app.main import feature_runtime

    with caplog.at_level("WARNING", logger="app.main"):
        feature_runtime(settings_for(tmp_path, runtime="onnxruntime"), backbone)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="app.main"):
        runtime = feature_runtime(settings_for(tmp_path, runtime="onnxruntime", runtime_quantize="int8"), backbone)
    assert runtime is not None and runtime.quantize == "int8"
    assert any("CLIPSHOT_RUNTIME_QUANTIZE=int8" in r.getMessage() and "docs/results/int8" in r.getMessage()
               for r in caplog.records), caplog.text
