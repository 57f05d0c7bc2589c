"""Train stage: fit the classifier on the prepared splits with early stopping, checkpointing and NaN guard.

Seeded end to end (Python, NumPy, TensorFlow, op determinism, the input order), so the same params and data
give the same metrics on CPU. Early stopping restores the best weights; the metrics reported as final are
those of the restored model, recomputed, never the last epoch's.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from tasks.params import Params, TrainParams, workspace_root
from tasks.prepared import PreparedData, batched_dataset

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict[str, float]], None]
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


@dataclass
class TrainSummary:
    epochs_run: int
    best_epoch: int  # 1-based, the epoch whose weights were restored
    stopped_early: bool
    best_val_loss: float
    best_val_accuracy: float
    train_loss: float  # of the restored model on the training split (no dropout)
    train_accuracy: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training was stopped and no model is saved."""


def seed_everything(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds, plus deterministic kernels (slightly slower, same result each run)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def learning_rate_schedule(train: TrainParams, steps_per_epoch: int) -> "float | keras.optimizers.schedules.LearningRateSchedule":
    import keras

    total_steps = max(1, train.epochs * steps_per_epoch)
    if train.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps=total_steps, alpha=0.01)
    if train.lr_schedule == "exponential":
        # Reaches 10% of the initial rate at the last planned epoch.
        return keras.optimizers.schedules.ExponentialDecay(train.learning_rate, decay_steps=total_steps, decay_rate=0.1)
    return train.learning_rate


def build_optimizer(train: TrainParams, steps_per_epoch: int) -> "keras.optimizers.Optimizer":
    import keras

    rate = learning_rate_schedule(train, steps_per_epoch)
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=train.momentum)
    if train.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(rate, momentum=train.momentum)
    return keras.optimizers.Adam(rate)


