"""Two-phase transfer training: (1) a new head on the frozen backbone, (2) fine-tuning the backbone's top layers.

Phase 1 trains only the head (the backbone is frozen and, like in phase 2, always runs in inference mode, so
its batch-norm statistics stay those it was trained with). With `transfer.cache_features` it trains on
backbone features computed once per data version (tasks/features.py), so a head epoch costs milliseconds.
Phase 2 unfreezes the top `transfer.fine_tune_layers` layers of the backbone (batch-norm layers stay frozen)
and trains the whole model end to end, with augmentation, at a lower learning rate.

Each phase is a training of its own as tasks/train.py runs one (same callbacks: early stopping, schedule,
NaN stop, per-epoch recorder, backup and restore), with its own backup folder, so a killed training resumes
in the phase it was in: `backup/transfer.json` says which phases are done, `backup/phase1.weights.h5` holds
the model phase 1 ended with. Per-epoch metrics carry `phase` (1 or 2) and run on one epoch axis.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.params import Params
from tasks.prepared import PreparedData, batched_dataset
from tasks.train import (
    EpochCallback, Progress, TrainingDiverged, TrainingOutcome, TrainSummary, _callbacks,
    balanced_class_weight, best_epoch_of, compile_classifier, gradient_flags, load_progress, monitor_mode,
    seed_everything, seed_state_variables, training_fingerprint,
)

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)
STATE_FILE = "transfer.json"
PHASE1_WEIGHTS = "phase1.weights.h5"


# ------------------------------------------------------------------------------------- freezing the layers


def freeze_backbone(model: "keras.Model") -> None:
    """Phase 1: nothing of the backbone trains."""
    from tasks.backbones import BACKBONE_LAYER

    model.get_layer(BACKBONE_LAYER).trainable = False


def unfreeze_top_layers(model: "keras.Model", count: int | str) -> list[str]:
    """Phase 2: the backbone's top `count` layers (nested models expanded; "all": every one) train, except
    batch normalization, whose scale and shift stay as pretrained. Returns the names of the layers that train."""
    import keras

    from tasks.backbones import BACKBONE_LAYER, leaf_layers

    backbone = model.get_layer(BACKBONE_LAYER)
    backbone.trainable = True  # sets every nested layer; then each is set again below
    leaves = leaf_layers(backbone)
    first = 0 if count == "all" else max(0, len(leaves) - int(count))
    for index, layer in enumerate(leaves):
        layer.trainable = index >= first and not isinstance(layer, keras.layers.BatchNormalization)
    return [layer.name for layer in leaves if layer.trainable and layer.weights]


def head_on_features(model: "keras.Model") -> "keras.Model":
    """The model's head (the layers after `pool`) as a model of its own on pooled features; the layers are
    shared, so training it trains the full model's head."""
    import keras

    names = [layer.name for layer in model.layers]
    pool = model.get_layer("pool")
    features = keras.Input(shape=tuple(pool.output.shape[1:]), name="features")
    x = features
    for layer in model.layers[names.index("pool") + 1:]:
        x = layer(x)
    return keras.Model(features, x, name="head")


def feature_extractor(model: "keras.Model") -> "keras.Model":
    return __import__("keras").Model(model.inputs, model.get_layer("pool").output, name="features")


# ------------------------------------------------------------------------------------------ resumable state


@dataclass
class TransferState:
    """What survives a kill between phases (next to each phase's own backup folder)."""

    fingerprint: str
    run_id: str | None = None
    phase1_done: bool = False
    phase1_history: list[dict[str, float]] = field(default_factory=list)
    phase1_best_epoch: int = 0

    @staticmethod
    def file(backup_dir: Path) -> Path:
        return backup_dir / STATE_FILE

    def save(self, backup_dir: Path) -> None:
        backup_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.file(backup_dir).with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self)))
        temporary.replace(self.file(backup_dir))


def load_transfer_progress(backup_dir: Path, fingerprint: str) -> Progress | None:
    """The resume hook run_train uses for transfer training: the run to continue (as `Progress.run_id`) if
    this same training was backed up, else None, with a different training's backup removed."""
    import shutil

    state_file = TransferState.file(backup_dir)
    if state_file.exists():
        try:
            state = TransferState(**json.loads(state_file.read_text()))
        except (ValueError, TypeError):
            state = None
        if state and state.fingerprint == fingerprint:
            return Progress(fingerprint=fingerprint, run_id=state.run_id)
    shutil.rmtree(backup_dir, ignore_errors=True)
    return None


