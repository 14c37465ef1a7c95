"""Heatmap modes over real HTTP: default JPEG overlay, PNG, mask + regions, regions alone, heatmap_size."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from app.serving.heatmap import upsample
from tests.helpers.predict import CLIENT, client, defect, files, good, png, store_root  # noqa: F401, F811 (the client and store_root fixtures)

URL = "/v1/categories/widget/predict"


def picture(heatmap: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(heatmap["data"])))
    image.load()
    return image


def test_default_is_a_jpeg_overlay_at_the_inputs_size(client):  # noqa: F811
    r = client.post(URL, headers=CLIENT, files=files(("d.png", png(defect()))))
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    heat = pred["heatmap"]
    assert heat["encoding"] == "jpeg" and heat["shape"] == [64, 64]
    # The tint starts at the level that made the verdict: threshold^2 / map mean under the peak_mean score.
    assert picture(heat).format == "JPEG" and heat["vmin"] == pytest.approx(pred["map_threshold"])
    assert pred["map_threshold"] != pytest.approx(pred["threshold"])
    assert pred["regions"] is None  # overlays carry no region list; mask and regions do


def test_mask_and_regions_agree_with_the_raw_map(client):  # noqa: F811
    """The mask is 'map > map_threshold' per pixel of the map stretched over the image; regions are its blobs;
    the part is anomalous exactly when the map's peak passes the map threshold."""
    upload = files(("d.png", png(defect())))
    raw = client.post(URL + "?heatmap=raw", headers=CLIENT, files=upload).json()["predictions"][0]
    grid = np.frombuffer(base64.b64decode(raw["heatmap"]["data"]), dtype="<f2").reshape(raw["heatmap"]["shape"])
    threshold = raw["map_threshold"]
    assert raw["is_anomalous"] is True and grid.max() > threshold
    r = client.post(URL + "?heatmap=mask", headers=CLIENT, files=upload)
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    mask = np.asarray(picture(pred["heatmap"]).convert("L")) > 127
    expected = upsample(grid.astype(np.float32), (64, 64)) > threshold
    # float16 transport of the grid moves a few pixels that sit within 1e-3 of the threshold
    assert mask.shape == (64, 64) and (mask != expected).mean() < 0.02
    assert pred["is_anomalous"] is True and mask.any()
    regions = pred["regions"]
    assert regions and pred["regions_total"] >= len(regions)
    x0, y0, x1, y1 = regions[0]["box"]
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    # the defect is the black square [20, 40) x [20, 40): the strongest region must overlap it
    assert x0 < 40 and x1 > 20 and y0 < 40 and y1 > 20
    assert regions[0]["peak_score"] == pytest.approx(float(grid.max()), rel=0.02)
    assert sum(reg["area_pct"] for reg in regions) == pytest.approx(100 * mask.mean(), abs=2.0)

    only = client.post(URL + "?heatmap=regions", headers=CLIENT, files=upload).json()["predictions"][0]
    assert only["heatmap"] is None and only["regions"] == regions


def test_normal_part_has_no_regions(client):  # noqa: F811
    pred = client.post(URL + "?heatmap=regions", headers=CLIENT, files=files(("g.png", png(good())))).json()
    assert pred["predictions"][0]["is_anomalous"] is False and pred["predictions"][0]["regions"] == []
    raw = client.post(URL + "?heatmap=raw", headers=CLIENT, files=files(("g.png", png(good())))).json()
    grid = np.frombuffer(base64.b64decode(raw["predictions"][0]["heatmap"]["data"]), dtype="<f2")
    assert grid.max() <= raw["predictions"][0]["map_threshold"]  # nothing above the level: no region


def test_heatmap_size_bounds_the_picture_and_keeps_the_aspect(client):  # noqa: F811
    wide = good(size=(80, 48))
    r = client.post(URL + "?heatmap=png&heatmap_size=40", headers=CLIENT, files=files(("w.png", png(wide))))
    assert r.status_code == 200, r.text
    heat = r.json()["predictions"][0]["heatmap"]
    assert heat["shape"] == [24, 40] and picture(heat).size == (40, 24)


@pytest.mark.parametrize("query", ["heatmap_size=8", "heatmap_size=100000", "heatmap_size=big", "heatmap=gif"])
def test_bad_heatmap_parameters_are_422(client, query):  # noqa: F811
    r = client.post(f"{URL}?{query}", headers=CLIENT, files=files(("g.png", png(good()))))
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


def test_heatmap_is_documented_once_per_predict_route(client):  # noqa: F811
    spec = client.get("/openapi.json").json()
    for path in ("/v1/categories/{category}/predict", "/v1/predict"):
        operation = spec["paths"][path]["post"]
        names = [p["name"] for p in operation.get("parameters", [])]
        body_ref = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
        form = spec["components"]["schemas"][body_ref]["properties"]
        assert names.count("heatmap") + ("heatmap" in form) == 1, (names, list(form))
        assert "heatmap_size" in names
