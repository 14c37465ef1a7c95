"""Refits on an int8 service (``runtime_quantize=int8``): each new version gets its own int8 graph.

Feedback that adds good shots refits the product through the HTTP route: the new version records a new calibration
digest (its shots changed), its graph is made, and it scores as a fresh ``FeatureRuntime`` calibrated on exactly
the new shot set. A fine-tune (tiny CLIP, two steps) does the same on the shots decoded at full size; a restart
with the runtime cache deleted re-makes that graph from the stored shots' full-size decode (the working-size one
has another digest), and ``clipshot export --quantize int8`` writes exactly the graph the service then loads.

Tiny CLIP has random weights: structure only, never accuracy."""

from __future__ import annotations

import shutil
import warnings

import pytest
from fastapi.testclient import TestClient

from app.cli.main import main
from app.main import create_app
from app.serving.int8_graphs import stored_calibrations
from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from clipshot.runtimes.quantize import calibration_digest
from clipshot.runtimes.runtime import calibration_pixels
from model_store import AdapterStore
from tests.helpers.categories import ADMIN, image_bytes, wait_job
from tests.helpers.decisions import manifest, register
from tests.helpers.int8 import SAME, decoded, max_diff, reference, served_scores
from tests.helpers.serving import settings_for

pytest.importorskip("onnxruntime")

# px: a registration or feedback refit box-reduces these by 2 (its working factor for tiny CLIP's 64 px frame),
# a fine-tune decodes them at full size; 255 is odd, so the reduction's last box is partial
# and the two decodes give other pixels (at 256 they are equal, and so would be their digests)
BIG = 255


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("test:tiny-clip")


def _int8_settings(store, **overrides):
    return settings_for(store, runtime="onnxruntime", runtime_quantize="int8", finetune_steps=2,
                        finetune_seconds=60, **overrides)


def _register_big(client: TestClient, category: str, seeds=range(4)) -> None:
    upload = [("files", (f"good{s}.png", image_bytes(s, size=BIG), "image/png")) for s in seeds]
    r = client.post(f"/v1/categories/{category}/shots", headers=ADMIN, files=upload, data={"finetune": "false"})
    assert r.status_code == 201, r.text


def _graphs(cache) -> set[str]:
    """The calibration digests of the int8 graphs in ``cache``."""
    return {p.name.rsplit("-", 1)[1] for p in cache.glob("*-int8-*")}


def test_feedback_refits_onto_a_new_graph_calibrated_on_the_new_shot_set(backbone, tmp_path):
    store = tmp_path / "store"
    settings = _int8_settings(store)
    with TestClient(create_app(settings, backbone=backbone)) as client:
        register(client, seeds=range(4), category="alpha")
        added = [("files", (f"fb{s}.png", image_bytes(s), "image/png")) for s in (60, 61)]
        r = client.post("/v1/categories/alpha/feedback", headers=ADMIN, files=added, data={"label": "good"})
        assert r.status_code == 201 and r.json()["version"] == 2, r.text
        scores = served_scores(client, "alpha")
    old, new = (manifest(store, "alpha", v)["adapter"]["backbone"] for v in (1, 2))
    assert new.get("quantize") == "int8" and new["calibration"] != old["calibration"]
    assert _graphs(settings.runtime_cache_dir) == {old["calibration"], new["calibration"]}
    expected, digest = reference(backbone, store, "alpha", decoded([0, 1, 2, 3, 60, 61]), tmp_path / "ref")
    assert digest == new["calibration"]  # the registration's shots and the confirmed goods, in the ledger's order
    assert max_diff(scores, expected) <= SAME


@pytest.fixture(scope="module")
def tuned(backbone, tmp_path_factory):
    """A store whose 255 px product was registered, then fine-tuned (two steps) and that version activated."""
    store = tmp_path_factory.mktemp("int8-tuned")
    settings = _int8_settings(store)
    with TestClient(create_app(settings, backbone=backbone)) as client, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _register_big(client, "big")
        job = client.post("/v1/categories/big/finetune", headers=ADMIN, json={"steps": 2}).json()
        done = wait_job(client, job["id"], timeout=300)
        assert done["state"] == "succeeded", done
        # the fine-tune's own validation banks run the fp32 graph on purpose: no warning meant for stored bundles
        assert not [w for w in caught if "fitted on fp32 features" in str(w.message)]
        version = done["result_version"]
        r = client.post(f"/v1/categories/big/versions/{version}/activate", headers=ADMIN)
        assert r.status_code == 200, r.text
        scores = served_scores(client, "big")
    return store, settings, version, scores


def test_a_finetune_calibrates_its_graph_on_the_full_size_shots(backbone, tuned, tmp_path):
    store, settings, version, scores = tuned
    memory, finetuned = (manifest(store, "big", v)["adapter"] for v in (1, version))
    recorded = finetuned["backbone"]["calibration"]
    # the registration fitted the shots' working-size decode, the fine-tune their full-size one: other pixels
    assert finetuned.get("lora") and recorded != memory["backbone"]["calibration"]
    assert recorded in _graphs(settings.runtime_cache_dir)
    expected, digest = reference(backbone, store, "big", decoded(range(4), size=BIG), tmp_path / "ref", version)
    assert digest == recorded  # the fine-tune's own decode: full size, not the working size
    assert max_diff(scores, expected) <= SAME


def test_a_restart_with_an_empty_cache_remakes_the_finetuned_graph_from_the_full_size_shots(backbone, tuned):
    store, settings, version, scores = tuned
    recorded = manifest(store, "big", version)["adapter"]["backbone"]["calibration"]
    stored = AdapterStore(store).manifest("big", version)
    detector = Detector(backbone)
    candidates = [calibration_digest(calibration_pixels(c))
                  for c in stored_calibrations(AdapterStore(store), settings, detector, stored)]
    assert candidates[1:] == [recorded] != candidates[:1]  # the working-size decode is not what it was fitted on
    shutil.rmtree(settings.runtime_cache_dir)
    with TestClient(create_app(settings, backbone=backbone)) as client:
        again = served_scores(client, "big")
    assert max_diff(scores, again) <= SAME
    assert _graphs(settings.runtime_cache_dir) == {recorded}


def test_clipshot_export_writes_the_graph_an_int8_service_loads(backbone, tmp_path):
    store = tmp_path / "store"
    with TestClient(create_app(_int8_settings(store), backbone=backbone)) as client:
        _register_big(client, "big")  # fitted on the working-size decode, which no plain PIL decode gives
        scores = served_scores(client, "big")
    recorded = manifest(store, "big", 1)["adapter"]["backbone"]["calibration"]
    cache = tmp_path / "cache"
    assert main(["export", "--category", "big", "--format", "onnx", "--quantize", "int8", "--store", str(store),
                 "--runtime-cache", str(cache)]) == 0
    (graph,) = cache.glob("*-int8-*")
    assert graph.name.endswith(f"-int8-{recorded}")  # the folder the service looks for
    made = (graph / "model.onnx").stat()
    with TestClient(create_app(_int8_settings(store, runtime_cache=cache), backbone=backbone)) as client:
        again = served_scores(client, "big")
    assert max_diff(scores, again) <= SAME
    assert list(cache.glob("*-int8-*")) == [graph]
    kept = (graph / "model.onnx").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)  # served as exported, not re-made
