"""The training pipeline as a Prefect flow: acquire → prepare → train → evaluate → register, one MLflow run.

Wiring only: each task calls the same `run_<stage>` function that `dvc.yaml` runs through `tasks.cli`, and the
MLflow run id is handed from task to task explicitly (MLflow's active run is thread-local; Prefect runs tasks
in threads).

    python -m flows.train_pipeline                      # run once, with params.yaml
    python -m flows.train_pipeline -S train.epochs=5    # with overrides, as `dvc exp run -S` takes them

Run from the command line, it uses a running Prefect server or starts a private one (`flows.prefect_api`) and
says which. acquire and prepare are skipped (Cached in Prefect) when their inputs are unchanged, as `dvc repro`
skips them (`flows.stage_cache`); training and evaluation always run. A failed or crashed flow run ends its
MLflow run FAILED and sends a notification (`flows.notifications`).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Before Prefect loads (seconds) or a server starts: bad params, a missing data root or a tracking store
    # that does not answer end here, in one line with exit status 2.
    from tasks.errors import run_entry
    from tasks.preflight import check_command_line

    run_entry(lambda: check_command_line(sys.argv[1:]))

import errno  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from typing import Annotated, Any, Optional  # noqa: E402

import typer  # noqa: E402

from flows.child_processes import exit_with_parent  # noqa: E402
from tasks.errors import UserError, quiet_expected_failures, run_command_line  # noqa: E402
from tasks.params import load_params  # noqa: E402

# Our stage loggers ("tasks.*") go to the Prefect UI and console next to Prefect's own.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; it only logs errors
logging.getLogger("tasks").setLevel(logging.INFO)

from prefect import flow, get_run_logger, task  # noqa: E402  (after the logging settings above)
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from flows.notifications import notify_failure  # noqa: E402
from flows.prefect_api import prefect_api  # noqa: E402
from flows.stage_cache import output_hashes, outputs_intact, stage_cache_key  # noqa: E402
from tasks.cli import OverridesOption, ProfileOption, quiet_libraries, stage_entry  # noqa: E402
from tasks.params import Params  # noqa: E402

# Errors that can pass on their own: a timeout, a dropped connection, a network share or disk that hiccups.
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ESTALE, errno.ETIMEDOUT, errno.ENETDOWN,
                    errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNRESET}
# A variable the platform sets for the flow-run processes Prefect's runner starts: they end with the platform.
EXIT_WITH_PARENT_VARIABLE = "CASSAVA_EXIT_WITH_PARENT"



def is_transient(error: BaseException) -> bool:
    """Whether a failure can pass on its own. Expected failures (bad data, bad params, a missing input, a
    tracking store that does not answer), a missing file or a wrong path fail the same way every time; the
    tracking store's client already retries by itself (MLflow, requests), for minutes."""
    if isinstance(error, UserError) or not isinstance(error, OSError):
        return False
    if type(error).__module__.split(".")[0] in ("mlflow", "requests", "urllib3"):
        return False
    return isinstance(error, (TimeoutError, ConnectionError)) or error.errno in TRANSIENT_ERRNOS


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except BaseException as error:
        return is_transient(error)
    return False


@task(cache_policy=NO_CACHE, task_run_name="{stage}")
def run_stage(stage: str, params: Params, run_id: str | None) -> str:
    """One pipeline stage, never cached (training must not be skipped silently); returns its MLflow run id."""
    return stage_entry(stage)(params, run_id)


@task(cache_key_fn=stage_cache_key, persist_result=True, task_run_name="{stage}", retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5,
      retry_condition_fn=_retry_if_transient)
def run_data_stage(stage: str, params: Params, run_id: str | None) -> dict[str, Any]:
    """acquire or prepare: reads and writes data, where transient I/O failures happen; cached by its inputs.

    The result records the outputs' hashes, so a cached result is used only while those outputs remain.
    """
    run_id = stage_entry(stage)(params, run_id)
    return {"run_id": run_id, "outputs": output_hashes(stage)}


