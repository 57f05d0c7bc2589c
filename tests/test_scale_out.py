"""Past one machine, as far as one machine can test it: tracking against a real `mlflow server` (PostgreSQL
backend store, artifacts served by the server) over HTTP, and data and models pushed to and pulled from the
default DVC remote.

PostgreSQL comes from Debian's packages (`.ci/run` installs them when missing). It runs as a child of the test,
from a throw-away data directory, on 127.0.0.1 and a free port, as the `postgres` user when the tests run as
root (PostgreSQL refuses to run as root). Every server started here gets a parent-death signal, so none
outlives the test even if the test process is killed.
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from tasks.params import code_root
from tests.conftest import tiny_params_tree

PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"PostgreSQL's {name} is missing: install Debian's `postgresql` package (.ci/run does)")
    return found


def _as_user(user: pwd.struct_passwd | None, death_signal: int) -> Callable[[], None]:
    """preexec_fn: drop to `user` (if given), then ask for `death_signal` when the test process dies (the
    kernel clears a parent-death signal on a change of user, so it is set after)."""
    def preexec() -> None:
        if user is not None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, death_signal)

    return preexec


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"nothing listening on 127.0.0.1:{port} after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen, stop_signal: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(stop_signal)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1:<free port> with an empty database `mlflow`; its URI."""
    user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="cassava-pg-"))  # not under pytest's root-only tmp: postgres must reach it
    data, log = folder / "data", folder / "postgres.log"
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)
    port = _free_port()
    preexec = _as_user(user, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown (ends the connections)
    subprocess.run([_postgres_bin("initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
                   preexec_fn=preexec, check=True, capture_output=True, cwd=folder)
    with log.open("w") as output:
        server = subprocess.Popen(
            [_postgres_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(folder)],
            preexec_fn=preexec, stdout=output, stderr=subprocess.STDOUT, cwd=folder)
    try:
        _wait_for_port(port, server, log)
        import psycopg2

        deadline = time.monotonic() + 120
        while True:  # listening is not yet accepting: it may still be starting up
            try:
                connection = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        # The driver named: SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3; the lock has psycopg2.
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        _stop(server, signal.SIGINT)
        shutil.rmtree(folder, ignore_errors=True)
    assert server.returncode is not None


@pytest.fixture
def mlflow_server(postgres: str, tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1:<free port>, runs in PostgreSQL, artifacts served from a local folder."""
    port = _free_port()
    log = tmp_path / "mlflow-server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", postgres,
             "--artifacts-destination", str(tmp_path / "served-artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            preexec_fn=_as_user(None, signal.SIGTERM), stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        _wait_for_port(port, server, log, timeout_s=600)  # creates MLflow's schema in PostgreSQL first
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(server)
    assert server.returncode is not None


@pytest.mark.server
@pytest.mark.timeout(1500)  # MLflow's schema in PostgreSQL, then the whole pipeline: 8.5 min at load 10
def test_pipeline_tracks_into_a_postgresql_backed_mlflow_server(
    workspace: Path, postgres: str, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import numpy as np
    import psycopg2
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.train_pipeline import train_pipeline
    from tasks.layout import MODEL_DIR

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    (workspace / "mlflow.db").unlink()  # nothing may land in a local store
    with prefect_test_harness(server_startup_timeout=600):
        result = train_pipeline()
    assert result["tracking_uri"] == mlflow_server
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == result["metrics"]["test_accuracy"]
    assert {"train.best_epoch", "test_macro_f1"} <= set(run.data.metrics)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, not a local path
    assert "evaluation/metrics.json" in {item.path for item in client.list_artifacts(run.info.run_id, "evaluation")}

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")  # downloaded through the server
    probabilities = model.predict(np.load(workspace / MODEL_DIR / "input_example.npy"))
    assert np.allclose(np.asarray(probabilities).sum(axis=1), 1.0, atol=1e-4)

    with psycopg2.connect(postgres.replace("+psycopg2", "")) as connection, connection.cursor() as cursor:  # it is really in PostgreSQL
        cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cursor.fetchone() == ("FINISHED",)
    assert not (workspace / "mlflow.db").exists() and not (workspace / "mlartifacts").exists()


def _run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ""}
    for variable in ("CASSAVA_WORKSPACE", "MLFLOW_TRACKING_URI", "DVC_ROOT"):
        env.pop(variable, None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_default_dvc_remote_round_trip(tmp_path: Path) -> None:
    """The committed default remote (a folder next to the checkout): push, wipe cache and outputs, pull, and
    `dvc repro` has nothing to do."""
    project = tmp_path / "project"
    tracked = subprocess.run(["git", "ls-files"], cwd=code_root(), capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if (code_root() / name).is_file() and not name.startswith(("tests/", "bench/")):
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(code_root() / name, project / name)
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params_tree(), sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        _run(command, project)
    dvc = [sys.executable, "-m", "dvc"]

    _run([*dvc, "repro"], project)
    remote = tmp_path / "cassava-dvc-remote"  # the default: next to the checkout
    assert not remote.exists()
    _run([*dvc, "push"], project)
    assert len([path for path in remote.rglob("*") if path.is_file()]) > 10

    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    cached_outs = [next(iter(out)) if isinstance(out, dict) else out
                   for stage in stages.values() for kind in ("outs", "metrics", "plots")
                   for out in stage.get(kind, [])
                   if not (isinstance(out, dict) and next(iter(out.values())).get("cache") is False)]
    assert {"data/raw", "data/prepared", "models/model"} <= set(cached_outs)
    shutil.rmtree(project / ".dvc" / "cache")
    for out in cached_outs:
        path = project / out
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    assert not (project / "models" / "model").exists()

    pulled = _run([*dvc, "pull"], project)
    assert (project / "models" / "model" / "model.keras").exists(), pulled
    assert (project / "data" / "prepared" / "test_images.npy").exists()
    assert "Data and pipelines are up to date" in _run([*dvc, "repro"], project)
