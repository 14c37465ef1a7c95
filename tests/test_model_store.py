"""Tests for model_store: round trips, integrity checks, versioning, atomicity, concurrency, shots."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

import model_store.bundles as bundles_mod
from model_store import (
    SCHEMA_VERSION,
    AdapterStore,
    BackboneMismatch,
    BundleCorrupt,
    BundleNotFound,
    InvalidInput,
    InvalidName,
    Manifest,
    StoreError,
    UnsupportedSchema,
    VersionNotFound,
)
from tests.helpers.store import SHA, SPEC, manifest_in, sample_tensors


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(-1).view(torch.uint8).tolist())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """dtype, shape and every bit equal (NaN payloads and -0.0 included, unlike torch.equal)."""
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


# ---- round trip ---------------------------------------------------------------------------------
def test_round_trip_is_bit_exact(store: AdapterStore) -> None:
    tensors = sample_tensors()
    version = store.save("screw", tensors, manifest_in())
    loaded, manifest = store.load("screw", backbone_spec=SPEC, backbone_sha256=SHA)

    assert version == 1
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert same_bits(loaded[name], tensor), name
    assert manifest.schema_version == SCHEMA_VERSION
    assert (manifest.category, manifest.version, manifest.kind) == ("screw", 1, "category")
    assert manifest.created.utcoffset() is not None and manifest.created.utcoffset().total_seconds() == 0
    assert manifest.adapter == manifest_in()["adapter"]
    assert manifest.metrics == manifest_in()["metrics"]
    assert manifest.training is not None and manifest.training.seconds == 12.5
    assert manifest.shots[0].sha256 == "b" * 64 and manifest.promotable is True
    path = store.root / "categories" / "screw" / "v1" / "adapter.safetensors"
    assert manifest.tensors_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert store.manifest("screw", 1) == manifest
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest


def test_empty_tensor_dict_is_allowed(store: AdapterStore) -> None:
    store.save("zero", {}, manifest_in())
    loaded, _ = store.load("zero")
    assert loaded == {}


def test_shared_storage_tensors_are_stored_independently(store: AdapterStore) -> None:
    base = torch.arange(10.0)
    store.save("views", {"all": base, "head": base[:3]}, manifest_in())
    loaded, _ = store.load("views")
    assert torch.equal(loaded["head"], base[:3]) and torch.equal(loaded["all"], base)


# ---- integrity checks ---------------------------------------------------------------------------
def test_flipped_byte_is_detected(store: AdapterStore) -> None:
    store.save("screw", sample_tensors(), manifest_in())
    path = store.root / "categories" / "screw" / "v1" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleCorrupt, match="sha256"):
        store.load("screw")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"backbone_spec": "open_clip:ViT-L-14-336:openai"}, "spec"), ({"backbone_sha256": "c" * 64}, "sha256")],
)
def test_backbone_mismatch(store: AdapterStore, kwargs: dict, field: str) -> None:
    store.save("screw", sample_tensors(), manifest_in())
    with pytest.raises(BackboneMismatch, match=field):
        store.load("screw", **kwargs)
    store.load("screw", backbone_spec=SPEC, backbone_sha256=SHA)  # matching values pass


@pytest.mark.parametrize("missing", ["adapter.safetensors", "manifest.json"])
def test_missing_file_is_reported(store: AdapterStore, missing: str) -> None:
    store.save("screw", sample_tensors(), manifest_in())
    (store.root / "categories" / "screw" / "v1" / missing).unlink()
    with pytest.raises(BundleCorrupt, match=f"missing.*{missing}"):
        store.load("screw")


def test_extra_file_such_as_a_pickle_is_rejected(store: AdapterStore) -> None:
    store.save("screw", sample_tensors(), manifest_in())
    (store.root / "categories" / "screw" / "v1" / "extra.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BundleCorrupt, match="unexpected files"):
        store.load("screw")


def test_unsupported_schema_and_bad_manifest(store: AdapterStore) -> None:
    store.save("screw", sample_tensors(), manifest_in())
    path = store.root / "categories" / "screw" / "v1" / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(UnsupportedSchema, match="99"):
        store.load("screw")
    path.write_text("{not json")
    with pytest.raises(BundleCorrupt, match="not valid JSON"):
        store.manifest("screw", 1)
    path.write_text(json.dumps({**data, "version": 7}))
    with pytest.raises(BundleCorrupt, match="copied or renamed"):
        store.load("screw")


def test_missing_category_and_version(store: AdapterStore) -> None:
    with pytest.raises(BundleNotFound, match="no active version"):
        store.load("nothing")
    store.save("screw", {}, manifest_in())
    with pytest.raises(VersionNotFound, match="available: \\[1\\]"):
        store.load("screw", 5)
    assert store.versions("nothing") == [] and store.active_version("nothing") is None


# ---- versioning ---------------------------------------------------------------------------------
def test_versions_activate_and_rollback(store: AdapterStore) -> None:
    assert store.save("screw", {"x": torch.tensor([1])}, manifest_in()) == 1
    assert store.save("screw", {"x": torch.tensor([2])}, manifest_in()) == 2
    assert store.save("screw", {"x": torch.tensor([3])}, manifest_in(), activate=False) == 3
    assert store.versions("screw") == [1, 2, 3]
    assert store.active_version("screw") == 2
    assert store.load("screw")[0]["x"].item() == 2
    assert store.load("screw", 3)[0]["x"].item() == 3

    store.activate("screw", 3)
    assert store.load("screw")[0]["x"].item() == 3
    assert store.rollback("screw") == 2
    assert store.active_version("screw") == 2
    store.activate("screw", 1)
    with pytest.raises(VersionNotFound):
        store.rollback("screw")
    with pytest.raises(VersionNotFound):
        store.activate("screw", 9)
    with pytest.raises(InvalidInput):
        store.activate("screw", 0)
    with pytest.raises(BundleNotFound):
        store.activate("ghost", 1)
    assert store.active_version("screw") == 1
    assert not (store.root / "categories" / "ghost").exists()


# ---- validation before mutation -----------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", "Screw", ".hidden", "-x", "a" * 65, "nul\x00", "sp ace", None, 3]
)
def test_invalid_names_rejected_without_writing(store: AdapterStore, name: object) -> None:
    with pytest.raises(InvalidName):
        store.save(name, {}, manifest_in())  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        store.save_shots(name, [("a.png", b"x")])  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        store.load(name)  # type: ignore[arg-type]
    assert not store.root.exists()


@pytest.mark.parametrize(
    ("tensors", "manifest"),
    [
        ({"x": [1, 2]}, manifest_in()),
        ({"x": torch.zeros(2).to_sparse()}, manifest_in()),
        ({1: torch.zeros(2)}, manifest_in()),
        ("nope", manifest_in()),
        ({"x": torch.zeros(2)}, {"adapter": {}}),  # backbone missing
        ({"x": torch.zeros(2)}, manifest_in(typo_field=1)),
        ({"x": torch.zeros(2)}, manifest_in(metrics={"f": object()})),
        ({"x": torch.zeros(2)}, manifest_in(category="other")),
    ],
)
def test_invalid_input_writes_nothing(store: AdapterStore, tensors: object, manifest: dict) -> None:
    with pytest.raises(InvalidInput):
        store.save("screw", tensors, manifest)  # type: ignore[arg-type]
    assert not store.root.exists()


# ---- atomicity ----------------------------------------------------------------------------------
def test_failed_rename_leaves_no_version(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save("screw", {"x": torch.tensor([1])}, manifest_in())

    def boom(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError, match="disk on fire"):
        store.save("screw", {"x": torch.tensor([2])}, manifest_in())
    monkeypatch.undo()

    cat = store.root / "categories" / "screw"
    assert store.versions("screw") == [1] and store.active_version("screw") == 1
    assert sorted(p.name for p in cat.iterdir()) == [".lock", "active.json", "v1"]
    assert store.save("screw", {"x": torch.tensor([3])}, manifest_in()) == 2


def test_crash_midway_is_invisible(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer dying after the tensors are on disk (no cleanup possible) leaves only hidden temp."""

    def crash(manifest: Manifest) -> bytes:
        raise KeyboardInterrupt  # simulates the process dying mid-write

    monkeypatch.setattr(bundles_mod, "dump_manifest", crash)
    monkeypatch.setattr(bundles_mod.shutil, "rmtree", lambda *a, **k: None)  # a dead process cleans nothing
    with pytest.raises(KeyboardInterrupt):
        store.save("screw", sample_tensors(), manifest_in())
    monkeypatch.undo()

    cat = store.root / "categories" / "screw"
    leftovers = [p for p in cat.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "adapter.safetensors").exists()
    assert store.versions("screw") == [] and store.active_version("screw") is None
    assert store.categories() == []
    with pytest.raises(BundleNotFound):
        store.load("screw")
    # stale temp dirs are swept by a later save once old enough
    os.utime(leftovers[0], (0, 0))
    assert store.save("screw", {}, manifest_in()) == 1
    assert not leftovers[0].exists()


