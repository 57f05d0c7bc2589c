"""The training pipeline as a Prefect flow: acquire → prepare → train → evaluate, one MLflow run.

Wiring only: each task calls the same `run_<stage>` function that `dvc.yaml` runs through `tasks.cli`, and the
MLflow run id is handed from task to task explicitly (MLflow's active run is thread-local; Prefect runs tasks
in threads).

    python -m flows.train_pipeline                      # run once, with params.yaml
    python -m flows.train_pipeline -S train.epochs=5    # with overrides, as `dvc exp run -S` takes them
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Before Prefect loads (seconds) or a server starts: bad params, a missing data root or a tracking store
    # that does not answer end here, in one line with exit status 2.
    from tasks.errors import run_entry
    from tasks.preflight import check_command_line

    run_entry(lambda: check_command_line(sys.argv[1:]))

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from typing import Annotated, Any, Optional  # noqa: E402

import typer  # noqa: E402

from tasks.errors import UserError, quiet_expected_failures, run_command_line  # noqa: E402
from tasks.params import load_params  # noqa: E402

# Our stage loggers ("tasks.*") go to the Prefect UI and console next to Prefect's own.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; it only logs errors
logging.getLogger("tasks").setLevel(logging.INFO)

from prefect import flow, task  # noqa: E402  (after the logging settings above)
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402

from tasks.cli import quiet_libraries, stage_entry  # noqa: E402
from tasks.params import Params  # noqa: E402


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups, not expected failures (bad data, bad params, a missing store): those fail the same
    way every time."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


@task(cache_policy=NO_CACHE, task_run_name="{stage}")
def run_stage(stage: str, params: Params, run_id: str | None) -> str:
    """One pipeline stage; returns the MLflow run id it logged into."""
    return stage_entry(stage)(params, run_id)


# Reading and writing data is where transient failures (a network share, a full disk being cleaned) happen.
io_stage = run_stage.with_options(retries=2, retry_delay_seconds=5, retry_condition_fn=_worth_retrying)


@flow(name="cassava-train-pipeline", log_prints=True)
def train_pipeline(overrides: list[str] | None = None, params_file: str | None = None) -> dict[str, Any]:
    """Run every stage once; return the MLflow run id, the tracking URI and the test metrics."""
    from tasks.layout import METRICS_FILE
    from tasks.params import workspace_root
    from tasks.tracking import configure_tracking

    params = load_params(params_file, overrides or [])
    quiet_libraries()
    run_id = io_stage("acquire", params, None)
    run_id = io_stage("prepare", params, run_id)
    run_id = run_stage("train", params, run_id)
    run_id = run_stage("evaluate", params, run_id)
    metrics = json.loads((workspace_root() / METRICS_FILE).read_text())
    return {"run_id": run_id, "tracking_uri": configure_tracking(), "metrics": metrics}


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    overrides: Annotated[
        Optional[list[str]], typer.Option("--set", "-S", help="Override a param: section.key=value (repeatable).")
    ] = None,
    params_file: Annotated[Optional[str], typer.Option("--params", help="Params file (default: params.yaml).")] = None,
) -> None:
    """Run the cassava training pipeline once under Prefect and say where to look."""
    from tasks.preflight import preflight

    preflight(load_params(params_file, overrides or []))  # in a second, before Prefect starts a server
    quiet_expected_failures()  # their one line is printed by the entry, not a traceback by Prefect
    result = train_pipeline(overrides=overrides or [], params_file=params_file)
    typer.echo(where_to_look(result))


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
    run_command_line(app, "python -m flows.train_pipeline")
