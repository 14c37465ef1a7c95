"""Version retention and the orphan sweep: old versions go after each new one, never the active, a pinned or a
held one; shot files no version lists go at once unless a live writer holds them. Real app, tiny CLIP."""

from __future__ import annotations

import io
import os
import time

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.main import create_app

ADMIN = {"Authorization": "Bearer admin-key"}
KEEP = 2
OLD = time.time() - 3600  # an mtime well past the sweep's grace for writers that take no hold


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((96 + rng.integers(0, 64, (64, 64, 3))).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_retention_keeps_the_newest_the_active_the_pinned_and_the_held(tmp_path, tiny_backbone):
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=tmp_path / "store",
                        admin_keys=["admin-key"], keep_versions=KEEP)
    with TestClient(create_app(settings, backbone=tiny_backbone)) as client:
        files = [("files", (f"s{i}.png", png(i), "image/png")) for i in range(3)]
        assert client.post("/v1/categories/widget/shots", headers=ADMIN, files=files,
                           data={"finetune": "false"}).status_code == 201  # v1
        r = client.put("/v1/categories/widget/versions/1/pin", headers=ADMIN)
        assert r.status_code == 200 and r.json() == {"category": "widget", "pinned": [1]}, r.text
        assert client.put("/v1/categories/widget/versions/9/pin", headers=ADMIN).status_code == 404

        def threshold(value: float) -> int:
            r = client.put("/v1/categories/widget/threshold", headers=ADMIN, json={"threshold": value})
            assert r.status_code == 200, r.text
            return r.json()["version"]

        def versions() -> list[int]:
            return [v["version"] for v in client.get("/v1/categories/widget", headers=ADMIN).json()["versions"]]

        for value in (0.1, 0.2, 0.3):  # v2, v3, v4
            threshold(value)
        assert versions() == [1, 3, 4]  # the newest two and the pinned v1; v2 is gone

        assert client.post("/v1/categories/widget/versions/1/activate", headers=ADMIN).status_code == 200
        assert client.delete("/v1/categories/widget/versions/1/pin", headers=ADMIN).json()["pinned"] == []
        assert versions() == [1, 3, 4]  # nothing is pruned without a new version
        threshold(0.4)  # v5, derived from the active v1
        assert versions() == [4, 5]  # v1 is neither active nor pinned any more

        # A crash left shot files no version lists: swept with the next version, unless a live writer holds
        # them (a fit in another replica that has not saved its version yet) or they are brand new.
        store, shots_dir = client.app.state.store, tmp_path / "store" / "categories" / "widget" / "shots"
        orphan = shots_dir / ("a" * 64 + ".png")
        orphan.write_bytes(b"left by a crash")
        young = shots_dir / ("c" * 64 + ".png")
        young.write_bytes(b"a writer without a hold, a moment ago")
        os.utime(orphan, (OLD, OLD))
        with store.hold("widget") as held:
            kept = store.save_shots("widget", [("fit.png", b"a fit in progress")], held=held)[0]
            os.utime(shots_dir / kept, (OLD, OLD))
            threshold(0.5)
            assert not orphan.exists() and young.exists() and (shots_dir / kept).exists()
        threshold(0.6)
        assert not (shots_dir / kept).exists()  # its writer is gone: nothing protects it now
        listed = {r["name"] for r in store.manifest("widget").model_dump()["shots"]}
        assert listed <= {p.name for p in shots_dir.iterdir()}  # every shot a kept version lists is still there
