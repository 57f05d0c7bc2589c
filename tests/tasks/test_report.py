"""The report's header and warnings, each rule on hand-made numbers, and how they show in the HTML."""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pytest

from tasks.params import Params, validate_params
from tasks.report import (
    GATE_PENDING,
    GATE_ROW,
    baseline_warning,
    changed_params,
    early_training_warning,
    fill_header_row,
    model_warnings,
    one_class_warning,
    report_header,
    shift_warning,
    write_html_report,
)
from tasks.scoring import majority_baseline

NAMES = ["cbb", "cmd", "healthy"]
ACTUAL = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])


def test_one_class_warning_fires_when_nearly_every_image_gets_one_class() -> None:
    collapsed = np.array([1] * 9 + [0])  # 90% 'cmd', which is 40% of the test images
    warning = one_class_warning(collapsed, ACTUAL, NAMES)
    assert warning is not None and "'cmd' for 90% of the test images (it is 40% of them)" in warning
    assert one_class_warning(np.array([1] * 8 + [0, 2]), ACTUAL, NAMES) is None  # 80%: a bias, not a collapse
    # A test split that really is 90% one class: predicting it is not a collapse.
    assert one_class_warning(np.ones(10, int), np.array([1] * 9 + [0]), NAMES) is None


def test_baseline_warning_when_accuracy_does_not_beat_the_majority_class() -> None:
    assert baseline_warning(0.40, 0.40, "cmd") == (
        "test accuracy 0.400 does not beat the majority-class baseline 0.400 (always answering 'cmd')")
    assert baseline_warning(0.35, 0.40, "cmd") is not None
    assert baseline_warning(0.41, 0.40, "cmd") is None


@pytest.mark.parametrize(
    ("best", "stopped", "run", "planned", "fires"),
    [
        (1, 0, 15, 15, "epoch 1's of 15"),  # ran everything, but never improved after epoch 1
        (1, 6, 6, 30, "epoch 1's of 6"),
        (2, 2, 2, 30, "early stopping ended training at epoch 2 of 30"),
        (4, 6, 6, 30, "early stopping ended training at epoch 6 of 30"),  # 6 <= 20% of 30
        (5, 7, 7, 30, None),
        (12, 0, 15, 15, None),
        (1, 0, 1, 1, None),  # a one-epoch run has nothing to improve on
    ],
)
def test_early_training_warning(best: int, stopped: int, run: int, planned: int, fires: str | None) -> None:
    warning = early_training_warning(best, stopped, run, planned)
    assert (warning is None) if fires is None else (fires in warning)


def test_shift_warning_only_when_the_test_fired() -> None:
    assert "AUC 0.910 >= 0.6" in shift_warning("shift detected", 0.91, 0.6)
    assert shift_warning("no shift detected", 0.52, 0.6) is None


def test_majority_baseline_is_the_training_majority_scored_on_test() -> None:
    train = np.array([2, 2, 2, 1, 0])
    assert majority_baseline(train, ACTUAL) == (2, pytest.approx(0.4))


def test_model_warnings_collects_every_rule_that_applies() -> None:
    collapsed = np.ones(10, int)
    warnings = model_warnings(
        collapsed, ACTUAL, NAMES, accuracy=0.4, baseline=(1, 0.4),
        train_summary={"best_epoch": 1, "stopped_epoch": 0, "epochs_run": 3}, epochs_planned=3,
        shift={"verdict": "shift detected", "classifier_auc": 0.8, "auc_threshold": 0.6},
    )
    assert len(warnings) == 4
    assert ["collapsed" in warnings[0], "baseline" in warnings[1], "epoch 1's" in warnings[2],
            "AUC 0.800" in warnings[3]] == [True] * 4
    healthy = model_warnings(ACTUAL, ACTUAL, NAMES, 1.0, (1, 0.4), None, 3,
                             {"verdict": "no shift detected", "classifier_auc": 0.5, "auc_threshold": 0.6})
    assert healthy == []


def test_changed_params_are_the_ones_that_differ_from_the_defaults() -> None:
    params = validate_params({"train": {"epochs": 3, "optimizer": "sgd"}, "model": {"batch_norm": False},
                              "evaluate": {"rotation_angles": [0.0, 15.0, 30.0, 60.0, 90.0]}})
    assert changed_params(params) == {"model.batch_norm": "False", "train.epochs": "3", "train.optimizer": "sgd"}
    assert changed_params(Params()) == {}


def test_header_and_warnings_render_and_the_gate_row_is_filled_in(tmp_path: Path) -> None:
    params = validate_params({"train": {"epochs": 3}})
    header = report_header("cnn-sgd-3ep", "abc123", params, "d41d8cd9", 0.25, (1, 0.4), NAMES)
    warning = baseline_warning(0.25, 0.4, "cmd")
    report = write_html_report(tmp_path / "evaluation.html", "evaluation", {"test_accuracy": 0.25}, [], header,
                               [warning])
    page = report.read_text()
    rows = dict(re.findall(r'<tr><th>(.*?)</th><td id="header-[a-z-]+">(.*?)</td></tr>', page))
    assert rows["Run"] == "cnn-sgd-3ep (abc123)"
    assert rows["Params changed from defaults"] == "train.epochs=3"
    assert rows["Data version"] == "d41d8cd9"
    assert html.unescape(rows["Test accuracy"]) == "0.2500 (majority-class baseline 0.4000: always 'cmd')"
    assert rows[GATE_ROW] == html.escape(GATE_PENDING)
    assert re.search(r'<div class="warnings" id="warnings"><h2>Warnings</h2><ul><li>(.*?)</li></ul></div>', page)
    assert html.escape(warning) in page

    filled = fill_header_row(page, GATE_ROW, "rejected: test_macro_f1 0.1 is below the minimum 0.3 <&>")
    assert "<td id=\"header-registry-gate\">rejected: test_macro_f1 0.1 is below the minimum 0.3 &lt;&amp;&gt;</td>" \
        in filled
    assert GATE_PENDING not in html.unescape(filled) and filled.count("<tr>") == page.count("<tr>")
    with pytest.raises(ValueError, match="no header row 'Nope'"):
        fill_header_row(page, "Nope", "x")