def check_backbone_available(params: Params) -> None:
    """Before any run starts or TensorFlow loads: ImageNet weights reachable, an MLflow source found and of
    the same backbone (BackboneError, one line, otherwise)."""
    from tasks.backbones import check_imagenet_weights_available, resolve_source

    check_imagenet_weights_available(params.model)
    resolve_source(params.model)


def phase_params(params: Params, epochs: int, learning_rate: float) -> Params:
    """The params one phase trains with: its own epochs and learning rate, the rest (schedule, early stopping,
    optimizer, resume) as configured."""
    train = params.train.model_copy(update={"epochs": epochs, "learning_rate": learning_rate})
    return params.model_copy(update={"train": train})


# ---------------------------------------------------------------------------------------------- one phase


@dataclass
class PhaseResult:
    history: list[dict[str, float]]
    best_epoch: int  # within the phase, 1-based; 0 when no epoch ran
    stopped: bool  # early stopping ended it
    resumed_from_epoch: int


def fit_phase(
    number: int, model: "keras.Model", params: Params, data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    fingerprint: str, backup_dir: Path, checkpoint_file: Path, on_epoch: EpochCallback | None,
) -> PhaseResult:
    """Fit `model` as one resumable training (tasks/train.py's callbacks), restore its best epoch."""
    import keras

    from tasks.guards import AppliedGradientNorm, DivergenceGuard

    train_x, train_y, val_x, val_y = data
    phase_dir = backup_dir / f"phase{number}"
    progress = (load_progress(phase_dir, fingerprint) if params.train.resume else None) or Progress(fingerprint)
    first_epoch = len(progress.history)
    batch_size = params.train.batch_size
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    compile_classifier(model, params.train, steps_per_epoch)
    guard = DivergenceGuard(params.train.divergence_factor, progress.reference_loss,
                            lambda loss: setattr(progress, "reference_loss", loss))
    for state, saved in zip(seed_state_variables(model), progress.latest.get("seed_states", [])):
        state.assign(np.asarray(saved, dtype=keras.ops.convert_to_numpy(state).dtype))
    class_count = int(model.output.shape[-1])
    class_weight = balanced_class_weight(train_y, class_count) if params.train.class_weight == "balanced" else None
    log.info("transfer: phase %d: %d trainable weights, epochs %d-%d, lr %g%s", number, len(model.trainable_weights),
             first_epoch + 1, params.train.epochs, params.train.learning_rate,
             f", resuming after epoch {first_epoch}" if first_epoch else "")
    if first_epoch < params.train.epochs:
        model.fit(
            batched_dataset(train_x, train_y, batch_size, shuffle=True, seed=params.train.seed + number,
                            epochs=range(first_epoch, params.train.epochs)),
            steps_per_epoch=steps_per_epoch,
            validation_data=batched_dataset(val_x, val_y, batch_size),
            epochs=params.train.epochs,
            class_weight=class_weight,
            callbacks=_callbacks(params, progress, phase_dir, checkpoint_file,
                                 [AppliedGradientNorm(model.optimizer), guard], on_epoch),
            verbose=2,
            shuffle=False,
        )
    history = progress.history
    if guard.reason or not all(math.isfinite(row["loss"]) for row in history):
        import shutil

        shutil.rmtree(backup_dir, ignore_errors=True)  # never resume into a diverged state
        checkpoint_file.unlink(missing_ok=True)
        raise TrainingDiverged(
            f"training diverged in phase {number}: {guard.reason or 'loss became NaN/inf at an epoch end'} "
            f"(learning rate {params.train.learning_rate:g}); training stopped, no model saved",
            gradient_flags(history, params.train.gradients.vanishing_below, params.train.gradients.exploding_above),
        )
    stopping = params.train.early_stopping
    best_epoch = len(history)
    if history and stopping.enabled and stopping.restore_best_weights and checkpoint_file.exists():
        best_epoch = best_epoch_of(history, stopping.monitor, monitor_mode(stopping.monitor, stopping.mode))
        model.set_weights(keras.saving.load_model(checkpoint_file).get_weights())
    return PhaseResult(history, best_epoch, 0 < len(history) < params.train.epochs, first_epoch)


