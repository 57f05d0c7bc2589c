"""SIGKILL at a random epoch, then run again: the same MLflow run continues and holds every epoch exactly once,
through the Prefect flow as through `dvc repro` (real processes, real Prefect server, real DVC)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run

from tasks.layout import ALL_METRICS_FILE, BACKUP_DIR, INTERRUPTED_RUN_FILE, METRICS_FILE, TRAIN_METRICS_FILE, headline
from tasks.params import code_root
from tests.conftest import tiny_params_tree
from tests.helpers import clone_project

EPOCHS = 6
OVERRIDES = [f"train.epochs={EPOCHS}", "train.early_stopping.patience=10", "data.synthetic.images_per_class=24",
             "registry.enabled=false", "evaluate.rotation_angles=[0, 90]", "evaluate.blur_sigmas=[0, 2]",
             "evaluate.saliency_per_class=0"]


def _environment(**extra: str) -> dict[str, str]:
    environment = {
        **os.environ,
        # Stage commands say `python`: make it this interpreter, as an activated venv would.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # A loaded machine starts Prefect's temporary server slowly: no start-up deadline here.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "900",
        **extra,
    }
    for variable in ("MLFLOW_TRACKING_URI", "DVC_ROOT", *(() if "CASSAVA_WORKSPACE" in extra else ("CASSAVA_WORKSPACE",))):
        environment.pop(variable, None)
    return environment


def _backed_up_epochs(workspace: Path) -> int:
    try:
        return int(json.loads((workspace / BACKUP_DIR / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_during_training(command: list[str], cwd: Path, environment: dict[str, str], workspace: Path) -> int:
    """Start `command`, SIGKILL it and everything it started once a random epoch after the first is backed
    up; return that epoch."""
    kill_after = random.randint(2, EPOCHS - 1)
    started = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while _backed_up_epochs(workspace) < kill_after:
            assert started.poll() is None, f"ended before epoch {kill_after} could be killed"
            assert time.monotonic() < deadline, f"epoch {kill_after} not reached in 900 s"
            time.sleep(0.1)
    finally:
        os.killpg(started.pid, signal.SIGKILL)  # as a power cut: no handler runs, nothing is cleaned up
        started.wait()
    return kill_after


def _run_to_completion(command: list[str], cwd: Path, environment: dict[str, str]) -> None:
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _assert_one_run_with_every_epoch_once(store: Path, killed_run_id: str) -> Run:
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    (run,) = client.search_runs(experiments)  # no second run started for the rest of the execution
    assert run.info.run_id == killed_run_id
    assert run.info.status == "FINISHED" and "cassava.failure" not in run.data.tags
    assert "died" in run.data.tags["cassava.resumed_after"]
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"):
        assert [point.step for point in client.get_metric_history(run.info.run_id, key)] == list(range(1, EPOCHS + 1))
    assert run.data.metrics["train.epochs_run"] == EPOCHS and run.data.metrics["train.resumed_from_epoch"] >= 2
    assert not [key for key in run.data.metrics if key.startswith("data.")]  # bookkeeping counters are tags
    return run


def _assert_headline_metrics_files(workspace: Path) -> None:
    every_test_metric = json.loads((workspace / ALL_METRICS_FILE).read_text())
    assert "test_recall.cmd" in every_test_metric
    assert json.loads((workspace / METRICS_FILE).read_text()) == headline(every_test_metric)
    assert list(json.loads((workspace / METRICS_FILE).read_text())) == [
        "test_accuracy", "test_macro_f1", "test_top2_accuracy"]
    assert list(json.loads((workspace / TRAIN_METRICS_FILE).read_text())) == ["best_epoch", "best_val_accuracy"]


@pytest.mark.reliability
def test_a_killed_flow_continues_in_the_same_run(workspace: Path, tmp_path: Path) -> None:
    (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_params_tree(OVERRIDES), sort_keys=False))
    command = [sys.executable, "-m", "flows.train_pipeline"]
    environment = _environment(CASSAVA_WORKSPACE=str(workspace), PYTHONPATH=str(code_root()),
                               PREFECT_HOME=str(tmp_path / "prefect"))
    _kill_during_training(command, code_root(), environment, workspace)
    killed_run_id = json.loads((workspace / INTERRUPTED_RUN_FILE).read_text())["run_id"]

    _run_to_completion(command, code_root(), environment)
    _assert_one_run_with_every_epoch_once(workspace / "mlflow.db", killed_run_id)
    _assert_headline_metrics_files(workspace)
    assert not (workspace / INTERRUPTED_RUN_FILE).exists() and not (workspace / BACKUP_DIR).exists()


@pytest.mark.reliability
def test_a_killed_dvc_repro_continues_in_the_same_run(tmp_path: Path) -> None:
    project = clone_project(tmp_path / "project", tiny_params_tree(OVERRIDES))
    command = [sys.executable, "-m", "dvc", "repro"]
    environment = _environment(PYTHONPATH="")
    _kill_during_training(command, project, environment, project)
    killed_run_id = json.loads((project / INTERRUPTED_RUN_FILE).read_text())["run_id"]

    _run_to_completion(command, project, environment)
    run = _assert_one_run_with_every_epoch_once(project / "mlflow.db", killed_run_id)
    assert run.data.tags["cassava.git_dirty"] == "false"  # a fresh clone: its first run is clean
    _assert_headline_metrics_files(project)
    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show"], cwd=project, env=environment,
                           capture_output=True, text=True, check=True).stdout
    assert "test_macro_f1" in shown and max(len(line) for line in shown.splitlines()) <= 120
