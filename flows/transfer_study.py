"""The transfer-learning lesson as a Prefect flow: small target training sets (images per class), from scratch
vs. from a pretrained backbone, same epoch budget, several seeds; one parent MLflow run with the comparison
table and plot (accuracy vs images per class, mean and spread).

    python -m flows.transfer_study                                   # pretrains a source first (flows.pretrain)
    python -m flows.transfer_study --source runs:/<run id>/model --sizes 10 25 50 --seeds 0 1 2 --epochs 12

Core: tasks/study.py. The source model is the one a pretraining run logged (ImageNet weights cannot be
downloaded here); its run id is the parent run's `cassava.backbone_source_run` tag.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # bad params or a dead tracking store: one line, before Prefect loads
    from tasks.errors import run_entry
    from tasks.preflight import check_command_line

    run_entry(lambda: check_command_line(sys.argv[1:]))

from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Optional  # noqa: E402

import typer  # noqa: E402

from flows.pretrain import pretrain_flow  # noqa: E402  (sets Prefect's logging up before Prefect loads)
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402
from flows.prefect_api import prefect_api  # noqa: E402
from tasks.cli import OverridesOption  # noqa: E402
from tasks.errors import quiet_expected_failures, run_command_line  # noqa: E402
from tasks.params import Params, load_params  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
STUDY_FOLDER = Path("study")  # the target data and the study's tables, under the workspace


@task(cache_policy=NO_CACHE, task_run_name="{arm}-{per_class}-per-class-seed-{seed}")
def trial(params: Params, prepared: Any, arm: str, per_class: int, seed: int, source: Any, epochs: int) -> Any:
    from tasks.study import run_trial

    return run_trial(params, prepared, arm, per_class, seed, source, epochs)


@flow(name="cassava-transfer-study", log_prints=True)
def transfer_study(
    sizes: list[int] | None = None, seeds: list[int] | None = None, epochs: int = 12, source_uri: str | None = None,
    overrides: list[str] | None = None, params_file: str | None = None,
) -> dict[str, Any]:
    """Every (arm, size, seed) trial, then the parent run; returns its id and the comparison rows."""
    from tasks.backbones import TAG_SOURCE_RUN, describe_source
    from tasks.params import flatten_params, workspace_root
    from tasks.study import ARMS, prepare_target, study_metrics, summarize, write_study
    from tasks.tracking import log_summary_run

    params = load_params(params_file, overrides or [])
    source_uri = source_uri or pretrain_flow(overrides=overrides, params_file=params_file)["model_uri"]
    source = describe_source(source_uri)
    prepared = prepare_target(params, workspace_root() / STUDY_FOLDER)
    trials = [
        trial(params, prepared, arm, per_class, seed, source, epochs)
        for per_class in sizes or [10, 25, 50] for seed in seeds or [0, 1, 2] for arm in ARMS
    ]
    files = write_study(trials, workspace_root() / STUDY_FOLDER / "results")
    run_id = log_summary_run(
        "cassava-transfer-study", f"transfer-study-{len(trials)}-trials",
        {**flatten_params(params), "study.sizes": str(sizes or [10, 25, 50]), "study.seeds": str(seeds or [0, 1, 2]),
         "study.epochs": str(epochs), "study.source_uri": source_uri},
        study_metrics(trials), {TAG_SOURCE_RUN: source.run_id}, files, "study",
    )
    return {"run_id": run_id, "comparison": summarize(trials), "files": [str(file) for file in files]}


@app.command()
def main(
    sizes: Annotated[Optional[list[int]], typer.Option("--sizes", help="Training images per class (repeatable).")] = None,
    seeds: Annotated[Optional[list[int]], typer.Option("--seeds", help="Seeds per size (repeatable).")] = None,
    epochs: Annotated[int, typer.Option(help="Epoch budget of every trial.")] = 12,
    source: Annotated[Optional[str], typer.Option(help="Pretrained model URI; default: pretrain one first.")] = None,
    overrides: OverridesOption = None,
    params_file: Annotated[Optional[str], typer.Option("--params", help="Params file (default: params.yaml).")] = None,
) -> None:
    """Measure from scratch vs pretrained on small training sets; print the comparison table."""
    quiet_expected_failures()
    with prefect_api(announce=typer.echo):  # a running Prefect server, or a private one
        result = transfer_study(sizes, seeds, epochs, source, overrides or [], params_file)
    typer.echo(f"\nparent run: {result['run_id']}\n{'arm':<11} {'per class':>9} {'mean':>7} {'std':>7}")
    for row in result["comparison"]:
        typer.echo(f"{row['arm']:<11} {row['per_class']:>9} {row['mean']:>7.3f} {row['std']:>7.3f}")


if __name__ == "__main__":
    run_command_line(app, "python -m flows.transfer_study")
