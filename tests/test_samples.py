"""``clipshot samples``: the made-up product a newcomer tries the service on must be a fair demonstration."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli.main import main
from app.cli.samples import DEFECTS, SIZE, write_samples
from clipshot.backbone import load_backbone
from clipshot.detector import Detector


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def test_command_writes_goods_defects_and_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["samples", str(tmp_path / "s"), "--good", "5", "--defects", "4"]) == 0
    assert "wrote 5 good and 4 defect photos" in capsys.readouterr().out
    goods = sorted((tmp_path / "s" / "good").glob("*.png"))
    defects = sorted((tmp_path / "s" / "defect").glob("*.png"))
    assert len(goods) == 5 and len(defects) == 4
    manifest = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert sorted(d["defect"] for d in manifest["defects"]) == sorted(DEFECTS)
    for path in defects:
        mask = np.asarray(Image.open(tmp_path / "s" / "defect_masks" / path.name))
        assert mask.shape == (SIZE, SIZE)
        # a defect covers a visible spot, never most of the part: 10 px is a scratch's area at the least,
        # 5 % of the frame well above the largest stain
        assert 10 < int((mask > 0).sum()) < 0.05 * SIZE * SIZE, path.name


def test_same_seed_same_files_other_seed_other_parts(tmp_path: Path) -> None:
    write_samples(tmp_path / "a", good=3, defects=4, seed=7)
    write_samples(tmp_path / "b", good=3, defects=4, seed=7)
    write_samples(tmp_path / "c", good=3, defects=4, seed=8)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert not set(_digests(tmp_path / "a").values()) & set(_digests(tmp_path / "c").values())


def test_bad_counts_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["samples", str(tmp_path), "--good", "0"]) == 2
    assert "--good must be at least 1" in capsys.readouterr().err


def test_registered_on_four_goods_every_defect_is_flagged_and_good_parts_pass(tmp_path: Path) -> None:
    """What the README promises a newcomer: register 4 good photos, and the held-out good parts pass while every
    kind of defect is flagged. A demonstration that misfires would teach them the product does not work."""
    written = write_samples(tmp_path, good=8, defects=len(DEFECTS), seed=0)
    detector = Detector(load_backbone("imagenet:efficientnet-lite0", image_size=160))  # small: seconds on a CPU
    shots = [Image.open(p).convert("RGB") for p in written["good"][:4]]
    adapter = detector.fit_memory(shots, category="washer")
    goods = detector.predict([Image.open(p).convert("RGB") for p in written["good"][4:]], adapter, map_size=None)
    defects = detector.predict([Image.open(p).convert("RGB") for p in written["defect"]], adapter, map_size=None)
    assert [p.is_anomalous for p in goods] == [False] * len(goods)
    assert [p.is_anomalous for p in defects] == [True] * len(defects)
    assert max(p.score for p in goods) < min(p.score for p in defects)
