"""Training guards (lesson 2): the gradient norm the optimizer really applied, and divergence detection.

`AppliedGradientNorm` measures, at every step inside the compiled train step, the global norm of the
gradients the optimizer applies: after the loss-scale division, accumulation and clipping (`clip: norm` caps
it at `clip_value`). It adds one norm per step to the graph, no extra forward or backward pass, and hands
the epoch's mean on as `grad_norm` in the epoch logs. `DivergenceGuard` stops a training whose loss is
non-finite or `train.divergence_factor` times above its initial loss, or whose weights or applied gradients
are no longer finite, and keeps the reason.
"""

from __future__ import annotations

import math
from typing import Callable

import keras
import numpy as np
import tensorflow as tf


def divergence_reason(loss: float, reference_loss: float | None, factor: float) -> str | None:
    """Why `loss` means a diverged training, or None. `reference_loss` is the loss before the first update."""
    if not math.isfinite(loss):
        return f"loss became NaN/inf ({loss})"
    if reference_loss is not None and loss > factor * max(reference_loss, 1e-12):
        return (f"loss {loss:.3g} exceeded train.divergence_factor = {factor:g} times the initial loss "
                f"{reference_loss:.3g}")
    return None


class AppliedGradientNorm(keras.callbacks.Callback):
    """Wraps the optimizer's last step before the update (`_backend_update_step`, which receives the
    gradients as they will be applied) to accumulate their global norm; logs the epoch mean as `grad_norm`.

    The variables are plain tf.Variables held here, not by the optimizer, so neither checkpoints nor the
    saved model change."""

    def __init__(self, optimizer: keras.optimizers.Optimizer) -> None:
        super().__init__()
        self.total = tf.Variable(0.0, trainable=False, dtype=tf.float32)
        self.steps = tf.Variable(0.0, trainable=False, dtype=tf.float32)
        update_step = optimizer._backend_update_step

        def measured_update_step(grads: list, trainable_variables: list, learning_rate: object) -> object:
            self.total.assign_add(tf.linalg.global_norm([grad for grad in grads if grad is not None]))
            self.steps.assign_add(1.0)
            return update_step(grads, trainable_variables, learning_rate)

        optimizer._backend_update_step = measured_update_step

    def epoch_mean(self) -> float:
        steps = float(self.steps.numpy())
        return float(self.total.numpy()) / steps if steps else math.nan

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.total.assign(0.0)
        self.steps.assign(0.0)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:  # the callbacks after this one (recorder, guard, History) see it
            logs["grad_norm"] = self.epoch_mean()


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first diverged batch (see `divergence_reason`) or at an epoch end with
    non-finite weights or applied gradients; `reason` says where and why, None while healthy.

    The reference is the first batch's loss (computed before any update); `remember_reference` keeps it
    with the resumable progress, so a resumed training compares against the same value."""

    def __init__(self, factor: float, reference_loss: float | None, remember_reference: Callable[[float], None]) -> None:
        super().__init__()
        self.factor = factor
        self.reference_loss = reference_loss
        self.remember_reference = remember_reference
        self.reason: str | None = None
        self.epoch = 0

    def _stop(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.model.stop_training = True

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", math.nan))
        if self.reference_loss is None and math.isfinite(loss):
            self.reference_loss = loss
            self.remember_reference(loss)
        reason = divergence_reason(loss, self.reference_loss, self.factor)
        if reason:
            self._stop(f"{reason} at batch {batch + 1} of epoch {self.epoch}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not all(np.isfinite(keras.ops.convert_to_numpy(weight)).all() for weight in self.model.weights):
            self._stop(f"non-finite weights after epoch {epoch + 1}")
        elif not math.isfinite((logs or {}).get("grad_norm", 0.0)):
            self._stop(f"non-finite applied gradients in epoch {epoch + 1}")
