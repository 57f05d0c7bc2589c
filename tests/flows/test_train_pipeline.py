"""End to end under Prefect (a real private Prefect server): one MLflow run that tells the whole story; data stages
cached by their inputs; a failed run ends FAILED and notifies."""

from __future__ import annotations

import csv
import http.server
import json
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from prefect.client.orchestration import get_client
from sklearn.metrics import f1_score, recall_score

from tasks.layout import HISTORY_FILE, MODEL_DIR, PREDICTIONS_FILE, PREPARED_DIR, TRAIN_SUMMARY_FILE
from tasks.params import code_root, flatten_params, load_params
from tasks.tracking import code_state, describe_run, dvc_data_version

pytestmark = [pytest.mark.slow, pytest.mark.server]  # a real private Prefect server


@pytest.fixture(scope="module")
def prefect_server():
    """The API entries use when no server runs: a private server for these tests (flows.prefect_api)."""
    from flows.prefect_api import prefect_api

    with prefect_api() as api:
        yield api


def test_flow_logs_one_complete_run(workspace: Path, prefect_server) -> None:
    from flows.train_pipeline import train_pipeline, where_to_look

    _, code_changed = code_state(code_root())  # tracked code differing from the commit (outputs do not count)
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
    with get_client(sync_client=True) as prefect:
        assert tags["cassava.prefect_flow_run_id"] in {str(flow_run.id) for flow_run in prefect.read_flow_runs()}
    assert tags["cassava.data_version"] == dvc_data_version(workspace / PREPARED_DIR)
    assert tags["cassava.git_dirty"] == ("true" if code_changed else "false")
    assert tags["mlflow.source.git.commit"] == subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=code_root(), capture_output=True, text=True, check=True).stdout.strip()
    assert tags["cassava.version.tensorflow-cpu"] == metadata.version("tensorflow-cpu")
    assert tags["cassava.version.keras"] == metadata.version("keras")
    for stage in ("acquire", "prepare", "train", "evaluate", "register"):
        assert tags[f"cassava.stage.{stage}"] == "done"
    registry = json.loads((workspace / "reports/registry.json").read_text())
    assert (tags["cassava.gate.decision"], tags["cassava.gate.reason"]) == (registry["decision"], registry["reason"])
    assert registry["decision"] == ("registered" if run.data.metrics["test_macro_f1"] >= 0.3 else "rejected")

    metrics = run.data.metrics
    reported = json.loads((workspace / "reports/metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(reported["test_accuracy"]) == result["metrics"]["test_accuracy"]
    with (workspace / PREDICTIONS_FILE).open() as handle:
        predictions = list(csv.DictReader(handle))
    actual, predicted = [row["actual"] for row in predictions], [row["predicted"] for row in predictions]
    assert metrics["test_macro_f1"] == pytest.approx(f1_score(actual, predicted, average="macro", zero_division=0))
    assert metrics["test_recall.cmd"] == pytest.approx(recall_score(actual, predicted, labels=["cmd"], average="macro",
                                                                    zero_division=0))
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
    shifted = metrics["test_shift_auc"] >= params.evaluate.shift_auc_threshold
    assert tags["cassava.shift_verdict"] == ("shift detected" if shifted else "no shift detected")
    assert tags["cassava.init_verdict"] == "healthy"
    assert [dataset.dataset.digest for dataset in run.inputs.dataset_inputs] == [tags["cassava.data_version"][:32]]

    # The end-of-run message points at files that exist.
    message = where_to_look(result)
    assert f"MLflow run:      {run.info.run_id}" in message and "reports/figures/" in message
    assert (workspace / "reports" / "report.html").is_file() and (workspace / "reports" / "figures").is_dir()

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


def _task_states(flow_run_id: str, expected: int) -> dict[str, str]:
    """Final state names of a flow run's task runs, by task run name (the server records them from events)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 120
    while True:
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states = {run.name: run.state.name for run in task_runs if run.state and run.state.is_final()}
        if len(states) >= expected or time.monotonic() > deadline:
            return states
        time.sleep(1)


def test_unchanged_data_stages_are_cached_and_training_is_not(workspace: Path, prefect_server) -> None:
    from flows.train_pipeline import train_pipeline

    first = train_pipeline()
    raw_file = next((workspace / "data" / "raw").rglob("*.png"))
    raw_written = raw_file.stat().st_mtime_ns
    state = train_pipeline(return_state=True)
    second = state.result()

    states = _task_states(str(state.state_details.flow_run_id), expected=5)
    assert states == {"acquire": "Cached", "prepare": "Cached", "train": "Completed", "evaluate": "Completed",
                      "register": "Completed"}
    assert raw_file.stat().st_mtime_ns == raw_written  # acquire really did not run
    client = MlflowClient()
    run = client.get_run(second["run_id"])
    assert second["run_id"] != first["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["cassava.data_version"] == client.get_run(first["run_id"]).data.tags["cassava.data_version"]
    assert run.data.tags["cassava.carried_over_from"] == first["run_id"]  # the skipped stages' records come along
    assert {"cassava.data.images_kept", "cassava.data.raw_files"} <= set(run.data.tags)  # counters are tags

    (workspace / "data" / "prepare.mlflow.json").unlink()  # an output of prepare is gone: prepare runs again
    state = train_pipeline(return_state=True)
    states = _task_states(str(state.state_details.flow_run_id), expected=6)
    assert (states["prepare"], states["prepare (outputs changed: run again)"]) == ("Cached", "Completed")


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A real HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def test_a_failed_run_ends_failed_with_the_reason_and_notifies(
    workspace: Path, prefect_server, webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.train_pipeline import train_pipeline

    url, received = webhook
    monkeypatch.setenv("CASSAVA_NOTIFY_WEBHOOK", url)
    (workspace / "photos").mkdir()  # no class folders: bad data, which must fail at once, without retries
    state = train_pipeline(overrides=["data.source=folder", "data.root=photos"], return_state=True)

    assert state.is_failed()
    client = MlflowClient()
    experiment = client.get_experiment_by_name("cassava-folder")
    (run,) = client.search_runs([experiment.experiment_id])  # one attempt: bad data is not retried
    assert run.info.status == "FAILED"
    assert "acquire: DataError" in run.data.tags["cassava.failure"] and "photos" in run.data.tags["cassava.failure"]
    deadline = time.monotonic() + 30
    while not received and time.monotonic() < deadline:
        time.sleep(0.2)
    (message,) = received
    assert message["state"] == "Failed" and message["flow"] == "cassava-train-pipeline"
    assert message["flow_run_id"] == str(state.state_details.flow_run_id) and "photos" in message["reason"]
