"""Training diagnostics of the course's lessons 1 and 2: initialization health and gradient norms.

Before any epoch, on one fixed batch: the mean and variance of every layer's pre-activations (conv and dense
outputs) and the gradient norm of every weight tensor. The rule of thumb of Glorot & Bengio (2010) is checked:
pre-activation mean near 0 and variance about the same at every depth; zero, vanishing or exploding
variances or gradients make the verdict "bad", visible on the run before training starts.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

# Layers whose outputs are pre-activations: what the rule of thumb speaks about.
PROBED_LAYER_TYPES = ("Conv2D", "Dense")


@dataclass(frozen=True)
class LayerStatistics:
    depth: int
    layer: str
    activation_mean: float
    activation_variance: float
    gradient_norm: float  # of the layer's kernel


@dataclass(frozen=True)
class InitializationVerdict:
    healthy: bool
    reason: str
    variance_ratio: float  # largest / smallest pre-activation variance across depth


@dataclass(frozen=True)
class Initialization:
    """What the probe measured and the verdict on it."""

    statistics: list[LayerStatistics]
    verdict: InitializationVerdict

    def write_report(self, table: Path, plot: Path) -> None:
        write_initialization_report(self.statistics, self.verdict, table, plot)


def probe_initialization(model: "keras.Model", images: np.ndarray, labels: np.ndarray) -> list[LayerStatistics]:
    """Per-layer pre-activation statistics and kernel gradient norms on one batch, in inference mode:
    measuring must not update batch-norm statistics nor consume dropout randomness."""
    import keras
    import tensorflow as tf

    probed = [layer for layer in model.layers if type(layer).__name__ in PROBED_LAYER_TYPES]
    probe = keras.Model(model.inputs, [layer.output for layer in probed[:-1]] + [model.output])
    batch = tf.convert_to_tensor(images, dtype=tf.float32)
    outputs = probe(batch, training=False)
    # The last Dense is the softmax output: its pre-activation is read through its logits instead.
    logits_layer = probed[-1]
    penultimate = keras.Model(model.inputs, logits_layer.input)(batch, training=False)
    logits = tf.matmul(penultimate, logits_layer.kernel) + (logits_layer.bias if logits_layer.use_bias else 0.0)
    activations = [output.numpy() for output in outputs[:-1]] + [logits.numpy()]

    loss_function = keras.losses.SparseCategoricalCrossentropy()
    with tf.GradientTape() as tape:
        loss = loss_function(labels, model(batch, training=False))
    kernels = [layer.kernel for layer in probed]
    gradients = tape.gradient(loss, kernels)
    return [
        LayerStatistics(
            depth=depth,
            layer=layer.name,
            activation_mean=float(np.mean(activation)),
            activation_variance=float(np.var(activation)),
            gradient_norm=float(tf.norm(gradient).numpy()) if gradient is not None else 0.0,
        )
        for depth, (layer, activation, gradient) in enumerate(zip(probed, activations, gradients), start=1)
    ]


def judge_initialization(
    statistics: list[LayerStatistics],
    max_step_ratio: float = 16.0,
    max_depth_ratio: float = 100.0,
    max_mean_to_std: float = 1.0,
) -> InitializationVerdict:
    """Apply the rule of thumb: no dead (zero-variance) layer; variance steady from one layer to the next
    (ratio within max_step_ratio) and across the whole depth (max_depth_ratio); mean small next to the
    spread; finite, non-zero gradients.

    The bounds leave room for Glorot's known halving through ReLUs (about 2-4x per layer here) while a
    random_normal(1.0) init, whose variance grows ~100x per layer, or a zeros init, fail.
    """
    variances = [layer.activation_variance for layer in statistics]
    problems: list[str] = []
    dead = [layer.layer for layer in statistics if not layer.activation_variance > 1e-12]
    if dead:
        problems.append(f"zero activation variance in {', '.join(dead)}")
    positive = [variance for variance in variances if variance > 1e-12]
    ratio = max(positive) / min(positive) if positive else math.inf
    steps = [max(a / b, b / a) for a, b in zip(variances, variances[1:]) if a > 1e-12 and b > 1e-12]
    if steps and max(steps) > max_step_ratio:
        problems.append(f"activation variance changes {max(steps):.3g}x between layers (allowed {max_step_ratio:g}x)")
    if not math.isfinite(ratio) or ratio > max_depth_ratio:
        problems.append(f"activation variance varies {ratio:.3g}x across depth (allowed {max_depth_ratio:g}x)")
    off_centre = [
        layer.layer
        for layer in statistics
        if layer.activation_variance > 1e-12
        and abs(layer.activation_mean) > max_mean_to_std * math.sqrt(layer.activation_variance)
    ]
    if off_centre:
        problems.append(f"activation mean far from 0 in {', '.join(off_centre)}")
    norms = [layer.gradient_norm for layer in statistics]
    if not all(math.isfinite(norm) for norm in norms):
        problems.append("non-finite gradients")
    elif not any(norm > 0 for norm in norms):
        problems.append("all gradients are zero")
    return InitializationVerdict(not problems, "; ".join(problems) or "mean ~0 and variance steady across depth", ratio)


def write_initialization_report(statistics: list[LayerStatistics], verdict: InitializationVerdict, table: Path, plot: Path) -> None:
    """The table (CSV) and the plot of activation variance by depth (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table.parent.mkdir(parents=True, exist_ok=True)
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(statistics[0])))
        writer.writeheader()
        writer.writerows(asdict(layer) for layer in statistics)
    figure, (variance_axis, gradient_axis) = plt.subplots(1, 2, figsize=(11, 3.6))
    depths = [layer.depth for layer in statistics]
    variance_axis.semilogy(depths, [max(layer.activation_variance, 1e-30) for layer in statistics], marker="o")
    variance_axis.set(title="pre-activation variance by depth", xlabel="depth", xticks=depths)
    gradient_axis.semilogy(depths, [max(layer.gradient_norm, 1e-30) for layer in statistics], marker="o", color="C1")
    gradient_axis.set(title="kernel gradient norm by depth", xlabel="depth", xticks=depths)
    figure.suptitle(f"initialization: {'healthy' if verdict.healthy else 'BAD'} ({verdict.reason})", fontsize=9)
    figure.tight_layout()
    figure.savefig(plot, dpi=100)
    plt.close(figure)

