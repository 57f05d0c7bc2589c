"""Evaluate stage: test-split metrics, the confusion matrix and learning curves, for MLflow and `dvc plots`; the
failure analysis; and the HTML report with its header and warnings.

It computes and reports; it does not decide. Registration is the next stage (`tasks.register`), which fills the
report's gate row in. Scoring is shared with that stage through `tasks.scoring`.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.params import EvaluateParams, Params, workspace_root
from tasks.prepared import PreparedData
from tasks.scoring import Evaluation, predict_probabilities, score_predictions

if TYPE_CHECKING:
    import keras

    from tasks.report import ReportSection

log = logging.getLogger(__name__)


def write_reports(evaluation: Evaluation, history_file: Path, reports_dir: Path) -> list[Path]:
    """metrics.json, test_predictions.csv (actual,predicted), figures/confusion_matrix.png and
    figures/learning_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    from tasks.layout import write_metrics

    reports_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = reports_dir / "metrics.json"
    write_metrics(evaluation.metrics, metrics_file, reports_dir / "all_metrics.json")

    predictions_file = reports_dir / "test_predictions.csv"
    with predictions_file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        names = evaluation.class_names
        writer.writerows((names[a], names[p]) for a, p in zip(evaluation.actual, evaluation.predicted))

    (reports_dir / "figures").mkdir(exist_ok=True)
    confusion_png = reports_dir / "figures" / "confusion_matrix.png"
    figure, axis = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ConfusionMatrixDisplay(evaluation.confusion, display_labels=names).plot(ax=axis, colorbar=False, cmap="Greens")
    axis.set_title(f"Test confusion matrix (accuracy {evaluation.metrics['test_accuracy']:.3f})")
    figure.tight_layout()
    figure.savefig(confusion_png, dpi=110)
    plt.close(figure)

    curves_png = reports_dir / "figures" / "learning_curves.png"
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


