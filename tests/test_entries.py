"""Every entry ends an expected failure with one line on stderr and exit status 2, before anything slow:
`dev.py run`, `python -m flows.train_pipeline`, `python -m flows.predict`, `python -m tasks.cli <stage>`,
`python -m tasks.predict`, and a DVC stage. Inside a Prefect flow too, without Prefect's tracebacks or retries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.params import code_root
from tests.conftest import tiny_params_tree
from tests.tasks.test_params import run_entry_and_list_heavy_modules
from tests.tasks.test_preflight import free_port


def _environment(workspace: Path | None = None, **extra: str) -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": str(code_root())}
    for variable in ("CASSAVA_WORKSPACE", "MLFLOW_TRACKING_URI", "DVC_ROOT", "CASSAVA_TRACEBACK"):
        environment.pop(variable, None)
    if workspace is not None:
        environment["CASSAVA_WORKSPACE"] = str(workspace)
    environment.update(extra)
    return environment


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def params_workspace(tmp_path: Path) -> Path:
    """A workspace holding only the tiny params.yaml (no data, no store): nothing slow can start from it."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_tree(), sort_keys=False))
    return tmp_path


@pytest.mark.parametrize(
    ("module", "arguments", "expected"),
    [
        ("flows.train_pipeline", ["-S", "train.seed=-1"], "error: invalid params: train.seed = -1"),
        ("flows.train_pipeline", ["-S", "data.source=folder", "-S", "data.root=no/such/photos"],
         "error: data.root = 'no/such/photos': no such folder"),
        ("flows.predict", ["no/such/folder"], "error: no/such/folder is not a folder"),
        ("flows.lessons_study", ["-S", "study.seeds=[1, 1]"],
         "error: invalid params: study.seeds = [1, 1]: each seed once"),
        ("tasks.cli", ["train"], "error: train: data/prepared is missing: run the prepare stage first"),
        ("tasks.predict", ["no/such/folder"], "error: no/such/folder is not a folder"),
        ("tasks.cli", ["train", "--epochs", "3"],
         "error: No such option: --epochs; see python -m tasks.cli train --help"),
        ("tasks.predict", ["photos", "--batch-size", "0"], "error: Invalid value for '--batch-size': Input should be"),
    ],
)
def test_entries_fail_in_one_line_before_importing_prefect_tensorflow_or_mlflow(
        params_workspace: Path, monkeypatch: pytest.MonkeyPatch, module: str, arguments: list[str],
        expected: str) -> None:
    monkeypatch.setenv("CASSAVA_WORKSPACE", str(params_workspace))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_entry_and_list_heavy_modules(module, *arguments)
    assert _one_error_line(result).startswith(expected)
    assert "HEAVY []" in result.stdout


def test_dev_py_run_validates_params_first(params_workspace: Path) -> None:
    command = [sys.executable, str(code_root() / "dev.py"), "run", "-S", "registry.metric=bogus"]
    result = subprocess.run(command, env=_environment(params_workspace), capture_output=True, text=True, timeout=120)
    assert _one_error_line(result).startswith("error: invalid params: registry.metric = 'bogus'")


def test_the_traceback_variable_adds_the_traceback(params_workspace: Path) -> None:
    command = [sys.executable, "-m", "tasks.cli", "evaluate"]
    environment = _environment(params_workspace, CASSAVA_TRACEBACK="1")
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "tasks.errors.MissingInput: evaluate: data/prepared is missing" in result.stderr
    assert result.stderr.endswith("error: evaluate: data/prepared is missing: run the prepare stage first "
                                  "(dvc repro, or python -m tasks.cli prepare)\n")


@pytest.mark.reliability
def test_an_unreachable_tracking_server_fails_the_flow_entry_within_seconds(params_workspace: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "flows.train_pipeline"], capture_output=True, text=True,
                            env=_environment(params_workspace, MLFLOW_TRACKING_URI=uri), timeout=120)
    assert time.monotonic() - started < 10
    assert _one_error_line(result).startswith(f"error: MLFLOW_TRACKING_URI = {uri}: no MLflow server answers")
    assert not (params_workspace / "data").exists()


@pytest.mark.reliability
def test_a_data_error_inside_the_prefect_flow_is_one_line_and_never_retried(workspace: Path,
                                                                              tmp_path: Path) -> None:
    # Four images per class, six needed to split: prepare (a task with retries) fails with a DataError.
    command = [sys.executable, "-m", "flows.train_pipeline", "-S", "data.synthetic.images_per_class=4"]
    environment = _environment(workspace, PREFECT_HOME=str(tmp_path / "prefect"),
                               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600")
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)

    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "\r" not in line and line.strip()]  # no tqdm bars
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "too few images to split in class(es) cbb (4)" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Finished in state Failed" not in result.stderr
    assert "Retry" not in result.stderr
    assert sum("prepare: starting" in line for line in lines) == 1  # started once: not retried
    assert len(lines) == len(set(lines)), "a line was logged twice"
    assert len(lines) < 20


@pytest.mark.slow
def test_a_dvc_stage_fails_in_one_line(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "tasks", "flows", "pyproject.toml"):
        source = code_root() / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, project / name)
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params_tree(["data.source=csv", "data.root=kaggle"])))
    (project / "kaggle").mkdir()
    environment = _environment(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH="")
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=project, env=environment, check=True, capture_output=True)

    result = subprocess.run([sys.executable, "-m", "dvc", "repro", "acquire"], cwd=project, env=environment,
                            capture_output=True, text=True, timeout=600)

    assert result.returncode != 0
    stage_errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert stage_errors == [f"error: data.root = {project / 'kaggle'}: the csv layout needs train.csv and "
                            "train_images/ (Kaggle 2020); for one sub-folder per class use data.source=folder"]
    assert "exited with 2" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
