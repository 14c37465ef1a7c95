"""A product chooses its memory scoring from its own shots (``clipshot.scoring_selection``).

The two synthetic products below are built so that the centred and the origin scorings *must* choose
differently: in one the normal patches vary along a direction shared by all of them and a defect points somewhere
new (what centring is for), in the other a defect is the normal variation pushed further along the same direction
(centring normalises the magnitude away and cannot see it). Real images cover the same choice in
``benchmarks/accuracy_suite.py``; here the evidence is exact and the test fails if the choice is ignored.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from PIL import Image

from clipshot import scoring_selection as selection
from clipshot.adapter import Adapter
from clipshot.calibration_evidence import Evidence
from clipshot.chunked import finish
from clipshot.features import Features
from clipshot.fusion import ScoringConfig
from clipshot.memory_branch import MemoryBank
from model_store import AdapterStore
from model_store.adapters import load_adapter, save_adapter

DIM, GRID, SHOTS, PER_SHOT = 8, (2, 2), 4, 2


def _unit(i: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), DIM).float()


def _product(kind: str, seed: int = 0) -> tuple[Features, Features, torch.Tensor, list[int]]:
    """(shots, synthetic defects, their patch masks, source shot of each) of a product of ``kind``.

    Every patch is a large common part (10 along e0, as pretrained features share) plus its own variation a
    along e1, plus a whisper of noise. ``direction``: a = +-U(1, 30), and a defect patch is 0.6 along e2, a new
    direction. ``magnitude``: a = U(1, 2), and a defect patch is 6 along e1, the normal direction, further."""
    g = torch.Generator().manual_seed(seed)
    common = 10 * _unit(0)

    def normal(count: int) -> torch.Tensor:
        if kind == "direction":  # signs alternate, so the shots' mean patch is the common part alone
            a = (1 + 29 * torch.rand(count, generator=g)) * torch.tensor([1.0, -1.0]).repeat(count // 2)
        else:
            a = 1 + torch.rand(count, generator=g)
        noise = 0.02 * torch.randn(count, DIM, generator=g)
        return common + a[:, None] * _unit(1) + noise

    cells = GRID[0] * GRID[1]
    shots = F.normalize(normal(SHOTS * cells).view(SHOTS, cells, DIM), dim=-1)
    defects = normal(SHOTS * PER_SHOT * cells).view(SHOTS * PER_SHOT, cells, DIM)
    defect = common + (0.6 * _unit(2) if kind == "direction" else 6 * _unit(1))
    defects[:, 0] = defect + 0.02 * torch.randn(SHOTS * PER_SHOT, DIM, generator=g)  # the top-left patch
    masks = torch.zeros(SHOTS * PER_SHOT, *GRID)
    masks[:, 0, 0] = 1
    sources = [i // PER_SHOT for i in range(SHOTS * PER_SHOT)]
    return (Features(None, [shots], GRID), Features(None, [F.normalize(defects, dim=-1)], GRID), masks, sources)


def _choose(detector, kind: str) -> Adapter:
    shots, defects, masks, sources = _product(kind)
    adapter = Adapter(category=kind, memory=MemoryBank.from_features(shots), selection={})
    frame = adapter.geometry.frame_of(detector.backbone.image_size)
    full = F.interpolate(masks[:, None], size=frame, mode="nearest")[:, 0]  # laid out like the maps
    finish(selection.select(detector, adapter, Evidence(shots, None, 0, defects, full, sources)))
    return adapter


def test_centred_and_origin_products_choose_differently(tiny_detector):
    by_direction = _choose(tiny_detector, "direction")
    by_magnitude = _choose(tiny_detector, "magnitude")
    assert by_direction.scoring.memory_center, by_direction.selection
    assert not by_magnitude.scoring.memory_center, by_magnitude.selection
    # The record says why: the chosen candidate's separation is the best of all candidates (ties: the first).
    for adapter in (by_direction, by_magnitude):
        record = adapter.selection
        best = max(c["separation"] for c in record["candidates"])
        chosen = next(c for c in record["candidates"] if c["name"] == record["chosen"])
        assert chosen["separation"] == best
        assert record["rule"] == selection.RULE


def test_ties_keep_the_most_proven_candidate():
    cfg = ScoringConfig()
    same = [selection.CandidateEvidence(name, cfg, 1.0, 0.9) for name in ("origin-peak", "centred-peak")]
    assert selection.choose(same) == 0
    better = [*same, selection.CandidateEvidence("centred-peak_mean", cfg, 1.0, 0.95)]
    assert selection.choose(better) == 2


def test_candidates_cover_stages_only_where_the_backbone_concatenates_them():
    names = [name for name, _ in selection.candidates(ScoringConfig(), staged=False)]
    assert names == ["origin-peak", "origin-peak_mean", "centred-peak", "centred-peak_mean"]
    staged = [name for name, _ in selection.candidates(ScoringConfig(), staged=True)]
    assert len(staged) == 8 and "centred-staged-peak_mean" in staged


def test_a_fit_that_chooses_records_the_choice_and_bundles_keep_it(tiny_detector, tmp_path):
    shots = [Image.new("RGB", (64, 64), (40 * i, 90, 160)) for i in range(4)]
    adapter = tiny_detector.fit_memory(shots, category="plain", text=False, choose_scoring=True)
    record = adapter.selection
    assert record is not None and record["chosen"] in {c["name"] for c in record["candidates"]}
    chosen = next(c for c in record["candidates"] if c["name"] == record["chosen"])
    assert (chosen["memory_center"], chosen["image_score"]) == (adapter.scoring.memory_center,
                                                               adapter.scoring.image_score)
    assert adapter.memory.centered == adapter.scoring.memory_center  # the served bank is built the chosen way
    store = AdapterStore(tmp_path)
    save_adapter(store, tiny_detector, adapter)
    loaded, _ = load_adapter(store, tiny_detector, "plain")
    assert loaded.selection == json.loads(json.dumps(record)) and loaded.scoring == adapter.scoring
    # Without asking, the shipped scoring is kept: nothing is chosen or recorded.
    fixed = tiny_detector.fit_memory(shots, category="fixed", text=False)
    assert fixed.selection is None and fixed.scoring == ScoringConfig()


def test_bundles_written_before_selection_load_without_one(tiny_detector):
    shots = [Image.new("RGB", (64, 64), (40 * i, 90, 160)) for i in range(2)]
    adapter = tiny_detector.fit_memory(shots, category="old", text=False, scoring=ScoringConfig(memory_center=False))
    tensors, config = adapter.to_tensors(), adapter.config()
    config.pop("scoring_selection")
    config["scoring"] = {k: v for k, v in config["scoring"].items() if k not in ("memory_center", "image_score")}
    loaded = Adapter.from_tensors("old", tensors, config)
    assert loaded.selection is None
    assert (loaded.scoring.memory_center, loaded.scoring.image_score) == (False, "peak")
