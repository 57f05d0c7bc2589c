"""Source-task pretraining as a Prefect flow: acquire → prepare → train on the source data set (params with
`pretrain.overrides` on top), in its own workspace folder, logged as one MLflow run in the project's store.

    python -m flows.pretrain                                   # the source set of params.yaml's pretrain section
    python -m flows.pretrain -S 'pretrain.overrides=[data.source=digits]'

It ends by printing the `-S model.backbone_weights=runs:/<run id>/model` a target run starts from (also in
models/pretrained.json); the target run records it as its `cassava.backbone_source_run` tag.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # bad params or a dead tracking store: one line, before Prefect loads
    from tasks.errors import run_entry
    from tasks.preflight import check_command_line

    run_entry(lambda: check_command_line(sys.argv[1:]))

from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from flows.train_pipeline import run_stage  # noqa: E402  (sets Prefect's logging up before Prefect loads)
from prefect import flow  # noqa: E402
from flows.prefect_api import prefect_api  # noqa: E402
from tasks.cli import OverridesOption  # noqa: E402
from tasks.errors import quiet_expected_failures, run_command_line  # noqa: E402
from tasks.params import load_params  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@flow(name="cassava-pretrain", log_prints=True)
def pretrain_flow(overrides: list[str] | None = None, params_file: str | None = None) -> dict[str, str]:
    """Pretrain on the source set; return the source run id and the model URI to start a target run from."""
    from tasks.pretrain import record_pretrained, source_workspace

    params = load_params(params_file, overrides or [])
    with source_workspace(params) as source:
        run_id = run_stage("acquire", source, None)  # (not the pipeline's cached data stages: another workspace)
        run_id = run_stage("prepare", source, run_id)
        run_id = run_stage("train", source, run_id)
    return record_pretrained(run_id, source)


@app.command()
def main(
    overrides: OverridesOption = None,
    params_file: Annotated[Optional[str], typer.Option("--params", help="Params file (default: params.yaml).")] = None,
) -> None:
    """Pretrain a backbone on the source data set under Prefect and say how to start from it."""
    from tasks.pretrain import source_params

    source_params(load_params(params_file, overrides or []))  # bad pretrain.overrides: before a server starts
    quiet_expected_failures()
    with prefect_api(announce=typer.echo):  # a running Prefect server, or a private one
        record = pretrain_flow(overrides=overrides or [], params_file=params_file)
    typer.echo(f"\nsource run:  {record['run_id']}\nstart from:  {record['use_with']}")


if __name__ == "__main__":
    run_command_line(app, "python -m flows.pretrain")