def explain_model(
    model: "keras.Model", prepared: PreparedData, probabilities: np.ndarray, evaluation: Evaluation,
    settings: "EvaluateParams", figures_dir: Path,
) -> tuple[dict[str, float], list["ReportSection"], dict[str, object]]:
    """The course's failure cases, measured on the test split: calibration, most confidently wrong images,
    rotation and blur robustness, sharp vs blurry, Grad-CAM saliency, train/test distribution shift.
    Returns metrics, report sections and the details written as JSON."""
    from tasks import analysis
    from tasks.report import ReportSection

    test_images, test_labels = prepared.split("test")
    names = evaluation.class_names
    metrics = analysis.extra_classification_metrics(probabilities, test_labels, names)
    metrics["test_expected_calibration_error"] = analysis.expected_calibration_error(
        probabilities, test_labels, settings.calibration_bins
    )
    confusion_png = analysis.plot_normalised_confusion(evaluation.confusion, names, figures_dir / "confusion_normalised.png")
    reliability_png = analysis.plot_reliability_diagram(
        probabilities, test_labels, figures_dir / "reliability_diagram.png", settings.calibration_bins
    )
    gallery_png = figures_dir / "confidently_wrong.png"
    wrong = analysis.plot_confidently_wrong(test_images, probabilities, test_labels, names, gallery_png, settings.gallery_size)

    log.info("evaluate: robustness curves (rotation, flip, blur) on %d test images", len(test_labels))
    predict = analysis.prediction_function(model, settings.batch_size)
    curves = {
        "rotation (degrees)": analysis.robustness_curve(predict, test_images, test_labels, analysis.rotate_images,
                                                        settings.rotation_angles),
        "horizontal flip": analysis.robustness_curve(
            predict, test_images, test_labels, lambda images, flip: analysis.flip_images(images) if flip else images, [0, 1]
        ),
        "blur (sigma)": analysis.robustness_curve(predict, test_images, test_labels, analysis.blur_images,
                                                  settings.blur_sigmas),
    }
    robustness_png = analysis.plot_robustness_curves(curves, figures_dir / "robustness.png")
    for key, prefix in (("rotation (degrees)", "rotation"), ("blur (sigma)", "blur")):
        metrics[f"test_accuracy_{prefix}_max"] = curves[key][-1]["accuracy"]
    metrics["test_accuracy_flipped"] = curves["horizontal flip"][-1]["accuracy"]

    sharpness = analysis.accuracy_by_sharpness(
        evaluation.predicted, test_labels, analysis.manifest_blur_scores(prepared.manifest_file, "test"),
        settings.sharpness_threshold,
    )
    metrics["test_sharp_accuracy"] = sharpness["sharp_accuracy"]
    metrics["test_blurry_accuracy"] = sharpness["blurry_accuracy"]

    sample = analysis.sample_per_class(test_labels, settings.saliency_per_class, settings.seed)
    saliency_png = figures_dir / "saliency.png"
    if sample:
        log.info("evaluate: Grad-CAM saliency for %d test images", len(sample))
        predicted = evaluation.predicted[sample]
        heatmaps = analysis.saliency_maps(model, test_images[sample], predicted)
        titles = [f"true {names[test_labels[i]]} / pred {names[p]}" for i, p in zip(sample, predicted)]
        analysis.plot_saliency_grid(test_images[sample], heatmaps, titles, saliency_png)

    log.info("evaluate: train/test distribution shift (two-sample test on the model's embeddings)")
    train_images, _ = prepared.split("train")
    shift = analysis.distribution_shift(
        train_images, test_images, analysis.embedding_function(model, "pool", settings.batch_size), settings.seed,
        settings.shift_auc_threshold,
    )
    metrics["test_shift_auc"] = shift["classifier_auc"]

    sections = [
        ReportSection("Confusion matrix", "Rows: true class, normalised to 1.", confusion_png),
        ReportSection("Calibration", f"Expected calibration error: {metrics['test_expected_calibration_error']:.4f}.",
                      reliability_png),
        ReportSection("Robustness", "Unfamiliar poses and poor focus: accuracy as the test images are rotated, "
                      "flipped or blurred.", robustness_png, analysis.robustness_table(curves)),
        ReportSection("Sharp vs blurry", "Test images split by the variance-of-Laplacian blur score.", None, sharpness),
        ReportSection("Most confidently wrong", f"{len(wrong)} test images the model got wrong with the most confidence.",
                      gallery_png if wrong else None),
        ReportSection("Saliency", "Grad-CAM on the last convolutional block, for a fixed sample per class.",
                      saliency_png if sample else None),
        ReportSection("Distribution shift", f"Train vs test: {shift['verdict']} (classifier AUC "
                      f"{shift['classifier_auc']:.3f}, threshold {settings.shift_auc_threshold}).", None,
                      {key: value for key, value in shift.items() if not isinstance(value, (list, dict))}),
    ]
    details = {"robustness": curves, "sharpness": sharpness, "distribution_shift": shift, "confidently_wrong": wrong}
    return metrics, sections, details


def limited_data_curve(params: Params, prepared: PreparedData, figures_dir: Path) -> tuple[list[dict], Path]:
    """Lesson "limited data": retrain on nested, stratified fractions of the training split; test accuracy each."""
    import tempfile

    from tasks import analysis
    from tasks.train import train_classifier

    _, train_labels = prepared.split("train")
    test_images, test_labels = prepared.split("test")
    points = []
    subsets = analysis.learning_curve_fractions(train_labels, params.evaluate.learning_curve_fractions, params.evaluate.seed)
    for fraction, indices in subsets.items():
        with tempfile.TemporaryDirectory() as scratch:
            outcome = train_classifier(params, prepared, Path(scratch) / "best.keras", Path(scratch) / "backup",
                                       train_indices=indices)
        probabilities = predict_probabilities(outcome.model, test_images, params.evaluate.batch_size)
        accuracy = float((probabilities.argmax(axis=1) == test_labels).mean())
        points.append({"fraction": fraction, "train_images": len(indices), "test_accuracy": accuracy})
        log.info("evaluate: learning curve: %d training images -> test accuracy %.4f", len(indices), accuracy)
    return points, analysis.plot_learning_curve(points, figures_dir / "learning_curve_data.png")


