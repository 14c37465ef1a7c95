"""Geometry over real HTTP: chosen at registration (auto or explicit), kept when shots are added, applied to
every prediction (heatmaps over the whole upload), and every bad geometry refused with 400 + nothing written."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers.categories import ADMIN, CLIENT, make_settings, snapshot
from tests.helpers.geometry import HEIGHT, WIDTH, wide_png


def files(seeds, **kw) -> list:
    return [("files", (f"good{s}.png", wide_png(s, **kw), "image/png")) for s in seeds]


@pytest.fixture()
def client(tmp_path, tiny_backbone):
    with TestClient(create_app(make_settings(tmp_path / "store"), backbone=tiny_backbone)) as c:
        yield c


def register(client, category, seeds=range(4), **data):
    return client.post(f"/v1/categories/{category}/shots", headers=ADMIN, files=files(seeds),
                       data={"finetune": "false", **data})


def test_auto_geometry_is_chosen_from_the_shots_and_shown(client):
    r = register(client, "shaft")
    assert r.status_code == 201, r.text
    geometry = r.json()["geometry"]
    assert geometry["resize"] == "native" and geometry["frame"][1] > geometry["frame"][0]
    assert geometry["rule"].startswith("auto:")
    detail = client.get("/v1/categories/shaft", headers=CLIENT).json()
    assert detail["versions"][0]["geometry"] == geometry


def test_explicit_geometry_is_stored_kept_on_added_shots_and_applied(client):
    r = register(client, "shaft", roi="10,5,140,55", tile="50", resize="squash")
    assert r.status_code == 201, r.text
    geometry = r.json()["geometry"]
    # a 130x50 ROI, 50-px tiles at 25 % overlap (37.5-px stride): 1 row, 1 + ceil(80 / 37.5) = 4 columns
    assert geometry["roi"] == [10, 5, 140, 55] and geometry["tiles"] == [1, 4] and geometry["resize"] == "squash"
    r = client.post("/v1/categories/shaft/shots", headers=ADMIN, files=files([9]), data={"finetune": "false"})
    assert r.status_code == 201 and r.json()["geometry"] == geometry  # no geometry fields: the stored one stays
    r = client.post("/v1/categories/shaft/predict?heatmap=raw", headers=CLIENT, files=files([11]))
    assert r.status_code == 200, r.text
    heat = r.json()["predictions"][0]["heatmap"]
    grid = np.frombuffer(base64.b64decode(heat["data"]), "<f2").reshape(heat["shape"])
    assert heat["shape"] == [HEIGHT, WIDTH]  # the whole upload (here smaller than the 4 tiles' resolution)
    assert grid[:5].max() == 0 and grid[:, :10].max() == 0 and grid[:, 140:].max() == 0  # outside the ROI
    assert grid[5:55, 10:140].min() > 0
    r = client.post("/v1/categories/shaft/predict?heatmap=png", headers=CLIENT, files=files([12]))
    assert r.status_code == 200 and r.json()["predictions"][0]["heatmap"]["shape"] == [HEIGHT, WIDTH]


@pytest.mark.parametrize(("data", "message"), [
    ({"roi": "0,0,400,50"}, "outside"),
    ({"roi": "20,20,20,50"}, "empty"),
    ({"roi": "1,2,3"}, "four integers"),
    ({"roi": "a,b,c,d"}, "four integers"),
    ({"tile": "100"}, "does not fit"),
    ({"tile": "4"}, "at least"),
])
def test_bad_geometry_is_refused_and_nothing_is_written(client, tmp_path, data, message):
    assert register(client, "bolt").status_code == 201  # an existing category must stay as it was, too
    before = snapshot(tmp_path / "store")
    for category in ("bolt", "fresh"):
        r = register(client, category, seeds=[20, 21, 22, 23], **data)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_geometry" and message in error["message"]
        assert snapshot(tmp_path / "store") == before


@pytest.mark.parametrize("data", [{"resize": "stretch"}, {"tile": "-1"}, {"tile_overlap": "0.95"}])
def test_malformed_geometry_fields_are_422(client, tmp_path, data):
    before = snapshot(tmp_path / "store")  # the job database only
    r = register(client, "bolt", **data)
    assert r.status_code == 422, r.text
    assert snapshot(tmp_path / "store") == before


def test_added_shots_must_fit_the_stored_roi(client, tmp_path):
    assert register(client, "shaft", roi="10,5,140,55").status_code == 201
    before = snapshot(tmp_path / "store")
    small = [("files", ("small.png", wide_png(30, width=100, height=50), "image/png"))]
    r = client.post("/v1/categories/shaft/shots", headers=ADMIN, files=small, data={"finetune": "false"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_geometry"
    assert snapshot(tmp_path / "store") == before


def test_prediction_of_an_image_smaller_than_the_roi_is_400(client):
    assert register(client, "shaft", roi="10,5,140,55").status_code == 201
    small = [("files", ("small.png", wide_png(31, width=100, height=50), "image/png"))]
    r = client.post("/v1/categories/shaft/predict", headers=CLIENT, files=small)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_geometry"
    assert "outside the 100x50 image" in r.json()["error"]["message"]
