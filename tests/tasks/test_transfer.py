"""Two-phase transfer training: phase 2 at the lower learning rate, the phase on every epoch, frozen features
cached per data version, and a training interrupted in phase 2 that resumes there and ends as if uninterrupted."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import keras
import pytest

from tasks.data import acquire, prepare_dataset
from tasks.features import FEATURES_DIR
from tasks.params import Params, validate_params
from tasks.prepared import PreparedData
from tasks.train import train_classifier
from tests.conftest import tiny_params_tree

LEARNING_RATE = 0.01


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A workspace (the feature cache lives under it) with prepared tiny data and a tiny backbone file."""
    root = tmp_path_factory.mktemp("transfer")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASSAVA_WORKSPACE", str(root))
        params = validate_params(tiny_params_tree())
        acquire(params.data, root / "raw")
        prepare_dataset(params.data, root / "raw", root / "prepared")
        inputs = keras.Input((None, None, 3))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(4, 3, strides=2, name="tiny_conv1")(x)
        x = keras.layers.BatchNormalization(name="tiny_bn")(x)
        x = keras.layers.Conv2D(6, 3, strides=2, activation="relu", name="tiny_conv2")(x)
        keras.Model(inputs, x).save(root / "tiny.keras")
        yield root


def _params(root: Path, *overrides: str) -> Params:
    return validate_params(tiny_params_tree([
        f"model.backbone={root / 'tiny.keras'}", f"train.learning_rate={LEARNING_RATE}", "train.lr_schedule=constant",
        "train.early_stopping.enabled=false", "transfer.head_epochs=2", "transfer.fine_tune_epochs=2",
        "transfer.fine_tune_layers=all", "transfer.fine_tune_lr_factor=0.1", *overrides,
    ]))


def _train(root: Path, params: Params, prepared: str = "prepared", on_epoch=None, backup: str = "backup"):
    return train_classifier(params, PreparedData(root / prepared), root / "checkpoints" / "best.keras", root / backup,
                            on_epoch=on_epoch)


def test_phase_two_fine_tunes_at_the_lower_learning_rate_and_every_epoch_names_its_phase(root: Path) -> None:
    logged: list[tuple[int, dict]] = []
    outcome = _train(root, _params(root), on_epoch=lambda epoch, values: logged.append((epoch, dict(values))))

    assert [epoch for epoch, _ in logged] == [1, 2, 3, 4]
    assert [values["phase"] for _, values in logged] == [1, 1, 2, 2]
    rates = [values["learning_rate"] for _, values in logged]
    assert rates[:2] == pytest.approx([LEARNING_RATE] * 2) and rates[2:] == pytest.approx([LEARNING_RATE * 0.1] * 2)
    assert [row["phase"] for row in outcome.history] == [1, 1, 2, 2]
    assert outcome.metrics["transfer.phase1_trainable_weights"] == 4  # the head only
    assert outcome.metrics["transfer.phase2_trainable_weights"] == 4 + 4  # and both convolutions, not the batch norm
    assert outcome.tags["cassava.transfer.fine_tuned_layers"] == "tiny_conv1, tiny_conv2"


def test_frozen_features_are_reused_while_the_data_version_is_unchanged_and_rebuilt_when_it_changes(root: Path) -> None:
    params = _params(root, "transfer.fine_tune_layers=0", "transfer.head_epochs=1", "train.seed=5")
    shutil.rmtree(root / FEATURES_DIR, ignore_errors=True)  # (the test above cached this backbone's features)
    first = _train(root, params, backup="backup-first")
    again = _train(root, params, backup="backup-again")  # a new training (a finished one would be resumed)
    assert (first.tags["cassava.features_cache"], again.tags["cassava.features_cache"]) == ("built", "reused")
    assert first.tags["cassava.features_key"] == again.tags["cassava.features_key"]
    assert again.history == first.history  # the cached features are the ones computed

    other_data = validate_params(tiny_params_tree(["data.seed=7"])).data  # a new split: a new data version
    prepare_dataset(other_data, root / "raw", root / "prepared-other")
    changed = _train(root, params, prepared="prepared-other", backup="backup-other")
    assert changed.tags["cassava.features_cache"] == "built"
    assert changed.tags["cassava.features_key"] != first.tags["cassava.features_key"]
    assert (root / FEATURES_DIR / changed.tags["cassava.features_key"] / "train_features.npy").exists()


