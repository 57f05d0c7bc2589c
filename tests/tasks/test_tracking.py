"""tracking.stage_run against a real SQLite MLflow store: resume, carry-over, and never a run left RUNNING."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.layout import INTERRUPTED_RUN_FILE
from tasks.names import stage_done_tag
from tasks.params import Params, code_root, flatten_params, load_params
from tasks.tracking import (
    EXPERIMENT_KIND_TAG,
    EpochLog,
    StageRecord,
    code_state,
    configure_tracking,
    describe_run,
    ensure_experiment,
    experiment_name,
    log_epoch_metrics,
    read_pointer,
    reap_orphaned_runs,
    stage_run,
    unique_run_name,
)


def _record(workspace: Path, stage: str, value: float) -> StageRecord:
    report = workspace / f"{stage}.txt"
    report.write_text(f"{stage} report\n")
    return StageRecord(stage, metrics={f"{stage}.value": value}, artifacts=[(report.name, stage)])


def test_stages_of_one_execution_share_one_run(workspace: Path, tiny_params: Params) -> None:
    with stage_run("acquire", tiny_params, None, workspace / "a.json") as first:
        first.complete(_record(workspace, "acquire", 1.0))
    with stage_run("prepare", tiny_params, workspace / "a.json", workspace / "p.json") as second:
        second.complete(_record(workspace, "prepare", 2.0))
    assert second.run_id == first.run_id
    run = MlflowClient().get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"acquire.value": 1.0, "prepare.value": 2.0}
    assert run.data.params == flatten_params(tiny_params)
    assert run.data.tags["cassava.stage.acquire"] == run.data.tags["cassava.stage.prepare"] == "done"
    assert run.data.tags["cassava.trigger"] == "cli"
    assert "cassava.version.mlflow" in run.data.tags and "mlflow.source.git.commit" in run.data.tags
    run_id, records = read_pointer(workspace / "p.json")
    assert run_id == first.run_id and [record.stage for record in records] == ["acquire", "prepare"]


def test_rerunning_a_later_stage_carries_the_story_into_a_new_linked_run(workspace: Path, tiny_params: Params) -> None:
    with stage_run("acquire", tiny_params, None, workspace / "a.json") as first:
        first.complete(_record(workspace, "acquire", 1.0))
    with stage_run("prepare", tiny_params, workspace / "a.json", workspace / "p.json") as run:
        run.complete(_record(workspace, "prepare", 2.0))
    # As `dvc repro` after a prepare-only param change: acquire is skipped, prepare runs again.
    with stage_run("prepare", tiny_params, workspace / "a.json", workspace / "p.json") as rerun:
        rerun.complete(_record(workspace, "prepare", 3.0))
    assert rerun.run_id != first.run_id
    carried = MlflowClient().get_run(rerun.run_id)
    assert carried.data.metrics == {"acquire.value": 1.0, "prepare.value": 3.0}
    assert carried.data.tags["cassava.carried_over_from"] == first.run_id
    assert carried.data.tags["cassava.acquire_run_id"] == first.run_id
    artifacts = {item.path for item in MlflowClient().list_artifacts(rerun.run_id, "acquire")}
    assert artifacts == {"acquire/acquire.txt"}


def test_changed_params_start_a_new_run_instead_of_resuming(workspace: Path, tiny_params: Params) -> None:
    with stage_run("acquire", tiny_params, None, workspace / "a.json") as first:
        first.complete(_record(workspace, "acquire", 1.0))
    changed = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"learning_rate": 0.5})})
    with stage_run("prepare", changed, workspace / "a.json", workspace / "p.json") as second:
        second.complete(_record(workspace, "prepare", 2.0))
    assert second.run_id != first.run_id
    assert MlflowClient().get_run(second.run_id).data.params["train.learning_rate"] == "0.5"


def test_a_failing_stage_ends_failed_with_the_reason(workspace: Path, tiny_params: Params) -> None:
    with pytest.raises(ZeroDivisionError):
        with stage_run("train", tiny_params, None, workspace / "t.json") as run:
            1 / 0
    failed = MlflowClient().get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["cassava.failure"] == "train: ZeroDivisionError: division by zero"
    assert not (workspace / "t.json").exists()


def test_background_work_is_done_before_the_run_ends_finished(workspace: Path, tiny_params: Params) -> None:
    def slow_logging() -> None:
        time.sleep(0.5)  # still working when the stage body ends
        MlflowClient().set_tag(run.run_id, "logged_in_background", "yes")

    with stage_run("train", tiny_params, None, workspace / "t.json") as run:
        run.in_background(slow_logging)
    finished = MlflowClient().get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["logged_in_background"] == "yes"


def test_a_failure_in_background_work_ends_the_run_failed(workspace: Path, tiny_params: Params) -> None:
    def broken_plot() -> None:
        raise RuntimeError("the plot could not be drawn")

    with pytest.raises(RuntimeError, match="the plot could not be drawn"):
        with stage_run("train", tiny_params, None, workspace / "t.json") as run:
            run.in_background(broken_plot)
    failed = MlflowClient().get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["cassava.failure"] == "train: RuntimeError: the plot could not be drawn"
    assert stage_done_tag("train") not in failed.data.tags
    assert not (workspace / "t.json").exists()  # no pointer: the next stage does not build on it


def test_an_interrupted_stage_ends_killed(workspace: Path, tiny_params: Params) -> None:
    with pytest.raises(KeyboardInterrupt):
        with stage_run("train", tiny_params, None, workspace / "t.json") as run:
            raise KeyboardInterrupt
    assert MlflowClient().get_run(run.run_id).info.status == "KILLED"


def _stage_in_subprocess(workspace: Path, ending: str, fingerprint: str | None = None) -> tuple[int, str]:
    """Run a stage in another process that ends with `ending` inside the stage; (exit code, its run id)."""
    script = (
        "import os, pathlib, signal\n"
        "from tasks.params import load_params\n"
        "from tasks.tracking import stage_run\n"
        f"with stage_run('train', load_params(), None, pathlib.Path('t.json'), training_fingerprint={fingerprint!r}) as run:\n"
        "    print(run.run_id, flush=True)\n"
        f"    {ending}\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=workspace,
                            env=_env_with_code_on_path())
    configure_tracking()
    return result.returncode, result.stdout.split()[0]


@pytest.mark.slow
def test_sigterm_ends_the_run_killed(workspace: Path) -> None:
    returncode, run_id = _stage_in_subprocess(workspace, "os.kill(os.getpid(), signal.SIGTERM)")
    assert returncode != 0
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED"
    assert "interrupted" in run.data.tags["cassava.failure"]


@pytest.mark.slow
def test_runs_of_dead_processes_are_reaped(workspace: Path, tiny_params: Params) -> None:
    _, run_id = _stage_in_subprocess(workspace, "os._exit(9)  # as SIGKILL: no cleanup at all")
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "RUNNING"
    assert reap_orphaned_runs(client, ensure_experiment(experiment_name(tiny_params))) == [run_id]
    assert client.get_run(run_id).info.status == "KILLED"




@pytest.mark.slow
def test_a_killed_training_is_continued_in_its_run_by_the_next_execution(workspace: Path, tiny_params: Params) -> None:
    _, killed = _stage_in_subprocess(workspace, "os._exit(9)  # as SIGKILL", fingerprint="training-1")
    assert (workspace / INTERRUPTED_RUN_FILE).exists()
    # The next execution's first stage (the flow's acquire) continues the killed run, whose process is gone.
    with stage_run("acquire", tiny_params, None, workspace / "a.json") as first:
        assert MlflowClient().get_run(first.run_id).info.status == "RUNNING"
    assert first.run_id == killed
    run = MlflowClient().get_run(killed)
    assert run.info.status == "FINISHED" and "cassava.failure" not in run.data.tags
    assert "died" in run.data.tags["cassava.resumed_after"]

    changed = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"epochs": 9})})
    with stage_run("acquire", changed, None, workspace / "other.json") as other:
        pass
    assert other.run_id != killed  # other params: another training, another run

    # The same params, but the data changed under the killed training: its epochs are not mixed with these.
    with stage_run("train", tiny_params, workspace / "a.json", workspace / "t.json", first.run_id,
                   training_fingerprint="training-2") as retrained:
        assert (workspace / INTERRUPTED_RUN_FILE).exists()
    assert retrained.run_id not in (killed, other.run_id)
    assert MlflowClient().get_run(retrained.run_id).data.tags["cassava.carried_over_from"] == killed
    assert not (workspace / INTERRUPTED_RUN_FILE).exists()  # finished: nothing left to continue


def test_git_dirty_means_code_changed_not_pipeline_outputs(tmp_path: Path) -> None:
    repo = tmp_path / "clone"
    for name in ("dvc.yaml", "tasks/train.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(code_root() / name, repo / name)
    outputs = ["dvc.lock", "params.yaml", "models/train.mlflow.json", "models/history.csv", "reports/metrics.json",
               "models/train_metrics.json", "reports/all_metrics.json"]
    for name in outputs:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("as committed\n")
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *command], cwd=repo, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert code_state(repo) == (commit, False)  # a fresh clone
    for name in outputs:  # what a run rewrites
        (repo / name).write_text("rewritten by a run\n")
    assert code_state(repo) == (commit, False)
    (repo / "tasks/train.py").write_text((repo / "tasks/train.py").read_text() + "\n# an edit\n")
    assert code_state(repo) == (commit, True)
    assert code_state(tmp_path) is None  # not a git checkout


@pytest.mark.reliability
def test_three_processes_start_together_on_a_brand_new_store(workspace: Path) -> None:
    (workspace / "mlflow.db").unlink()  # brand new: MLflow must create its tables first
    script = (
        "import os, pathlib\n"
        "from tasks.params import load_params\n"
        "from tasks.tracking import stage_run\n"
        "with stage_run('acquire', load_params(), None, pathlib.Path(f'a{os.getpid()}.json')) as run:\n"
        "    print(run.run_id)\n"
    )
    starts = [subprocess.Popen([sys.executable, "-c", script], cwd=workspace, env=_env_with_code_on_path(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = [start.communicate(timeout=900) for start in starts]
    for start, (_, error) in zip(starts, outcomes):
        assert start.returncode == 0, error[-3000:]
    configure_tracking()
    client = MlflowClient()
    (experiment,) = [item for item in client.search_experiments() if item.name == "cassava-synthetic"]
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(output.strip() for output, _ in outcomes)
    assert {run.info.status for run in runs} == {"FINISHED"}


@pytest.mark.parametrize(
    ("overrides", "data_version", "expected"),
    [
        ([], None, "defaults"),
        ([], "0123456789abcdef.dir", "defaults data=01234567"),
        (["model.batch_norm=false", "train.optimizer=sgd"], None, "bn=off sgd"),
        (["train.epochs=3"], None, "ep=3"),
        (["train.epochs=15"], None, "defaults"),  # the default value: nothing differs
        (["train.optimizer=sgd", "train.learning_rate=0.01", "model.batch_norm=false", "train.epochs=20"], "abcdef12345",
         "bn=off sgd lr=0.01 ep=20 data=abcdef12"),
        (["model.batch_norm=[true, false, true]", "model.conv_filters=[8, 16, 32]"], None, "cnn=8-16-32 bn=on-off-on"),
        (["train.early_stopping.patience=10", "model.augmentation.flip=horizontal"], None, "flip=horizontal patience=10"),
        (["train.seed=7"], None, "train.seed=7"),  # seed is also data.seed and evaluate.seed
        (["data.source=folder", "data.root=/data/icassava/train"], None, "root=train"),  # the experiment says folder
        (["tracking.run_name=my baseline"], "0123456789", "my baseline"),
    ],
)
def test_run_names_say_what_differs_from_the_defaults(overrides: list[str], data_version: str | None,
                                                      expected: str) -> None:
    params = load_params(code_root() / "params.yaml", overrides)
    assert describe_run(params, data_version) == expected


def test_a_long_run_name_says_how_many_more_params_differ() -> None:
    overrides = [f"evaluate.{key}" for key in ("batch_size=7", "top_k=3", "calibration_bins=9", "gallery_size=3",
                                               "saliency_per_class=1", "shift_auc_threshold=0.7", "seed=4")]
    name = describe_run(load_params(code_root() / "params.yaml", [*overrides, "train.epochs=2"]), None)
    assert name.startswith("ep=2 evaluate.batch_size=7 top_k=3 calibration_bins=9")
    assert name.endswith(" +2 more") and len(name) <= 100


@pytest.mark.parametrize(
    ("taken", "current", "expected"),
    [
        ([], None, "bn=off"),
        (["bn=off"], None, "bn=off #2"),
        (["bn=off", "bn=off #2", "bn=off #4"], None, "bn=off #3"),
        (["bn=off"], "bn=off #2", "bn=off #2"),  # a run keeps the number it has
        (["bn=off #2"], "bn=off #2", "bn=off"),  # ... unless another run holds it
        (["bn=off"], "ep=3", "bn=off #2"),  # renamed when its params say otherwise
    ],
)
def test_repeated_run_names_get_a_number(taken: list[str], current: str | None, expected: str) -> None:
    assert unique_run_name("bn=off", taken, current) == expected


def test_two_runs_named_at_the_same_instant_end_with_different_names(workspace: Path, tiny_params: Params) -> None:
    import threading

    from tasks.names import NAME_KEY_TAG
    from tasks.tracking import _name_run, name_key

    configure_tracking()
    experiment_id = ensure_experiment(experiment_name(tiny_params))
    both_looked = threading.Barrier(2, timeout=60)

    class RacingClient(MlflowClient):
        """Each client's first look at the taken names waits for the other's: both see the name free."""

        looked = False

        def search_runs(self, *args, **kwargs):
            found = super().search_runs(*args, **kwargs)
            if not self.looked:
                self.looked = True
                both_looked.wait()
            return found

    tags = {NAME_KEY_TAG: name_key(tiny_params)}  # as stage_run creates its runs
    first = MlflowClient().create_run(experiment_id, run_name="starting", tags=tags).info.run_id
    second = MlflowClient().create_run(experiment_id, run_name="starting", tags=tags).info.run_id
    threads = [threading.Thread(target=_name_run, args=(RacingClient(), run_id, tiny_params, None))
               for run_id in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    base = describe_run(tiny_params, None)
    names = {MlflowClient().get_run(run_id).info.run_name for run_id in (first, second)}
    assert names == {base, f"{base} #2"}


def test_runs_with_the_same_params_get_unique_names_in_the_store(workspace: Path, tiny_params: Params) -> None:
    names = []
    for index in range(3):
        with stage_run("acquire", tiny_params, None, workspace / "a.json") as run:
            pass
        names.append(MlflowClient().get_run(run.run_id).info.run_name)
    base = describe_run(tiny_params, None)
    assert names == [base, f"{base} #2", f"{base} #3"]
    with stage_run("prepare", tiny_params, workspace / "a.json", workspace / "p.json") as resumed:
        pass
    assert resumed.run_id == run.run_id and MlflowClient().get_run(run.run_id).info.run_name == f"{base} #3"


def test_experiments_open_on_the_training_view(workspace: Path, tiny_params: Params) -> None:
    configure_tracking()
    client = MlflowClient()
    created = client.get_experiment(ensure_experiment("brand-new"))
    assert created.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = client.create_experiment("made-before-the-tag")  # as earlier versions of the pipeline left them
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(older).tags
    assert ensure_experiment("made-before-the-tag") == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_data_counters_are_tags_not_metrics(workspace: Path, tiny_params: Params) -> None:
    from tasks.data import run_acquire, run_prepare
    from tasks.prepared import PreparedData

    run_id = run_prepare(tiny_params, run_acquire(tiny_params))
    run = MlflowClient().get_run(run_id)
    assert not [key for key in run.data.metrics if key.startswith("data.")]
    report = json.loads(PreparedData(workspace / "data/prepared").report_file.read_text())
    assert run.data.tags["cassava.data.raw_files"] == str(16 * 5)
    assert run.data.tags["cassava.data.images_kept"] == str(report["images_kept"])
    split_total = sum(int(run.data.tags[f"cassava.data.{split}_images"]) for split in ("train", "val", "test"))
    assert split_total == report["images_kept"]


def test_every_epoch_is_logged_once_across_a_kill(workspace: Path, tiny_params: Params) -> None:
    with stage_run("train", tiny_params, None, workspace / "t.json") as run:
        for epoch in (1, 2, 3):  # the killed attempt logged epoch 3, but its backup holds epochs 1-2 only
            log_epoch_metrics(run.run_id, epoch, {"loss": 1.0 / epoch, "val_loss": 2.0 / epoch})
        backed_up = [{"epoch": epoch, "loss": 1.0 / epoch, "val_loss": 2.0 / epoch} for epoch in (1, 2)]
        resumed = EpochLog(run.run_id, backed_up)
        for epoch in (3, 4):  # the resumed training runs epoch 3 again, then 4
            resumed(epoch, {"loss": 1.0 / epoch, "val_loss": 2.0 / epoch})
    # A run that lost epoch 2 (killed between the backup and the log) gets it back from the backup.
    with stage_run("train", tiny_params, None, workspace / "t2.json") as other:
        log_epoch_metrics(other.run_id, 1, {"loss": 1.0, "val_loss": 2.0})
        EpochLog(other.run_id, backed_up)
    client = MlflowClient()
    for key in ("loss", "val_loss"):
        assert [point.step for point in client.get_metric_history(run.run_id, key)] == [1, 2, 3, 4]
        assert [point.step for point in client.get_metric_history(other.run_id, key)] == [1, 2]


def _env_with_code_on_path() -> dict[str, str]:
    import os

    from tasks.params import code_root

    return {**os.environ, "PYTHONPATH": str(code_root())}


def test_dvc_metrics_files_hold_the_headline_numbers_only(tmp_path: Path) -> None:
    from tasks.layout import write_metrics

    evaluation = {"test_recall.cmd": 0.5, "test_top3_accuracy": 0.9, "test_macro_f1": 0.6, "test_accuracy": 0.7,
                  "test_expected_calibration_error": 0.1, "test_precision.cbb": 0.4}
    write_metrics(evaluation, tmp_path / "metrics.json", tmp_path / "all_metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "test_accuracy": 0.7, "test_macro_f1": 0.6, "test_top3_accuracy": 0.9}
    assert json.loads((tmp_path / "all_metrics.json").read_text()) == evaluation
    training = {"epochs_run": 6.0, "best_epoch": 4.0, "best_val_accuracy": 0.8, "seconds": 12.5}
    write_metrics(training, tmp_path / "train_metrics.json")
    assert json.loads((tmp_path / "train_metrics.json").read_text()) == {"best_epoch": 4.0, "best_val_accuracy": 0.8}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost one, as intended
def test_a_sigterm_whose_exception_is_lost_in_a_weakref_callback_is_delivered_again() -> None:
    import os
    import signal
    import time
    import weakref

    from tasks.tracking import Terminated, _sigterm_raises

    class Thing:
        pass

    def on_collected(_: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):  # the handler runs in here: Python prints "Exception ignored" and goes on
            pass

    started = time.monotonic()
    with pytest.raises(Terminated):
        with _sigterm_raises():
            thing = Thing()
            reference = weakref.ref(thing, on_collected)
            del thing
            while time.monotonic() - started < 20:  # a training that would go on
                time.sleep(0.01)
    assert reference() is None and time.monotonic() - started < 10
