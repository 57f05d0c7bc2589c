"""Train stage: fit the classifier with the course's knobs (lessons 1-4) and their diagnostics.

Seeded end to end (Python, NumPy, TensorFlow, op determinism, an epoch-indexed input order), so the same
params and data give the same metrics on CPU, also when a killed training is started again: Keras'
BackupAndRestore brings back weights, optimizer and epoch, and a small progress file next to it brings back
the per-epoch history and the early-stopping state. When early stopping restores the best weights, the
metrics reported as final are those of the restored model (its epoch's validation), never the last epoch's.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from tasks.errors import UserError
from tasks.names import GRADIENT_FLAG_TAG, INIT_REASON_TAG, INIT_VERDICT_TAG
from tasks.params import Params, TrainParams, flatten_params, workspace_root
from tasks.prepared import PreparedData, batched_dataset, per_class_subset

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict[str, float]], None]
HISTORY_COLUMNS = (
    "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "grad_norm", "gap_accuracy", "gap_loss",
)
PROBE_BATCH = 64  # images in the fixed batch used for the initialization diagnostics


@dataclass
class TrainSummary:
    epochs_run: int
    best_epoch: int  # 1-based, the epoch whose weights the final model has
    stopped_epoch: int  # 1-based epoch where early stopping ended training, 0 if it ran all epochs
    resumed_from_epoch: int  # 0 unless a killed training was continued
    best_val_loss: float  # of the final (restored) model: its epoch's validation
    best_val_accuracy: float
    train_loss: float  # of the final model on the training split, inference mode
    train_accuracy: float
    seconds: float
    gradient_flags: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items() if key != "gradient_flags"}


class TrainingDiverged(UserError, RuntimeError):
    """The loss became non-finite or exploded, or weights or gradients did; training was stopped and no model
    is saved. `gradient_flags` are the per-epoch gradient-norm flags up to the stop."""

    def __init__(self, message: str, gradient_flags: list[str]) -> None:
        super().__init__(message)
        self.gradient_flags = gradient_flags


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Python, NumPy and TensorFlow seeds, plus deterministic kernels (`train.deterministic`: same result each
    run). The kernel choice is process-wide, so it is set both ways: a sweep point or a test that ran a
    non-deterministic training before must not leave the next one non-reproducible."""
    import keras
    from tensorflow.python.framework import config as tf_config  # disable_op_determinism has no public alias

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf_config.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


def learning_rate_schedule(train: TrainParams, steps_per_epoch: int) -> "float | keras.optimizers.schedules.LearningRateSchedule":
    """The per-step learning rate; `plateau` starts constant and is lowered by a callback."""
    import keras

    schedule = train.schedule
    total_steps = max(1, train.epochs * steps_per_epoch)
    if train.lr_schedule == "step":
        boundaries = list(range(schedule.step_epochs * steps_per_epoch, total_steps, schedule.step_epochs * steps_per_epoch))
        values = [train.learning_rate * schedule.step_factor**index for index in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values) if boundaries else train.learning_rate
    if train.lr_schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            train.learning_rate, decay_steps=total_steps, decay_rate=schedule.decay_rate
        )
    if train.lr_schedule == "cosine":
        warmup_steps = min(int(round(schedule.warmup_epochs * steps_per_epoch)), total_steps - 1)
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup_steps else train.learning_rate,
            decay_steps=total_steps - warmup_steps,
            alpha=schedule.min_lr_fraction,
            warmup_target=train.learning_rate if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    return train.learning_rate


def build_optimizer(train: TrainParams, steps_per_epoch: int) -> "keras.optimizers.Optimizer":
    import keras

    rate = learning_rate_schedule(train, steps_per_epoch)
    clipping: dict[str, float] = {}
    if train.gradients.clip == "norm":
        clipping["global_clipnorm"] = train.gradients.clip_value
    elif train.gradients.clip == "value":
        clipping["clipvalue"] = train.gradients.clip_value
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=train.momentum, nesterov=train.nesterov, **clipping)
    if train.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(rate, rho=train.rho, momentum=train.momentum, epsilon=train.epsilon, **clipping)
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(
            rate, weight_decay=train.weight_decay, beta_1=train.beta_1, beta_2=train.beta_2, epsilon=train.epsilon, **clipping
        )
    return keras.optimizers.Adam(rate, beta_1=train.beta_1, beta_2=train.beta_2, epsilon=train.epsilon, **clipping)