# ---- concurrency --------------------------------------------------------------------------------
def test_concurrent_saves_get_distinct_versions(store: AdapterStore) -> None:
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results.append(store.save("screw", {"i": torch.tensor([i])}, manifest_in()))
        except BaseException as exc:  # pragma: no cover - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == list(range(1, 9))
    assert store.versions("screw") == list(range(1, 9))
    stored = {store.load("screw", v)[0]["i"].item() for v in range(1, 9)}
    assert stored == set(range(8))


# ---- shots --------------------------------------------------------------------------------------
def test_shots_are_deduplicated_and_sorted(store: AdapterStore) -> None:
    a, b = b"\x89PNG image a", b"\xff\xd8 jpeg b"
    names = store.save_shots("screw", [("good_01.PNG", a), ("b.jpg", b), ("copy.png", a)])
    sha_a, sha_b = hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()
    assert names == [f"{sha_a}.png", f"{sha_b}.jpg", f"{sha_a}.png"]
    assert store.save_shots("screw", [("again.jpeg", a)]) == [f"{sha_a}.png"]
    paths = store.shot_paths("screw")
    assert [p.name for p in paths] == sorted([f"{sha_a}.png", f"{sha_b}.jpg"])
    assert {p.read_bytes() for p in paths} == {a, b}
    assert store.save_shots("odd", [("../../x.p/ng", b"z")]) == [hashlib.sha256(b"z").hexdigest()]
    assert store.categories() == ["odd", "screw"]