# ------------------------------------------------------------------------------------------------ training


def _improves(value: float, reference: float, mode: str) -> bool:
    return value < reference if mode == "min" else value > reference


def _phase_logger(number: int, offset: int, on_epoch: EpochCallback | None) -> EpochCallback:
    """Per-epoch values of a phase on the run's one epoch axis, with the phase as a metric of its own."""

    def log_epoch(epoch: int, values: dict[str, float]) -> None:
        values["phase"] = float(number)
        if on_epoch:
            on_epoch(offset + epoch, values)

    return log_epoch


def _phase_features(
    params: Params, model: "keras.Model", prepared: PreparedData, train_rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(train features, val features, facts for the run) from the cache, built on first use."""
    from tasks.backbones import backbone_identity, resolve_source
    from tasks.features import FEATURES_DIR, cached_features, feature_cache_key
    from tasks.params import workspace_root
    from tasks.tracking import dvc_data_version

    identity = backbone_identity(params.model, params.train.seed, resolve_source(params.model))
    data_version = dvc_data_version(prepared.root) or "unversioned"
    key = feature_cache_key(data_version, identity, params.data.image_size)
    started = time.perf_counter()
    features, reused = cached_features(
        feature_extractor(model), prepared, key, workspace_root() / FEATURES_DIR, params.evaluate.batch_size,
        {"data_version": data_version, "backbone": identity, "image_size": str(params.data.image_size)},
    )
    train_features = features["train"] if train_rows is None else features["train"][train_rows]
    facts = {"cassava.features_cache": "reused" if reused else "built", "cassava.features_key": key,
             "features_seconds": round(time.perf_counter() - started, 3)}
    return train_features, features["val"], facts


def train_transfer(
    params: Params,
    prepared: PreparedData,
    checkpoint_file: Path,
    backup_dir: Path,
    on_epoch: EpochCallback | None = None,
    progress: Progress | None = None,
    train_indices: np.ndarray | None = None,
) -> TrainingOutcome:
    """tasks.train.train_classifier for a backbone: phase 1 (head), phase 2 (fine-tuning), the better of the
    two phases' best epochs as the final model."""
    import keras

    from tasks.backbones import lineage_tags, resolve_source
    from tasks.model import build_classifier

    seed_everything(params.train.seed, params.train.deterministic)
    train_rows = None if train_indices is None else np.sort(train_indices)
    train_images, train_labels = prepared.split("train")
    if train_rows is not None:
        train_images, train_labels = train_images[train_rows], train_labels[train_rows]
    val_images, val_labels = prepared.split("val")
    fingerprint = progress.fingerprint if progress else training_fingerprint(params, prepared)
    state = TransferState(fingerprint, run_id=progress.run_id if progress else None)
    if params.train.resume and TransferState.file(backup_dir).exists():
        saved = TransferState(**json.loads(TransferState.file(backup_dir).read_text()))
        if saved.fingerprint == fingerprint:
            state = saved
            state.run_id = progress.run_id if progress and progress.run_id else saved.run_id
    if params.train.resume:
        state.save(backup_dir)

    model = build_classifier(params.model, params.data.image_size, len(prepared.class_names()), params.train.seed)
    tags = lineage_tags(params.model, resolve_source(params.model))
    metrics: dict[str, float] = {}
    stopping = params.train.early_stopping
    mode = monitor_mode(stopping.monitor, stopping.mode)
    started = time.perf_counter()
    checkpoints = checkpoint_file.parent
    checkpoints.mkdir(parents=True, exist_ok=True)

    # Phase 1: the head on the frozen backbone.
    freeze_backbone(model)
    metrics["transfer.phase1_trainable_weights"] = len(model.trainable_weights)
    if state.phase1_done:
        model.load_weights(backup_dir / PHASE1_WEIGHTS)
        phase1 = PhaseResult(state.phase1_history, state.phase1_best_epoch, False, len(state.phase1_history))
    else:
        head_params = phase_params(params, params.head_epochs, params.train.learning_rate)
        if params.transfer.cache_features:
            train_x, val_x, facts = _phase_features(params, model, prepared, train_rows)
            metrics["transfer.features_seconds"] = facts.pop("features_seconds")
            tags.update(facts)
            fit_model = head_on_features(model)
        else:
            train_x, val_x, fit_model = train_images, val_images, model
        phase1 = fit_phase(1, fit_model, head_params, (train_x, train_labels, val_x, val_labels), fingerprint + ":1",
                           backup_dir, checkpoints / "phase1_best.keras", _phase_logger(1, 0, on_epoch))
        state.phase1_done, state.phase1_history, state.phase1_best_epoch = True, phase1.history, phase1.best_epoch
        if params.train.resume:
            model.save_weights(backup_dir / PHASE1_WEIGHTS)
            state.save(backup_dir)
    history = [{**row, "phase": 1.0} for row in phase1.history]
    best_epoch, resumed_from = phase1.best_epoch, phase1.resumed_from_epoch
    stopped_epoch = len(history) if phase1.stopped else 0

    # Phase 2: fine-tune the top layers at the lower learning rate.
    if params.transfer.fine_tune_layers != 0 and params.transfer.fine_tune_epochs > 0:
        phase1_weights = model.get_weights()
        trained_layers = unfreeze_top_layers(model, params.transfer.fine_tune_layers)
        metrics["transfer.phase2_trainable_weights"] = len(model.trainable_weights)
        tags["cassava.transfer.fine_tuned_layers"] = ", ".join(trained_layers)[:5000] or "none"
        tune_params = phase_params(params, params.transfer.fine_tune_epochs, params.fine_tune_learning_rate)
        phase2 = fit_phase(2, model, tune_params, (train_images, train_labels, val_images, val_labels),
                           fingerprint + ":2", backup_dir, checkpoints / "phase2_best.keras",
                           _phase_logger(2, len(history), on_epoch))
        offset = len(history)
        history += [{**row, "epoch": offset + row["epoch"], "phase": 2.0} for row in phase2.history]
        resumed_from += phase2.resumed_from_epoch
        stopped_epoch = len(history) if phase2.stopped else 0
        phase1_best = history[best_epoch - 1][stopping.monitor] if best_epoch else None
        phase2_best = history[offset + phase2.best_epoch - 1][stopping.monitor] if phase2.best_epoch else None
        if phase2_best is not None and (phase1_best is None or _improves(phase2_best, phase1_best, mode)):
            best_epoch = offset + phase2.best_epoch
        else:
            model.set_weights(phase1_weights)  # fine-tuning did not beat the head alone: keep phase 1's model
    seconds = time.perf_counter() - started
    if not model.compiled:  # phase 1 trained the head alone, on features
        compile_classifier(model, params.train, 1)

    train_loss, train_accuracy = model.evaluate(batched_dataset(train_images, train_labels, params.train.batch_size), verbose=0)
    val_loss, val_accuracy = model.evaluate(batched_dataset(val_images, val_labels, params.train.batch_size), verbose=0)
    summary = TrainSummary(
        epochs_run=len(history), best_epoch=best_epoch, stopped_epoch=stopped_epoch, resumed_from_epoch=resumed_from,
        best_val_loss=val_loss, best_val_accuracy=val_accuracy, train_loss=train_loss, train_accuracy=train_accuracy,
        seconds=round(seconds, 2),
        gradient_flags=gradient_flags(history, params.train.gradients.vanishing_below, params.train.gradients.exploding_above),
    )
    metrics["transfer.phase1_epochs"] = float(len(phase1.history))
    metrics["transfer.phase2_epochs"] = float(len(history) - len(phase1.history))
    tags["cassava.transfer.final_phase"] = "2" if best_epoch > len(phase1.history) else "1"
    log.info("transfer: final model = epoch %d of %d (phase %s): val_accuracy %.4f, val_loss %.4f", best_epoch,
             len(history), tags["cassava.transfer.final_phase"], val_accuracy, val_loss)
    return TrainingOutcome(model, summary, history, tags=tags, metrics=metrics)