def data_stage(stage: str, params: Params, run_id: str | None, upstream_ran: bool) -> tuple[str | None, bool]:
    """Run a data stage, or skip it when its inputs are unchanged and its outputs intact.

    Returns (the run id the next stage continues, or None to let it carry the story over into a new run from
    the pointer files as `dvc repro` does; whether the stage ran). Once a stage has run in this flow run, the
    ones after it run too, so a single MLflow run holds the execution.
    """
    state = run_data_stage.with_options(refresh_cache=upstream_ran)(stage, params, run_id, return_state=True)
    result = state.result()
    if state.name != "Cached":
        return result["run_id"], True
    if outputs_intact(stage, result["outputs"]):
        get_run_logger().info("%s: inputs unchanged and outputs intact: skipped (cached)", stage)
        return None, False
    get_run_logger().info("%s: inputs unchanged but its outputs changed since: running it again", stage)
    again = run_data_stage.with_options(refresh_cache=True, task_run_name=f"{stage} (outputs changed: run again)")
    return again(stage, params, run_id)["run_id"], True


@flow(name="cassava-train-pipeline", log_prints=True, on_failure=[notify_failure], on_crashed=[notify_failure])
def train_pipeline(
    overrides: list[str] | None = None, params_file: str | None = None, profile: str | None = None
) -> dict[str, Any]:
    """Run every stage once; return the MLflow run id, the tracking URI and the test metrics."""
    from tasks.layout import METRICS_FILE
    from tasks.params import workspace_root
    from tasks.tracking import configure_tracking

    if os.environ.get(EXIT_WITH_PARENT_VARIABLE):
        exit_with_parent()
    params = load_params(params_file, overrides or [], profile)
    quiet_libraries()
    run_id, acquired = data_stage("acquire", params, None, upstream_ran=False)
    run_id, _ = data_stage("prepare", params, run_id, upstream_ran=acquired)
    run_id = run_stage("train", params, run_id)
    run_id = run_stage("evaluate", params, run_id)
    run_id = run_stage("register", params, run_id)
    metrics = json.loads((workspace_root() / METRICS_FILE).read_text())
    return {"run_id": run_id, "tracking_uri": configure_tracking(), "metrics": metrics}


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
COMPLETED_RUNS: list[str] = []  # by this process: its exit can then skip the interpreter's teardown


@app.command()
def main(
    overrides: OverridesOption = None,
    params_file: Annotated[Optional[str], typer.Option("--params", help="Params file (default: params.yaml).")] = None,
    profile: ProfileOption = None,
) -> None:
    """Run the cassava training pipeline once under Prefect and say where to look."""
    from tasks.preflight import preflight

    preflight(load_params(params_file, overrides or [], profile))  # in a second, before Prefect starts a server
    quiet_expected_failures()  # their one line is printed by the entry, not a traceback by Prefect
    with prefect_api(announce=typer.echo):  # a running Prefect server, or a private one; says which
        result = train_pipeline(overrides=overrides or [], params_file=params_file, profile=profile)
    typer.echo(where_to_look(result))
    COMPLETED_RUNS.append(result["run_id"])


def where_to_look(result: dict[str, Any]) -> str:
    """The end-of-run message: the run, its headline metrics, the report and figures, the UI command."""
    metrics = result["metrics"]
    return "\n".join(
        [
            "",
            f"MLflow run:      {result['run_id']}",
            f"test accuracy:   {metrics['test_accuracy']:.4f}",
            f"test macro F1:   {metrics['test_macro_f1']:.4f}",
            "report:          reports/report.html   (figures: reports/figures/, metrics: reports/metrics.json)",
            f"open the UI:     .venv/bin/mlflow ui --backend-store-uri {result['tracking_uri']} --host 127.0.0.1 "
            "--port 5000",
            "                 then http://127.0.0.1:5000 → experiment cassava-* (opens on its runs table)",
        ]
    )


if __name__ == "__main__":
    run_command_line(app, "python -m flows.train_pipeline", work_done=lambda: bool(COMPLETED_RUNS))
