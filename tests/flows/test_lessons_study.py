"""The lessons study end to end, on the quick profile and the tiny workspace: real Prefect (temporary server), a
real 2-worker Dask LocalCluster, a process per trial, a real MLflow store. A study SIGKILLed half-way and started
again continues its run and reuses the finished trials; at the end every lesson run is there and linked, the
report has its sections, and the verdicts match the ones recomputed from the logged metrics. Plus: the same
trial trained twice with the same seed gives the same numbers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from tasks.params import code_root, load_params

# The quick profile, with a lighter failure analysis and a small source set for the transfer lesson's pretraining.
QUICK_OVERRIDES = ["evaluate.rotation_angles=[0, 90]", "evaluate.blur_sigmas=[0, 2]",
                   "pretrain.overrides=[data.seed=7, data.synthetic.images_per_class=12, "
                   "tracking.experiment_name=cassava-pretrain]"]


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):
        yield


def _study_command() -> list[str]:
    return [sys.executable, "-m", "flows.lessons_study", "--profile", "study-quick",
            *(argument for override in QUICK_OVERRIDES for argument in ("-S", override))]


def _environment(workspace: Path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, CASSAVA_WORKSPACE=str(workspace), PREFECT_API_URL=PREFECT_API_URL.value(),
               PYTHONPATH=str(code_root()))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _trials(client: MlflowClient, experiment_id: str, status: str | None = None) -> list:
    query = "tags.`cassava.study.role` = 'trial'" + (f" and attributes.status = '{status}'" if status else "")
    return client.search_runs([experiment_id], filter_string=query, max_results=1000)


@pytest.mark.server
@pytest.mark.timeout(3000)  # two partial quick studies on 2 cores shared with other jobs
def test_quick_study_interrupted_then_restarted_reuses_finished_trials(workspace: Path, prefect_server) -> None:
    from tasks.lessons import arm_values, lessons, plan_trials, verdicts
    from tasks.lessons_runs import completed, diverged, history

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    env = _environment(workspace)
    with (workspace / "study-1.log").open("w") as log:
        study = subprocess.Popen(_study_command(), cwd=workspace, env=env, stdout=log, stderr=subprocess.STDOUT)
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 1200
        done: list = []
        while time.monotonic() < deadline and study.poll() is None:
            experiment = client.get_experiment_by_name("cassava-synthetic")
            if experiment:
                done = _trials(client, experiment.experiment_id, "FINISHED")
            if len(done) >= 4:
                break
            time.sleep(2)
        assert len(done) >= 4, (workspace / "study-1.log").read_text()[-3000:]
        descendants = psutil.Process(study.pid).children(recursive=True)
    finally:
        study.send_signal(signal.SIGKILL)
        study.wait()
    _, alive = psutil.wait_procs(descendants, timeout=120)
    assert alive == [], [" ".join(process.cmdline())[:120] for process in alive]
    experiment_id = client.get_experiment_by_name("cassava-synthetic").experiment_id
    params = load_params(workspace / "params.yaml", QUICK_OVERRIDES, profile="study-quick")
    lesson_list = lessons(params)
    evaluated = {lesson.key: lesson.evaluate for lesson in lesson_list}
    finished_before = {run.info.run_id for run in _trials(client, experiment_id)
                       if completed(run, evaluated[run.data.tags["cassava.study.lesson"]])}
    assert finished_before

    restarted = subprocess.run(_study_command(), cwd=workspace, env=env, capture_output=True, text=True, timeout=2400)
    output = restarted.stdout + restarted.stderr
    assert restarted.returncode == 0, output[-4000:]
    assert "continuing study run" in output and f"{len(finished_before)} reused from this study run" in output

    # One study run, continued, FINISHED; a FINISHED run per lesson under it; no run left RUNNING anywhere.
    (study_run,) = client.search_runs([experiment_id], filter_string="tags.`cassava.study.role` = 'study'")
    assert study_run.info.status == "FINISHED"
    lesson_runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'"
                                                                   " and tags.`cassava.study.role` = 'lesson'")
    assert sorted(run.data.tags["cassava.study.lesson"] for run in lesson_runs) == sorted(l.key for l in lesson_list)
    assert {run.info.status for run in lesson_runs} == {"FINISHED"}
    for experiment in client.search_experiments():
        assert not client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")

    # Every planned trial has exactly one completed run under its lesson; the ones finished before the kill
    # were reused, not trained again.
    trials = plan_trials(params.study, lesson_list)
    by_lesson = {run.data.tags["cassava.study.lesson"]: run for run in lesson_runs}
    completed_runs: dict[str, object] = {}
    for lesson in lesson_list:
        for run in client.search_runs([experiment_id], max_results=1000,
                                      filter_string=f"tags.`mlflow.parentRunId` = '{by_lesson[lesson.key].info.run_id}'"):
            if completed(run, lesson.evaluate):
                key = run.data.tags["cassava.study.trial_key"]
                assert key not in completed_runs, f"{key} trained twice"
                completed_runs[key] = run
    assert len(completed_runs) == len(trials)
    for run in completed_runs.values():  # the small-data lessons trained on their subset, the others on theirs
        small = run.data.tags["cassava.study.lesson"] in ("overfitting", "transfer")
        assert run.data.params["train.subset_per_class"] == str(params.study.small_per_class if small
                                                               else params.study.train_per_class)
    assert {run.info.run_id for run in completed_runs.values()} >= set(finished_before)

    # The report: every section, every lesson run linked, plots embedded; written and logged on the study run.
    report = (workspace / "reports/study/study.md").read_text()
    page = (workspace / "reports/study/study.html").read_text()
    for heading in ["## Summary", "## Decision rule", *(f"## {lesson.title}" for lesson in lesson_list)]:
        assert heading in report
    for run in [*lesson_runs, *completed_runs.values()]:
        assert f"/runs/{run.info.run_id})" in report and f"/runs/{run.info.run_id}\"" in page
    assert page.count("data:image/png;base64,") == len(lesson_list)
    assert {item.path for item in client.list_artifacts(study_run.info.run_id, "study")} >= {
        "study/study.md", "study/study.html", "study/verdicts.json"}

    # The verdicts, recomputed from what MLflow holds, match the logged ones; one effect by hand.
    recorded = {entry["lesson"]: entry for entry in json.loads((workspace / "reports/study/verdicts.json").read_text())["lessons"]}
    classes = 5
    for lesson in lesson_list:
        values = {}
        for run in completed_runs.values():
            if run.data.tags["cassava.study.lesson"] == lesson.key:
                arm, seed = run.data.tags["cassava.study.arm"], int(run.data.tags["cassava.study.seed"])
                values[(arm, seed)] = arm_values(run.data.metrics, history(client, run.info.run_id, "val_accuracy"),
                                                 diverged(run), params.study, classes)
        expected = verdicts(lesson, values, params.study)
        lesson_run = by_lesson[lesson.key]
        for number, verdict in enumerate(expected, start=1):
            assert lesson_run.data.tags[f"cassava.study.verdict{number}"] == verdict.outcome
            assert recorded[lesson.key]["verdicts"][number - 1]["outcome"] == verdict.outcome
            if math.isfinite(verdict.effect):
                assert lesson_run.data.metrics[f"claim{number}.effect"] == pytest.approx(verdict.effect)
    bn = {(run.data.tags["cassava.study.arm"], run.data.tags["cassava.study.seed"]): run.data.metrics
          for run in completed_runs.values() if run.data.tags["cassava.study.lesson"] == "batch_norm"}
    by_hand = bn[("bn-modest-lr", "0")]["train.best_val_accuracy"] - bn[("no-bn-modest-lr", "0")]["train.best_val_accuracy"]
    assert by_lesson["batch_norm"].data.metrics["claim1.effect"] == pytest.approx(by_hand)

    leftovers = [process for process in psutil.Process().children(recursive=True)
                 if "tasks.sweep_runs" in " ".join(process.cmdline()) or "spawn_main" in " ".join(process.cmdline())]
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_same_trial_twice_with_the_same_seed_gives_the_same_numbers(workspace: Path) -> None:
    from tasks.cli import stage_entry
    from tasks.lessons import arm_values, lessons, plan_trials
    from tasks.lessons_runs import history, trial_tags
    from tasks.prepared import PreparedData
    from tasks.sweep_runs import point_job, read_outcome, run_point_process
    from tasks.tracking import configure_tracking, ensure_experiment

    params = load_params(workspace / "params.yaml", ["study.seeds=[5]", "study.epochs=3"])
    stage_entry("acquire")(params, None)
    stage_entry("prepare")(params, None)
    tracking_uri = configure_tracking()
    experiment_id = ensure_experiment("lessons-determinism")
    client = MlflowClient(tracking_uri)
    parent = client.create_run(experiment_id).info.run_id
    trial = next(trial for trial in plan_trials(params.study, lessons(params))
                 if (trial.lesson, trial.arm) == ("batch_norm", "bn-modest-lr"))
    runs = []
    for attempt in (1, 2):
        job = point_job(attempt, {}, trial.label, list(trial.overrides), workspace / f"attempt-{attempt}",
                        PreparedData(workspace / "data/prepared").root, workspace / "params.yaml", parent,
                        experiment_id, tracking_uri, 1, trial_tags("k", trial), evaluate=False)
        assert run_point_process(job) == 0, job.log_file.read_text()[-3000:]
        runs.append(client.get_run(read_outcome(job)["run_id"]))
    first, second = ({"values": arm_values(run.data.metrics, history(client, run.info.run_id, "val_accuracy"), False,
                                           params.study, 5),
                      "loss": history(client, run.info.run_id, "loss")} for run in runs)
    assert first == second and len(first["loss"]) == 3


def test_the_study_stage_is_outside_the_default_pipeline_and_names_real_inputs() -> None:
    import yaml

    from tasks.params import Params

    root = code_root()
    (stage,) = yaml.safe_load((root / "pipelines/study/dvc.yaml").read_text())["stages"].values()
    assert stage["cmd"] == "python -m flows.lessons_study --use-prepared"  # the flow itself: one definition
    assert "data/prepared" in stage["deps"]  # the main pipeline's prepared data, not a copy
    assert all((root / dep).exists() for dep in stage["deps"] if dep != "data/prepared")
    assert set(stage["params"]) <= set(Params.model_fields) and "study" in stage["params"]
    outs = [out if isinstance(out, str) else next(iter(out)) for out in stage["outs"]]
    assert sorted(outs) == ["reports/study/figures", "reports/study/study.html", "reports/study/study.md",
                            "reports/study/verdicts.json"]  # what tasks.lessons_runs.write_study_report writes
    default = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert not any("lessons_study" in str(definition["cmd"]) for definition in default.values())
