"""The local platform in one command: a Prefect server, the MLflow UI, and the training flow served on a schedule.

    python -m flows.platform                                  # or: python3 dev.py platform
    python -m flows.platform --prefect-port 4200 --mlflow-port 5000

It starts (or reuses, when PREFECT_API_URL names a running one) a Prefect server with its UI, scheduler and
database under `<workspace>/.prefect/server`, starts `mlflow server` on the workspace's tracking store with
artifacts served, both on 127.0.0.1 (free ports unless given), records them in `<workspace>/.prefect/
platform.json` so every entry started meanwhile uses this Prefect server, and serves the training flow as the
deployment `cassava-train-pipeline/scheduled-retraining` with the schedule of params.yaml's `schedule:`
section (cron or interval, time zone, overrides). Ctrl-C or SIGTERM stops everything it started; so does
SIGKILL (the servers run under guards, the flow-run processes watch their parent: `flows.child_processes`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from flows.child_processes import free_port, start_guarded, stop_guarded
from flows.prefect_api import (
    PLATFORM_RECORD,
    PrefectApi,
    PrefectApiError,
    healthy,
    read_platform_record,
    running_api,
    start_server,
    use_api,
    wait_until_healthy,
)
from tasks.errors import run_command_line
from tasks.params import Params, RetrainScheduleParams, load_params, workspace_root

DEPLOYMENT_NAME = "scheduled-retraining"


def describe_schedule(schedule: RetrainScheduleParams) -> str:
    overrides = " ".join(schedule.overrides) or "none"
    if schedule.cron:
        when = f"cron '{schedule.cron}' ({schedule.timezone})"
    elif schedule.interval_seconds:
        when = f"every {schedule.interval_seconds:g} s"
    else:
        when = "no schedule (runs start from the UI or `prefect deployment run`)"
    return f"{when}; overrides: {overrides}"


def prefect_schedules(schedule: RetrainScheduleParams) -> list:
    """The schedule of params.yaml as Prefect schedules; each carries the overrides its runs use."""
    from prefect.schedules import Cron, Interval

    parameters = {"overrides": list(schedule.overrides)}
    if schedule.cron:
        return [Cron(schedule.cron, timezone=schedule.timezone, parameters=parameters)]
    if schedule.interval_seconds:
        return [Interval(datetime.timedelta(seconds=schedule.interval_seconds), timezone=schedule.timezone,
                         parameters=parameters)]
    return []


@contextlib.contextmanager
def platform_prefect(workspace: Path, port: int | None) -> Iterator[tuple[PrefectApi, int | None]]:
    """A running Prefect server named by PREFECT_API_URL, or one started here; yields (api, its process group)."""
    if os.environ.get("PREFECT_API_URL"):
        api = running_api()  # raises if it does not answer
        if api is not None:
            yield api, None
            return
    server = start_server(workspace / ".prefect" / "server", ui=True, port=port)
    try:
        yield PrefectApi(server.url, "platform", f"started here, process group {server.pgid}"), server.pgid
    finally:
        stop_guarded(server.guard)


@contextlib.contextmanager
def mlflow_ui(workspace: Path, port: int | None) -> Iterator[tuple[str, int | None]]:
    """An `mlflow server` over the tracking store (artifacts served); a remote tracking server is only named."""
    from tasks.tracking import default_tracking_uri

    store = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if store.startswith(("http://", "https://")):
        yield store, None
        return
    chosen = port or free_port()
    url = f"http://127.0.0.1:{chosen}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
               "--artifacts-destination", str(workspace / "mlartifacts"), "--host", "127.0.0.1",
               "--port", str(chosen), "--workers", "1"]
    log_file = workspace / ".prefect" / "mlflow-server.log"
    guard = start_guarded(command, dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"), log_file)
    try:
        if not wait_until_healthy(url, guard, name="MLflow"):
            raise PrefectApiError(f"the MLflow server did not start (log: {log_file})")
        yield url, guard.pid
    finally:
        stop_guarded(guard)


@contextlib.contextmanager
def platform_record(workspace: Path, facts: dict) -> Iterator[None]:
    """`<workspace>/.prefect/platform.json`: where entries find this platform's Prefect server while it runs."""
    path = workspace / PLATFORM_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(facts, indent=2) + "\n")
    temporary.replace(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def serve_training(params: Params) -> None:
    """Serve the training flow with the schedule; returns on Ctrl-C / SIGTERM."""
    from flows.train_pipeline import EXIT_WITH_PARENT_VARIABLE, train_pipeline

    os.environ[EXIT_WITH_PARENT_VARIABLE] = "1"  # flow-run processes end if this process is killed
    train_pipeline.serve(
        name=DEPLOYMENT_NAME,
        schedules=prefect_schedules(params.schedule),
        paused=False,
        limit=1,  # one retraining at a time: a run that outlasts its interval delays the next, never overlaps
        tags=["cassava", "scheduled-retraining"],
        description="Retrains on the current data version; the registry gate decides whether it becomes champion.",
        print_starting_message=False,
    )


def run_platform(params: Params, prefect_port: int | None, mlflow_port: int | None, say=typer.echo) -> None:
    workspace = workspace_root()
    record = read_platform_record(workspace)
    if record and _alive(record.get("platform_pid", -1)):
        raise PrefectApiError(f"a platform is already running here (pid {record['platform_pid']}): Prefect at "
                              f"{record['prefect_api_url']}, MLflow at {record['mlflow_url']}; stop it first")
    with contextlib.ExitStack() as stack:
        say("platform: starting the Prefect server and the MLflow UI (the first start creates their databases)")
        api, prefect_group = stack.enter_context(platform_prefect(workspace, prefect_port))
        mlflow_url, mlflow_group = stack.enter_context(mlflow_ui(workspace, mlflow_port))
        facts = {"platform_pid": os.getpid(), "prefect_api_url": api.url, "prefect_group": prefect_group,
                 "mlflow_url": mlflow_url, "mlflow_group": mlflow_group}
        stack.enter_context(platform_record(workspace, facts))
        stack.enter_context(use_api(api.url))
        say(api.describe())
        say("\n".join([
            f"Prefect UI:  {api.url.removesuffix('/api')}",
            f"MLflow UI:   {mlflow_url}",
            f"deployment:  cassava-train-pipeline/{DEPLOYMENT_NAME}: {describe_schedule(params.schedule)}",
            f"             run it now: PREFECT_API_URL={api.url} prefect deployment run "
            f"'cassava-train-pipeline/{DEPLOYMENT_NAME}'",
            "entries started meanwhile (python3 dev.py run, the flows) use this Prefect server",
            "Ctrl-C stops everything started here.",
        ]))
        serve_training(params)
    say("platform: stopped")


def _alive(pid: int) -> bool:
    import psutil

    return pid > 0 and psutil.pid_exists(pid)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    prefect_port: Annotated[Optional[int], typer.Option(help="Prefect server port (default: a free one).")] = None,
    mlflow_port: Annotated[Optional[int], typer.Option(help="MLflow UI port (default: a free one).")] = None,
    params_file: Annotated[Optional[str], typer.Option("--params", help="Params file (default: params.yaml).")] = None,
) -> None:
    """Start the local platform: Prefect server, MLflow UI, scheduled retraining; Ctrl-C stops it all."""
    params = load_params(params_file)  # a bad schedule stops here (one line, exit 2), before any server starts
    # SIGTERM takes the Ctrl-C path: Prefect's runner shuts down on KeyboardInterrupt, then the servers stop.
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        run_platform(params, prefect_port, mlflow_port)
    except KeyboardInterrupt:
        typer.echo("platform: stopped")


if __name__ == "__main__":
    run_command_line(app, "python -m flows.platform")
