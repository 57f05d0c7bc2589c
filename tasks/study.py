"""The transfer-learning lesson, measured: on the same small target training sets (n images per class), train
from scratch and from a pretrained backbone with the same epoch budget and several seeds, and compare test
accuracy (mean and spread per size). flows/transfer_study.py runs it; this module is its pure core.

"Same budget": the scratch CNN trains `epochs` epochs; the pretrained arm trains `epochs // 2` head epochs
(on cached features) and the rest fine-tuning. Both use the target's full validation split for early
stopping and are scored on the full test split.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tasks.backbones import SourceModel
from tasks.params import Params, apply_overrides, validate_params
from tasks.prepared import PreparedData, per_class_subset

log = logging.getLogger(__name__)
ARMS = ("scratch", "pretrained")


@dataclass(frozen=True)
class Trial:
    arm: str  # scratch | pretrained
    per_class: int
    seed: int
    train_images: int = 0
    test_accuracy: float = math.nan
    epochs_run: int = 0
    seconds: float = 0.0


def arm_overrides(arm: str, source: SourceModel, epochs: int, seed: int) -> list[str]:
    """The overrides of one arm: the CNN from scratch, or the source's backbone with a new head, with the same
    epoch budget (the pretrained arm splits it between head training and fine-tuning)."""
    common = [f"train.epochs={epochs}", f"train.seed={seed}", "train.resume=false"]
    if arm == "scratch":
        return [*common, "model.backbone=none", "model.backbone_weights=none"]
    return [*common, f"model.backbone={source.backbone}", f"model.backbone_weights={source.uri}",
            f"transfer.head_epochs={epochs // 2}", f"transfer.fine_tune_epochs={epochs - epochs // 2}"]


def arm_params(params: Params, arm: str, source: SourceModel, epochs: int, seed: int) -> Params:
    """The params of one arm (see arm_overrides)."""
    return validate_params(apply_overrides(params.model_dump(), arm_overrides(arm, source, epochs, seed)))


def run_trial(params: Params, prepared: PreparedData, arm: str, per_class: int, seed: int, source: SourceModel,
              epochs: int) -> Trial:
    from tasks.evaluate import predict_probabilities
    from tasks.train import train_classifier

    _, train_labels = prepared.split("train")
    test_images, test_labels = prepared.split("test")
    indices = per_class_subset(train_labels, per_class, seed)
    trial_params = arm_params(params, arm, source, epochs, seed)
    with tempfile.TemporaryDirectory() as scratch:
        outcome = train_classifier(trial_params, prepared, Path(scratch) / "best.keras", Path(scratch) / "backup",
                                   train_indices=indices)
    predicted = predict_probabilities(outcome.model, test_images, params.evaluate.batch_size).argmax(axis=1)
    accuracy = float((predicted == test_labels).mean())
    log.info("study: %s, %d per class, seed %d: test accuracy %.4f", arm, per_class, seed, accuracy)
    return Trial(arm, per_class, seed, len(indices), accuracy, outcome.summary.epochs_run, outcome.summary.seconds)


def summarize(trials: Sequence[Trial]) -> list[dict[str, float | str]]:
    """Per arm and size: mean, standard deviation, min and max test accuracy over the seeds."""
    rows = []
    for arm in ARMS:
        for per_class in sorted({trial.per_class for trial in trials}):
            scores = [trial.test_accuracy for trial in trials if trial.arm == arm and trial.per_class == per_class]
            if scores:
                rows.append({"arm": arm, "per_class": per_class, "seeds": len(scores),
                             "mean": statistics.fmean(scores), "std": statistics.pstdev(scores),
                             "min": min(scores), "max": max(scores)})
    return rows


def write_study(trials: Sequence[Trial], folder: Path) -> list[Path]:
    """trials.csv, comparison.csv and comparison.png (accuracy vs images per class, mean and spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "trials.csv", folder / "comparison.csv", folder / "comparison.png"]
    for file, rows in ((files[0], [asdict(trial) for trial in trials]), (files[1], summarize(trials))):
        with file.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm, colour in zip(ARMS, ("C0", "C1")):
        rows = [row for row in summarize(trials) if row["arm"] == arm]
        sizes = [row["per_class"] for row in rows]
        means = np.array([row["mean"] for row in rows])
        spread = np.array([row["std"] for row in rows])
        axis.plot(sizes, means, marker="o", color=colour, label=arm)
        axis.fill_between(sizes, means - spread, means + spread, color=colour, alpha=0.2)
        points = [trial for trial in trials if trial.arm == arm]
        axis.scatter([trial.per_class for trial in points], [trial.test_accuracy for trial in points], color=colour, s=10)
    axis.set_xlabel("training images per class")
    axis.set_ylabel("test accuracy")
    axis.set_title("From scratch vs. pretrained backbone (mean ± std over seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(files[2], dpi=110)
    plt.close(figure)
    return files


def prepare_target(params: Params, folder: Path) -> PreparedData:
    """The target data set of the study, acquired and prepared under `folder` (the pipeline's own data/ and
    its MLflow runs are left alone)."""
    from tasks.data import acquire, prepare_dataset

    if not PreparedData(folder / "prepared").images_file("test").exists():
        acquire(params.data, folder / "raw")
        prepare_dataset(params.data, folder / "raw", folder / "prepared")
    return PreparedData(folder / "prepared")


def study_metrics(trials: Sequence[Trial]) -> dict[str, float]:
    """`<arm>.n<size>.mean` / `.std` per arm and size, and the pretrained-minus-scratch gain per size."""
    rows = summarize(trials)
    metrics = {f"{row['arm']}.n{row['per_class']}.{key}": float(row[key]) for row in rows for key in ("mean", "std")}
    for row in rows:
        scratch = metrics.get(f"scratch.n{row['per_class']}.mean")
        if row["arm"] == "pretrained" and scratch is not None:
            metrics[f"gain.n{row['per_class']}"] = float(row["mean"]) - scratch
    return metrics
