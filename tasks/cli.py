"""Command line of the stages: `python -m tasks.cli <stage> [-S section.key=value ...]`.

`dvc.yaml` runs exactly these commands, and the Prefect flow calls the same `run_<stage>` functions, so both
paths share one definition of every stage. Params are validated before any heavy import: a bad value exits
with status 2 and one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from tasks.params import Params, ParamsError, load_params

STAGES: dict[str, str] = {
    "acquire": "tasks.data:run_acquire",
    "prepare": "tasks.data:run_prepare",
    "train": "tasks.train:run_train",
    "evaluate": "tasks.evaluate:run_evaluate",
}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run one pipeline stage (as dvc.yaml does) or check params. Overrides: -S section.key=value.",
)

OverridesOption = Annotated[
    Optional[list[str]], typer.Option("--set", "-S", help="Override a param: section.key=value (repeatable).")
]
ParamsOption = Annotated[Optional[Path], typer.Option("--params", help="Params file (default: params.yaml).")]


def quiet_libraries() -> None:
    """Keep the stage's own log lines readable among TensorFlow's, MLflow's and Prefect's."""
    # TensorFlow's C++ start-up chatter (CPU features, a harmless tf.data attribute notice); Python-level
    # errors and warnings still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here: it would only retry
    for noisy in ("tensorflow", "absl", "alembic", "mlflow", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()


def stage_entry(stage: str) -> Callable[[Params, str | None], str]:
    """The `run_<stage>(params, run_id)` function of a stage, imported only when it is about to run."""
    module_name, function_name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def load_or_exit(params_file: Path | None, overrides: list[str] | None) -> Params:
    try:
        return load_params(params_file, overrides or [])
    except ParamsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


def _run_stage(stage: str, params_file: Path | None, overrides: list[str] | None) -> None:
    params = load_or_exit(params_file, overrides)
    configure_logging()
    from tasks.data import DataError
    from tasks.train import TrainingDiverged

    try:
        run_id = stage_entry(stage)(params, None)
    except (DataError, TrainingDiverged) as error:  # the run is FAILED with the reason; one line is enough
        typer.echo(f"error: {stage}: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{stage}: done (MLflow run {run_id})")


def _register(stage: str) -> None:
    def command(overrides: OverridesOption = None, params_file: ParamsOption = None) -> None:
        _run_stage(stage, params_file, overrides)

    command.__doc__ = f"Run the {stage} stage ({STAGES[stage].replace(':', '.')})."
    app.command(stage)(command)


for _stage in STAGES:
    _register(_stage)


@app.command("check-params")
def check_params(overrides: OverridesOption = None, params_file: ParamsOption = None) -> None:
    """Validate params.yaml (and overrides) and print the resolved values, flattened as MLflow logs them."""
    from tasks.params import flatten_params

    for key, value in flatten_params(load_or_exit(params_file, overrides)).items():
        typer.echo(f"{key} = {value}")


def main() -> None:
    app(prog_name="python -m tasks.cli")


if __name__ == "__main__":
    sys.exit(main())
