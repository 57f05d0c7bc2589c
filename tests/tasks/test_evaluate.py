"""Evaluation metrics against a hand-computed case, and the report files dvc plots / MLflow read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.evaluate import write_reports
from tasks.scoring import score_predictions

# Six images, three classes. Predicted (argmax) = [0, 1, 1, 1, 2, 0]; second choices make top-2 = 5/6.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBABILITIES = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],  # true 0, second choice 0: top-2 hit
        [0.1, 0.8, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.1, 0.8],
        [0.6, 0.3, 0.1],  # true 2, ranked last: top-2 miss
    ]
)


def test_metrics_match_a_hand_computed_case() -> None:
    evaluation = score_predictions(PROBABILITIES, LABELS, ["cbb", "cmd", "healthy"], top_k=2)
    metrics = evaluation.metrics
    assert metrics["test_accuracy"] == pytest.approx(4 / 6)
    assert metrics["test_top2_accuracy"] == pytest.approx(5 / 6)
    assert metrics["test_precision.cbb"] == pytest.approx(1 / 2)
    assert metrics["test_precision.cmd"] == pytest.approx(2 / 3)
    assert metrics["test_recall.cmd"] == pytest.approx(1.0)
    assert metrics["test_recall.healthy"] == pytest.approx(1 / 2)
    assert metrics["test_macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics["test_support.healthy"] == 2
    assert evaluation.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_reports_for_dvc_and_mlflow(tmp_path: Path) -> None:
    history = tmp_path / "history.csv"
    history.write_text(
        "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate\n1,1.0,0.5,1.1,0.4,0.01\n2,0.8,0.6,0.9,0.5,0.005\n"
    )
    evaluation = score_predictions(PROBABILITIES, LABELS, ["cbb", "cmd", "healthy"], top_k=2)
    written = write_reports(evaluation, history, tmp_path / "reports")
    assert {path.name for path in written} == {
        "metrics.json", "test_predictions.csv", "confusion_matrix.png", "learning_curves.png"
    }
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["test_accuracy"] == pytest.approx(4 / 6)
    with (tmp_path / "reports/test_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[1] == {"actual": "cbb", "predicted": "cmd"} and len(rows) == 6
    assert (tmp_path / "reports/figures/confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