def _epoch_logger(history_rows: list[dict[str, float]], on_epoch: EpochCallback | None) -> "keras.callbacks.Callback":
    import keras

    class EpochLogger(keras.callbacks.Callback):
        """Records each epoch's metrics and the learning rate actually used, and hands them on (to MLflow)."""

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            values = {key: float(value) for key, value in (logs or {}).items() if key in HISTORY_COLUMNS}
            values["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            history_rows.append({"epoch": epoch + 1, **values})
            if on_epoch:
                on_epoch(epoch + 1, values)

    return EpochLogger()


def train_classifier(
    params: Params, prepared: PreparedData, checkpoint_file: Path, on_epoch: EpochCallback | None = None
) -> tuple["keras.Model", TrainSummary, list[dict[str, float]]]:
    """Fit a new classifier; return the restored best model, its summary and the per-epoch history."""
    import time

    import keras

    from tasks.model import build_classifier

    seed_everything(params.train.seed)
    train_images, train_labels = prepared.split("train")
    val_images, val_labels = prepared.split("val")
    batch_size = params.train.batch_size
    train_batches = batched_dataset(train_images, train_labels, batch_size, shuffle=True, seed=params.train.seed)
    val_batches = batched_dataset(val_images, val_labels, batch_size, shuffle=False, seed=params.train.seed)

    model = build_classifier(params.model, params.data.image_size, len(prepared.class_names()), params.train.seed)
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    model.compile(
        optimizer=build_optimizer(params.train, steps_per_epoch),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stopping = params.train.early_stopping
    early_stopping = keras.callbacks.EarlyStopping(
        monitor=stopping.monitor, patience=stopping.patience, min_delta=stopping.min_delta, restore_best_weights=True
    )
    checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
    history_rows: list[dict[str, float]] = []
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        early_stopping,
        keras.callbacks.ModelCheckpoint(checkpoint_file, monitor=stopping.monitor, save_best_only=True),
        _epoch_logger(history_rows, on_epoch),
    ]
    started = time.perf_counter()
    log.info("train: %d train / %d val images, %d epochs max, %s lr=%g (%s)", len(train_labels), len(val_labels),
             params.train.epochs, params.train.optimizer, params.train.learning_rate, params.train.lr_schedule)
    model.fit(
        train_batches,
        validation_data=val_batches,
        epochs=params.train.epochs,
        callbacks=callbacks,
        verbose=2,  # one line per epoch: readable in logs, unlike a progress bar redrawn per step
        shuffle=False,  # the input pipeline already reshuffles, seeded, each epoch
    )
    seconds = time.perf_counter() - started
    if not history_rows or not all(math.isfinite(row.get("loss", math.nan)) for row in history_rows):
        raise TrainingDiverged(
            f"loss became NaN/inf at epoch {len(history_rows)} (train.learning_rate = {params.train.learning_rate}); "
            "no model saved"
        )

    unshuffled_train = batched_dataset(train_images, train_labels, batch_size, shuffle=False, seed=params.train.seed)
    train_loss, train_accuracy = model.evaluate(unshuffled_train, verbose=0)
    val_loss, val_accuracy = model.evaluate(val_batches, verbose=0)
    summary = TrainSummary(
        epochs_run=len(history_rows),
        best_epoch=early_stopping.best_epoch + 1,
        stopped_early=early_stopping.stopped_epoch > 0,
        best_val_loss=val_loss,
        best_val_accuracy=val_accuracy,
        train_loss=train_loss,
        train_accuracy=train_accuracy,
        seconds=round(seconds, 2),
    )
    log.info("train: restored epoch %d of %d: val_accuracy %.4f, val_loss %.4f", summary.best_epoch,
             summary.epochs_run, val_accuracy, val_loss)
    return model, summary, history_rows


def save_training_outputs(
    model: "keras.Model", summary: TrainSummary, history_rows: list[dict[str, float]], prepared: PreparedData,
    model_dir: Path, history_file: Path, summary_file: Path,
) -> None:
    """The model (with an input example and its summary), the per-epoch history CSV, the summary JSON."""
    from tasks.model import model_summary

    model_dir.mkdir(parents=True, exist_ok=True)
    model.save(model_dir / "model.keras")
    val_images, _ = prepared.split("val")
    np.save(model_dir / "input_example.npy", np.asarray(val_images[:2], dtype=np.float32))
    (model_dir / "model_summary.txt").write_text(model_summary(model) + "\n")
    with history_file.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history_rows)
    summary_file.write_text(json.dumps(asdict(summary), indent=2) + "\n")


def run_train(params: Params, run_id: str | None = None) -> str:
    """Stage entry (DVC command and Prefect task): train, log per-epoch metrics live, save and log the model."""
    from tasks import layout
    from tasks.tracking import StageRecord, log_epoch_metrics, stage_run

    root = workspace_root()
    prepared = PreparedData(root / layout.PREPARED_DIR)
    with stage_run("train", params, root / layout.PREPARE_POINTER, root / layout.TRAIN_POINTER, run_id) as run:
        model, summary, history = train_classifier(
            params, prepared, root / layout.CHECKPOINT_FILE,
            on_epoch=lambda epoch, values: log_epoch_metrics(run.run_id, epoch, values),
        )
        save_training_outputs(
            model, summary, history, prepared,
            root / layout.MODEL_DIR, root / layout.HISTORY_FILE, root / layout.TRAIN_SUMMARY_FILE,
        )
        run.complete(
            StageRecord(
                "train",
                metrics={f"train.{key}": value for key, value in summary.metrics().items()},
                artifacts=[
                    (layout.HISTORY_FILE.as_posix(), "training"),
                    (layout.TRAIN_SUMMARY_FILE.as_posix(), "training"),
                    ((layout.MODEL_DIR / "model_summary.txt").as_posix(), "training"),
                ],
                series_csv=layout.HISTORY_FILE.as_posix(),
                model_dir=layout.MODEL_DIR.as_posix(),
            )
        )
    return run.run_id
