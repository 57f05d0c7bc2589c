"""What happens when a stage or a flow run fails: only transient failures are retried; a failed or crashed flow
run leaves no MLflow run RUNNING or FINISHED (the slow end-to-end case is in test_train_pipeline.py)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from mlflow import MlflowClient


def test_failure_marks_runs_left_running_or_finished_and_keeps_a_stage_s_reason(workspace: Path) -> None:
    from tests.helpers import open_store
    from tasks.tracking import fail_runs_of_flow_run

    experiment_id = open_store()
    client = MlflowClient()
    runs = {}
    for status in ("RUNNING", "FINISHED", "FAILED", "RUNNING"):
        run = client.create_run(experiment_id, tags={"cassava.prefect_flow_run_id": "flow-run-1" if len(runs) < 3 else "other"})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        runs[run.info.run_id] = status
    first, finished, failed, other = runs
    client.set_tag(failed, "cassava.failure", "train: the stage's own reason")

    assert sorted(fail_runs_of_flow_run("flow-run-1", "crashed: SIGKILL")) == sorted([first, finished])
    assert [client.get_run(run).info.status for run in runs] == ["FAILED", "FAILED", "FAILED", "RUNNING"]
    assert client.get_run(first).data.tags["cassava.failure"] == "crashed: SIGKILL"
    assert client.get_run(failed).data.tags["cassava.failure"] == "train: the stage's own reason"


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TimeoutError("read timed out"), True),
        (ConnectionResetError("peer reset"), True),
        (OSError(errno.EIO, "input/output error"), True),
        (OSError(errno.ESTALE, "stale NFS handle"), True),
        (FileNotFoundError(errno.ENOENT, "no such file"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (OSError(errno.ENOSPC, "disk full"), False),
        (ValueError("bad value"), False),
    ],
)
def test_only_transient_failures_are_retried(error: BaseException, transient: bool) -> None:
    from flows.train_pipeline import is_transient

    assert is_transient(error) is transient


def test_bad_data_params_and_tracking_errors_are_never_retried() -> None:
    import requests
    from mlflow.exceptions import MlflowException

    from flows.train_pipeline import is_transient
    from tasks.errors import DataError, TrackingStoreError
    from tasks.params import ParamsError

    for error in (DataError("x"), ParamsError("y"), TrackingStoreError("z"), MlflowException("store unreachable"),
                  requests.exceptions.ConnectionError("refused"), KeyboardInterrupt()):
        assert not is_transient(error), error
