"""Evaluate stage: test-split metrics, the confusion matrix and learning curves, for MLflow and `dvc plots`."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.params import Params, workspace_root
from tasks.prepared import PreparedData, batched_dataset

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # flat, stable names: test_accuracy, test_macro_f1, test_precision.cbb, ...
    confusion: np.ndarray  # counts, rows = true class, columns = predicted class
    class_names: list[str]
    predicted: np.ndarray
    actual: np.ndarray


def score_predictions(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str], top_k: int) -> Evaluation:
    """Accuracy, macro F1, top-k accuracy, per-class precision/recall/F1, confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    class_ids = np.arange(len(class_names))
    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=class_ids, zero_division=0
    )
    metrics = {
        "test_accuracy": float(accuracy_score(labels, predicted)),
        "test_macro_f1": float(f1_score(labels, predicted, labels=class_ids, average="macro", zero_division=0)),
        f"test_top{top_k}_accuracy": float(
            top_k_accuracy_score(labels, probabilities, k=min(top_k, len(class_names)), labels=class_ids)
        ),
    }
    for index, name in enumerate(class_names):
        metrics[f"test_precision.{name}"] = float(precision[index])
        metrics[f"test_recall.{name}"] = float(recall[index])
        metrics[f"test_f1.{name}"] = float(f1[index])
        metrics[f"test_support.{name}"] = float(support[index])
    return Evaluation(metrics, confusion_matrix(labels, predicted, labels=class_ids), class_names, predicted, labels)


def predict_probabilities(model: "keras.Model", images: np.ndarray, batch_size: int) -> np.ndarray:
    batches = batched_dataset(images, np.zeros(len(images), dtype=np.int32), batch_size, shuffle=False, seed=0)
    return model.predict(batches.map(lambda image, _: image), verbose=0)


def write_reports(evaluation: Evaluation, history_file: Path, reports_dir: Path) -> list[Path]:
    """metrics.json, test_predictions.csv (actual,predicted), confusion_matrix.png, learning_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    reports_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = reports_dir / "metrics.json"
    metrics_file.write_text(json.dumps(evaluation.metrics, indent=2, sort_keys=True) + "\n")

    predictions_file = reports_dir / "test_predictions.csv"
    with predictions_file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        names = evaluation.class_names
        writer.writerows((names[a], names[p]) for a, p in zip(evaluation.actual, evaluation.predicted))

    confusion_png = reports_dir / "confusion_matrix.png"
    figure, axis = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ConfusionMatrixDisplay(evaluation.confusion, display_labels=names).plot(ax=axis, colorbar=False, cmap="Greens")
    axis.set_title(f"Test confusion matrix (accuracy {evaluation.metrics['test_accuracy']:.3f})")
    figure.tight_layout()
    figure.savefig(confusion_png, dpi=110)
    plt.close(figure)

    curves_png = reports_dir / "learning_curves.png"
    _plot_learning_curves(history_file, curves_png)
    return [metrics_file, predictions_file, confusion_png, curves_png]


def _plot_learning_curves(history_file: Path, output: Path) -> None:
    import matplotlib.pyplot as plt

    with history_file.open() as handle:
        rows = list(csv.DictReader(handle))
    epochs = [int(row["epoch"]) for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, (title, keys) in zip(
        axes, (("loss", ("loss", "val_loss")), ("accuracy", ("accuracy", "val_accuracy")), ("learning rate", ("learning_rate",)))
    ):
        for key in keys:
            axis.plot(epochs, [float(row[key]) for row in rows], marker="o", label=key)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


def run_evaluate(params: Params, run_id: str | None = None) -> str:
    """Stage entry (DVC command and Prefect task): score the trained model on the test split and log it."""
    import keras

    from tasks import layout
    from tasks.tracking import StageRecord, stage_run

    root = workspace_root()
    prepared = PreparedData(root / layout.PREPARED_DIR)
    with stage_run("evaluate", params, root / layout.TRAIN_POINTER, root / layout.EVALUATE_POINTER, run_id) as run:
        model = keras.saving.load_model(root / layout.MODEL_DIR / "model.keras")
        test_images, test_labels = prepared.split("test")
        probabilities = predict_probabilities(model, test_images, params.evaluate.batch_size)
        evaluation = score_predictions(probabilities, test_labels, prepared.class_names(), params.evaluate.top_k)
        written = write_reports(evaluation, root / layout.HISTORY_FILE, root / layout.REPORTS_DIR)
        log.info("evaluate: test accuracy %.4f, macro F1 %.4f on %d images", evaluation.metrics["test_accuracy"],
                 evaluation.metrics["test_macro_f1"], len(test_labels))
        run.complete(
            StageRecord(
                "evaluate",
                metrics=evaluation.metrics,
                artifacts=[(path.relative_to(root).as_posix(), "evaluation") for path in written],
            )
        )
    return run.run_id