def compile_classifier(model: "keras.Model", train: TrainParams, steps_per_epoch: int) -> None:
    """The optimizer, loss and metrics every training path uses, with `train.jit_compile` (XLA) applied."""
    model.compile(optimizer=build_optimizer(train, steps_per_epoch), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=train.jit_compile)


def balanced_class_weight(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """n_samples / (n_classes * count) per class (scikit-learn's "balanced")."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    by_class = {int(label): float(weight) for label, weight in zip(present, weights)}
    return {index: by_class.get(index, 1.0) for index in range(num_classes)}


def monitor_mode(monitor: str, mode: str) -> str:
    return mode if mode != "auto" else ("max" if "accuracy" in monitor else "min")


def best_epoch_of(history_rows: list[dict[str, float]], monitor: str, mode: str) -> int:
    """1-based epoch with the best monitored value (the first, on ties): what the checkpoint holds."""
    values = [row[monitor] for row in history_rows]
    finite = [value if math.isfinite(value) else (math.inf if mode == "min" else -math.inf) for value in values]
    best = min(finite) if mode == "min" else max(finite)
    return finite.index(best) + 1


# ----------------------------------------------------------------------------------------- resumable state


def seed_state_variables(model: "keras.Model") -> list:
    """The model's random-generator states: its variables that are not weights."""
    weight_ids = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weight_ids]


@dataclass
class Progress:
    """What BackupAndRestore does not keep: the history so far, and per finished epoch a snapshot of the
    callbacks' counters (early stopping, reduce-on-plateau) and the random-generator states of dropout and
    augmentation. Without them a resumed training would stop, decay or draw masks differently."""

    fingerprint: str
    run_id: str | None = None
    reference_loss: float | None = None  # the first batch's loss: what divergence is measured against
    history: list[dict[str, float]] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # aligned with history

    @staticmethod
    def file(backup_dir: Path) -> Path:
        return backup_dir / "progress.json"

    @property
    def latest(self) -> dict[str, Any]:
        return self.snapshots[-1] if self.snapshots else {}

    def save(self, backup_dir: Path) -> None:
        backup_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.file(backup_dir).with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self)))
        temporary.replace(self.file(backup_dir))  # atomic: a kill never leaves half a file


def training_fingerprint(params: Params, prepared: PreparedData) -> str:
    """Identifies 'the same training': params and the exact training data (its manifest)."""
    digest = hashlib.sha256(json.dumps(flatten_params(params), sort_keys=True).encode())
    digest.update(prepared.manifest_file.read_bytes())
    return digest.hexdigest()


def load_progress(backup_dir: Path, fingerprint: str) -> Progress | None:
    """The saved progress of this same training, cut to the epochs whose weights are backed up (a kill can
    fall between the two saves), or None: a different training's or an inconsistent backup is discarded."""
    from tasks.backup import backed_up_epochs

    progress_file = Progress.file(backup_dir)
    if progress_file.exists():
        saved = Progress(**json.loads(progress_file.read_text()))
        epochs = backed_up_epochs(backup_dir)
        if saved.fingerprint != fingerprint:
            log.info("train: discarding a backup of a different training (params or data changed)")
        elif 0 < epochs <= len(saved.history):
            saved.history, saved.snapshots = saved.history[:epochs], saved.snapshots[:epochs]
            return saved
    shutil.rmtree(backup_dir, ignore_errors=True)
    return None


