"""The lessons study, the pure core: which arms each lesson trains, which claims it tests, the values a claim
reads from a finished run, and the verdict rule. No MLflow, no TensorFlow, no Prefect (tasks/lessons_runs.py
runs the arms and writes the report; flows/lessons_study.py wires it).

Every arm trains with the same data version and the same training budget (`study.*` and the study's fixed
overrides below), `study.seeds` times; only the arm's own keys differ from its lesson's other arms. Claims
compare two arms (or two metrics of one arm, or a metric and a threshold) seed by seed.

Decision rule (DECISION_RULE, also printed in the report): the effect of a claim is the mean over seeds of the
paired difference "claimed better minus claimed worse" (signed so that positive = as claimed), with a
two-sided Student-t confidence interval (`study.confidence`, default 95%) over the seeds. The claim
- holds when the whole interval is above 0;
- does not hold when the whole interval is below 0 (the opposite is measured), or lies within
  ±`study.margin` (no effect worth the name: a clean tie);
- is inconclusive otherwise (fewer than 2 seeds, or an interval that straddles 0 and reaches beyond the margin:
  a noisy tie).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from tasks.params import Params, StudyParams

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
DECISION_RULE = (
    "Effect = mean over seeds of the paired difference (claimed better minus claimed worse, positive = as claimed), "
    "with a two-sided Student-t confidence interval over the seeds. Holds: the whole interval is above 0. "
    "Does not hold: the whole interval is below 0, or it lies within ±margin (a clean tie). "
    "Inconclusive: otherwise (fewer than 2 seeds, or an interval across 0 wider than the margin: a noisy tie). "
    "A training that diverged counts as chance-level accuracy that never reaches the target."
)

# What every arm holds fixed, so each lesson changes only its own knobs: the CNN with batch norm (without it,
# this small budget barely moves off chance on the synthetic leaves) and without the extras the lessons switch
# on one at a time (dropout, schedules, early stopping, augmentation), a constant learning rate, and a light
# failure analysis (no saliency maps or galleries: the study reads numbers).
STUDY_BASE = {
    "model.backbone": "none", "model.backbone_weights": "none",
    "model.batch_norm": True, "model.dropout": 0.0, "model.head_dropout": 0.0, "model.l2": 0.0,
    "model.initializer": "glorot_uniform",
    "model.augmentation.flip": "none", "model.augmentation.rotation": 0.0, "model.augmentation.zoom": 0.0,
    "model.augmentation.contrast": 0.0, "model.augmentation.brightness": 0.0,
    "train.optimizer": "adam", "train.lr_schedule": "constant", "train.early_stopping.enabled": False,
    "train.class_weight": "none", "train.resume": False,
    "evaluate.saliency_per_class": 0, "evaluate.gallery_size": 0, "evaluate.learning_curve": False,
}
# Values a claim reads from a finished arm (see arm_values).
VAL_ACCURACY, TEST_ACCURACY, GAP, EPOCHS_TO_TARGET = "val_accuracy", "test_accuracy", "generalization_gap", "epochs_to_target"
INIT_SPREAD = "init_log10_variance_ratio"
ROTATED, SHARP, BLURRY, SHIFT_AUC = ("test_accuracy_rotation_max", "test_sharp_accuracy", "test_blurry_accuracy",
                                     "test_shift_auc")


@dataclass(frozen=True)
class Measure:
    """One side of a claim: a metric of an arm, or a constant (a threshold)."""

    arm: str | None
    metric: str
    constant: float = math.nan

    def describe(self) -> str:
        return f"{self.constant:g}" if self.arm is None else f"{self.arm}: {self.metric}"


@dataclass(frozen=True)
class Claim:
    text: str
    better: Measure  # claimed to be better (higher, or lower when lower_is_better)
    worse: Measure
    lower_is_better: bool = False
    tie_margin: bool = True  # false: no "clean tie" band (a claim against a threshold)


@dataclass(frozen=True)
class Lesson:
    key: str  # initialization | optimizers | batch_norm | overfitting | transfer | failure_cases
    title: str
    question: str
    arms: dict[str, dict[str, Any]]  # arm name -> params keys it sets, on top of the lesson's `fixed`
    claims: tuple[Claim, ...]
    curve: str  # the per-epoch metric plotted for this lesson
    fixed: dict[str, Any] = field(default_factory=dict)  # held fixed for every arm of this lesson
    evaluate: bool = False  # claims read test-split metrics: the arms run the evaluate stage too
    needs_source: bool = False  # transfer: the arms start from a pretrained source model


def compare(metric: str, better: str, worse: str, lower_is_better: bool = False, *, text: str) -> Claim:
    """A claim that arm `better` beats arm `worse` on `metric`."""
    return Claim(text, Measure(better, metric), Measure(worse, metric), lower_is_better)


def lessons(params: Params) -> list[Lesson]:
    """The six lessons of the course, as arms and claims on these params' study settings."""
    study = params.study
    high_lr, modest_lr = study.high_learning_rate, study.modest_learning_rate
    small = {"train.subset_per_class": study.small_per_class}
    return [
        Lesson(
            "initialization", "1. Initialization",
            "Does a variance-preserving initialization (Glorot, He) train better than a badly scaled random normal "
            "(too small, too large) or zeros? Activation variance by depth at initialization, final validation "
            "accuracy, epochs to the target accuracy.",
            {"glorot": {"model.initializer": "glorot_uniform"}, "he": {"model.initializer": "he_normal"},
             "normal-too-small": {"model.initializer": "random_normal", "model.init_stddev": 0.001},
             "normal-too-large": {"model.initializer": "random_normal", "model.init_stddev": 1.0},
             "zeros": {"model.initializer": "zeros"}},
            (
                compare(INIT_SPREAD, "glorot", "normal-too-large", lower_is_better=True,
                        text="Glorot keeps the activation variance steadier across depth than a too-large normal init"),
                compare(VAL_ACCURACY, "glorot", "normal-too-small",
                        text="Glorot reaches a higher validation accuracy than a too-small normal init"),
                compare(VAL_ACCURACY, "glorot", "normal-too-large",
                        text="Glorot reaches a higher validation accuracy than a too-large normal init"),
                compare(VAL_ACCURACY, "he", "zeros",
                        text="He reaches a higher validation accuracy than zeros"),
                Claim("He reaches the target accuracy in fewer epochs than a too-small normal init",
                      Measure("he", EPOCHS_TO_TARGET), Measure("normal-too-small", EPOCHS_TO_TARGET),
                      lower_is_better=True),
            ),
            curve="val_accuracy",
            fixed={"model.batch_norm": False},  # batch norm would rescale a badly scaled init: the lesson is without
        ),
        Lesson(
            "optimizers", "2. Navigating the loss landscape",
            "SGD vs SGD with momentum vs Adam, and a constant vs a scheduled (cosine) learning rate: loss curves "
            "and epochs to the target accuracy.",
            {"sgd": {"train.optimizer": "sgd", "train.momentum": 0.0, "train.learning_rate": study.sgd_learning_rate},
             "sgd-momentum": {"train.optimizer": "sgd", "train.momentum": 0.9,
                              "train.learning_rate": study.sgd_learning_rate},
             "adam": {"train.optimizer": "adam", "train.learning_rate": modest_lr},
             "adam-cosine": {"train.optimizer": "adam", "train.learning_rate": modest_lr,
                             "train.lr_schedule": "cosine"}},
            (
                compare(VAL_ACCURACY, "sgd-momentum", "sgd",
                        text="Momentum reaches a higher validation accuracy than plain SGD"),
                compare(EPOCHS_TO_TARGET, "adam", "sgd", lower_is_better=True,
                        text="Adam reaches the target accuracy in fewer epochs than plain SGD"),
                compare(VAL_ACCURACY, "adam-cosine", "adam",
                        text="A cosine schedule ends at a higher validation accuracy than a constant rate (Adam)"),
            ),
            curve="loss",
        ),
        Lesson(
            "batch_norm", "3. Batch normalization",
            f"With vs without batch normalization, at a modest ({modest_lr:g}) and at a high ({high_lr:g}) "
            "learning rate (Adam).",
            {"no-bn-modest-lr": {"model.batch_norm": False, "train.learning_rate": modest_lr},
             "bn-modest-lr": {"model.batch_norm": True, "train.learning_rate": modest_lr},
             "no-bn-high-lr": {"model.batch_norm": False, "train.learning_rate": high_lr},
             "bn-high-lr": {"model.batch_norm": True, "train.learning_rate": high_lr}},
            (
                compare(VAL_ACCURACY, "bn-modest-lr", "no-bn-modest-lr",
                        text="Batch norm raises the validation accuracy at a modest learning rate"),
                compare(VAL_ACCURACY, "bn-high-lr", "no-bn-high-lr",
                        text="Batch norm raises the validation accuracy at a high learning rate"),
                compare(VAL_ACCURACY, "bn-high-lr", "no-bn-modest-lr",
                        text="With batch norm, the high learning rate does at least as well as the modest one without"),
            ),
            curve="val_accuracy",
        ),
        Lesson(
            "overfitting", "4. Overfitting",
            f"On a small training subset ({study.small_per_class} images per class): dropout 0 vs 0.5, early "
            "stopping off vs on; generalization gap (train minus validation accuracy) and test accuracy.",
            {"dropout-0": {"model.dropout": 0.0, "model.head_dropout": 0.0},
             "dropout-0.5": {"model.dropout": 0.5, "model.head_dropout": 0.5},
             "dropout-0+early-stop": {"model.dropout": 0.0, "model.head_dropout": 0.0,
                                      "train.early_stopping.enabled": True},
             "dropout-0.5+early-stop": {"model.dropout": 0.5, "model.head_dropout": 0.5,
                                        "train.early_stopping.enabled": True}},
            (
                compare(GAP, "dropout-0.5", "dropout-0", lower_is_better=True,
                        text="Dropout 0.5 narrows the generalization gap (no early stopping)"),
                compare(TEST_ACCURACY, "dropout-0.5", "dropout-0",
                        text="Dropout 0.5 raises the test accuracy (no early stopping)"),
                compare(TEST_ACCURACY, "dropout-0+early-stop", "dropout-0",
                        text="Early stopping raises the test accuracy (no dropout)"),
            ),
            curve="gap_accuracy",
            fixed={**small, "train.early_stopping.patience": 3, "train.early_stopping.restore_best_weights": True},
            evaluate=True,
        ),
        Lesson(
            "transfer", "5. Transfer learning",
            f"At limited data ({study.small_per_class} images per class): a CNN from scratch vs the same budget "
            "starting from a backbone pretrained on a source data set (head on the frozen backbone, then "
            "fine-tuning).",
            {"scratch": {}, "pretrained": {}},  # their keys come from tasks.study.arm_overrides (needs the source)
            (
                compare(TEST_ACCURACY, "pretrained", "scratch",
                        text="A pretrained backbone beats training from scratch on test accuracy"),
            ),
            curve="val_accuracy",
            fixed=small,
            evaluate=True,
            needs_source=True,
        ),
        Lesson(
            "failure_cases", "6. Failure cases",
            "Robustness curves (rotation, blur) of a model trained with and without augmentation; accuracy on "
            "sharp vs blurry test images; the distribution-shift verdict between the training and test splits.",
            {"no-augmentation": {},
             "augmentation": {"model.augmentation.flip": "horizontal_and_vertical", "model.augmentation.rotation": 0.25,
                              "model.augmentation.zoom": 0.1}},
            (
                compare(ROTATED, "augmentation", "no-augmentation",
                        text="Augmentation raises the accuracy on test images rotated by the largest angle"),
                Claim("Sharp test images are classified better than blurry ones",
                      Measure("no-augmentation", SHARP), Measure("no-augmentation", BLURRY)),
                Claim("The training and test splits are alike (shift-test AUC below the threshold)",
                      Measure("no-augmentation", SHIFT_AUC), Measure(None, SHIFT_AUC, params.evaluate.shift_auc_threshold),
                      lower_is_better=True, tie_margin=False),
            ),
            curve="val_accuracy",
            evaluate=True,
        ),
    ]


