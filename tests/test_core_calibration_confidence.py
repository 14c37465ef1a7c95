"""A verdict's confidence is a conformal p-value among the product's own evidence: (k + 1) / (n + 1), with each
good image counted once (its highest view), so a quality engineer can read "a good part scores this high in X % of
cases" without a model of the scores."""

from __future__ import annotations

import pytest

from clipshot.calibration import Calibration, calibrate, decision_confidence

# Four good images, each with its own leave-one-out score then one light view's (clipshot.calibration_fit's order):
# per image maxima 0.12, 0.10, 0.15, 0.11. Synthetic defects well above them.
NORMAL = [0.10, 0.12, 0.09, 0.10, 0.15, 0.13, 0.11, 0.08]
MAXIMA = [0.12, 0.10, 0.15, 0.11]
SYNTHETIC = [0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 1.00, 1.10]


def cal(validation=()) -> Calibration:
    return calibrate(NORMAL, SYNTHETIC, shots=4, validation_defect_scores=validation)


@pytest.mark.parametrize(("score", "above"), [(0.05, 4), (0.11, 3), (0.115, 2), (0.15, 1), (0.2, 0)])
def test_good_p_value_counts_good_images_scoring_at_least_as_high(score, above):
    found = decision_confidence(cal(), score)
    assert found is not None
    assert found.good_images == 4  # images, not the 8 scores: a view is not an independent good part
    assert found.good_p_value == pytest.approx((above + 1) / (4 + 1))
    assert sum(m >= score for m in MAXIMA) == above  # the hand count above agrees with the data


def test_no_score_looks_rarer_than_one_in_n_plus_one():
    """With 4 good images the smallest p-value is 1/5: a score far above every good image cannot say more."""
    assert decision_confidence(cal(), 100.0).good_p_value == pytest.approx(0.2)


def test_defect_p_value_counts_defect_evidence_scoring_at_most_as_high():
    synthetic = decision_confidence(cal(), 0.45)
    assert synthetic.defect_evidence == "synthetic" and synthetic.defect_images == 9
    assert synthetic.defect_p_value == pytest.approx((2 + 1) / (9 + 1))  # 0.30 and 0.40 score at most 0.45
    confirmed = decision_confidence(cal(validation=[0.2, 0.5]), 0.45)  # confirmed defects replace the synthetic
    assert confirmed.defect_evidence == "confirmed" and confirmed.defect_images == 2
    assert confirmed.defect_p_value == pytest.approx((1 + 1) / (2 + 1))


def test_without_evidence_there_is_nothing_to_say():
    assert decision_confidence(Calibration(threshold=0.2, target_false_alarm_rate=None, mean=0.0, std=0.0,
                                           max_normal=0.0, count=0, method="manual"), 0.3) is None
    no_defects = decision_confidence(calibrate(NORMAL, shots=4), 0.3)
    assert no_defects.defect_p_value is None and no_defects.defect_evidence is None
    assert decision_confidence(cal(), float("nan")) is None