def test_invalid_shots_write_nothing(store: AdapterStore) -> None:
    for files in ([("a.png", b"ok"), ("b.png", b"")], [("a.png", "text")], [("a.png",)], "x"):
        with pytest.raises(InvalidInput):
            store.save_shots("screw", files)  # type: ignore[arg-type]
    assert store.save_shots("screw", []) == []
    assert not store.root.exists() and store.shot_paths("screw") == []


# ---- delete / listing ---------------------------------------------------------------------------
def test_delete_and_categories(store: AdapterStore) -> None:
    assert store.categories() == []
    store.save("screw", {}, manifest_in())
    store.save("bottle", {}, manifest_in())
    store.save_shots("screw", [("a.png", b"a")])
    assert store.categories() == ["bottle", "screw"]
    store.delete("screw")
    assert store.categories() == ["bottle"]
    assert sorted(p.name for p in (store.root / "categories").iterdir()) == ["bottle"]
    assert store.versions("screw") == [] and store.shot_paths("screw") == []
    with pytest.raises(BundleNotFound):
        store.delete("screw")
    assert store.save("screw", {}, manifest_in()) == 1  # a re-created category starts again at v1


# ---- generic bundle -----------------------------------------------------------------------------
def test_generic_bundles(store: AdapterStore) -> None:
    with pytest.raises(BundleNotFound):
        store.load_generic()
    tensors = sample_tensors()
    assert store.save_generic(tensors, manifest_in()) == 1
    assert store.save_generic({"x": torch.ones(1)}, manifest_in(), activate=False) == 2
    loaded, manifest = store.load_generic(backbone_spec=SPEC, backbone_sha256=SHA)
    assert manifest.kind == "generic" and manifest.version == 1
    assert all(same_bits(loaded[k], v) for k, v in tensors.items())
    assert (store.root / "generic" / "v2" / "manifest.json").is_file()
    store.generic.activate(2)
    assert store.load_generic()[1].version == 2
    with pytest.raises(BackboneMismatch):
        store.load_generic(backbone_sha256="0" * 64)
    assert store.categories() == []  # the generic slot is not a category
    with pytest.raises(InvalidInput):
        store.save_generic({}, manifest_in(kind="category"))


def test_errors_share_a_base_class() -> None:
    for exc in (InvalidName, InvalidInput, BundleNotFound, VersionNotFound, BundleCorrupt, BackboneMismatch):
        assert issubclass(exc, StoreError)


# ---- derived versions and the shot ledger ------------------------------------------------------------
def test_derive_reuses_tensors_byte_for_byte_and_refuses_a_damaged_source(store: AdapterStore) -> None:
    store.save("screw", sample_tensors(), manifest_in())
    v2 = store.derive("screw", 1, {"metrics": {"threshold": 0.3}})
    assert (v2, store.active_version("screw")) == (2, 2)
    one, two = (store.root / "categories" / "screw" / f"v{v}" / "adapter.safetensors" for v in (1, 2))
    assert one.read_bytes() == two.read_bytes()
    m = store.manifest("screw", 2)
    assert m.metrics == {"threshold": 0.3} and m.shots == store.manifest("screw", 1).shots
    store.load("screw", 2)  # checksummed like any other version
    with pytest.raises(InvalidInput):
        store.derive("screw", 1, {"shots": "not a list"})
    data = bytearray(one.read_bytes())
    data[-1] ^= 0xFF
    one.write_bytes(bytes(data))
    with pytest.raises(BundleCorrupt):
        store.derive("screw", 1, {})
    assert store.versions("screw") == [1, 2] and store.active_version("screw") == 2


def test_orphan_sweep_removes_only_old_unlisted_files(store: AdapterStore) -> None:
    listed, orphan, fresh = b"listed", b"orphan", b"fresh orphan"
    names = store.save_shots("screw", [("a.png", listed), ("b.png", orphan), ("c.png", fresh)])
    ref = {"name": names[0], "sha256": hashlib.sha256(listed).hexdigest(), "source": "feedback", "label": "good"}
    store.save("screw", {}, manifest_in(shots=[ref]))
    old = 0.0
    for name in names[:2]:
        os.utime(store.shot_path("screw", name), (old, old))
    assert store.referenced_shots("screw") == {names[0]}
    assert store.sweep_orphan_shots("screw") == [names[1]]
    assert {p.name for p in store.shot_paths("screw")} == {names[0], names[2]}  # the fresh one may be in flight
    with pytest.raises(InvalidName):
        store.shot_path("screw", "../v1/manifest.json")