@dataclass(frozen=True)
class Trial:
    """One arm trained with one seed."""

    lesson: str
    arm: str
    seed: int
    overrides: tuple[str, ...]  # on top of the study's base params
    evaluate: bool

    @property
    def label(self) -> str:
        return f"{self.lesson}/{self.arm}/seed-{self.seed}"


def yaml_value(value: Any) -> str:
    """A value as an override writes it (`[16, 32]`, `true`, `0.5`)."""
    return json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)


def _budget(study: StudyParams) -> dict[str, Any]:
    return {**STUDY_BASE, "train.epochs": study.epochs, "train.subset_per_class": study.train_per_class,
            "train.learning_rate": study.modest_learning_rate}


def _as_overrides(keys: Mapping[str, Any]) -> list[str]:
    return [f"{key}={yaml_value(value)}" for key, value in keys.items()]


def trial_overrides(study: StudyParams, lesson: Lesson, arm: str, seed: int, source_overrides: Sequence[str] = ()) -> list[str]:
    """Study base, the training budget, the lesson's fixed keys, the arm's keys, the seed: later wins."""
    return [*_as_overrides({**_budget(study), **lesson.fixed, **lesson.arms[arm], "train.seed": seed}),
            *source_overrides]


def source_overrides(study: StudyParams) -> list[str]:
    """The pretraining run lesson 5 starts from: the study's model and budget, on the whole source set (params'
    `pretrain.overrides` on top), with the first seed."""
    return _as_overrides({**_budget(study), "train.subset_per_class": None, "train.seed": study.seeds[0]})


