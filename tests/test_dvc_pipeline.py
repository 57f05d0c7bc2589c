"""End to end with real DVC in a temporary git repository: repro, no-op repro, partial re-runs, experiments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import tiny_params_tree
from tests.helpers import clone_project

pytestmark = pytest.mark.slow  # real DVC in a temporary git repository, whole pipeline


def _run(command: list[str], cwd: Path) -> str:
    environment = {
        **os.environ,
        # Stage commands say `python`: make it this interpreter, as an activated venv would.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": "",
    }
    for variable in ("CASSAVA_WORKSPACE", "MLFLOW_TRACKING_URI", "DVC_ROOT"):
        environment.pop(variable, None)
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _dvc(*args: str, cwd: Path) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone-like copy of this project (tracked files only) with the tiny params, committed."""
    return clone_project(tmp_path_factory.mktemp("dvc") / "project", tiny_params_tree())


def _runs(project: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return MlflowClient().search_runs(
        [experiment.experiment_id for experiment in MlflowClient().search_experiments()], order_by=["start_time ASC"]
    )


def _lock_md5(project: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)


def test_repro_runs_everything_into_one_run_then_is_a_no_op(project: Path) -> None:
    output = _dvc("repro", cwd=project)
    for stage in ("acquire", "prepare", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in output
    (run,) = _runs(project)
    assert run.info.status == "FINISHED"
    assert run.data.tags["cassava.trigger"] == "dvc"
    assert run.data.tags["cassava.data_version"] == _lock_md5(project, "prepare", "data/prepared")
    assert run.data.tags["cassava.git_dirty"] == "false"  # a fresh clone's first run
    assert {"test_accuracy", "test_macro_f1", "train.best_epoch"} <= set(run.data.metrics)
    assert int(run.data.tags["cassava.data.images_kept"]) > 0
    assert (project / "mlartifacts").is_dir() and not (project / "mlruns").exists()

    again = _dvc("repro", cwd=project)
    assert "Running stage" not in again
    assert len(_runs(project)) == 1


def test_an_evaluation_param_reruns_only_evaluation_and_the_new_run_tells_the_whole_story(project: Path) -> None:
    (trained,) = _runs(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["top_k"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    output = _dvc("repro", cwd=project)
    assert "Running stage 'evaluate'" in output
    assert not any(f"Running stage '{stage}'" in output for stage in ("acquire", "prepare", "train"))
    latest = _runs(project)[-1]
    assert latest.info.run_id != trained.info.run_id
    assert latest.data.tags["cassava.train_run_id"] == trained.info.run_id
    assert latest.data.tags["cassava.carried_over_from"] == trained.info.run_id
    assert "test_top3_accuracy" in latest.data.metrics
    assert "Running stage 'register'" in output  # evaluate's new run is gated too, in that same run
    assert latest.data.tags["cassava.stage.register"] == "done" and "cassava.gate.decision" in latest.data.tags
    assert latest.data.metrics["train.best_epoch"] == trained.data.metrics["train.best_epoch"]
    history = MlflowClient().get_metric_history(latest.info.run_id, "val_loss")
    assert len(history) == trained.data.metrics["train.epochs_run"]
    artifacts = {item.path for item in MlflowClient().list_artifacts(latest.info.run_id, "data")}
    assert "data/data_report.json" in artifacts
    # The carried-over model is the trained one: same answers on the input example the training saved.
    example = np.load(project / "models" / "model" / "input_example.npy")
    carried = mlflow.pyfunc.load_model(f"runs:/{latest.info.run_id}/model").predict(example)
    trained_model = mlflow.pyfunc.load_model(f"runs:/{trained.info.run_id}/model").predict(example)
    assert carried.shape == (len(example), 5)
    assert np.array_equal(carried, trained_model)


def test_a_registry_param_reruns_only_register_and_the_new_run_holds_evaluation_and_gate(project: Path) -> None:
    evaluated = _runs(project)[-1]
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["registry"]["minimum"] = 1.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    output = _dvc("repro", cwd=project)
    assert "Running stage 'register'" in output
    assert not any(f"Running stage '{stage}'" in output for stage in ("acquire", "prepare", "train", "evaluate"))
    latest = _runs(project)[-1]
    assert latest.info.run_id != evaluated.info.run_id  # new params: a new run, the stages before carried over
    assert latest.data.tags["cassava.evaluate_run_id"] == evaluated.info.run_id
    macro_f1 = evaluated.data.metrics["test_macro_f1"]
    assert latest.data.metrics["test_macro_f1"] == macro_f1
    assert latest.data.metrics["test_top3_accuracy"] == evaluated.data.metrics["test_top3_accuracy"]
    assert latest.data.tags["cassava.gate.decision"] == "rejected"
    assert latest.data.tags["cassava.gate.reason"] == f"test_macro_f1 {macro_f1:.4f} is below the minimum 1.0000"
    registry = json.loads((project / "reports" / "registry.json").read_text())
    assert (registry["decision"], registry["run_id"]) == ("rejected", latest.info.run_id)
    assert f"rejected: test_macro_f1 {macro_f1:.4f} is below the minimum 1.0000" in (
        project / "reports" / "report.html").read_text()


def test_plots_render(project: Path) -> None:
    _dvc("plots", "show", "-o", "plots_html", cwd=project)
    page = (project / "plots_html" / "index.html").read_text()
    assert "learning curves (loss)" in page and "test confusion matrix" in page


def test_exp_run_with_set_param_is_listed_and_tracked(project: Path) -> None:
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline results"], project)
    # --temp runs in a throw-away copy under .dvc/tmp/exps, as queued experiments do: the run must still land
    # in the project's own store (DVC_ROOT), with its artifacts next to it.
    _dvc("exp", "run", "--temp", "-S", "train.learning_rate=0.01", "-n", "lr-0.01", cwd=project)
    shown = json.loads(_dvc("exp", "show", "--json", cwd=project))
    names = [exp.get("name") for baseline in shown for exp in (baseline.get("experiments") or [])
             for exp in [exp] + (exp.get("revs") or [])]
    assert "lr-0.01" in names
    latest = _runs(project)[-1]
    assert latest.data.params["train.learning_rate"] == "0.01"
    assert latest.data.tags["cassava.dvc_exp_name"] == "lr-0.01"
    assert latest.info.run_name.startswith("cnn=8-16 lr=0.01 ep=3 ")
    assert latest.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    assert {item.path for item in MlflowClient().list_artifacts(latest.info.run_id, "evaluation")} >= {
        "evaluation/metrics.json"}
