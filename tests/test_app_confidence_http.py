"""Every verdict over real HTTP carries its confidence, computed from the evidence stored in the product's bundle:
the number for a flagged part is the share of good images scoring at least as high ((k + 1) / (n + 1))."""

from __future__ import annotations

import numpy as np
import pytest

from app.client import Client
from clipshot.detector import Detector
from model_store.adapters import load_adapter
from model_store.store import AdapterStore
from tests.helpers.predict import defect, good
from tests.helpers.serving import served_widget

ADMIN_KEY, CLIENT_KEY = "admin-key", "client-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_backbone):
    store = tmp_path_factory.mktemp("store")
    with served_widget(store, tiny_backbone, ADMIN_KEY, CLIENT_KEY) as url:
        yield url, store


def test_each_prediction_carries_p_values_from_the_stored_evidence(served, tiny_backbone):
    url, store = served
    with Client(url, CLIENT_KEY) as client:
        answer = client.predict("widget", [good(50), good(51), defect(52)], heatmap="none")
    cal = load_adapter(AdapterStore(store), Detector(tiny_backbone), "widget")[0].calibration
    assert cal is not None and cal.shots == 4
    # each good image counts once, by its highest score (own and light views, in shot order)
    maxima = [g.max() for g in np.array_split(np.asarray(cal.normal_scores), cal.shots)]
    verdicts = set()
    for pred in answer.predictions:
        c = pred.confidence
        assert c is not None and c.good_images == 4 and c.defect_evidence == "synthetic"
        assert c.good_p_value == pytest.approx((sum(m >= pred.score for m in maxima) + 1) / 5)
        assert c.defect_images == len(cal.defect_scores) > 0
        assert c.defect_p_value == pytest.approx((sum(d <= pred.score for d in cal.defect_scores) + 1)
                                                 / (len(cal.defect_scores) + 1))
        assert c.p_value == (c.good_p_value if pred.is_anomalous else c.defect_p_value)  # the side against it
        verdicts.add(pred.is_anomalous)
    assert verdicts == {True, False}  # both sides of the choice were exercised
