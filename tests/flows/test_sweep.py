"""Sweeps end to end: real Prefect (temporary server), a real 2-worker Dask LocalCluster, real MLflow SQLite store,
a process per point. Plus the command line's bad input, concurrent writers on one SQLite store, and a SIGKILLed
sweep leaving nothing behind."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from tasks.params import code_root

SWEPT = ["train.learning_rate=0.001,0.01", "model.dropout=0,0.3"]
# Fixed for every point: the failure analysis at its smallest (it is evaluate's own tests' subject, not this one's).
LIGHT_EVALUATION = ["evaluate.rotation_angles=[0]", "evaluate.blur_sigmas=[0]", "evaluate.saliency_per_class=0",
                    "evaluate.gallery_size=0"]


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):  # its first start took 180 s at load 9
        yield


def _leftovers() -> list[str]:
    """Dask worker processes or point processes still running under this test process."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in command or "tasks.sweep_runs" in command:
            found.append(f"{process.pid}: {command[:120]}")
    return found


def test_bad_point_stops_the_command_line_before_anything_starts(workspace: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "flows.sweep", "-S", "train.learning_rate=0.01,-1", "-S", "model.dropout=0,0.3"],
        cwd=code_root(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: sweep point 3 (lr=-1 dropout=0): invalid params: "
                                     "train.learning_rate = -1: input should be greater than 0")
    assert time.monotonic() - started < 60
    assert not (workspace / "data").exists() and not (workspace / "sweeps").exists()


