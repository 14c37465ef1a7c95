"""`clipshot eval` end to end through the console-script entry point, with real detectors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from app.cli.main import main
from tests.helpers.evaluation import make_dataset


def _outputs_ok(out):
    for name in ("results.json", "results.md", "shots.png", "examples.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("shots.png", "examples.png"):
        assert Image.open(out / name).format == "PNG"
    return json.loads((out / "results.json").read_text())


def test_eval_memory_mode_offline_backbone(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["eval", "--data", str(data), "--shots", "1,2", "--seeds", "0,1", "--mode", "memory",
                 "--backbone", "imagenet:efficientnet-lite0", "--image-size", "64", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    results = _outputs_ok(out)
    records = results["records"]
    assert sorted((r["shots"], r["seed"]) for r in records) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    # Bright 5x6 squares on flat grey texture: a real ImageNet backbone separates them almost perfectly;
    # 0.9 fails a broken memory branch (random scores give ~0.5) without depending on exact values.
    assert all(r["metrics"]["image_auroc"] >= 0.9 for r in records)
    assert "image AUROC" in capsys.readouterr().out or "image_auroc" in (out / "results.md").read_text().lower()


def test_eval_fused_zero_shot_tiny_clip_pipeline(tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["eval", "--data", str(data), "--shots", "0,1", "--seeds", "0", "--mode", "fused",
                 "--backbone", "test:tiny-clip", "--device", "cpu", "--out", str(out)])
    assert code == 0
    records = _outputs_ok(out)["records"]
    assert sorted(r["shots"] for r in records) == [0, 1]
    for record in records:  # random weights: only that every metric was computed, not its value
        assert all(0.0 <= record["metrics"][k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "aupro"))


def test_eval_rejects_clip_only_mode_on_offline_backbone(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    code = main(["eval", "--data", str(data), "--shots", "0", "--seeds", "0", "--mode", "memory",
                 "--backbone", "imagenet:efficientnet-lite0", "--image-size", "64", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "memory branch only" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["eval", "--data", "/nonexistent", "--out", "x", "--shots", "1"]])
def test_eval_bad_root_is_a_clean_error(argv, capsys, tmp_path):
    argv[argv.index("x")] = str(tmp_path / "o")
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err
