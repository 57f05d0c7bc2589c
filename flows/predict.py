"""Batch prediction as a Prefect flow: the same `tasks.predict.predict_folder` the command line runs, as a task.

    python -m flows.predict photos/                                        # champion of cassava-classifier
    python -m flows.predict photos/ --model runs:/<run id>/model --output photos.csv

The flow's run in the Prefect UI carries a table of the files it skipped, with the reason for each.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Before Prefect loads (seconds) or a server starts: a missing folder or a tracking store that does not
    # answer ends here, in one line with exit status 2.
    from tasks.errors import run_entry
    from tasks.predict import check_prediction_command_line

    run_entry(lambda: check_prediction_command_line(sys.argv[1:]))

import logging  # noqa: E402
import os  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402

# Our loggers ("tasks.*") go to the Prefect UI and console next to Prefect's own.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; it only logs errors
logging.getLogger("tasks").setLevel(logging.INFO)

from prefect import flow, task  # noqa: E402  (after the logging settings above)
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402

from tasks.cli import quiet_libraries  # noqa: E402
from tasks.errors import quiet_expected_failures, run_command_line  # noqa: E402
from tasks.predict import DEFAULT_MODEL_URI, PredictionSummary, predict_folder  # noqa: E402


@task(cache_policy=NO_CACHE, task_run_name="predict {folder}")
def predict_images(model_uri: str, folder: str, output: str, batch_size: int) -> PredictionSummary:
    """Classify the folder's images into the output CSV (no retries: a failure here is not transient)."""
    return predict_folder(model_uri, Path(folder), Path(output), batch_size)


@flow(name="cassava-predict", log_prints=True)
def predict_flow(
    folder: str, model_uri: str = DEFAULT_MODEL_URI, output: str = "predictions.csv", batch_size: int = 64
) -> dict[str, Any]:
    """Classify a folder of images; return the summary (counts, output files, skipped files with reasons)."""
    from prefect.artifacts import create_table_artifact

    quiet_libraries()
    summary = predict_images(model_uri, folder, output, batch_size)
    if summary.skipped:
        create_table_artifact(
            [asdict(skipped) for skipped in summary.skipped],
            key="skipped-images",
            description=f"{len(summary.skipped)} files in {folder} could not be read and were not classified",
        )
    result = asdict(summary)
    result.update(output_csv=str(summary.output_csv), skipped_csv=str(summary.skipped_csv))
    return result


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    folder: Annotated[str, typer.Argument(help="Folder of images (searched recursively).")],
    model: Annotated[str, typer.Option("--model", "-m", help="MLflow model URI (models:/... or runs:/...).")]
    = DEFAULT_MODEL_URI,
    output: Annotated[str, typer.Option("--output", "-o", help="Predictions CSV.")] = "predictions.csv",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per prediction batch.")] = 64,
) -> None:
    """Classify a folder of leaf images under Prefect and say where the results are."""
    from flows.prefect_api import prefect_api

    quiet_expected_failures()  # their one line is printed by the entry, not a traceback by Prefect
    with prefect_api(announce=typer.echo):  # a running Prefect server, or a private one; says which
        result = predict_flow(folder=folder, model_uri=model, output=output, batch_size=batch_size)
    typer.echo(f"predicted {result['predicted']} images → {result['output_csv']}")
    if result["skipped"]:
        typer.echo(f"skipped {len(result['skipped'])} unreadable files → {result['skipped_csv']}")


if __name__ == "__main__":
    run_command_line(app, "python -m flows.predict")
