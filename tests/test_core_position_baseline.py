"""A product may divide its maps by the normal level its own shots show at each position
(``clipshot.position_baseline``), and decides so from its own evidence.

The two synthetic products below are built so that the plain and the divided maps *must* choose differently: in one
a normal stripe at a fixed position outscores the small defects, which dividing by the level removes (a thread or
a frame border); in the other the background is near zero with noise of its own size, so dividing by the level
turns that noise into peaks above the defects (a centred object on a dark background). Real images make the same
choice in ``benchmarks/accuracy_suite.py``; here the evidence is exact and the test fails if the choice is ignored.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from clipshot import position_baseline
from clipshot.adapter import Adapter
from clipshot.calibration_evidence import Evidence, LeaveOneOut
from clipshot.features import Features
from clipshot.fusion import ScoringConfig
from clipshot.memory_branch import MemoryBank
from model_store import AdapterStore
from model_store.adapters import load_adapter, save_adapter

SHOTS, PER_SHOT, SIDE = 4, 4, 16


def _evidence(kind: str, seed: int = 0) -> tuple[Adapter, Evidence, LeaveOneOut]:
    """(adapter, evidence, plain leave-one-out maps) of a product of ``kind``.

    ``stripe``: every good map is 0.1 +- 0.01, except column 0, which is 1.0 +- 0.05 in every shot; a defect adds
    0.3 on a 2x2 spot away from the stripe. Plain maps rank the normal stripe (1.05) above the defects (0.4).
    ``background``: a central object at 0.2 +- 0.01 on a background uniform in [0.0005, 0.01]; a defect adds 0.1
    on the object. Plain maps separate perfectly; divided, the background's noise reaches ~2x its level while a
    defect is 1.5x the object's."""
    g = torch.Generator().manual_seed(seed)

    def normal(count: int) -> torch.Tensor:
        if kind == "stripe":
            maps = 0.1 + 0.01 * torch.randn(count, SIDE, SIDE, generator=g)
            maps[:, :, 0] = 1.0 + 0.05 * torch.randn(count, SIDE, generator=g)
        else:
            maps = 0.0005 + 0.0095 * torch.rand(count, SIDE, SIDE, generator=g)
            maps[:, 4:12, 4:12] = 0.2 + 0.01 * torch.randn(count, 8, 8, generator=g)
        return maps

    defects = normal(SHOTS * PER_SHOT)
    masks = torch.zeros_like(defects)
    for k in range(len(defects)):
        y, x = (int(v) for v in torch.randint(4, 10, (2,), generator=g))
        masks[k, y : y + 2, x : x + 2] = 1
    defects = defects + masks * (0.3 if kind == "stripe" else 0.1)
    normals = normal(SHOTS)
    scoring = ScoringConfig(image_score="peak", position_baseline="auto")
    loo = LeaveOneOut(normals.flatten(1).amax(1).tolist(), defects.flatten(1).amax(1).tolist(), normals, defects)
    feats = Features(None, [torch.zeros(SHOTS, 1, 2)], (1, 1))
    ev = Evidence(feats, None, 0, None, masks, [k // PER_SHOT for k in range(len(defects))])
    adapter = Adapter(category=kind, scoring=scoring, memory=MemoryBank([torch.zeros(1, 2)]))
    return adapter, ev, loo


@pytest.mark.parametrize("kind, chosen", [("stripe", "divided"), ("background", "plain")])
def test_products_with_and_without_position_bound_normal_structure_choose_differently(kind, chosen):
    adapter, ev, loo = _evidence(kind)
    out = position_baseline.decide(adapter, ev, loo)
    record = adapter.baseline_choice
    assert record["chosen"] == chosen, record
    assert (adapter.baseline is not None) == (chosen == "divided")
    other = "plain" if chosen == "divided" else "divided"
    assert record[chosen]["separation"] > record[other]["separation"], record
    # Calibration goes on with the chosen maps' scores: each held-out shot divided by the *other* shots' level.
    if chosen == "divided":
        others = position_baseline.level(loo.normal_maps[1:])
        assert torch.allclose(out.normal_maps[0], loo.normal_maps[0] / others)
        assert out.normal[0] == pytest.approx(float((loo.normal_maps[0] / others).max()))
        assert torch.allclose(adapter.baseline, position_baseline.level(loo.normal_maps))
    else:
        assert out is loo


def test_on_divides_off_keeps_and_too_little_evidence_says_why():
    adapter, ev, loo = _evidence("background")
    on = replace(adapter, scoring=replace(adapter.scoring, position_baseline="on"))
    position_baseline.decide(on, ev, loo)
    assert on.baseline is not None and on.baseline_choice["chosen"] == "divided"  # forced, against the evidence
    off = replace(adapter, scoring=replace(adapter.scoring, position_baseline="off"))
    assert position_baseline.decide(off, ev, loo) is loo and off.baseline is None and off.baseline_choice is None
    few = replace(ev, feats=Features(None, [torch.zeros(2, 1, 2)], (1, 1)))
    position_baseline.decide(adapter, few, loo)
    assert adapter.baseline is None and "at least 3" in adapter.baseline_choice["reason"]
    texted = replace(adapter, text=torch.zeros(2, 4))
    position_baseline.decide(texted, ev, loo)
    assert texted.baseline is None and "text branch" in texted.baseline_choice["reason"]
    with pytest.raises(ValueError, match="position_baseline"):
        ScoringConfig(position_baseline="sometimes")


def _shots() -> list[Image.Image]:
    return [Image.new("RGB", (64, 64), (40 * i, 90, 160)) for i in range(4)]


def test_a_fit_serves_divided_maps_and_bundles_keep_the_level(tiny_detector, tmp_path):
    adapter = tiny_detector.fit_memory(_shots(), category="lvl", text=False,
                                       scoring=ScoringConfig(position_baseline="on"))
    assert adapter.baseline is not None and adapter.baseline_choice["chosen"] == "divided"
    probe = [Image.new("RGB", (64, 64), (200, 30, 30))]
    feats = tiny_detector.features_of(probe, adapter)
    scores, maps = tiny_detector.score_features(feats, adapter)
    plain = replace(adapter, baseline=None, uid="plain")  # another product: its own uid
    _, plain_maps = tiny_detector.score_features(feats, plain)
    assert torch.allclose(maps, plain_maps / adapter.baseline)
    # One scoring path: a mixed batch of this product and one without a level scores each row as alone.
    mixed_scores, mixed_maps = tiny_detector.score_rows(Features.cat([feats, feats]), [adapter, plain])
    assert torch.allclose(mixed_maps[0], maps[0]) and torch.allclose(mixed_maps[1], plain_maps[0])
    store = AdapterStore(tmp_path)
    save_adapter(store, tiny_detector, adapter)
    loaded, _ = load_adapter(store, tiny_detector, "lvl")
    assert torch.equal(loaded.baseline, adapter.baseline.cpu())
    assert loaded.baseline_choice == json.loads(json.dumps(adapter.baseline_choice))
    assert torch.allclose(tiny_detector.score_features(feats, loaded)[0], scores)


def test_bundles_written_before_the_level_load_plain_and_a_missing_level_is_corrupt(tiny_detector):
    adapter = tiny_detector.fit_memory(_shots(), category="old", text=False,
                                       scoring=ScoringConfig(position_baseline="on"))
    tensors, config = adapter.to_tensors(), adapter.config()
    old_config = {**config, "scoring": {k: v for k, v in config["scoring"].items() if k != "position_baseline"}}
    old_config.pop("position_baseline")
    old = Adapter.from_tensors("old", {k: v for k, v in tensors.items() if k != "memory.baseline"}, old_config)
    assert old.scoring.position_baseline == "off" and old.baseline is None and old.baseline_choice is None
    with pytest.raises(ValueError, match="memory.baseline is missing"):
        Adapter.from_tensors("old", {k: v for k, v in tensors.items() if k != "memory.baseline"}, config)
