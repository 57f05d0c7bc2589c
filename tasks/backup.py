"""A per-epoch backup that a kill at any instant cannot corrupt (imported only where Keras is loaded).

Keras' BackupAndRestore writes its weights file in place and its epoch file after it: a SIGKILL during the
write leaves a truncated HDF5 file (h5py then fails with a RuntimeError, which its OSError fallback does not
catch), and a kill between the two writes pairs epoch N's counter with epoch N+1's weights. Here each epoch's
weights go to their own file, and only then does the epoch file, replaced atomically, point at them: whatever
the moment of the kill, the epoch file names complete weights of that very epoch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras

METADATA_FILE = "training_metadata.json"  # {"epoch": N, "batch": 0}: epochs finished and backed up


def weights_file(backup_dir: Path, epoch: int) -> Path:
    return backup_dir / f"epoch-{epoch:04d}.weights.h5"


def backed_up_epochs(backup_dir: Path) -> int:
    """Epochs whose weights the backup holds, complete; 0 if none (or the epoch file is unreadable)."""
    try:
        epoch = int(json.loads((backup_dir / METADATA_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return epoch if weights_file(backup_dir, epoch).exists() else 0


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore (per epoch) with a write order that survives a kill at any point."""

    def __init__(self, backup_dir: Path) -> None:
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False)
        self.directory = Path(backup_dir)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._load_model()

    def _load_model(self) -> None:
        epochs = backed_up_epochs(self.directory)
        if not epochs:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)  # its variables must exist to be loaded
        self.model.load_weights(weights_file(self.directory, epochs))
        self.model._initial_epoch = epochs

    def _save_model(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        epoch = self._current_epoch
        self.model.save_weights(weights_file(self.directory, epoch), overwrite=True)
        staging = self.directory / f"{METADATA_FILE}.tmp"
        staging.write_text(json.dumps({"epoch": epoch, "batch": 0}))
        os.replace(staging, self.directory / METADATA_FILE)  # the switch to the new epoch: atomic
        for older in self.directory.glob("epoch-*.weights.h5"):
            if older.name != weights_file(self.directory, epoch).name:
                older.unlink(missing_ok=True)