@pytest.mark.server
@pytest.mark.timeout(1500)  # 4 trainings on 2 cores shared with other jobs: 5 to 8 minutes at load 8
def test_four_point_sweep_on_two_local_workers(workspace: Path, prefect_server) -> None:
    from flows.sweep import run_sweep

    result = run_sweep([*SWEPT, *LIGHT_EVALUATION, "registry.minimum=0"], workers=2, keep_workspaces=True)
    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "sweep lr×dropout (4)"
    assert parent.data.tags["cassava.data_version"] and "data/data_report.json" in {
        item.path for item in client.list_artifacts(parent.info.run_id, "data")}

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 and {child.info.status for child in children} == {"FINISHED"}
    by_id = {child.info.run_id: child for child in children}
    points = {(float(child.data.params["train.learning_rate"]), float(child.data.params["model.dropout"]))
              for child in children}
    assert points == {(0.001, 0.0), (0.001, 0.3), (0.01, 0.0), (0.01, 0.3)}
    assert all(child.data.tags["cassava.data_version"] == parent.data.tags["cassava.data_version"] for child in children)
    assert all(child.data.tags["cassava.stage.evaluate"] == "done" for child in children)

    summary = Path(client.download_artifacts(parent.info.run_id, "sweep/summary.csv"))
    rows = list(csv.DictReader(summary.open()))
    assert len(rows) == 4 and {row["run_id"] for row in rows} == set(by_id)
    for row in rows:
        child = by_id[row["run_id"]]
        assert float(row["train.learning_rate"]) == float(child.data.params["train.learning_rate"])
        assert float(row["model.dropout"]) == float(child.data.params["model.dropout"])
        for metric in ("test_macro_f1", "test_accuracy", "train.best_val_accuracy"):
            assert float(row[metric]) == child.data.metrics[metric]
    assert {item.path for item in client.list_artifacts(parent.info.run_id, "sweep")} == {
        "sweep/summary.csv", "sweep/summary.md", "sweep/spec.yaml", "sweep/metric_vs_params.png"}

    ordered = sorted(children, key=lambda child: int(child.data.tags["cassava.sweep.point"]))
    best = max(ordered, key=lambda child: child.data.metrics["test_macro_f1"])  # first of equals, as the sweep
    assert parent.data.tags["cassava.sweep.best_run_id"] == best.info.run_id == result["best_run_id"]
    assert parent.data.metrics["best_test_macro_f1"] == best.data.metrics["test_macro_f1"]

    # Only the parent went through the gate, for the best child: one version, the champion.
    versions = client.search_model_versions("name = 'cassava-classifier'")
    assert [version.run_id for version in versions] == [best.info.run_id]
    assert client.get_registered_model("cassava-classifier").aliases == {"champion": versions[0].version}
    assert [child.data.tags.get("cassava.gate.decision") for child in ordered].count("registered") == 1

    logs = "".join(path.read_text() for path in (workspace / "sweeps").glob("*/point-*/point.log"))
    assert logs.count("evaluate: test accuracy") == 4 and "database is locked" not in logs
    assert sqlite3.connect(workspace / "mlflow.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert not client.search_runs([parent.info.experiment_id], filter_string="attributes.status = 'RUNNING'")
    deadline = time.monotonic() + 60  # the cluster is closed when the flow ends; its processes exit at once
    while _leftovers() and time.monotonic() < deadline:
        time.sleep(1)
    assert _leftovers() == []


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mlflow import MlflowClient
    client = MlflowClient(sys.argv[1])
    run_id = client.create_run(sys.argv[2], tags={"mlflow.parentRunId": sys.argv[3]}).info.run_id
    Path(sys.argv[4]).write_text(run_id)
    while not Path(sys.argv[5]).exists():  # start together
        time.sleep(0.01)
    for step in range(150):
        client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
        client.set_tag(run_id, f"tag{step % 10}", str(step))
        if step % 30 == 0:
            client.search_runs([sys.argv[2]], max_results=5)  # a reader that then writes
    client.set_terminated(run_id, "FINISHED")
""")


@pytest.mark.reliability
def test_four_concurrent_children_never_lock_the_store(workspace: Path, tmp_path: Path) -> None:
    from tasks.tracking import allow_concurrent_writers, configure_tracking, ensure_experiment

    uri = configure_tracking()
    experiment_id = ensure_experiment("cassava-concurrency")
    allow_concurrent_writers(uri)
    parent = MlflowClient().create_run(experiment_id).info.run_id
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, uri, experiment_id, parent, str(tmp_path / f"id{n}"),
                                 str(go)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for n in range(4)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"id{n}").exists() for n in range(4)) and time.monotonic() < deadline:
        time.sleep(0.1)
    go.touch()
    outputs = [writer.communicate(timeout=300)[0] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0, 0, 0], outputs
    assert not any("database is locked" in output for output in outputs)
    client = MlflowClient()
    for n in range(4):
        run = client.get_run((tmp_path / f"id{n}").read_text())
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
        assert [point.step for point in client.get_metric_history(run.info.run_id, "loss")] == list(range(150))
        assert len([key for key in run.data.tags if key.startswith("tag")]) == 10


@pytest.mark.server
@pytest.mark.reliability
def test_killed_sweep_leaves_no_process_and_no_running_child(workspace: Path, prefect_server) -> None:
    from prefect.settings import PREFECT_API_URL

    from tasks.tracking import reap_orphaned_runs

    env = dict(os.environ, CASSAVA_WORKSPACE=str(workspace), PREFECT_API_URL=PREFECT_API_URL.value(),
               PYTHONPATH=str(code_root()))
    env.pop("MLFLOW_TRACKING_URI", None)
    # Epochs of the tiny set take tens of milliseconds: the most the schema allows, so that neither point can finish its
    # training before the other has started and the sweep is killed.
    command = [sys.executable, "-m", "flows.sweep", *(arg for axis in SWEPT for arg in ("-S", axis)),
               "-S", "train.epochs=1000", "-S", "train.early_stopping.enabled=false", "--workers", "2"]
    with (workspace / "sweep.log").open("w") as log:
        sweep = subprocess.Popen(command, cwd=workspace, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
        deadline = time.monotonic() + 400  # load varies: generous, bounded
        children = []
        while time.monotonic() < deadline and sweep.poll() is None:
            experiment = client.get_experiment_by_name("cassava-synthetic")
            if experiment:
                children = client.search_runs([experiment.experiment_id],
                                              filter_string="tags.`cassava.sweep.role` = 'child' and "
                                                            "tags.`cassava.stage` = 'train'")
            if len(children) == 2:
                break
            time.sleep(2)
        assert len(children) == 2, (workspace / "sweep.log").read_text()[-3000:]
        descendants = psutil.Process(sweep.pid).children(recursive=True)
        assert sum("tasks.sweep_runs" in " ".join(process.cmdline()) for process in descendants) == 2
    finally:
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
    gone, alive = psutil.wait_procs(descendants, timeout=120)
    assert alive == [], [" ".join(process.cmdline())[:120] for process in alive]

    for child in children:
        run = client.get_run(child.info.run_id)
        assert run.info.status == "KILLED" and "interrupted" in run.data.tags["cassava.failure"]
    parent_id = children[0].data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "RUNNING"  # its process died without a word ...
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workspace / 'mlflow.db'}"
    assert parent_id in reap_orphaned_runs(client, children[0].info.experiment_id)  # ... and the next run reaps it
    assert client.get_run(parent_id).info.status == "KILLED"
