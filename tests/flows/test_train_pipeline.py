"""End to end under Prefect (a real temporary Prefect server): one MLflow run that tells the whole story."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tasks.layout import HISTORY_FILE, MODEL_DIR, PREPARED_DIR, TRAIN_SUMMARY_FILE
from tasks.params import flatten_params, load_params
from tasks.tracking import describe_run, dvc_data_version


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_flow_logs_one_complete_run(workspace: Path, prefect_server) -> None:
    from flows.train_pipeline import train_pipeline

    result = train_pipeline(overrides=["train.learning_rate=0.003"])
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    params = load_params(workspace / "params.yaml", ["train.learning_rate=0.003"])

    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "cassava-synthetic"
    assert len(client.search_runs([experiment.experiment_id])) == 1  # one run per pipeline execution
    assert run.data.params == flatten_params(params)
    assert run.info.run_name == describe_run(params, run.data.tags["cassava.data_version"])
    assert "lr=0.003" in run.info.run_name

    tags = run.data.tags
    assert tags["cassava.trigger"] == "prefect"
    assert tags["cassava.prefect_flow_run_id"]
    assert tags["cassava.data_version"] == dvc_data_version(workspace / PREPARED_DIR)
    assert tags["cassava.git_dirty"] in ("true", "false") and len(tags["mlflow.source.git.commit"]) == 40
    assert tags["cassava.version.tensorflow-cpu"] and tags["cassava.version.keras"].startswith("3.")
    for stage in ("acquire", "prepare", "train", "evaluate"):
        assert tags[f"cassava.stage.{stage}"] == "done"

    metrics = run.data.metrics
    reported = json.loads((workspace / "reports/metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(reported["test_accuracy"]) == result["metrics"]["test_accuracy"]
    assert 0.0 <= metrics["test_macro_f1"] <= 1.0 and "test_recall.cmd" in metrics
    summary = json.loads((workspace / TRAIN_SUMMARY_FILE).read_text())
    assert metrics["train.best_epoch"] == summary["best_epoch"]
    with (workspace / HISTORY_FILE).open() as handle:
        epochs = list(csv.DictReader(handle))
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [point.step for point in history] == list(range(1, len(epochs) + 1))
    rates = [point.value for point in client.get_metric_history(run.info.run_id, "learning_rate")]
    assert rates[0] > rates[-1]  # the cosine schedule decays

    artifacts = {item.path for folder in ("data", "training", "evaluation")
                 for item in client.list_artifacts(run.info.run_id, folder)}
    assert {"data/data_report.json", "data/split_manifest.csv", "data/.acquire_report.json",
            "training/history.csv", "training/model_summary.txt",
            "evaluation/confusion_matrix.png", "evaluation/learning_curves.png", "evaluation/metrics.json",
            "evaluation/report.html", "evaluation/reliability_diagram.png", "evaluation/robustness.png",
            "evaluation/saliency.png", "evaluation/failure_analysis.json"} <= artifacts
    assert {"test_expected_calibration_error", "test_roc_auc_ovr", "test_weighted_f1", "test_shift_auc",
            "test_accuracy_rotation_max", "test_sharp_accuracy"} <= set(metrics)
    assert tags["cassava.shift_verdict"] in ("shift detected", "no shift detected")
    assert tags["cassava.init_verdict"] == "healthy"
    assert [dataset.dataset.digest for dataset in run.inputs.dataset_inputs] == [tags["cassava.data_version"][:32]]

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    example = np.load(workspace / MODEL_DIR / "input_example.npy")
    probabilities = model.predict(example)
    assert probabilities.shape == (2, 5)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_flow_rejects_bad_params_before_running_anything(workspace: Path, prefect_server) -> None:
    from flows.train_pipeline import train_pipeline
    from tasks.params import ParamsError

    with pytest.raises(ParamsError, match="train.optimizer = 'adagrad'"):
        train_pipeline(overrides=["train.optimizer=adagrad"])
    assert not (workspace / "data").exists()
