"""Decision metrics at the adapter's own threshold, scores.csv, and the `eval --feedback` operator simulation."""

from __future__ import annotations

import csv
import json

import pytest

from app.cli.main import main
from clipshot.evaluation.dataset import Sample
from clipshot.evaluation.feedback import split_halves, wrong_verdicts
from clipshot.evaluation.metrics import decision_metrics, recall_by_defect
from tests.helpers.evaluation import make_dataset


def test_decision_metrics_count_verdicts_like_the_service():
    labels = [0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.4, 0.6, 0.45]
    # score > threshold flags: [F, T, F, T, F] at 0.45 (0.45 itself is NOT flagged, as in prediction.make_prediction)
    m = decision_metrics(labels, scores, 0.45)
    assert m["accuracy"] == pytest.approx(2 / 5)  # tn=1 (0.1), tp=1 (0.6)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["false_alarm_rate"] == pytest.approx(1 / 2)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["f1_at_threshold"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    by_type = recall_by_defect(labels, scores, ["good", "good", "crack", "crack", "dent"], 0.45)
    assert by_type == {"crack": 0.5, "dent": 0.0}


def test_decision_metrics_missing_every_defect_is_f1_zero_not_nan():
    m = decision_metrics([0, 1, 1], [0.1, 0.2, 0.3], 1.0)
    assert m["recall"] == 0.0 and m["f1_at_threshold"] == 0.0 and m["false_alarm_rate"] == 0.0


def test_feedback_split_rule_alternates_within_each_type_and_orders_round_robin(tmp_path):
    samples = [Sample(tmp_path / f"{d}{i}.png", d, 0 if d == "good" else 1, None)
               for d in ("good", "crack") for i in range(4)]
    operator, held = split_halves(samples)
    names = [samples[i].path.stem for i in operator]
    assert names == ["crack0", "good0", "crack2", "good2"]  # positions 0 then 2, types in name order
    assert sorted(samples[i].path.stem for i in held) == ["crack1", "crack3", "good1", "good3"]
    labels = [s.label for s in samples]
    scores = [0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]  # good0 false alarm; every crack missed
    assert [samples[i].path.stem for i in wrong_verdicts(operator, labels, scores, 0.5, 2)] == ["crack0", "good0"]


def test_eval_writes_decisions_scores_csv_and_feedback_runs(tmp_path):
    data = make_dataset(tmp_path / "data", n_good=4, n_defect=4)
    out = tmp_path / "out"
    code = main(["eval", "--data", str(data), "--shots", "4", "--seeds", "0", "--mode", "memory",
                 "--backbone", "imagenet:efficientnet-lite0", "--image-size", "64", "--device", "cpu",
                 "--feedback", "2", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    main_run = next(r for r in results["records"] if r["mode"] == "memory")
    metrics = main_run["metrics"]
    for name in ("accuracy", "recall", "false_alarm_rate", "precision", "f1_at_threshold", "f1_gap", "threshold",
                 "recall:scratch"):
        assert name in metrics, name
    assert metrics["f1_gap"] == pytest.approx(metrics["image_f1max"] - metrics["f1_at_threshold"])
    with (out / "scores.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["shots"] == "4"]
    assert len(rows) == 8  # one line per test image of the run
    for row in rows:  # every verdict is checkable by hand: score vs the run's own threshold
        assert float(row["threshold"]) == pytest.approx(metrics["threshold"])
        assert row["verdict"] == ("anomalous" if float(row["score"]) > float(row["threshold"]) else "normal")
    recall = sum(r["verdict"] == "anomalous" for r in rows if r["label"] == "1") / 4
    assert metrics["recall"] == pytest.approx(recall)
    phases = {r["mode"]: r for r in results["records"] if "+feedback" in r["mode"]}
    assert set(phases) == {"memory+feedback2:before", "memory+feedback2:after"}
    for record in phases.values():
        assert record["n_test"] == 4  # the held-out half (odd positions of each type)
        assert all(name.split("/")[1] in {"000.png", "002.png"} for name in record["fed_back"])  # operator half
    md = (out / "results.md").read_text()
    assert "decisions at the adapter's own threshold" in md and "F1 at threshold" in md
    assert "mode: memory+feedback2:after" in md


def test_eval_help_shows_defaults_and_no_empty_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("(default: memory)", "(default: 0.25)", "(default: 0)", "imagenet:efficientnet-lite0"):
        assert shown in text, shown
    assert "(default: None)" not in text  # unset options say nothing rather than "None"
