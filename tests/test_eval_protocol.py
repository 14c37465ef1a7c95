"""Harness tests: dataset layout, shot rule, aggregation, and protocol -> report -> plots end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipshot.evaluation import (
    ALL_METRICS,
    QUALITY_METRICS,
    DatasetError,
    aggregate,
    list_categories,
    list_test_samples,
    list_train_good,
    load_mask,
    run_protocol,
    select_shots,
    shot_permutation,
    write_outputs,
)
from tests.helpers.evaluation import SIDE, make_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class MeanDiffDetector:
    """Test double for the harness only: map = |image - adapter mean| resized to map_size."""

    def predict(self, images, adapter, *, map_size="input"):
        out = []
        for img in images:
            arr = np.asarray(img, dtype=np.float32)
            amap = np.abs(arr - adapter["mean"]).mean(axis=2)
            if map_size != "input":
                amap = np.asarray(Image.fromarray(amap).resize(map_size[::-1], Image.Resampling.BILINEAR))
            out.append(type("Pred", (), {"score": float(amap.max()), "anomaly_map": amap})())
        return out


def make_adapter_recorder(calls: list):
    def make_adapter(shots, k, seed, *, category):
        calls.append((category, k, seed, len(shots)))
        stack = [np.asarray(s, dtype=np.float32) for s in shots]
        mean = np.mean(stack, axis=0) if stack else np.full((SIDE, SIDE, 3), 127.5, dtype=np.float32)
        return {"mean": mean}, 0.01 * k, 0.0
    return make_adapter


# --- dataset -------------------------------------------------------------------------------------

def test_dataset_listing_and_masks(tmp_path: Path) -> None:
    root = make_dataset(tmp_path)
    make_dataset(tmp_path, "gadget", seed=1)
    (tmp_path / "not_a_category").mkdir()
    assert list_categories(root) == ["gadget", "widget"]
    assert [p.name for p in list_train_good(root, "widget")] == [f"{i:03d}.png" for i in range(6)]
    samples = list_test_samples(root, "widget")
    assert [(s.defect, s.label, s.mask_path is None) for s in samples] == (
        [("good", 0, True)] * 3 + [("scratch", 1, False)] * 3)
    full = load_mask(samples[3], "full")
    assert full.dtype == bool and full.shape == (SIDE, SIDE) and full.sum() == 30  # 5x6 square
    assert load_mask(samples[0], "full").shape == (SIDE, SIDE) and not load_mask(samples[0]).any()
    big = load_mask(samples[3], 256)
    assert big.shape == (256, 256) and big.sum() == 30 * 64  # nearest x8 keeps the square binary


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        list_categories(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no category"):
        list_categories(tmp_path)
    root = make_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        list_train_good(root, "nope")
    (root / "widget" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match="missing ground-truth mask"):
        list_test_samples(root, "widget")


# --- shot rule -----------------------------------------------------------------------------------

FILES = [f"/data/bottle/train/good/{i:03d}.png" for i in range(20)]


def test_shots_deterministic_nested_and_order_independent() -> None:
    shuffled = FILES[:]
    random.Random(1).shuffle(shuffled)
    for seed in (0, 1, 2):
        sets = [select_shots(FILES, k, category="bottle", seed=seed) for k in (1, 2, 4, 8, 16)]
        for small, large in zip(sets, sets[1:], strict=False):
            assert large[:len(small)] == small  # 1 ⊂ 2 ⊂ 4 ⊂ 8 ⊂ 16
        assert len(set(sets[-1])) == 16
        assert select_shots(shuffled, 16, category="bottle", seed=seed) == sets[-1]
        moved = [f.replace("/data", "/elsewhere") for f in FILES]  # only names matter
        assert [p.name for p in select_shots(moved, 8, category="bottle", seed=seed)] == [
            p.name for p in sets[3]]
    perms = {tuple(shot_permutation(FILES, category=c, seed=s)) for c in ("bottle", "cable") for s in (0, 1)}
    assert len(perms) == 4  # seeds and categories give different draws


def test_shots_regression_pin() -> None:
    # Pinned on purpose: results are only comparable across versions if the same files are drawn.
    # If this fails, the rule (or CPython's shuffle) changed: bump the protocol version, don't re-pin.
    names = [p.name for p in select_shots(FILES, 4, category="bottle", seed=0)]
    expected = [f"{i:03d}.png" for i in range(20)]
    random.Random("bottle:0").shuffle(expected)
    assert names == expected[:4]
    assert names == PINNED_BOTTLE_SEED0


PINNED_BOTTLE_SEED0 = ["012.png", "019.png", "008.png", "014.png"]


def test_shots_bounds() -> None:
    assert select_shots(FILES, 0, category="bottle", seed=0) == []
    with pytest.raises(ValueError, match="only 20"):
        select_shots(FILES, 21, category="bottle", seed=0)


# --- aggregation ---------------------------------------------------------------------------------

def _rec(cat: str, seed: int, value: float, k: int = 1) -> dict:
    return {"category": cat, "mode": "memory", "shots": k, "seed": seed,
            "metrics": {m: value for m in ALL_METRICS}}


def test_aggregate_mean_std_and_mean_row() -> None:
    rows = aggregate([_rec("a", 0, 0.8), _rec("a", 1, 0.9), _rec("b", 0, 0.6), _rec("b", 1, 0.5)])
    by_cat = {r["category"]: r["metrics"]["aupro"] for r in rows}
    assert by_cat["a"]["mean"] == pytest.approx(0.85)
    assert by_cat["a"]["std"] == pytest.approx(np.sqrt(2 * 0.05**2))  # ddof=1: sqrt(0.005)
    # mean row: per-seed category means are 0.7 (seed 0) and 0.7 (seed 1) -> std 0, not category spread
    assert by_cat["mean"]["mean"] == pytest.approx(0.7) and by_cat["mean"]["std"] == pytest.approx(0.0)
    assert [r["category"] for r in rows] == ["a", "b", "mean"]


# --- end to end ----------------------------------------------------------------------------------

def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()


@pytest.mark.parametrize("mask_size", ["full", 16])
def test_protocol_report_plots_end_to_end(tmp_path: Path, mask_size: str | int) -> None:
    root = make_dataset(tmp_path / "data")
    make_dataset(tmp_path / "data", "gadget", seed=1)
    calls: list = []
    result = run_protocol(root, MeanDiffDetector(), make_adapter_recorder(calls), mode="memory",
                          shots=[0, 1, 2, 4], seeds=[0, 1], mask_size=mask_size, batch_size=4,
                          progress=False)
    # zero-shot once per category (first seed); 3 shot counts x 2 seeds otherwise
    assert len(result.records) == 2 * (1 + 3 * 2)
    assert ("widget", 0, 0, 0) in calls and ("widget", 0, 1, 0) not in calls
    assert all(n == k for _, k, _, n in calls)  # make_adapter gets exactly k shot images
    for cat in ("gadget", "widget"):
        for seed in (0, 1):
            files = {r["shots"]: r["shot_files"] for r in result.records
                     if r["category"] == cat and r["seed"] == seed and r["shots"] > 0}
            assert files[1] == files[2][:1] and files[2] == files[4][:2]  # nested, same rule
    # bright squares vs texture: a working harness must rank the defects first
    for rec in result.records:
        if rec["shots"] > 0:
            assert rec["metrics"]["image_auroc"] == 1.0
            assert rec["metrics"]["aupro"] > 0.9
    side = SIDE if mask_size == "full" else mask_size
    assert all(e.mask.shape == e.amap.shape for e in result.examples)
    assert {e.title.split()[1].split("/")[0] for e in result.examples} == {"good", "scratch"}
    assert result.settings["map_size"] == ("input" if mask_size == "full" else (side, side))

    out = tmp_path / "out"
    paths = write_outputs(out, result, command=["clipshot", "eval", "--data", str(root)],
                          settings={"backbone": "fake"})
    assert set(paths) == {"results.json", "results.md", "scores.csv", "shots.png", "examples.png"}
    _assert_png(out / "shots.png")
    _assert_png(out / "examples.png")
    data = json.loads((out / "results.json").read_text())
    assert {"command", "settings", "versions", "records", "aggregated", "metrics"} <= set(data)
    assert data["command"].startswith("clipshot eval --data")
    assert data["settings"]["backbone"] == "fake" and data["settings"]["mode"] == "memory"
    for row in data["aggregated"] + data["records"]:
        for name in QUALITY_METRICS:
            value = row["metrics"][name]
            value = value["mean"] if isinstance(value, dict) else value
            assert 0.0 <= value <= 1.0, (name, row)
    cats = {r["category"] for r in data["aggregated"]}
    assert cats == {"gadget", "widget", "mean"}
    md = (out / "results.md").read_text()
    assert "| category | shots | image AUROC | pixel AUROC | AUPRO |" in md
    assert md.count("\n| widget |") == 4 and "±" in md


def test_protocol_rejects_unknown_category_and_map_mismatch(tmp_path: Path) -> None:
    root = make_dataset(tmp_path)
    with pytest.raises(ValueError, match="unknown categories"):
        run_protocol(root, MeanDiffDetector(), make_adapter_recorder([]), mode="memory",
                     categories=["nope"], progress=False)

    class WrongSize(MeanDiffDetector):
        def predict(self, images, adapter, *, map_size="input"):
            return super().predict(images, adapter, map_size=(8, 8))

    with pytest.raises(ValueError, match="anomaly map"):
        run_protocol(root, WrongSize(), make_adapter_recorder([]), mode="memory", shots=[1],
                     seeds=[0], progress=False)
