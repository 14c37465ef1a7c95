"""Over real HTTP (tiny random CLIP): a defect sent as a confirmed good does not hold the automatic threshold
above itself in the next versions, the decision note names it, and removing the shot restores the old floor."""

from __future__ import annotations

import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.helpers.categories import ADMIN, CLIENT, image_bytes, make_settings
from tests.helpers.decisions import manifest, register


def _blotched(seed: int) -> bytes:
    """A good part with a large dark blotch: a real defect, labelled good by mistake below."""
    pixels = np.array(Image.open(io.BytesIO(image_bytes(seed))))
    pixels[8:56, 8:56] = 10
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_a_mislabelled_confirmed_good_does_not_set_the_threshold_floor(tmp_path, tiny_backbone):
    with TestClient(create_app(make_settings(tmp_path / "store"), backbone=tiny_backbone)) as client:
        store = client.app.state.store.root
        register(client)  # four registration shots: version 1
        r = client.post("/v1/categories/widget/feedback", headers=ADMIN, data={"label": "good"},
                        files=[("files", ("oops.png", _blotched(70), "image/png"))])
        assert r.status_code == 201, r.text
        cal = manifest(store, "widget", 2)["adapter"]["calibration"]
        assert cal["confirmed"] == [4]  # the feedback image, after the four shots, in the memory's order
        per_image = [max(group) for group in np.array_split(cal["normal_scores"], cal["shots"])]
        assert int(np.argmax(per_image)) == 4  # the blotch scores above every good image ...
        assert max(per_image[:4]) <= cal["threshold"] < per_image[4]  # ... yet the floor is the shots' maximum
        decision = client.get("/v1/categories/widget", headers=CLIENT).json()["decision"]
        assert "confirmed good image(s) [4]" in decision["note"]
