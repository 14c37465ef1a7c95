"""Issue 13 items 7 and 8: damaged versions are not activated, inputs and the schema tell the truth, and a
restart cleans up after a crash (leftover temp bundle folders, a dead job's stale progress message)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.jobs.job_store import INTERRUPTED_MESSAGE, JobState, JobStore
from app.main import create_app
from app.schemas import OBJECT_NAME_PATTERN
from model_store import AdapterStore, BundleCorrupt
from model_store.atomic import claimed_tmp_dir
from tests.helpers.categories import ADMIN, CLIENT, image_bytes, make_settings, shots, snapshot
from tests.helpers.store import manifest_in, sample_tensors


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture()
def client(store, tiny_backbone):
    with TestClient(create_app(make_settings(store), backbone=tiny_backbone)) as c:
        yield c


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_backbone):
    """One app for the read-only and refusal checks (each startup costs about a second)."""
    root = tmp_path_factory.mktemp("hygiene") / "store"
    with TestClient(create_app(make_settings(root), backbone=tiny_backbone)) as c:
        c.store_root = root
        register(c, range(4))
        yield c


def register(client: TestClient, seeds: range | list[int], **data: str) -> dict:
    r = client.post("/v1/categories/widget/shots", headers=ADMIN, files=shots(seeds),
                    data={"finetune": "false", **data})
    assert r.status_code == 201, r.text
    return r.json()


def test_activating_a_damaged_version_is_refused_and_get_shows_integrity(client, store):
    register(client, range(4))
    assert register(client, [4])["version"] == 2
    assert client.post("/v1/categories/widget/versions/1/activate", headers=ADMIN).status_code == 200
    tensors = store / "categories" / "widget" / "v2" / "adapter.safetensors"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside the tensor payload, as on a failing disk
    tensors.write_bytes(bytes(data))
    before = snapshot(store)

    r = client.post("/v1/categories/widget/versions/2/activate", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_corrupt", r.text
    assert "sha256" in r.json()["error"]["message"]
    assert snapshot(store) == before
    detail = client.get("/v1/categories/widget", headers=CLIENT).json()
    assert detail["active_version"] == 1
    integrity = {v["version"]: v["integrity"] for v in detail["versions"]}
    assert integrity[1] == "ok" and integrity[2].startswith("corrupt:"), integrity
    upload = [("files", ("part.png", image_bytes(9), "image/png"))]
    assert client.post("/v1/categories/widget/predict", headers=CLIENT, files=upload).status_code == 200


@pytest.mark.parametrize("description", [
    "nul\x00byte", "two\r\nInjected-Header: x", "\x1b[31mred terminal", "tab\tseparated", "x" * 65, "-leading",
])
def test_register_description_follows_the_object_name_rule(shared, description):
    r = shared.post("/v1/categories/gadget/shots", headers=ADMIN, files=shots(range(4)),
                    data={"description": description, "finetune": "false"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_description", r.text
    assert not (shared.store_root / "categories" / "gadget").exists()


def test_register_description_that_is_not_utf8_is_read_as_latin1_and_stays_clean(shared):
    """Bytes that are not UTF-8 reach the route decoded as Latin-1 (Starlette's fallback), so they can never
    smuggle a control character or line break past the rule; what they spell is stored as such."""
    boundary = b"b0undary"
    parts = [b"--" + boundary + b'\r\nContent-Disposition: form-data; name="description"\r\n\r\nbad \xff\xfe name\r\n',
             b"--" + boundary + b'\r\nContent-Disposition: form-data; name="finetune"\r\n\r\nfalse\r\n']
    for name, (filename, data, media) in shots(range(4)):
        parts.append(b"--" + boundary + f'\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"'
                     f"\r\nContent-Type: {media}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + b"--" + boundary + b"--\r\n"
    r = shared.post("/v1/categories/latin/shots", content=body,
                    headers={**ADMIN, "Content-Type": f"multipart/form-data; boundary={boundary.decode()}"})
    assert r.status_code == 201, r.text
    versions = shared.get("/v1/categories/latin", headers=CLIENT).json()["versions"]
    assert versions[0]["object_name"] == "bad \u00ff\u00fe name"
    assert shared.delete("/v1/categories/latin", headers=ADMIN).status_code in (200, 204)


def test_a_clean_description_is_stored_and_echoed(client):
    register(client, range(4), description="metal widget-2")
    versions = client.get("/v1/categories/widget", headers=CLIENT).json()["versions"]
    assert versions[0]["object_name"] == "metal widget-2"


def test_openapi_states_what_the_server_enforces(store, tiny_backbone):
    settings = make_settings(store, max_shots=12, max_predict_images=7)
    schema = create_app(settings, backbone=tiny_backbone).openapi()
    category = next(p for p in schema["paths"]["/v1/categories/{category}"]["get"]["parameters"]
                    if p["name"] == "category")["schema"]
    assert (category["pattern"], category["minLength"], category["maxLength"]) == \
        ("^[a-z0-9][a-z0-9._-]{0,63}$", 1, 64)
    bodies = schema["components"]["schemas"]

    def body(path: str) -> dict:  # the multipart form model of a POST, found from the operation itself
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        return bodies[ref.rsplit("/", 1)[-1]]

    register_files = body("/v1/categories/{category}/shots")["properties"]["files"]
    array = next(v for v in register_files["anyOf"] if v.get("type") == "array")
    assert (array["minItems"], array["maxItems"]) == (1, 12)
    predict_files = body("/v1/categories/{category}/predict")["properties"]["files"]
    assert (predict_files["minItems"], predict_files["maxItems"]) == (1, 7)
    description = body("/v1/categories/{category}/shots")["properties"]["description"]
    assert description["pattern"] == OBJECT_NAME_PATTERN


def test_options_and_405_list_every_method_of_the_path(shared):
    r = shared.options("/v1/categories/widget")
    assert r.status_code == 204
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "DELETE", "OPTIONS"}
    r = shared.put("/v1/categories/widget", headers=ADMIN)
    assert r.status_code == 405 and "DELETE" in r.headers["allow"]


@pytest.mark.parametrize("body", [{"seed": False}, {"seed": True}, {"steps": True}, {"seed": "3"}])
def test_finetune_refuses_booleans_and_strings_for_numbers(shared, body):
    r = shared.post("/v1/categories/widget/finetune", headers=ADMIN, json=body)
    assert r.status_code == 422, r.text
    assert shared.get("/v1/jobs", headers=ADMIN).json()["jobs"] == []


def test_startup_sweeps_abandoned_temp_folders_but_not_live_ones(store, tiny_backbone):
    with TestClient(create_app(make_settings(store), backbone=tiny_backbone)) as c:
        register(c, range(4))
    category = store / "categories" / "widget"
    crashed = category / ".tmp-0123abcd"
    crashed.mkdir()
    (crashed / "adapter.safetensors").write_bytes(b"half a bundle")
    generic_crash = store / "generic" / ".tmp-feedface"
    generic_crash.mkdir(parents=True)
    trash = store / "categories" / ".trash-old-0000"
    (trash / "v1").mkdir(parents=True)
    shot_tmp = category / "shots" / ".tmp-shot"
    shot_tmp.write_bytes(b"partial shot")
    old = time.time() - 120  # temp *files* get a minute's grace: a live write finishes in milliseconds
    os.utime(shot_tmp, (old, old))
    fresh_file = category / ".tmp-pointer"
    fresh_file.write_bytes(b'{"version": 1}')
    versions_before = sorted(p.name for p in category.iterdir() if p.name.startswith("v"))

    with claimed_tmp_dir(category) as live, \
            TestClient(create_app(make_settings(store), backbone=tiny_backbone)) as c:
        assert live.is_dir(), "a temp folder a live writer holds must survive the sweep"
        for leftover in (crashed, generic_crash, trash, shot_tmp):
            assert not leftover.exists(), leftover
        assert fresh_file.exists()
        assert sorted(p.name for p in category.iterdir() if p.name.startswith("v")) == versions_before
        assert c.get("/v1/categories/widget", headers=CLIENT).json()["active_version"] == 1


def test_a_restarted_job_gets_a_fresh_message(store, tiny_backbone):
    store.mkdir(parents=True)
    with JobStore(store) as jobs:
        job = jobs.create("widget", "finetune", {})
        jobs.update(job.id, state=JobState.running, message="training step 37 (loss 0.41)", progress=0.4)
    with TestClient(create_app(make_settings(store), backbone=tiny_backbone)) as c:
        after = c.get(f"/v1/jobs/{job.id}", headers=ADMIN).json()
    assert after["state"] == "failed"
    assert after["message"] == INTERRUPTED_MESSAGE and "training step" not in after["message"]


def test_store_activate_and_rollback_verify_the_tensor_checksum(tmp_path):
    store = AdapterStore(tmp_path)
    for _ in range(3):
        store.save("screw", sample_tensors(), manifest_in())
    for version in (1, 2):
        path = tmp_path / "categories" / "screw" / f"v{version}" / "adapter.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    pointer = (tmp_path / "categories" / "screw" / "active.json").read_bytes()
    with pytest.raises(BundleCorrupt, match="sha256"):
        store.activate("screw", 1)
    with pytest.raises(BundleCorrupt, match="sha256"):
        store.rollback("screw")  # v2 is the rollback target: damaged too
    assert (tmp_path / "categories" / "screw" / "active.json").read_bytes() == pointer
    assert store.active_version("screw") == 3
