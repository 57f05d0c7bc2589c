"""The per-epoch backup survives a kill at any instant of its write (tasks/backup.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tasks.backup import METADATA_FILE, backed_up_epochs, weights_file


def _model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def _fit(model, backup_dir: Path, epochs: int) -> list[int]:
    import keras

    from tasks.backup import AtomicBackupAndRestore

    seen: list[int] = []
    x, y = np.random.default_rng(0).normal(size=(16, 4)).astype("float32"), np.arange(16) % 3
    model.fit(x, y, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: seen.append(epoch)),
                         AtomicBackupAndRestore(backup_dir)])
    return seen


def test_each_epoch_leaves_one_complete_weights_file_named_by_the_epoch_file(tmp_path: Path) -> None:
    _fit(_model(), tmp_path, 3)
    assert backed_up_epochs(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.glob("*.weights.h5")) == [weights_file(tmp_path, 3).name]


def test_a_kill_while_the_next_epoch_is_written_resumes_from_the_last_complete_one(tmp_path: Path) -> None:
    first = _model()
    _fit(first, tmp_path, 2)
    saved = [w.copy() for w in first.get_weights()]
    # The kill cut the write of epoch 3's weights short: a truncated HDF5 file, the epoch file still at 2.
    weights_file(tmp_path, 3).write_bytes(weights_file(tmp_path, 2).read_bytes()[:2048])
    resumed = _model()
    epochs_run = _fit(resumed, tmp_path, 2)
    assert epochs_run == []  # nothing left to run: epoch 2 was complete
    assert all(np.array_equal(a, b) for a, b in zip(saved, resumed.get_weights()))


def test_an_unreadable_or_dangling_epoch_file_means_no_backup(tmp_path: Path) -> None:
    (tmp_path / METADATA_FILE).write_text('{"epo')
    assert backed_up_epochs(tmp_path) == 0
    (tmp_path / METADATA_FILE).write_text(json.dumps({"epoch": 4, "batch": 0}))
    assert backed_up_epochs(tmp_path) == 0  # epoch 4's weights never landed
    assert _fit(_model(), tmp_path, 2) == [0, 1]