class Killed(Exception):
    """Stands in for a kill between two epochs (after the backup of the epoch before)."""


@pytest.mark.reliability
def test_a_training_interrupted_in_phase_two_resumes_there_and_ends_as_if_uninterrupted(root: Path) -> None:
    params = _params(root, "transfer.fine_tune_epochs=3", "train.seed=3")
    uninterrupted = _train(root, params, backup="backup-straight")

    def kill_in_phase_two(epoch: int, values: dict) -> None:
        if epoch == 4:  # phase 2's second epoch: phase 1 and phase 2's first epoch are backed up
            raise Killed()

    with pytest.raises(Killed):
        _train(root, params, on_epoch=kill_in_phase_two, backup="backup-killed")
    logged: list[int] = []
    resumed = _train(root, params, on_epoch=lambda epoch, values: logged.append(epoch), backup="backup-killed")

    assert logged == [4, 5]  # phase 1 was not run again, nor phase 2's first epoch
    assert resumed.summary.resumed_from_epoch == 3
    assert [row["phase"] for row in resumed.history] == [1, 1, 2, 2, 2]
    for mine, theirs in zip(resumed.history, uninterrupted.history):
        assert mine == pytest.approx(theirs, rel=1e-5)


@pytest.mark.reliability
def test_a_transfer_training_killed_in_phase_two_resumes_in_its_run_and_ends_as_if_uninterrupted(workspace: Path) -> None:
    import json
    import os
    import signal
    import subprocess
    import time

    from mlflow import MlflowClient

    from tasks.data import run_acquire, run_prepare
    from tasks.layout import BACKUP_DIR, HISTORY_FILE, TRAIN_SUMMARY_FILE
    from tasks.params import load_params
    from tasks.tracking import configure_tracking
    from tests.tasks.test_train_robustness import _run_to_completion, _train_command, _write_params

    tune_epochs = 12  # a tiny backbone's epochs take milliseconds: enough of them that the kill lands mid-phase
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
    keras.Model(inputs, x).save(workspace / "tiny.keras")
    _write_params(workspace, "model.backbone=tiny.keras", "transfer.head_epochs=2", f"transfer.fine_tune_epochs={tune_epochs}",
                  "transfer.fine_tune_layers=all", "train.early_stopping.enabled=false", "train.lr_schedule=constant")
    params = load_params()
    run_prepare(params, run_acquire(params))
    command, environment = _train_command(workspace)
    phase_two = workspace / BACKUP_DIR / "phase2" / "training_metadata.json"

    def phase_two_epochs_backed_up() -> int:
        try:
            return int(json.loads(phase_two.read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            return 0

    training = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and phase_two_epochs_backed_up() < 1:
        assert training.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(training.pid, signal.SIGKILL)  # as a power cut: no handler runs
    training.wait()
    done_in_phase_two = phase_two_epochs_backed_up()
    assert 1 <= done_in_phase_two < tune_epochs
    run_id = json.loads((workspace / BACKUP_DIR / "transfer.json").read_text())["run_id"]

    _run_to_completion(command, environment)
    summary = json.loads((workspace / TRAIN_SUMMARY_FILE).read_text())
    assert summary["resumed_from_epoch"] == 2 + done_in_phase_two and summary["epochs_run"] == 2 + tune_epochs
    resumed_history = (workspace / HISTORY_FILE).read_text()
    configure_tracking()
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and "cassava.failure" not in run.data.tags
    phases = MlflowClient().get_metric_history(run_id, "phase")
    assert sorted((point.step, point.value) for point in phases) == [(1, 1), (2, 1)] + [
        (epoch, 2) for epoch in range(3, 3 + tune_epochs)]

    _run_to_completion(command, environment)  # uninterrupted, from scratch: the same history
    assert json.loads((workspace / TRAIN_SUMMARY_FILE).read_text())["resumed_from_epoch"] == 0
    assert (workspace / HISTORY_FILE).read_text() == resumed_history
