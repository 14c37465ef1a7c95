"""Each backbone stage searched at its own stride (``MemoryBank`` ``pools``): the stride-16 stage of an
EfficientNet patch vector is upsampled onto the stride-8 grid by the extractor, so it is searched at every other
cell of every other row, against the whole bank, and interpolated between. What it does to accuracy is the
suite's (docs/results/stage-grids/); here: the arithmetic, the bundle form, older bundles, the default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.functional import normalize

from clipshot.adapter import Adapter
from clipshot.backbone import load_backbone
from clipshot.features import Features
from clipshot.fusion import ScoringConfig
from clipshot.memory_branch import MemoryBank

STAGES = [4, 8]
GRID = (4, 6)


def _features(count: int, seed: int) -> Features:
    """Two stages on a 4 x 6 grid, concatenated and normalised together as the EfficientNet extractor does."""
    generator = torch.Generator().manual_seed(seed)
    fine = 2 + torch.randn(count, GRID[0] * GRID[1], STAGES[0], generator=generator)
    coarse = 2 + torch.randn(count, GRID[0] * GRID[1], STAGES[1], generator=generator)
    return Features(cls=None, patches=[normalize(torch.cat([fine, coarse], dim=-1), dim=-1)], grid=GRID)


def _stage_distances(bank_rows: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(N,) (1 - max cosine)/2 of each query row against every bank row, fp32, no chunking."""
    bank_rows, query = normalize(bank_rows, dim=-1), normalize(query, dim=-1)
    return (1 - (query @ bank_rows.T).amax(dim=1)) / 2


def _reference(bank: torch.Tensor, query: Features) -> torch.Tensor:
    """Stage 1 at every cell; stage 2 at cells (2i, 2j), each odd row/column the mean of its two neighbours,
    the last one a copy of the one before (written out by hand, not with the code's interpolation)."""
    bank = bank.float()
    q = query.patches[0].reshape(-1, sum(STAGES))
    batch = query.patches[0].shape[0]
    fine = _stage_distances(bank[:, : STAGES[0]], q[:, : STAGES[0]]).view(batch, *GRID)
    every = _stage_distances(bank[:, STAGES[0]:], q[:, STAGES[0]:]).view(batch, *GRID)
    coarse = torch.zeros(batch, *GRID)
    coarse[:, ::2, ::2] = every[:, ::2, ::2]  # exact where searched: the same number as a search of every cell
    coarse[:, ::2, 1:-1:2] = (coarse[:, ::2, 0:-2:2] + coarse[:, ::2, 2::2]) / 2
    coarse[:, ::2, -1] = coarse[:, ::2, -2]
    coarse[:, 1:-1:2] = (coarse[:, 0:-2:2] + coarse[:, 2::2]) / 2
    coarse[:, -1] = coarse[:, -2]
    return (fine + coarse) / 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_coarse_stage_is_searched_at_every_other_cell(precision):
    shots, query = _features(3, seed=1), _features(2, seed=2)
    pooled = MemoryBank.from_features(shots, stages=STAGES, pools=[1, 2])
    # Against the bank's own (fp16-stored) rows fp32 agrees to float noise; bf16 products move a distance by up
    # to ~1e-3 (``_shifted``), so there only the gross structure is checked.
    got = pooled.distances(query, precision)
    reference = _reference(pooled.layers[0], query)
    assert torch.allclose(got, reference, atol=1e-5 if precision == "fp32" else 2e-3)
    per_cell = MemoryBank.from_features(shots, stages=STAGES).distances(query, precision)
    assert not torch.allclose(per_cell, got, atol=2e-3)  # the test sees the striding left out


