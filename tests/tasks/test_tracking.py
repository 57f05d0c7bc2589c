"""tracking.stage_run against a real SQLite MLflow store: resume, carry-over, and never a run left RUNNING."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.params import Params, flatten_params
from tasks.tracking import (
    StageRecord,
    configure_tracking,
    describe_run,
    ensure_experiment,
    experiment_name,
    read_pointer,
    reap_orphaned_runs,
    stage_run,
)


def _record(workspace: Path, stage: str, value: float) -> StageRecord:
    report = workspace / f"{stage}.txt"
    report.write_text(f"{stage} report\n")
    return StageRecord(stage, metrics={f"{stage}.value": value}, artifacts=[(report.name, stage)])


def test_stages_of_one_execution_share_one_run(workspace: Path, tiny_params: Params) -> None:
    with stage_run("acquire", tiny_params, None, workspace / "a.json") as first:
        first.complete(_record(workspace, "acquire", 1.0))
    with stage_run("prepare", tiny_params, workspace / "a.json", workspace / "p.json") as second:
        second.complete(_record(workspace, "prepare", 2.0))
    assert second.run_id == first.run_id
    run = MlflowClient().get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"acquire.value": 1.0, "prepare.value": 2.0}
    assert run.data.params == flatten_params(tiny_params)
    assert run.data.tags["cassava.stage.acquire"] == run.data.tags["cassava.stage.prepare"] == "done"
    assert run.data.tags["cassava.trigger"] == "cli"
    assert "cassava.version.mlflow" in run.data.tags and "mlflow.source.git.commit" in run.data.tags
    run_id, records = read_pointer(workspace / "p.json")
    assert run_id == first.run_id and [record.stage for record in records] == ["acquire", "prepare"]


def test_rerunning_a_later_stage_carries_the_story_into_a_new_linked_run(workspace: Path, tiny_params: Params) -> None:
    with stage_run("acquire", tiny_params, None, workspace / "a.json") as first:
        first.complete(_record(workspace, "acquire", 1.0))
    with stage_run("prepare", tiny_params, workspace / "a.json", workspace / "p.json") as run:
        run.complete(_record(workspace, "prepare", 2.0))
    # As `dvc repro` after a prepare-only param change: acquire is skipped, prepare runs again.
    with stage_run("prepare", tiny_params, workspace / "a.json", workspace / "p.json") as rerun:
        rerun.complete(_record(workspace, "prepare", 3.0))
    assert rerun.run_id != first.run_id
    carried = MlflowClient().get_run(rerun.run_id)
    assert carried.data.metrics == {"acquire.value": 1.0, "prepare.value": 3.0}
    assert carried.data.tags["cassava.carried_over_from"] == first.run_id
    assert carried.data.tags["cassava.acquire_run_id"] == first.run_id
    artifacts = {item.path for item in MlflowClient().list_artifacts(rerun.run_id, "acquire")}
    assert artifacts == {"acquire/acquire.txt"}


def test_changed_params_start_a_new_run_instead_of_resuming(workspace: Path, tiny_params: Params) -> None:
    with stage_run("acquire", tiny_params, None, workspace / "a.json") as first:
        first.complete(_record(workspace, "acquire", 1.0))
    changed = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"learning_rate": 0.5})})
    with stage_run("prepare", changed, workspace / "a.json", workspace / "p.json") as second:
        second.complete(_record(workspace, "prepare", 2.0))
    assert second.run_id != first.run_id
    assert MlflowClient().get_run(second.run_id).data.params["train.learning_rate"] == "0.5"


def test_a_failing_stage_ends_failed_with_the_reason(workspace: Path, tiny_params: Params) -> None:
    with pytest.raises(ZeroDivisionError):
        with stage_run("train", tiny_params, None, workspace / "t.json") as run:
            1 / 0
    failed = MlflowClient().get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["cassava.failure"] == "train: ZeroDivisionError: division by zero"
    assert not (workspace / "t.json").exists()


def test_an_interrupted_stage_ends_killed(workspace: Path, tiny_params: Params) -> None:
    with pytest.raises(KeyboardInterrupt):
        with stage_run("train", tiny_params, None, workspace / "t.json") as run:
            raise KeyboardInterrupt
    assert MlflowClient().get_run(run.run_id).info.status == "KILLED"


def _stage_in_subprocess(workspace: Path, ending: str) -> tuple[int, str]:
    """Run a stage in another process that ends with `ending` inside the stage; (exit code, its run id)."""
    script = (
        "import os, pathlib, signal\n"
        "from tasks.params import load_params\n"
        "from tasks.tracking import stage_run\n"
        "with stage_run('train', load_params(), None, pathlib.Path('t.json')) as run:\n"
        "    print(run.run_id, flush=True)\n"
        f"    {ending}\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=workspace,
                            env=_env_with_code_on_path())
    configure_tracking()
    return result.returncode, result.stdout.split()[0]


@pytest.mark.slow
def test_sigterm_ends_the_run_killed(workspace: Path) -> None:
    returncode, run_id = _stage_in_subprocess(workspace, "os.kill(os.getpid(), signal.SIGTERM)")
    assert returncode != 0
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED"
    assert "interrupted" in run.data.tags["cassava.failure"]


@pytest.mark.slow
def test_runs_of_dead_processes_are_reaped(workspace: Path, tiny_params: Params) -> None:
    _, run_id = _stage_in_subprocess(workspace, "os._exit(9)  # as SIGKILL: no cleanup at all")
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "RUNNING"
    assert reap_orphaned_runs(client, ensure_experiment(experiment_name(tiny_params))) == [run_id]
    assert client.get_run(run_id).info.status == "KILLED"


def test_run_names_say_what_differs(tiny_params: Params) -> None:
    assert describe_run(tiny_params, "0123456789abcdef.dir") == "cnn8-16-adam-lr0.002-01234567"


def _env_with_code_on_path() -> dict[str, str]:
    import os

    from tasks.params import code_root

    return {**os.environ, "PYTHONPATH": str(code_root())}