def run_evaluate(params: Params, run_id: str | None = None) -> str:
    """Stage entry (DVC command and Prefect task): score the trained model on the test split, explain it,
    write the HTML report (its registry-gate row is filled in by the register stage) and log everything."""
    import keras

    from tasks import layout
    from tasks.names import SHIFT_VERDICT_TAG
    from tasks.report import ReportSection, model_warnings, report_header, write_html_report
    from tasks.scoring import keras_progress_bars_off, majority_baseline
    from tasks.staging import staged_outputs
    from tasks.tracking import StageRecord, describe_run, dvc_data_version, stage_run

    root = workspace_root()
    prepared = PreparedData(root / layout.PREPARED_DIR)
    outputs = [layout.REPORTS_DIR / "figures", layout.EVALUATION_REPORT, layout.REPORTS_DIR / "failure_analysis.json",
               layout.PREDICTIONS_FILE, layout.METRICS_FILE, layout.ALL_METRICS_FILE,
               layout.EVALUATE_POINTER]
    # No `1/1 ━━━━` bars from predictions made inside libraries (MLflow validating a carried-over model's example).
    with keras_progress_bars_off(), staged_outputs(root, "evaluate", outputs) as staged, \
            stage_run("evaluate", params, root / layout.TRAIN_POINTER, root / layout.EVALUATE_POINTER, run_id) as run:
        reports_dir = staged.new / layout.REPORTS_DIR  # swapped in by staged.publish(), on success only
        model = keras.saving.load_model(root / layout.MODEL_DIR / "model.keras")
        test_images, test_labels = prepared.split("test")
        log.info("evaluate: scoring the model on %d test images", len(test_labels))
        probabilities = predict_probabilities(model, test_images, params.evaluate.batch_size)
        evaluation = score_predictions(probabilities, test_labels, prepared.class_names(), params.evaluate.top_k)
        baseline = majority_baseline(prepared.split("train")[1], test_labels)
        evaluation.metrics["test_majority_baseline_accuracy"] = baseline[1]
        written = write_reports(evaluation, root / layout.HISTORY_FILE, reports_dir)
        figures_dir = reports_dir / "figures"
        extra_metrics, sections, details = explain_model(model, prepared, probabilities, evaluation, params.evaluate, figures_dir)
        evaluation.metrics.update(extra_metrics)
        if params.evaluate.learning_curve:
            points, curve_png = limited_data_curve(params, prepared, figures_dir)
            sections.append(ReportSection("Learning curve", "Test accuracy against the amount of training data.",
                                          curve_png, points))
            details["learning_curve"] = points
        layout.write_metrics(evaluation.metrics, staged.path(layout.METRICS_FILE), staged.path(layout.ALL_METRICS_FILE))
        details_file = reports_dir / "failure_analysis.json"
        details_file.write_text(json.dumps(details, indent=2, default=float) + "\n")

        summary_file = root / layout.TRAIN_SUMMARY_FILE
        train_summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
        warnings = model_warnings(
            evaluation.predicted, evaluation.actual, evaluation.class_names, evaluation.metrics["test_accuracy"],
            baseline, train_summary, params.train.epochs, details["distribution_shift"],
        )
        data_version = dvc_data_version(root / layout.PREPARED_DIR)
        header = report_header(describe_run(params, data_version), run.run_id, params, data_version,
                               evaluation.metrics["test_accuracy"], baseline, evaluation.class_names)
        write_html_report(
            staged.new / layout.EVALUATION_REPORT, "cassava-pipeline evaluation", evaluation.metrics,
            [ReportSection("Learning curves", "", figures_dir / "learning_curves.png"), *sections], header, warnings,
        )
        for warning in warnings:
            log.warning("evaluate: warning: %s", warning)
        log.info("evaluate: test accuracy %.4f (majority-class baseline %.4f), macro F1 %.4f, ECE %.4f on %d images; "
                 "report %s", evaluation.metrics["test_accuracy"], baseline[1], evaluation.metrics["test_macro_f1"],
                 evaluation.metrics["test_expected_calibration_error"], len(test_labels), root / layout.EVALUATION_REPORT)
        # The report goes to the run once the register stage has filled in the gate (reports/report.html).
        staged_files = [*written, staged.path(layout.ALL_METRICS_FILE), details_file, *figures_dir.glob("*.png")]
        staged.publish()
        artifacts = {(root / layout.REPORTS_DIR / path.relative_to(reports_dir)).resolve() for path in staged_files}
        run.complete(
            StageRecord(
                "evaluate",
                metrics=evaluation.metrics,
                tags={SHIFT_VERDICT_TAG: str(details["distribution_shift"]["verdict"])},
                artifacts=sorted((path.relative_to(root.resolve()).as_posix(), "evaluation") for path in artifacts),
            )
        )
    return run.run_id