def _callbacks(
    params: Params, progress: Progress, backup_dir: Path, checkpoint_file: Path,
    guards: list["keras.callbacks.Callback"], on_epoch: EpochCallback | None,
) -> list["keras.callbacks.Callback"]:
    import keras

    stopping = params.train.early_stopping
    mode = monitor_mode(stopping.monitor, stopping.mode)

    class Resumable:
        """Mixin: after Keras resets a callback at train begin, put back its counters from the last snapshot."""

        counters: tuple[str, ...] = ()

        def on_train_begin(self, logs: dict | None = None) -> None:
            super().on_train_begin(logs)
            for name, value in progress.latest.get(type(self).__name__, {}).items():
                setattr(self, name, value)

        def snapshot(self) -> dict[str, float]:
            return {name: float(getattr(self, name)) for name in self.counters}

    class ResumableEarlyStopping(Resumable, keras.callbacks.EarlyStopping):
        counters = ("best", "best_epoch", "wait")

    class ResumableReduceLROnPlateau(Resumable, keras.callbacks.ReduceLROnPlateau):
        counters = ("best", "wait", "cooldown_counter")

    class EpochRecorder(keras.callbacks.Callback):
        """Per epoch: learning rate actually used, applied gradient norm (logged by AppliedGradientNorm),
        generalization gap; saves progress and hands the values on (to MLflow, live)."""

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            values = {key: float(value) for key, value in (logs or {}).items() if key in HISTORY_COLUMNS}
            values["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            values["gap_accuracy"] = values["accuracy"] - values["val_accuracy"]
            values["gap_loss"] = values["loss"] - values["val_loss"]
            progress.history.append({"epoch": epoch + 1, **values})
            snapshot: dict[str, Any] = {type(c).__name__: c.snapshot() for c in callbacks if isinstance(c, Resumable)}
            snapshot["seed_states"] = [keras.ops.convert_to_numpy(state).tolist() for state in seed_state_variables(self.model)]
            progress.snapshots.append(snapshot)
            if params.train.resume:
                progress.save(backup_dir)
            if on_epoch:
                on_epoch(epoch + 1, values)

    callbacks: list[keras.callbacks.Callback] = list(guards)  # first: the others see grad_norm and the stop
    if stopping.enabled:
        callbacks.append(ResumableEarlyStopping(
            monitor=stopping.monitor, mode=mode, patience=stopping.patience, min_delta=stopping.min_delta,
            restore_best_weights=False,  # the best checkpoint is restored instead: it survives a restart
        ))
    if params.train.lr_schedule == "plateau":
        callbacks.append(ResumableReduceLROnPlateau(
            monitor="val_loss", factor=params.train.schedule.plateau_factor, patience=params.train.schedule.plateau_patience
        ))
    best_so_far = None
    if progress.history:
        best_so_far = progress.history[best_epoch_of(progress.history, stopping.monitor, mode) - 1][stopping.monitor]
    callbacks.append(keras.callbacks.ModelCheckpoint(
        checkpoint_file, monitor=stopping.monitor, mode=mode, save_best_only=True, initial_value_threshold=best_so_far
    ))
    callbacks.append(EpochRecorder())  # after the callbacks whose counters it snapshots
    if params.train.resume:
        from tasks.backup import AtomicBackupAndRestore

        callbacks.append(AtomicBackupAndRestore(backup_dir))  # last, so the progress file is never behind the weights
    return callbacks


def gradient_flags(history: list[dict[str, float]], vanishing_below: float, exploding_above: float) -> list[str]:
    flags = []
    for row in history:
        norm = row.get("grad_norm", math.nan)
        if not math.isfinite(norm) or norm > exploding_above:
            flags.append(f"exploding at epoch {int(row['epoch'])} (norm {norm:.3g} > {exploding_above:g})")
        elif norm < vanishing_below:
            flags.append(f"vanishing at epoch {int(row['epoch'])} (norm {norm:.3g} < {vanishing_below:g})")
    return flags


# ----------------------------------------------------------------------------------------------- training


@dataclass
class TrainingOutcome:
    model: "keras.Model"
    summary: TrainSummary
    history: list[dict[str, float]]
    tags: dict[str, str] = field(default_factory=dict)  # e.g. a transfer run's backbone lineage
    metrics: dict[str, float] = field(default_factory=dict)


def train_classifier(
    params: Params,
    prepared: PreparedData,
    checkpoint_file: Path,
    backup_dir: Path,
    on_epoch: EpochCallback | None = None,
    progress: Progress | None = None,
    train_indices: np.ndarray | None = None,
) -> TrainingOutcome:
    """Fit a new classifier (or continue `progress`); return the final model, its summary and history.
    `train_indices` trains on that subset of the training split (the limited-data learning curve); else
    `train.subset_per_class` draws one."""
    import keras

    from tasks.guards import AppliedGradientNorm, DivergenceGuard
    from tasks.model import build_classifier

    if train_indices is None and params.train.subset_per_class:
        train_indices = per_class_subset(prepared.split("train")[1], params.train.subset_per_class, params.train.seed)
    if params.model.is_transfer:  # a backbone: two-phase training (head, then fine-tuning)
        from tasks.transfer import train_transfer

        return train_transfer(params, prepared, checkpoint_file, backup_dir, on_epoch, progress, train_indices)
    seed_everything(params.train.seed, params.train.deterministic)
    train_images, train_labels = prepared.split("train")
    if train_indices is not None:
        train_images, train_labels = train_images[np.sort(train_indices)], train_labels[np.sort(train_indices)]
    val_images, val_labels = prepared.split("val")
    class_count = len(prepared.class_names())
    batch_size = params.train.batch_size
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    progress = progress or Progress(fingerprint=training_fingerprint(params, prepared))
    first_epoch = len(progress.history)

    log.info("train: building the model (conv blocks %s) and measuring its initialization", params.model.conv_filters)
    model = build_classifier(params.model, params.data.image_size, class_count, params.train.seed)
    compile_classifier(model, params.train, steps_per_epoch)
    guard = DivergenceGuard(params.train.divergence_factor, progress.reference_loss,
                            lambda loss: setattr(progress, "reference_loss", loss))
    guards = [AppliedGradientNorm(model.optimizer), guard]
    for state, saved in zip(seed_state_variables(model), progress.latest.get("seed_states", [])):
        state.assign(np.asarray(saved, dtype=keras.ops.convert_to_numpy(state).dtype))
    checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
    class_weight = balanced_class_weight(train_labels, class_count) if params.train.class_weight == "balanced" else None
    log.info(
        "train: %d train / %d val images, epochs %d-%d, %s lr=%g (%s)%s", len(train_labels), len(val_labels),
        first_epoch + 1, params.train.epochs, params.train.optimizer, params.train.learning_rate,
        params.train.lr_schedule, f", resuming after epoch {first_epoch}" if first_epoch else "",
    )
    started = time.perf_counter()
    if first_epoch < params.train.epochs:
        model.fit(
            batched_dataset(train_images, train_labels, batch_size, shuffle=True, seed=params.train.seed,
                            epochs=range(first_epoch, params.train.epochs)),
            steps_per_epoch=steps_per_epoch,
            validation_data=batched_dataset(val_images, val_labels, batch_size),
            epochs=params.train.epochs,
            class_weight=class_weight,
            callbacks=_callbacks(params, progress, backup_dir, checkpoint_file, guards, on_epoch),
            verbose=2,  # one line per epoch: readable in logs, unlike a progress bar redrawn per step
            shuffle=False,  # the input pipeline orders each epoch itself (seeded, resumable)
        )
    seconds = time.perf_counter() - started
    history = progress.history
    flags = gradient_flags(history, params.train.gradients.vanishing_below, params.train.gradients.exploding_above)
    if guard.reason or not history or not all(math.isfinite(row["loss"]) for row in history):
        shutil.rmtree(backup_dir, ignore_errors=True)  # never resume into a diverged state
        checkpoint_file.unlink(missing_ok=True)  # nor restore its weights
        raise TrainingDiverged(
            f"training diverged: {guard.reason or 'loss became NaN/inf at an epoch end'} "
            f"(train.learning_rate = {params.train.learning_rate:g}); training stopped, no model saved", flags
        )

    stopping = params.train.early_stopping
    mode = monitor_mode(stopping.monitor, stopping.mode)
    best_epoch = len(history)
    if stopping.enabled and stopping.restore_best_weights and checkpoint_file.exists():
        best_epoch = best_epoch_of(history, stopping.monitor, mode)
        model.load_weights(checkpoint_file)
    stopped_epoch = len(history) if len(history) < params.train.epochs else 0
    train_loss, train_accuracy = model.evaluate(batched_dataset(train_images, train_labels, batch_size), verbose=0)
    # The final weights are those of epoch `best_epoch`, whose validation fit ran on exactly these weights, in
    # inference mode, on the same batches: its numbers are the final model's (not evaluated a second time).
    val_loss, val_accuracy = history[best_epoch - 1]["val_loss"], history[best_epoch - 1]["val_accuracy"]
    summary = TrainSummary(
        epochs_run=len(history), best_epoch=best_epoch, stopped_epoch=stopped_epoch, resumed_from_epoch=first_epoch,
        best_val_loss=val_loss, best_val_accuracy=val_accuracy, train_loss=train_loss, train_accuracy=train_accuracy,
        seconds=round(seconds, 2), gradient_flags=flags,
    )
    log.info("train: final model = epoch %d of %d: val_accuracy %.4f, val_loss %.4f", best_epoch, len(history),
             val_accuracy, val_loss)
    return TrainingOutcome(model, summary, history)


def save_training_outputs(
    outcome: TrainingOutcome, prepared: PreparedData, model_dir: Path, history_file: Path, summary_file: Path
) -> None:
    """The model (with an input example, its signature's shapes and its summary), the per-epoch history CSV,
    the summary JSON."""
    from tasks.model import model_summary
    from tasks.tracking import keras_signature_shapes

    model_dir.mkdir(parents=True, exist_ok=True)
    outcome.model.save(model_dir / "model.keras")
    (model_dir / "signature.json").write_text(json.dumps(keras_signature_shapes(outcome.model)) + "\n")
    val_images, _ = prepared.split("val")
    np.save(model_dir / "input_example.npy", np.asarray(val_images[:2], dtype=np.float32))
    (model_dir / "model_summary.txt").write_text(model_summary(outcome.model) + "\n")
    with history_file.open("w", newline="") as handle:
        phase = ["phase"] if outcome.history and "phase" in outcome.history[0] else []  # transfer training
        writer = csv.DictWriter(handle, fieldnames=[*HISTORY_COLUMNS, *phase], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(outcome.history)
    summary_file.write_text(json.dumps(asdict(outcome.summary), indent=2) + "\n")


def diagnose_initialization(params: Params, prepared: PreparedData) -> "Initialization":
    """Lesson 1, before any epoch: probe the freshly initialized model on a fixed batch and judge it."""
    from tasks.diagnostics import Initialization, judge_initialization, probe_initialization
    from tasks.model import build_classifier

    seed_everything(params.train.seed, params.train.deterministic)
    images, labels = prepared.split("train")
    model = build_classifier(params.model, params.data.image_size, len(prepared.class_names()), params.train.seed)
    statistics = probe_initialization(model, np.asarray(images[:PROBE_BATCH], dtype=np.float32), labels[:PROBE_BATCH])
    verdict = judge_initialization(statistics)
    (log.info if verdict.healthy else log.warning)("train: initialization %s: %s",
                                                   "healthy" if verdict.healthy else "BAD", verdict.reason)
    return Initialization(statistics, verdict)


if TYPE_CHECKING:
    from tasks.diagnostics import Initialization


def run_train(params: Params, run_id: str | None = None) -> str:
    """Stage entry (DVC command and Prefect task): diagnose, train (resuming if a backup of this same
    training exists, in its MLflow run), log per-epoch metrics live, save and log the model. The outputs are
    staged and replace the previous ones only when the run succeeds (tasks/staging.py)."""
    resume_from = load_progress
    if params.model.is_transfer:
        from tasks.transfer import check_backbone_available, load_transfer_progress

        check_backbone_available(params)  # offline ImageNet weights: one line at once, not a failed download later
        resume_from = load_transfer_progress
    from tasks import layout
    from tasks.staging import staged_outputs
    from tasks.tracking import (EpochLog, StageRecord, import_end_of_stage_modules, log_artifacts, set_run_tags,
                                stage_run)

    root = workspace_root()
    prepared = PreparedData(root / layout.PREPARED_DIR)
    backup_dir = root / layout.BACKUP_DIR
    fingerprint = training_fingerprint(params, prepared)
    progress = resume_from(backup_dir, fingerprint) if params.train.resume else None
    outputs = [layout.MODEL_DIR, layout.HISTORY_FILE, layout.TRAIN_SUMMARY_FILE, layout.TRAIN_METRICS_FILE,
               layout.INIT_DIAGNOSTICS_FILE, layout.INIT_DIAGNOSTICS_PLOT, layout.TRAIN_POINTER]
    # A killed training's run is found by stage_run (it was marked with this fingerprint), so it continues.
    with staged_outputs(root, "train", outputs) as staged, \
            stage_run("train", params, root / layout.PREPARE_POINTER, root / layout.TRAIN_POINTER, run_id,
                      training_fingerprint=fingerprint if params.train.resume else None) as run:
        progress = progress or Progress(fingerprint=fingerprint)
        progress.run_id = run.run_id
        epoch_log = EpochLog(run.run_id, progress.history)  # every epoch once, also across a kill
        diagnostics = [staged.path(layout.INIT_DIAGNOSTICS_FILE), staged.path(layout.INIT_DIAGNOSTICS_PLOT)]
        initialization = diagnose_initialization(params, prepared)
        verdict = initialization.verdict
        # Logged at once, not with the stage's record at the end: a bad initialization shows before any epoch.
        set_run_tags(run.run_id, {INIT_VERDICT_TAG: "healthy" if verdict.healthy else "bad",
                                  INIT_REASON_TAG: verdict.reason})

        def report_initialization() -> None:  # drawn and logged while training runs (matplotlib: about 1 s)
            initialization.write_report(*diagnostics)
            log_artifacts(run.run_id, diagnostics, "diagnostics")

        run.in_background(report_initialization)
        run.in_background(import_end_of_stage_modules)  # off the critical path too, while training runs
        try:
            outcome = train_classifier(
                params, prepared, root / layout.CHECKPOINT_FILE, backup_dir, on_epoch=epoch_log, progress=progress,
            )
        except TrainingDiverged as diverged:
            set_run_tags(run.run_id, {GRADIENT_FLAG_TAG: "; ".join(diverged.gradient_flags) or "none"})
            raise
        save_training_outputs(outcome, prepared, staged.path(layout.MODEL_DIR), staged.path(layout.HISTORY_FILE),
                              staged.path(layout.TRAIN_SUMMARY_FILE))
        layout.write_metrics(outcome.summary.metrics(), staged.path(layout.TRAIN_METRICS_FILE))
        run.wait_for_background()  # the diagnostics are outputs too
        staged.publish()
        run.complete(
            StageRecord(
                "train",
                metrics={**{f"train.{key}": value for key, value in outcome.summary.metrics().items()},
                         "init.variance_ratio": min(verdict.variance_ratio, 1e30), **outcome.metrics},
                tags={INIT_VERDICT_TAG: "healthy" if verdict.healthy else "bad",
                      INIT_REASON_TAG: verdict.reason,
                      GRADIENT_FLAG_TAG: "; ".join(outcome.summary.gradient_flags) or "none", **outcome.tags},
                artifacts=[
                    (layout.HISTORY_FILE.as_posix(), "training"),
                    (layout.TRAIN_SUMMARY_FILE.as_posix(), "training"),
                    ((layout.MODEL_DIR / "model_summary.txt").as_posix(), "training"),
                    (layout.INIT_DIAGNOSTICS_FILE.as_posix(), "diagnostics"),
                    (layout.INIT_DIAGNOSTICS_PLOT.as_posix(), "diagnostics"),
                ],
                series_csv=layout.HISTORY_FILE.as_posix(),
                model_dir=layout.MODEL_DIR.as_posix(),
            )
        )
    shutil.rmtree(backup_dir, ignore_errors=True)  # finished: nothing left to resume
    return run.run_id
