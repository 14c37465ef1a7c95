"""Shot management over real HTTP: list, remove, add beyond the first upload; shots belong to a category only
through the version that lists them (orphans after a crash are invisible and swept); DELETE serialises with
every mutation queued before it (issue 13, items 5 and 6)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

import httpx
from fastapi.testclient import TestClient

from app.main import create_app
from tests.test_app_categories import ADMIN, CLIENT, image_bytes, make_settings, shots, snapshot
from tests.test_app_decisions import manifest, register


def sha(seed: int) -> str:
    return hashlib.sha256(image_bytes(seed)).hexdigest()


def test_shots_list_remove_and_add_beyond_the_first_upload(tmp_path, tiny_backbone):
    # max_shots=4 per upload: three uploads of 4 must give 12 shots (the limit is per upload, not per lifetime).
    settings = make_settings(tmp_path / "store", max_shots=4, recommended_min_shots=2)
    with TestClient(create_app(settings, backbone=tiny_backbone)) as client:
        store = client.app.state.store.root
        register(client, range(4))
        listed = client.get("/v1/categories/widget/shots", headers=CLIENT).json()["shots"]
        assert [s["sha256"] for s in listed] == [sha(i) for i in range(4)]
        assert listed[0]["file_name"] == "good0.png" and listed[0]["source"] == "registration"
        assert listed[0]["added_at"] is not None
        for start in (4, 8):
            r = client.post("/v1/categories/widget/shots", headers=ADMIN, files=shots(range(start, start + 4)),
                            data={"finetune": "false"})
            assert r.status_code == 201, r.text
        assert r.json()["shots"] == 12 and len(manifest(store, "widget", 3)["shots"]) == 12

        r = client.delete(f"/v1/categories/widget/shots/{sha(5)}", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["shots"], r.json()["removed"]) == (4, 11, sha(5))
        assert sha(5) not in {s["sha256"] for s in manifest(store, "widget", 4)["shots"]}
        assert sha(5) not in {s["sha256"] for s in
                              client.get("/v1/categories/widget/shots", headers=CLIENT).json()["shots"]}

        # Rolling back restores the image set with the model: v3 listed the removed shot.
        assert client.post("/v1/categories/widget/versions/3/activate", headers=ADMIN).status_code == 200
        assert len(client.get("/v1/categories/widget/shots", headers=CLIENT).json()["shots"]) == 12

        before = snapshot(store)
        assert client.delete(f"/v1/categories/widget/shots/{'0' * 64}", headers=ADMIN).status_code == 404
        assert client.delete("/v1/categories/widget/shots/xyz", headers=ADMIN).status_code == 400
        assert client.delete(f"/v1/categories/nope/shots/{sha(1)}", headers=ADMIN).status_code == 404
        assert client.delete(f"/v1/categories/widget/shots/{sha(1)}", headers=CLIENT).status_code == 403
        assert client.get("/v1/categories/nope/shots", headers=CLIENT).status_code == 404
        assert snapshot(store) == before

        register(client, [30], category="single")
        before = snapshot(store)
        r = client.delete(f"/v1/categories/single/shots/{sha(30)}", headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "last_shot"
        assert snapshot(store) == before


def test_orphan_shots_of_a_crashed_fit_are_invisible_and_swept_at_start(tmp_path, tiny_backbone):
    settings = make_settings(tmp_path / "store", max_shots=4, max_category_images=8, recommended_min_shots=2)
    with TestClient(create_app(settings, backbone=tiny_backbone)) as client:
        register(client, range(4))
        store = client.app.state.store
        # What a registration of 4 more writes before its fit; a kill -9 here used to make them shots.
        store.save_shots("widget", [(f"o{i}.png", image_bytes(20 + i)) for i in range(4)])
        assert client.get("/v1/categories/widget", headers=CLIENT).json()["shots"] == 4
        assert len(client.get("/v1/categories/widget/shots", headers=CLIENT).json()["shots"]) == 4
        # The next fit uses the listed shots plus its own upload, and the limit counts only those (4 + 4 <= 8).
        r = client.post("/v1/categories/widget/shots", headers=ADMIN, files=shots(range(10, 14)),
                        data={"finetune": "false"})
        assert r.status_code == 201 and r.json()["shots"] == 8, r.text
        assert {s["sha256"] for s in manifest(store.root, "widget", 2)["shots"]} == \
            {sha(i) for i in [*range(4), *range(10, 14)]}
    orphans = [p for p in store.shot_paths("widget") if p.name.split(".")[0] in {sha(20 + i) for i in range(4)}]
    assert len(orphans) == 4
    old = time.time() - 2 * 3600  # older than the store's stale age (1 h): a dead writer's files
    for path in store.shot_paths("widget"):
        os.utime(path, (old, old))
    with TestClient(create_app(settings, backbone=tiny_backbone)):
        names = {p.name for p in store.shot_paths("widget")}
    assert not any(p.name in names for p in orphans)
    assert names == store.referenced_shots("widget") and len(names) == 8


def test_delete_waits_for_every_mutation_queued_before_it(tmp_path, tiny_backbone):
    """Issue 13 item 5: register A; DELETE B (waits for A); register C (waits); DELETE D must wait for C, and the
    category must be gone at the end. Fits are held at a gate so the interleaving is exact."""
    app = create_app(make_settings(tmp_path / "store"), backbone=tiny_backbone)
    entered, gates = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]

    async def scenario():
        async with app.router.lifespan_context(app):
            detector = app.state.category_service.detector
            real, calls = detector.fit_memory_steps, []

            def held(*args, **kwargs):  # runs on the device worker: the request holds the category lock here
                index = len(calls)
                calls.append(index)
                if index < 2:
                    entered[index].set()
                    assert gates[index].wait(60)
                return real(*args, **kwargs)

            detector.fit_memory_steps = held
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://clipshot", timeout=60) as client:
                def register(seeds):
                    return asyncio.create_task(client.post("/v1/categories/widget/shots", headers=ADMIN,
                                                           files=shots(seeds), data={"finetune": "false"}))

                def delete():
                    return asyncio.create_task(client.delete("/v1/categories/widget", headers=ADMIN))

                a = register(range(4))
                assert await asyncio.to_thread(entered[0].wait, 30)
                b = delete()
                await asyncio.sleep(0.3)
                c = register(range(4, 8))
                await asyncio.sleep(0.3)
                assert not b.done() and not c.done()
                gates[0].set()  # A finishes, B deletes, C starts fitting
                assert await asyncio.to_thread(entered[1].wait, 30)
                d = delete()
                await asyncio.sleep(0.5)
                d_early = d.done()  # the bug: D answered while C was still fitting
                gates[1].set()
                results = [await t for t in (a, b, c, d)]
                after = await client.get("/v1/categories/widget", headers=ADMIN)
                return d_early, [r.status_code for r in results], after.status_code

    try:
        d_early, codes, after = asyncio.run(scenario())
    finally:
        for gate in gates:
            gate.set()
    assert codes == [201, 200, 201, 200]
    assert not d_early and after == 404  # D came after C, so the category stays deleted
    assert not (tmp_path / "store" / "categories" / "widget").exists()
