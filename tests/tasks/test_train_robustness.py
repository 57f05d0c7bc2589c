"""Robust training: a killed training resumes in the same run with the same result; NaN fails cleanly;
everything switched on at once still trains and logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from mlflow import MlflowClient

from tasks.data import run_acquire, run_prepare
from tasks.layout import BACKUP_DIR, CHECKPOINT_FILE, HISTORY_FILE, MODEL_DIR, TRAIN_SUMMARY_FILE
from tasks.params import code_root, load_params, validate_params
from tasks.tracking import configure_tracking
from tests.conftest import tiny_params_tree

if TYPE_CHECKING:
    from mlflow.entities import Run


def _write_params(workspace: Path, *overrides: str) -> None:
    (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_params_tree(list(overrides)), sort_keys=False))


def _run_to_completion(command: list[str], environment: dict[str, str]) -> None:
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def _train_command(workspace: Path) -> tuple[list[str], dict[str, str]]:
    environment = {**os.environ, "CASSAVA_WORKSPACE": str(workspace), "PYTHONPATH": str(code_root())}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return [sys.executable, "-m", "tasks.cli", "train"], environment


@pytest.mark.slow
def test_killed_training_resumes_in_the_same_run_and_ends_as_if_uninterrupted(workspace: Path) -> None:
    epochs = 12  # the tiny set's epochs are short: enough of them that the kill lands mid-training
    _write_params(workspace, f"train.epochs={epochs}", "train.early_stopping.patience=100",
                  "data.synthetic.images_per_class=24")
    params = load_params()
    run_prepare(params, run_acquire(params))
    command, environment = _train_command(workspace)
    progress_file = workspace / BACKUP_DIR / "progress.json"

    def backed_up_epochs() -> int:
        # The backup's epoch file: the epochs whose weights are saved (the progress file can be one epoch ahead
        # if the kill falls between the two writes; resuming then starts from the weights).
        metadata = workspace / BACKUP_DIR / "training_metadata.json"
        try:
            return int(json.loads(metadata.read_text())["epoch"]) if progress_file.exists() else 0
        except (OSError, ValueError, KeyError):
            return 0

    training = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if backed_up_epochs() >= 2:
            break
        assert training.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(training.pid, signal.SIGKILL)  # as a power cut: no handler runs
    training.wait()
    killed = json.loads(progress_file.read_text())
    finished_epochs = min(len(killed["history"]), backed_up_epochs())
    assert 2 <= finished_epochs < epochs

    _run_to_completion(command, environment)
    summary = json.loads((workspace / TRAIN_SUMMARY_FILE).read_text())
    assert summary["resumed_from_epoch"] == finished_epochs and summary["epochs_run"] == epochs
    assert not (workspace / BACKUP_DIR).exists()
    resumed_history = (workspace / HISTORY_FILE).read_text()

    configure_tracking()
    client = MlflowClient()
    run = client.get_run(killed["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["cassava.stage.train"] == "done"
    assert "cassava.failure" not in run.data.tags and "died" in run.data.tags["cassava.resumed_after"]
    assert [point.step for point in client.get_metric_history(run.info.run_id, "val_loss")] == list(range(1, epochs + 1))

    # The same training uninterrupted (no backup left, so it starts from scratch) ends identically.
    _run_to_completion(command, environment)
    uninterrupted = json.loads((workspace / TRAIN_SUMMARY_FILE).read_text())
    assert uninterrupted["resumed_from_epoch"] == 0
    assert (workspace / HISTORY_FILE).read_text() == resumed_history
    for key in ("best_epoch", "best_val_loss", "best_val_accuracy", "train_loss"):
        assert uninterrupted[key] == summary[key]


@pytest.mark.parametrize(
    ("loss", "reference", "verdict"),
    [(1.6, 1.6, None), (1599.0, 1.6, None), (1601.0, 1.6, "exceeded train.divergence_factor = 1000 times"),
     (float("nan"), 1.6, "NaN/inf"), (float("inf"), None, "NaN/inf"), (1e9, None, None)],
)
def test_the_divergence_rule(loss: float, reference: float | None, verdict: str | None) -> None:
    from tasks.guards import divergence_reason

    reason = divergence_reason(loss, reference, 1000.0)
    if verdict is None:
        assert reason is None
    else:
        assert reason is not None and verdict in reason


@pytest.mark.slow
def test_the_gradient_norm_is_the_one_the_optimizer_applied(tmp_path: Path) -> None:
    from tasks.data import acquire, prepare_dataset
    from tasks.prepared import PreparedData
    from tasks.train import train_classifier

    # Clipping to a global norm far below the raw gradients' makes every applied step exactly that norm;
    # a probe computing gradients separately (as before) would report the unclipped ones.
    params = validate_params(tiny_params_tree(["train.gradients.clip=norm", "train.gradients.clip_value=0.01",
                                               "train.epochs=2", "train.gradients.vanishing_below=0.1"]))
    acquire(params.data, tmp_path / "raw")
    prepare_dataset(params.data, tmp_path / "raw", tmp_path / "prepared")
    outcome = train_classifier(params, PreparedData(tmp_path / "prepared"), tmp_path / "best.keras", tmp_path / "backup")
    assert [row["grad_norm"] for row in outcome.history] == pytest.approx([0.01, 0.01], rel=1e-3)
    assert outcome.summary.gradient_flags == ["vanishing at epoch 1 (norm 0.01 < 0.1)",
                                              "vanishing at epoch 2 (norm 0.01 < 0.1)"]


def _train_until_it_fails(workspace: Path, *overrides: str) -> tuple[Exception, "Run"]:
    """Prepare, then train with a healthy earlier model in place: the training must fail; returns the
    error and the MLflow run, after checking that the earlier outputs and run pointer were left as they were."""
    from tasks.layout import TRAIN_POINTER
    from tasks.train import TrainingDiverged, run_train

    _write_params(workspace, *overrides)
    params = load_params()
    run_id = run_prepare(params, run_acquire(params))
    earlier = {workspace / MODEL_DIR / "model.keras": b"the model of an earlier, healthy run",
               workspace / TRAIN_POINTER: b'{"run_id": "an earlier run", "records": []}',
               workspace / HISTORY_FILE: b"epoch,loss\n1,0.5\n"}
    for file, content in earlier.items():
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(content)

    with pytest.raises(TrainingDiverged) as failure:
        run_train(params)
    for file, content in earlier.items():
        assert file.read_bytes() == content, f"{file} was replaced by the failed training"
    assert not (workspace / TRAIN_SUMMARY_FILE).exists()  # nothing of the failed run appears
    assert not (workspace / ".staging").exists()
    assert not (workspace / BACKUP_DIR).exists() and not (workspace / CHECKPOINT_FILE).exists()
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert not MlflowClient().search_logged_models([run.info.experiment_id])
    return failure.value, run


@pytest.mark.slow
def test_a_nan_loss_fails_the_run_and_keeps_the_previous_outputs(workspace: Path) -> None:
    error, run = _train_until_it_fails(
        workspace, "train.optimizer=sgd", "train.learning_rate=1000000", "train.lr_schedule=constant",
        "model.batch_norm=false", "train.divergence_factor=1e300",  # only the NaN rule can fire
    )
    assert "loss became NaN/inf" in str(error)
    assert "TrainingDiverged: training diverged: loss became NaN/inf" in run.data.tags["cassava.failure"]
    assert "learning_rate = 1e+06" in run.data.tags["cassava.failure"]


@pytest.mark.reliability
def test_a_finite_divergence_fails_the_run_and_flags_the_exploding_gradients(workspace: Path) -> None:
    # The case: batch norm keeps the loss finite (5.6e16) while the learning rate blows it up.
    error, run = _train_until_it_fails(workspace, "train.learning_rate=1000000", "train.lr_schedule=constant")
    assert "exceeded train.divergence_factor = 1000 times the initial loss" in str(error)
    failure = run.data.tags["cassava.failure"]
    print(f"diverged run: {failure}")
    assert failure.startswith("train: TrainingDiverged: training diverged: loss ") and "batch " in failure
    assert run.data.tags["cassava.gradient_flag"].startswith("exploding at epoch 1")
    assert "cassava.stage.train" not in run.data.tags


@pytest.mark.slow
def test_everything_switched_on_trains_and_logs(workspace: Path) -> None:
    from tasks.evaluate import run_evaluate
    from tasks.train import run_train

    _write_params(
        workspace,
        "model.initializer=he_normal", "model.batch_norm=[true, false]", "model.dropout=[0.1, 0.2]", "model.l2=0.0001",
        "model.augmentation.flip=horizontal", "model.augmentation.rotation=0.05", "model.augmentation.zoom=0.1",
        "model.augmentation.contrast=0.1", "model.augmentation.brightness=0.1",
        "train.optimizer=sgd", "train.nesterov=true", "train.learning_rate=0.05", "train.lr_schedule=step",
        "train.schedule.step_epochs=1", "train.schedule.step_factor=0.5", "train.gradients.clip=norm",
        "train.class_weight=balanced", "train.early_stopping.monitor=val_accuracy", "train.early_stopping.mode=max",
        "train.epochs=3", "evaluate.learning_curve=true", "evaluate.learning_curve_fractions=[0.5, 1.0]",
    )
    params = load_params()
    run_id = run_evaluate(params, run_train(params, run_prepare(params, run_acquire(params))))
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["cassava.init_verdict"] == "healthy"
    assert run.data.tags["cassava.gradient_flag"] == "none"
    assert run.data.params["train.optimizer"] == "sgd" and run.data.params["model.dropout"] == "[0.1, 0.2]"
    # The speed settings a run trained with are in its params, as every other knob.
    assert run.data.params["train.deterministic"] == "True" and run.data.params["train.jit_compile"] == "False"
    rates = [point.value for point in client.get_metric_history(run_id, "learning_rate")]
    assert rates == pytest.approx([0.05, 0.025, 0.0125])
    for key in ("grad_norm", "gap_accuracy", "gap_loss"):
        assert len(client.get_metric_history(run_id, key)) == 3
    assert {"train.best_epoch", "train.stopped_epoch", "init.variance_ratio", "test_accuracy"} <= set(run.data.metrics)
    artifacts = {item.path for item in client.list_artifacts(run_id, "diagnostics")}
    assert artifacts == {"diagnostics/init_diagnostics.csv", "diagnostics/init_diagnostics.png"}
    curve = json.loads((workspace / "reports/failure_analysis.json").read_text())["learning_curve"]
    assert [point["fraction"] for point in curve] == [0.5, 1.0]
    assert curve[0]["train_images"] < curve[1]["train_images"]
    report = (workspace / "reports/evaluation.html").read_text()  # evaluate's report (register completes it)
    assert "<h2>Learning curve</h2>" in report and "<h2>Saliency</h2>" in report