def test_a_shot_scored_against_itself_stays_near_zero():
    # Every searched cell is a bank row, and on a smooth (upsampled) stage the cells between interpolate near 0
    # too, so a seen part stays near 0 and ranks below an unseen one — the property the memory exists for.
    generator = torch.Generator().manual_seed(3)
    coarse = F.interpolate(2 + torch.randn(2, STAGES[1], GRID[0] // 2, GRID[1] // 2, generator=generator),
                           size=GRID, mode="bilinear", align_corners=False)
    fine = 2 + torch.randn(2, STAGES[0], *GRID, generator=generator)
    joint = torch.cat([fine, coarse], dim=1).permute(0, 2, 3, 1).reshape(2, -1, sum(STAGES))
    seen = Features(cls=None, patches=[normalize(joint, dim=-1)], grid=GRID)
    bank = MemoryBank.from_features(seen, stages=STAGES, pools=[1, 2])
    assert bank.distances(seen, "fp32").max() < 1e-3
    assert bank.distances(_features(2, seed=4), "fp32").mean() > 10 * bank.distances(seen, "fp32").mean()


def test_odd_grids_search_the_last_row_and_column():
    shots, query = _features(2, seed=5), _features(2, seed=8)
    odd = Features(cls=None, patches=[query.patches[0].view(2, *GRID, -1)[:, :3, :5].reshape(2, 15, -1)], grid=(3, 5))
    got = MemoryBank.from_features(shots, stages=STAGES, pools=[1, 2]).distances(odd, "fp32")
    every = MemoryBank.from_features(shots, stages=STAGES).distances(odd, "fp32")
    # cells (0|2, 0|2|4) are searched: there the map is exactly the per-cell one (rows 0 and 2, the last row too)
    assert got.shape == (2, 3, 5)
    assert torch.allclose(got[:, ::2, ::2], every[:, ::2, ::2], atol=1e-6)
    assert not torch.allclose(got, every, atol=1e-3)


def test_pools_need_one_factor_per_stage():
    with pytest.raises(ValueError, match="one factor >= 1 per stage"):
        MemoryBank([torch.zeros(4, 12)], stages=[4, 8], pools=[1])
    with pytest.raises(ValueError, match="one factor >= 1 per stage"):
        MemoryBank([torch.zeros(4, 12)], stages=[4, 8], pools=[1, 0])
    with pytest.raises(ValueError, match="one factor >= 1 per stage"):
        MemoryBank([torch.zeros(4, 12)], pools=[2])
    assert MemoryBank([torch.zeros(4, 12)], stages=[4, 8], pools=[1, 1]).pools is None  # nothing to pool


def test_bundle_form_keeps_the_pools_and_older_bundles_search_every_cell():
    shots, query = _features(3, seed=6), _features(2, seed=7)
    adapter = Adapter(category="c", scoring=ScoringConfig(),
                      memory=MemoryBank.from_features(shots, stages=STAGES, pools=[1, 2]))
    config, tensors = adapter.config(), adapter.to_tensors()
    assert config["memory_stage_pools"] == [1, 2] and config["scoring"]["memory_stage_grids"] is True
    loaded = Adapter.from_tensors("c", tensors, config)
    assert loaded.memory is not None and adapter.memory is not None
    assert torch.equal(loaded.memory.distances(query, "fp32"), adapter.memory.distances(query, "fp32"))
    # A bundle written before the setting: no pools key, no scoring flag -> every cell searched, as calibrated.
    old = {k: v for k, v in config.items() if k != "memory_stage_pools"}
    old["scoring"] = {k: v for k, v in config["scoring"].items() if k != "memory_stage_grids"}
    older = Adapter.from_tensors("c", tensors, old)
    assert older.memory is not None and older.memory.pools is None
    assert older.scoring.memory_stage_grids is False
    per_cell = MemoryBank.from_features(shots, stages=STAGES).distances(query, "fp32")
    assert torch.allclose(older.memory.distances(query, "fp32"), per_cell)


def test_the_detector_strides_only_where_the_scoring_and_the_backbone_say_so():
    from clipshot.detector import Detector

    backbone = load_backbone("imagenet:efficientnet-lite0", device="cpu", precision="fp32")
    assert backbone.stage_pools == (1, 2)  # stride 16 on the stride-8 grid
    detector = Detector(backbone)
    feats = Features(cls=None, patches=[normalize(torch.randn(1, 4, sum(backbone.stage_dims)), dim=-1)], grid=(2, 2))
    on = detector.memory_bank(feats, Adapter(category="c", scoring=ScoringConfig()))  # the shipped default
    off = detector.memory_bank(feats, Adapter(category="c", scoring=ScoringConfig(memory_stage_grids=False)))
    joint = detector.memory_bank(feats, Adapter(category="c", scoring=ScoringConfig(memory_stages=False)))
    assert on.pools == [1, 2] and off.pools is None and joint.pools is None
