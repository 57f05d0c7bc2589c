"""Command line of the stages: `python -m tasks.cli <stage> [-S section.key=value ...]`.

`dvc.yaml` runs exactly these commands, and the Prefect flow calls the same `run_<stage>` functions, so both
paths share one definition of every stage. Before any heavy import, params are validated and the stage's
inputs and the tracking store checked (`tasks.preflight`): an expected failure (`tasks.errors.UserError`) exits
with status 2 and one line saying what is wrong and what to do.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from tasks.errors import run_command_line
from tasks.params import Params, load_params

log = logging.getLogger("tasks.cli")  # also under `python -m tasks.cli`, where __name__ is __main__

STAGES: dict[str, str] = {
    "acquire": "tasks.data:run_acquire",
    "prepare": "tasks.data:run_prepare",
    "train": "tasks.train:run_train",
    "evaluate": "tasks.evaluate:run_evaluate",
    "register": "tasks.register:run_register",
    "pretrain": "tasks.pretrain:run_pretrain",  # source-task pretraining (pipelines/pretrain/dvc.yaml, outside the DAG)
}
# What a stage does before its first log line of its own (imports and set-up take seconds to tens of seconds).
STAGE_ACTIVITY: dict[str, str] = {
    "acquire": "writing the data source into data/raw",
    "prepare": "validating, de-duplicating and splitting data/raw",
    "train": "loading TensorFlow, building the model",
    "evaluate": "loading TensorFlow and the model, scoring the test split",
    "register": "gating the evaluated model against the registry's champion",
    "pretrain": "acquiring, preparing and training on the source data set in pretrain/",
}

COMPLETED_STAGES: list[str] = []  # by this process: its exit can then skip the interpreter's teardown

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
ProfileOption = Annotated[
    Optional[str], typer.Option("--profile", help="A params profile (profiles/<name>.yaml), applied before -S.")
]


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
    """The `run_<stage>(params, run_id)` function of a stage, imported only when it is about to run (the
    start is said first: importing a stage can take seconds)."""
    log.info("%s: starting (%s)", stage, STAGE_ACTIVITY.get(stage, STAGES[stage]))
    module_name, function_name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def _run_stage(stage: str, params_file: Path | None, overrides: list[str] | None, profile: str | None = None) -> None:
    from tasks.preflight import preflight

    params = load_params(params_file, overrides or [], profile)
    preflight(params, stage)
    configure_logging()
    run_id = stage_entry(stage)(params, None)
    typer.echo(f"{stage}: done (MLflow run {run_id})")
    COMPLETED_STAGES.append(stage)


def _register(stage: str) -> None:
    def command(overrides: OverridesOption = None, params_file: ParamsOption = None, profile: ProfileOption = None) -> None:
        _run_stage(stage, params_file, overrides, profile)

    command.__doc__ = f"Run the {stage} stage ({STAGES[stage].replace(':', '.')})."
    app.command(stage)(command)


for _stage in STAGES:
    _register(_stage)


@app.command("check-params")
def check_params(overrides: OverridesOption = None, params_file: ParamsOption = None, profile: ProfileOption = None) -> None:
    """Validate params.yaml (and overrides) and print the resolved values, flattened as MLflow logs them."""
    from tasks.params import flatten_params

    for key, value in flatten_params(load_params(params_file, overrides or [], profile)).items():
        typer.echo(f"{key} = {value}")


@app.command("profile")
def profile_arguments(name: Annotated[str, typer.Argument(help="Profile name, e.g. real-photos.")]) -> None:
    """Print a params profile as -S arguments: `dvc exp run $(python -m tasks.cli profile real-photos)`."""
    import shlex

    from tasks.params import profile_overrides

    typer.echo(" ".join(f"-S {shlex.quote(override)}" for override in profile_overrides(name)))


def main() -> None:
    run_command_line(app, "python -m tasks.cli", work_done=lambda: bool(COMPLETED_STAGES))


if __name__ == "__main__":
    sys.exit(main())
