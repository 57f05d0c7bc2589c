"""The lessons study as a Prefect flow: the course's six lessons tested as controlled ablations on this data
(same data version, same training budget, several seeds per arm), each claim judged from the numbers.

    python -m flows.lessons_study                          # params.yaml's study section (3 seeds: ~30 min)
    python -m flows.lessons_study --profile study-quick    # quick mode: 2 seeds, few epochs, small subsets
    dvc repro pipelines/study/dvc.yaml                     # the same, on the main pipeline's prepared data

Wiring only: the lessons, arms, claims and the verdict rule are tasks/lessons.py; the MLflow runs and the report
tasks/lessons_runs.py; every trial (arm x seed) runs as one of the sweep's point processes (tasks/sweep_runs.py)
on the sweep's Dask runner (flows/sweep.py), under its lesson's run, under the study run. Started again after an
interruption (same params, same data version), the study continues its run and reuses the finished trials.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # bad params or a dead tracking store: one line, before Prefect loads
    from tasks.errors import run_entry
    from tasks.preflight import check_command_line

    run_entry(lambda: check_command_line(sys.argv[1:]))

import os  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Optional  # noqa: E402
from unittest import mock  # noqa: E402

import typer  # noqa: E402

from flows.train_pipeline import data_stage  # noqa: E402  (sets Prefect's logging up before Prefect loads)
from flows.pretrain import pretrain_flow  # noqa: E402
from flows.prefect_api import prefect_api  # noqa: E402
from flows.sweep import dask_task_runner  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from tasks.cli import OverridesOption, ProfileOption, quiet_libraries  # noqa: E402
from tasks.errors import quiet_expected_failures, run_command_line  # noqa: E402
from tasks.params import DEFAULT_PARAMS_FILE, Params, load_params, profile_overrides, workspace_root  # noqa: E402
from tasks.sweep_runs import PointJob, run_point_process  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
TRIALS_FOLDER = Path("lessons")  # every trial's own workspace, under the workspace (removed when all succeed)


@task(cache_policy=NO_CACHE, task_run_name="{job.label}")
def study_trial(job: PointJob) -> int:
    """One arm with one seed, on a Dask worker, in its own process; its exit status (a failed trial is
    reported in the study, not raised: the other trials go on)."""
    return run_point_process(job)


def transfer_source(client: Any, study_run: str, params: Params, base_overrides: list[str],
                    params_file: str | None) -> Any:
    """The pretrained model lesson 5 starts from: the one this study run recorded, else pretrained now with the
    study's budget, in the study's own folder (the pipeline's pretrain/ and models/pretrained.json stay as
    they are), and recorded on the study run."""
    from tasks.backbones import describe_source
    from tasks.lessons import source_overrides
    from tasks.lessons_runs import SOURCE_TAG

    uri = client.get_run(study_run).data.tags.get(SOURCE_TAG)
    if not uri:
        budget = source_overrides(params.study)
        folder = workspace_root() / TRIALS_FOLDER / study_run / "source"
        folder.mkdir(parents=True, exist_ok=True)
        params_path = str(Path(params_file).resolve()) if params_file else str(workspace_root() / DEFAULT_PARAMS_FILE)
        with mock.patch.dict(os.environ, {"CASSAVA_WORKSPACE": str(folder),
                                          "MLFLOW_TRACKING_URI": client.tracking_uri}):
            uri = pretrain_flow(overrides=[*base_overrides, *budget], params_file=params_path)["model_uri"]
        client.set_tag(study_run, SOURCE_TAG, uri)
    return describe_source(uri)


@flow(name="cassava-lessons-study", log_prints=True)
def lessons_study(overrides: list[str] | None = None, params_file: str | None = None, use_prepared: bool = False,
                  threads_per_trial: int | None = None) -> dict[str, Any]:
    """Every trial of every lesson (reusing the finished ones of an interrupted run), the verdicts, the report;
    returns the study run id, the summary rows, the report paths and the failed trials."""
    from mlflow import MlflowClient
    from mlflow.entities import RunStatus

    from tasks import layout, lessons_runs as runs
    from tasks.lessons import lessons, plan_trials, study_key, trial_key
    from tasks.params import ParamsError, apply_overrides, read_params_tree, validate_params
    from tasks.prepared import PreparedData
    from tasks.study import ARMS, arm_overrides
    from tasks.sweep_runs import point_job, read_outcome
    from tasks.params import flatten_params
    from tasks.tracking import allow_concurrent_writers, configure_tracking, dvc_data_version, ensure_experiment, \
        experiment_name

    quiet_libraries()
    overrides = list(overrides or [])
    params = load_params(params_file, overrides)
    root = workspace_root()
    prepared = PreparedData(root / layout.PREPARED_DIR)
    if not (use_prepared and prepared.images_file("test").exists()):
        run_id, ran = data_stage("acquire", params, None, False)
        data_stage("prepare", params, run_id, ran)
    data_version = dvc_data_version(prepared.root)
    tracking_uri = configure_tracking()
    experiment_id = ensure_experiment(experiment_name(params))
    allow_concurrent_writers(tracking_uri)
    client = MlflowClient(tracking_uri)
    study = params.study
    key = study_key(params, data_version)
    title = f"lessons study ({len(study.seeds)} seeds x {study.epochs} epochs)"
    study_run, continued = runs.open_study_run(client, experiment_id, key, title)
    print(f"study: {'continuing' if continued else 'new'} study run {study_run} (data version {data_version})")
    lesson_list = lessons(params)
    lesson_runs: dict[str, str] = {}
    try:
        if not continued:
            flat = [_param(k, v) for k, v in flatten_params(params).items()]
            for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(study_run, params=flat[start:start + 100])
            client.set_tag(study_run, runs.DATA_VERSION_TAG, str(data_version))
        source = transfer_source(client, study_run, params, overrides, params_file)
        transfer = {(arm, seed): arm_overrides(arm, source, study.epochs, seed) for arm in ARMS for seed in study.seeds}
        trials = plan_trials(study, lesson_list, transfer)
        tree = read_params_tree(params_file)
        for trial in trials:  # every trial valid before the first one trains
            try:
                validate_params(apply_overrides(tree, [*overrides, *trial.overrides]))
            except ParamsError as error:
                raise ParamsError(f"study trial {trial.label}: {error}") from None
        lesson_runs = {lesson.key: runs.open_lesson_run(client, experiment_id, study_run, lesson) for lesson in lesson_list}
        reused = runs.finished_trials(client, experiment_id, list(lesson_runs.values()), trials, key)
        params_path = Path(params_file).resolve() if params_file else root / DEFAULT_PARAMS_FILE
        trials_dir = root / TRIALS_FOLDER / study_run
        jobs = {
            trial: point_job(number, {"lesson": trial.lesson, "arm": trial.arm, "seed": trial.seed}, trial.label,
                             [*overrides, *trial.overrides], trials_dir / f"trial-{number:03d}", prepared.root,
                             params_path, lesson_runs[trial.lesson], experiment_id, tracking_uri, threads_per_trial,
                             runs.trial_tags(key, trial), trial.evaluate)
            for number, trial in enumerate(trials, start=1) if trial_key(key, trial) not in reused
        }
        print(f"study: {len(trials)} trials ({len(lesson_list)} lessons, {len(study.seeds)} seed(s) per arm): "
              f"{len(reused)} reused from this study run, {len(jobs)} to train")
        futures = {study_trial.submit(job): trial for trial, job in jobs.items()}
        left = len(futures)
        for future in as_completed(list(futures)):
            trial, left = futures[future], left - 1
            status = future.result(raise_on_failure=False)
            title_of = next(lesson.title for lesson in lesson_list if lesson.key == trial.lesson)
            print(f"study: {title_of}: arm {trial.arm}, seed {trial.seed}: "
                  f"{'done' if status == 0 else f'FAILED (exit {status}, log {jobs[trial].log_file})'}; "
                  f"{left} of {len(futures)} left")
        trial_runs = {trial: reused[trial_key(key, trial)] if trial_key(key, trial) in reused else
                      _child_run(client, read_outcome(jobs[trial])) for trial in trials}
        report = runs.write_study_report(client, params, lesson_list, lesson_runs, trial_runs, experiment_id,
                                         study_run, data_version, len(prepared.class_names()), root / runs.REPORT_DIR)
        for lesson in lesson_list:
            runs.end_run(client, lesson_runs[lesson.key], RunStatus.to_string(RunStatus.FINISHED))
    except (KeyboardInterrupt, SystemExit) as interruption:
        for run_id in [*lesson_runs.values(), study_run]:
            runs.end_run(client, run_id, RunStatus.to_string(RunStatus.KILLED), f"study: interrupted ({interruption!r})")
        raise
    except BaseException as error:
        for run_id in [*lesson_runs.values(), study_run]:
            runs.end_run(client, run_id, RunStatus.to_string(RunStatus.FAILED), f"study: {type(error).__name__}: {error}")
        raise
    runs.end_run(client, study_run, RunStatus.to_string(RunStatus.FINISHED))
    failed = [trial.label for trial, run in trial_runs.items() if run is None or not runs.completed(run, trial.evaluate)]
    if not failed:
        shutil.rmtree(root / TRIALS_FOLDER / study_run, ignore_errors=True)  # all in MLflow; failures keep logs
    return {"study_run_id": study_run, "continued": continued, "reused": len(reused), "trained": len(jobs),
            "tracking_uri": tracking_uri, "experiment_id": experiment_id, "failed": failed, **report}


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value[:6000])


def _child_run(client: Any, outcome: dict[str, Any]) -> Any:
    return client.get_run(outcome["run_id"]) if outcome.get("run_id") else None


def run_lessons_study(overrides: list[str], params_file: str | None = None, profile: str | None = None,
                      use_prepared: bool = False) -> dict[str, Any]:
    """Resolve the profile, size the Dask cluster (study.workers, else one per core), run the flow."""
    from tasks.lessons import lessons, plan_trials

    overrides = [*(profile_overrides(profile) if profile else []), *overrides]
    params = load_params(params_file, overrides)
    trials = len(plan_trials(params.study, lessons(params)))
    runner, threads, where = dask_task_runner(None, params.study.workers, trials)
    print(f"study: up to {trials} trials on {where}", flush=True)
    # The Dask workers are other processes: prefect_api exports PREFECT_API_URL, so their task runs report to
    # the same server (a running one, else this study's private one).
    with prefect_api(announce=typer.echo):
        return lessons_study.with_options(task_runner=runner)(
            overrides=overrides, params_file=params_file, use_prepared=use_prepared, threads_per_trial=threads)


@app.command()
def main(
    overrides: OverridesOption = None,
    params_file: Annotated[Optional[str], typer.Option("--params", help="Params file (default: params.yaml).")] = None,
    profile: ProfileOption = None,
    use_prepared: Annotated[bool, typer.Option(
        "--use-prepared", help="Use data/prepared as it is (the DVC stage: a dependency) instead of running the "
                               "data stages.")] = False,
) -> None:
    """Test the course's lessons on this data: ablations with several seeds, verdicts, a report."""
    quiet_expected_failures()
    result = run_lessons_study(overrides or [], params_file, profile, use_prepared)
    typer.echo(f"\nstudy run:  {result['study_run_id']} ({result['trained']} trials trained, {result['reused']} reused)")
    for row in result["summary"]:
        typer.echo(f"  {row['verdict']:<14} {row['lesson']}: {row['claim']}")
    typer.echo(f"report:     {result['markdown']}\n            {result['html']}")
    if result["failed"]:
        typer.echo(f"failed trials: {', '.join(result['failed'])}", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    run_command_line(app, "python -m flows.lessons_study")
