"""The Prefect API every entry uses, the local platform and its schedule: real servers, real processes, real kills.

The server and reliability tests start real Prefect (and MLflow) servers on free 127.0.0.1 ports, with a fresh
PREFECT_HOME, and check afterwards, by process group, that nothing they started is left.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import yaml

from flows.child_processes import free_port, group_alive
from flows.prefect_api import PLATFORM_RECORD, PrefectApiError, running_api
from tasks.names import stage_done_tag
from tasks.params import ParamsError, code_root, load_params

RUN_LIMIT_SECONDS = 600  # a tiny pipeline on a loaded 2-core machine: minutes, not seconds


# ------------------------------------------------------------------------------------------ schedule params
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule.cron=61 * * * *", "schedule.cron = '61 * * * *': not a cron expression"),
        ("schedule.interval_seconds=60", "schedule.cron and schedule.interval_seconds are both set"),
        ("schedule.interval_seconds=-5", "schedule.interval_seconds = -5: input should be greater than 0"),
        ("schedule.timezone=Mars/Olympus", "schedule.timezone = 'Mars/Olympus': not a known time zone"),
        ("schedule.overrides=[train.epochs=0]", "schedule.overrides: train.epochs = 0"),
        ("schedule.overrides=[train.optimiser=sgd]", "schedule.overrides: train.optimiser: unknown key"),
        ("schedule.overrides=[schedule.cron=x]", "changes the schedule itself"),
        ("schedule.every=5", "schedule.every: unknown key"),
    ],
)
def test_bad_schedules_are_rejected_by_name(override: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("*", r"\*")):
        load_params(code_root() / "params.yaml", [override])


def test_schedule_becomes_prefect_schedules_with_the_overrides() -> None:
    from flows.local_platform import prefect_schedules

    params = load_params(code_root() / "params.yaml", ["schedule.cron=30 2 * * 1-5", "schedule.timezone=Europe/Paris",
                                                       "schedule.overrides=[train.epochs=30]"])
    (cron,) = prefect_schedules(params.schedule)
    assert (cron.cron, cron.timezone, cron.parameters) == ("30 2 * * 1-5", "Europe/Paris", {"overrides": ["train.epochs=30"]})
    interval = load_params(code_root() / "params.yaml", ["schedule.cron=null", "schedule.interval_seconds=90"])
    (every,) = prefect_schedules(interval.schedule)
    assert every.interval.total_seconds() == 90 and every.parameters == {"overrides": []}
    assert prefect_schedules(load_params(code_root() / "params.yaml", ["schedule.cron=null"]).schedule) == []


def test_prefect_yaml_is_a_valid_deployment_of_the_flow_with_the_params_schedule() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates the file with
    from prefect.flows import load_flow_from_entrypoint

    config = PrefectYamlModel.model_validate(yaml.safe_load((code_root() / "prefect.yaml").read_text()))
    (deployment,) = config.deployments
    assert load_flow_from_entrypoint(str(code_root() / deployment.entrypoint)).name == "cassava-train-pipeline"
    assert deployment.work_pool.name == "cassava-process"
    schedule = load_params(code_root() / "params.yaml").schedule
    (configured,) = deployment.schedules
    assert (configured.cron, configured.timezone, configured.parameters) == (
        schedule.cron, schedule.timezone, {"overrides": schedule.overrides})


# ------------------------------------------------------------------------------------- which Prefect API
@pytest.fixture
def health_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that answers Prefect's health check; yields its API URL."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()


def test_an_unanswering_prefect_api_url_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    with pytest.raises(PrefectApiError, match=f"PREFECT_API_URL={url} does not answer"):
        running_api()


def test_a_running_server_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch, health_server: str) -> None:
    monkeypatch.setenv("PREFECT_API_URL", health_server)
    api = running_api()
    assert (api.url, api.source) == (health_server, "PREFECT_API_URL")
    assert api.describe() == f"Prefect: using the server at {health_server} (from PREFECT_API_URL)"


def test_the_platform_record_is_used_only_while_the_platform_lives(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, health_server: str
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    record = workspace / PLATFORM_RECORD
    record.parent.mkdir(parents=True)
    assert running_api() is None  # no record: a private server will be started
    record.write_text(json.dumps({"platform_pid": _dead_pid(), "prefect_api_url": health_server}))
    assert running_api() is None  # recorded, but its platform died
    record.write_text(json.dumps({"platform_pid": os.getpid(), "prefect_api_url": health_server}))
    api = running_api()
    assert (api.url, api.source) == (health_server, "platform")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------------ real runs and kills
def _entry_env(workspace: Path, prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(CASSAVA_WORKSPACE=str(workspace), PREFECT_HOME=str(prefect_home), PYTHONUNBUFFERED="1", **extra)
    return env


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(["nice", "-n", "5", sys.executable, *command], cwd=code_root(), env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait_for_line(log: Path, needle: str, process: subprocess.Popen[bytes], limit: float = RUN_LIMIT_SECONDS) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        assert process.poll() is None, f"exited {process.returncode} before {needle!r}: {log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {needle!r} within {limit:.0f} s: {log.read_text()[-3000:]}")


def _process_group(line: str) -> int:
    return int(line.split("process group ")[1].split(";")[0].split(")")[0])


def _wait_gone(pids: set[int], groups: set[int], limit: float = 60) -> list[str]:
    """Wait until none of these processes and groups exist; what is left after `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        left = [f"pid {pid}" for pid in pids if _running(pid)] + [f"group {g}" for g in groups if group_alive(g)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.reliability
@pytest.mark.server
def test_a_sigkilled_run_leaves_no_prefect_server(workspace: Path, tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    run = _start(["-m", "flows.train_pipeline"], _entry_env(workspace, tmp_path / "prefect-home"), log)
    try:
        line = _wait_for_line(log, "Prefect: started a private server at", run)
        group = _process_group(line)
        server_pids = {process.pid for process in psutil.process_iter() if _group_of(process) == group}
        assert len(server_pids) >= 2  # the guard and the server
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert _wait_gone(server_pids, {group}, limit=30) == []
    finally:
        if run.poll() is None:
            run.kill()


def _group_of(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


@pytest.mark.reliability
@pytest.mark.server
def test_three_runs_started_at_once_all_finish(tmp_path: Path) -> None:
    """A fresh PREFECT_HOME shared by three runs started together, each with a fresh workspace and store."""
    from tests.conftest import tiny_params_tree

    prefect_home = tmp_path / "prefect-home"  # fresh: the migrated database template is made by one of them
    runs = []
    for index in range(3):
        workspace = tmp_path / f"workspace-{index}"
        workspace.mkdir()
        (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_params_tree([f"data.seed={index + 1}"])))
        log = tmp_path / f"run-{index}.log"
        runs.append((workspace, log, _start(["-m", "flows.train_pipeline"], _entry_env(workspace, prefect_home), log)))
    try:
        for workspace, log, run in runs:
            run.wait(RUN_LIMIT_SECONDS)
            output = log.read_text(errors="replace")
            assert run.returncode == 0, output[-3000:]
            assert "Prefect: started a private server at" in output and "MLflow run:" in output
            assert (workspace / "reports" / "metrics.json").exists()
        started = [line for _, log, _ in runs for line in log.read_text().splitlines() if "private server at" in line]
        assert len({_process_group(line) for line in started}) == 3  # each its own server
    finally:
        for _, _, run in runs:
            if run.poll() is None:
                run.kill()


@pytest.mark.server
def test_platform_runs_the_schedule_and_stops_everything(workspace: Path, tmp_path: Path) -> None:
    """Serve on an interval that fires within seconds; one scheduled run retrains, is tagged, passes the gate."""
    from mlflow import MlflowClient

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["schedule"] = {"cron": None, "interval_seconds": 15, "timezone": "UTC", "overrides": ["train.epochs=2"]}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = tmp_path / "platform.log"
    platform = _start(["-m", "flows.local_platform"], _entry_env(workspace, tmp_path / "prefect-home"), log)
    seen: set[int] = set()
    try:
        _wait_for_line(log, "Ctrl-C stops everything", platform)
        record = json.loads((workspace / PLATFORM_RECORD).read_text())
        assert record["platform_pid"] == platform.pid
        client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
        scheduled = None
        deadline = time.monotonic() + RUN_LIMIT_SECONDS
        while scheduled is None and time.monotonic() < deadline:
            seen |= _descendants(platform.pid)
            assert platform.poll() is None, log.read_text()[-3000:]
            experiment = client.get_experiment_by_name("cassava-synthetic")
            runs = client.search_runs([experiment.experiment_id], "tags.`cassava.trigger` = 'schedule'") if experiment else []
            # Each stage ends the run FINISHED and the next reopens it: wait for the last stage's.
            scheduled = next((run for run in runs if run.info.status == "FINISHED"
                              and run.data.tags.get(stage_done_tag("register")) == "done"), None)
            time.sleep(3)
        assert scheduled is not None, f"no scheduled run finished: {log.read_text()[-3000:]}"
        tags = scheduled.data.tags
        assert tags["cassava.prefect_deployment_id"] and tags["cassava.prefect_flow_run_id"]
        assert scheduled.data.params["train.epochs"] == "2"  # the schedule's overrides
        assert tags["cassava.data_version"].endswith(".dir")
        assert tags["cassava.gate.decision"] in ("registered", "rejected")  # it went through the registry gate
        seen |= _descendants(platform.pid)
        platform.send_signal(signal.SIGTERM)
        platform.wait(120)
        assert "platform: stopped" in log.read_text()
        assert _wait_gone(seen | {platform.pid}, {record["prefect_group"], record["mlflow_group"]}) == []
        assert not (workspace / PLATFORM_RECORD).exists()
    finally:
        if platform.poll() is None:
            platform.kill()


@pytest.mark.reliability
@pytest.mark.server
def test_a_sigkilled_platform_leaves_no_process(workspace: Path, tmp_path: Path) -> None:
    """kill -9 of the platform while a scheduled run trains: servers and the flow-run process all end."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["schedule"] = {"cron": None, "interval_seconds": 10, "timezone": "UTC", "overrides": []}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = tmp_path / "platform.log"
    platform = _start(["-m", "flows.local_platform"], _entry_env(workspace, tmp_path / "prefect-home"), log)
    try:
        _wait_for_line(log, "Ctrl-C stops everything", platform)
        record = json.loads((workspace / PLATFORM_RECORD).read_text())
        deadline = time.monotonic() + RUN_LIMIT_SECONDS
        while not any("spawn_main" in " ".join(_cmdline(pid)) for pid in _descendants(platform.pid)):
            assert time.monotonic() < deadline and platform.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        time.sleep(5)  # let the flow run get going
        seen = _descendants(platform.pid)
        platform.send_signal(signal.SIGKILL)
        platform.wait()
        assert _wait_gone(seen, {record["prefect_group"], record["mlflow_group"]}, limit=90) == []
    finally:
        if platform.poll() is None:
            platform.kill()


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _descendants(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()