def plan_trials(study: StudyParams, lesson_list: Sequence[Lesson],
                transfer_overrides: Mapping[tuple[str, int], Sequence[str]] | None = None) -> list[Trial]:
    """Every (lesson, arm, seed), seed-major: a study stopped half-way has whole seeds of every lesson done.
    `transfer_overrides[(arm, seed)]`: the transfer arms' keys (they need the pretrained source)."""
    trials = []
    for seed in study.seeds:
        for lesson in lesson_list:
            for arm in lesson.arms:
                extra = (transfer_overrides or {}).get((arm, seed), ()) if lesson.needs_source else ()
                trials.append(Trial(lesson.key, arm, seed, tuple(trial_overrides(study, lesson, arm, seed, extra)),
                                    lesson.evaluate))
    return trials


def study_key(base: Params, data_version: str | None) -> str:
    """What makes two studies the same: every param (the study section included) and the data version."""
    payload = json.dumps({"params": base.model_dump(), "data_version": data_version}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def trial_key(study: str, trial: Trial) -> str:
    """A finished trial is reused on a restart when this key matches (study key + lesson/arm/seed)."""
    return f"{study}:{trial.label}"


# ------------------------------------------------------------------------------------- values and verdicts


def epochs_to_target(val_accuracy: Sequence[float], target: float, epochs: int) -> int:
    """The first epoch (1-based) whose validation accuracy reaches `target`; epochs + 1 when none does."""
    return next((epoch for epoch, value in enumerate(val_accuracy, start=1) if value >= target), epochs + 1)


def arm_values(metrics: Mapping[str, float], val_accuracy: Sequence[float], diverged: bool, study: StudyParams,
               classes: int) -> dict[str, float]:
    """The values claims read, from a finished run's final metrics and its per-epoch validation accuracy. A
    diverged training (no model) counts as chance-level accuracy that never reaches the target."""
    if diverged:
        chance = 1.0 / classes
        return {VAL_ACCURACY: chance, TEST_ACCURACY: chance, EPOCHS_TO_TARGET: float(study.epochs + 1)}
    values = {
        VAL_ACCURACY: metrics.get("train.best_val_accuracy", math.nan),
        EPOCHS_TO_TARGET: float(epochs_to_target(val_accuracy, study.target_accuracy, study.epochs)),
        GAP: metrics.get("train.train_accuracy", math.nan) - metrics.get("train.best_val_accuracy", math.nan),
        INIT_SPREAD: math.log10(max(metrics.get("init.variance_ratio", math.nan), 1.0)),
    }
    for name in (TEST_ACCURACY, ROTATED, SHARP, BLURRY, SHIFT_AUC):
        if name in metrics:
            values[name] = metrics[name]
    return {name: float(value) for name, value in values.items() if math.isfinite(value)}


@dataclass(frozen=True)
class Verdict:
    claim: str
    outcome: str  # holds | does not hold | inconclusive
    effect: float  # mean paired difference, positive = as claimed
    low: float
    high: float
    seeds: int
    compared: str  # "better vs worse (metric)"


def judge(differences: Sequence[float], margin: float, confidence: float) -> tuple[str, float, float, float]:
    """The decision rule (module doc) on per-seed differences, positive = as claimed: (outcome, mean, low, high)."""
    from scipy import stats

    values = [value for value in differences if math.isfinite(value)]
    if len(values) < 2:
        mean = values[0] if values else math.nan
        return INCONCLUSIVE, mean, math.nan, math.nan
    mean = statistics.fmean(values)
    half = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    low, high = mean - half, mean + half
    if low > 0:
        return HOLDS, mean, low, high
    if high < 0 or (-margin < low and high < margin):
        return DOES_NOT_HOLD, mean, low, high
    return INCONCLUSIVE, mean, low, high


def paired_differences(claim: Claim, values: Mapping[tuple[str, int], Mapping[str, float]],
                       seeds: Sequence[int]) -> list[float]:
    """Per seed with both sides measured: better minus worse, signed so that positive = as claimed."""
    sign = -1.0 if claim.lower_is_better else 1.0

    def side(measure: Measure, seed: int) -> float:
        if measure.arm is None:
            return measure.constant
        return values.get((measure.arm, seed), {}).get(measure.metric, math.nan)

    differences = [sign * (side(claim.better, seed) - side(claim.worse, seed)) for seed in seeds]
    return [difference for difference in differences if math.isfinite(difference)]


def verdicts(lesson: Lesson, values: Mapping[tuple[str, int], Mapping[str, float]], study: StudyParams) -> list[Verdict]:
    """Every claim of a lesson judged on the arms' values ({(arm, seed): {value name: number}})."""
    found = []
    for claim in lesson.claims:
        differences = paired_differences(claim, values, study.seeds)
        outcome, effect, low, high = judge(differences, study.margin if claim.tie_margin else 0.0, study.confidence)
        found.append(Verdict(claim.text, outcome, effect, low, high, len(differences),
                             f"{claim.better.describe()} vs {claim.worse.describe()}"))
    return found


def arm_summary(values: Mapping[tuple[str, int], Mapping[str, float]], arm: str, name: str) -> tuple[float, float, int]:
    """Mean, standard deviation (0 for one seed) and count of one value of an arm over its seeds."""
    found = [per_seed[name] for (each, _), per_seed in values.items() if each == arm and name in per_seed]
    if not found:
        return math.nan, math.nan, 0
    return statistics.fmean(found), statistics.stdev(found) if len(found) > 1 else 0.0, len(found)


def format_effect(verdict: Verdict) -> str:
    if not math.isfinite(verdict.low):
        return f"{verdict.effect:+.3f} (no interval: {verdict.seeds} seed(s))"
    return f"{verdict.effect:+.3f} [{verdict.low:+.3f}, {verdict.high:+.3f}]"


def summary_rows(lesson_verdicts: Sequence[tuple[Lesson, Sequence[Verdict]]], confidence: float) -> list[dict[str, str]]:
    """The study's summary table: one row per claim."""
    return [{"lesson": lesson.title, "claim": verdict.claim, f"effect ({confidence:.0%} CI)": format_effect(verdict),
             "seeds": str(verdict.seeds), "verdict": verdict.outcome}
            for lesson, found in lesson_verdicts for verdict in found]


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]).replace("|", "\\|") for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"
