"""One good image confirmed by mistake (a defect labelled good through feedback) must not set the automatic
threshold's floor: re-fits keep confirmed goods, so it would hold the threshold above that defect for good."""

from __future__ import annotations

import numpy as np
import pytest

from clipshot.calibration import Calibration, apply_policy, calibrate, floor

# Seven good images scoring around 0.1 (log-normal spread, as leave-one-out scores do) and synthetic defects
# around 0.5: the automatic rule then sits between them, where the floor decides whether 0.9 is reachable.
GOODS = list(np.exp(np.random.default_rng(0).normal(np.log(0.1), 0.15, 7)))
DEFECTS = list(np.exp(np.random.default_rng(1).normal(np.log(0.5), 0.2, 32)))
MISLABELLED = 0.9  # a real defect sent as "good": far above every good image


def _auto(normal, confirmed=()) -> Calibration:
    return calibrate(normal, DEFECTS, shots=len(normal), confirmed=confirmed)


def test_a_single_confirmed_good_far_above_the_rest_does_not_set_the_floor():
    cal = _auto([*GOODS, MISLABELLED], confirmed=[7])
    assert cal.threshold < MISLABELLED  # before: 0.9, the mislabelled image itself
    assert cal.threshold >= max(GOODS)  # still never below a registration shot
    assert floor(cal) == pytest.approx(max(GOODS))
    assert "confirmed good image(s) [7]" in cal.note and "DELETE" in cal.note  # the operator is told which
    # the image still counts as a good one above the threshold: the false-alarm bound says so
    assert cal.expected_false_alarm_rate > _auto(GOODS).expected_false_alarm_rate
    # a policy change later (from the stored evidence) keeps the same floor
    assert apply_policy(cal, cal.policy_spec()).threshold == pytest.approx(cal.threshold)
    assert Calibration.from_dict(cal.to_dict()).confirmed == [7]


def test_a_shot_or_two_confirmed_goods_still_set_the_floor():
    assert _auto([*GOODS, MISLABELLED]).threshold >= MISLABELLED  # a registration shot defines normal
    two = _auto([*GOODS, MISLABELLED, MISLABELLED], confirmed=[7, 8])
    assert two.threshold >= MISLABELLED  # two confirmed goods agree: real variation the shots missed
    assert _auto([*GOODS, MISLABELLED], confirmed=[0]).threshold >= MISLABELLED  # the confirmed one is not the top


def test_without_confirmed_goods_nothing_changes():
    """Registration-only evidence (every shipped default): the floor is the largest normal score, as before."""
    cal = _auto([*GOODS, 0.2])
    assert floor(cal) == max(cal.normal_scores) and cal.confirmed == []
