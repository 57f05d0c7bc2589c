"""The lessons study's pure core: the verdict rule on hand-made numbers, claims paired by seed, the values a
claim reads from a run, the plan of trials and the study's params."""

from __future__ import annotations

import math

import pytest

from tasks.lessons import (DOES_NOT_HOLD, EPOCHS_TO_TARGET, GAP, HOLDS, INCONCLUSIVE, INIT_SPREAD, TEST_ACCURACY,
                           VAL_ACCURACY, Claim, Measure, arm_values, epochs_to_target, judge, lessons,
                           paired_differences, plan_trials, source_overrides, study_key, trial_key, verdicts)
from tasks.params import ParamsError, validate_params
from tests.conftest import tiny_params_tree


def _params(*overrides: str):
    return validate_params(tiny_params_tree(list(overrides)))


@pytest.mark.parametrize(
    ("differences", "margin", "expected"),
    [
        ([0.10, 0.12, 0.09, 0.11], 0.02, HOLDS),  # a clear gain, every seed agrees
        ([-0.10, -0.12, -0.09, -0.11], 0.02, DOES_NOT_HOLD),  # the opposite, measured
        ([0.001, -0.002, 0.0015, -0.001], 0.02, DOES_NOT_HOLD),  # a clean tie: the interval sits inside +-margin
        ([0.20, -0.18, 0.15, -0.17], 0.02, INCONCLUSIVE),  # a noisy tie: mean ~0, interval far beyond the margin
        ([0.30, 0.05], 0.02, INCONCLUSIVE),  # two seeds that agree in sign but not enough: t(1) is wide
        ([0.10], 0.02, INCONCLUSIVE),  # one seed: no interval
        ([], 0.02, INCONCLUSIVE),
        ([0.001, -0.002, 0.0015, -0.001], 0.0, INCONCLUSIVE),  # no tie band (a claim against a threshold)
    ],
)
def test_verdict_rule_on_hand_made_differences(differences: list[float], margin: float, expected: str) -> None:
    outcome, mean, low, high = judge(differences, margin, 0.95)
    assert outcome == expected
    if len(differences) >= 2:
        assert low <= mean <= high
        assert mean == pytest.approx(sum(differences) / len(differences))


def test_interval_is_the_student_t_interval() -> None:
    # mean 2, sample sd 1, n 4: half-width = t(0.975, 3) * 1 / 2 = 3.182446 / 2
    _, mean, low, high = judge([1.0, 2.0, 3.0, 2.0 + math.sqrt(2 / 3) * 0], 0.0, 0.95)
    values = [1.0, 2.0, 3.0, 2.0]
    sd = (sum((v - 2.0) ** 2 for v in values) / 3) ** 0.5
    assert mean == pytest.approx(2.0)
    assert high - mean == pytest.approx(3.182446 * sd / 2, rel=1e-5)
    assert mean - low == pytest.approx(high - mean)


def test_claims_pair_seeds_and_sign_lower_is_better() -> None:
    values = {("a", 0): {"m": 5.0}, ("b", 0): {"m": 8.0}, ("a", 1): {"m": 6.0}, ("b", 1): {"m": 9.0},
              ("a", 2): {"m": 1.0}}  # seed 2 of b missing: not paired
    lower = Claim("a needs fewer", Measure("a", "m"), Measure("b", "m"), lower_is_better=True)
    assert paired_differences(lower, values, [0, 1, 2]) == [3.0, 3.0]
    higher = Claim("a is higher", Measure("a", "m"), Measure("b", "m"))
    assert paired_differences(higher, values, [0, 1, 2]) == [-3.0, -3.0]
    threshold = Claim("a below 7", Measure("a", "m"), Measure(None, "m", 7.0), lower_is_better=True)
    assert paired_differences(threshold, values, [0, 1, 2]) == [2.0, 1.0, 6.0]


def test_lesson_verdicts_from_hand_made_arm_values() -> None:
    params = _params("study.seeds=[0, 1, 2, 3]")
    overfitting = next(lesson for lesson in lessons(params) if lesson.key == "overfitting")
    values = {}
    for seed, (gap_plain, gap_dropout, test_plain, test_dropout, test_stop) in enumerate(
            [(0.40, 0.20, 0.50, 0.51, 0.60), (0.42, 0.22, 0.52, 0.40, 0.61),
             (0.38, 0.19, 0.49, 0.62, 0.62), (0.41, 0.21, 0.51, 0.47, 0.59)]):
        values[("dropout-0", seed)] = {GAP: gap_plain, TEST_ACCURACY: test_plain}
        values[("dropout-0.5", seed)] = {GAP: gap_dropout, TEST_ACCURACY: test_dropout}
        values[("dropout-0+early-stop", seed)] = {TEST_ACCURACY: test_stop}
    found = verdicts(overfitting, values, params.study)
    assert [verdict.outcome for verdict in found] == [HOLDS, INCONCLUSIVE, HOLDS]
    assert found[0].effect == pytest.approx(0.1975)  # gap narrowed by ~0.2 (lower is better: positive = as claimed)
    assert all(verdict.seeds == 4 for verdict in found)


def test_arm_values_from_run_metrics() -> None:
    study = _params("study.epochs=5", "study.target_accuracy=0.5").study
    metrics = {"train.best_val_accuracy": 0.6, "train.train_accuracy": 0.9, "init.variance_ratio": 1000.0,
               "test_accuracy": 0.55}
    values = arm_values(metrics, [0.2, 0.4, 0.5, 0.6, 0.6], diverged=False, study=study, classes=5)
    assert values[VAL_ACCURACY] == 0.6 and values[TEST_ACCURACY] == 0.55
    assert values[GAP] == pytest.approx(0.3)
    assert values[INIT_SPREAD] == pytest.approx(3.0)
    assert values[EPOCHS_TO_TARGET] == 3
    assert epochs_to_target([0.1, 0.2], 0.5, 5) == 6  # never reached: censored at epochs + 1
    diverged = arm_values({}, [], diverged=True, study=study, classes=5)
    assert diverged == {VAL_ACCURACY: 0.2, TEST_ACCURACY: 0.2, EPOCHS_TO_TARGET: 6.0}


def test_plan_holds_everything_but_the_arm_fixed() -> None:
    params = _params("study.seeds=[3, 4]", "study.epochs=7")
    lesson_list = lessons(params)
    assert [lesson.key for lesson in lesson_list] == ["initialization", "optimizers", "batch_norm", "overfitting",
                                                      "transfer", "failure_cases"]
    trials = plan_trials(params.study, lesson_list)
    assert len(trials) == 2 * sum(len(lesson.arms) for lesson in lesson_list)
    assert [trial.seed for trial in trials[:3]] == [3, 3, 3]  # seed-major
    by_lesson: dict[str, list] = {}
    for trial in trials:
        assert "train.epochs=7" in trial.overrides and f"train.seed={trial.seed}" in trial.overrides
        validate_params(tiny_params_tree(list(trial.overrides)))  # every trial is valid params
        by_lesson.setdefault((trial.lesson, trial.seed), []).append(set(trial.overrides))
    for (lesson_key, _), arms in by_lesson.items():
        lesson = next(lesson for lesson in lesson_list if lesson.key == lesson_key)
        shared = set.intersection(*arms)
        for arm_overrides, arm in zip(arms, lesson.arms):
            assert all(any(item.startswith(f"{key}=") for item in arm_overrides) for key in lesson.arms[arm])
            assert {item.split("=")[0] for item in arm_overrides - shared} <= set().union(*map(set, lesson.arms.values()))
    keys = {trial_key("k", trial) for trial in trials}
    assert len(keys) == len(trials)  # a restart can tell every trial apart
    source = validate_params(tiny_params_tree([*source_overrides(params.study)]))  # lesson 5's pretraining run
    assert source.train.subset_per_class is None and source.train.epochs == 7 and source.train.seed == 3


def test_study_key_changes_with_params_and_data_version() -> None:
    base = _params()
    assert study_key(base, "abc") == study_key(_params(), "abc")
    assert study_key(base, "abc") != study_key(base, "abd")
    assert study_key(base, "abc") != study_key(_params("study.epochs=4"), "abc")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study.seeds=[1, 1]", "study.seeds"),
        ("study.seeds=[]", "study.seeds"),
        ("study.confidence=1.5", "study.confidence"),
        ("study.small_per_class=0", "study.small_per_class"),
        ("study.speed=3", "study.speed: unknown key"),
    ],
)
def test_bad_study_params_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        _params(override)
