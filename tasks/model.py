"""Model stage core: a Keras 3 functional CNN built from `model.*` params.

The model takes float32 images with values in [0, 255] and rescales them itself, so the logged MLflow model
accepts exactly what the prepared arrays (and the prediction loader) hold: no separate preprocessing step to
forget at serving time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.params import ModelParams

if TYPE_CHECKING:
    import keras


def build_classifier(model_params: ModelParams, image_size: int, num_classes: int, seed: int) -> "keras.Model":
    """Conv blocks (conv → [batch norm] → ReLU → max-pool → dropout), global average pooling, a dense head."""
    import keras
    from keras import layers

    def initializer(offset: int) -> keras.initializers.Initializer:
        # A distinct seed per layer: the same seed everywhere would give correlated (identical-shaped) kernels.
        return keras.initializers.get({"class_name": model_params.initializer, "config": {"seed": seed + offset}})

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for block, filters in enumerate(model_params.conv_filters, start=1):
        x = layers.Conv2D(
            filters,
            model_params.kernel_size,
            padding="same",
            use_bias=not model_params.batch_norm,  # batch norm's beta replaces the bias
            kernel_initializer=initializer(block),
            name=f"block{block}_conv",
        )(x)
        if model_params.batch_norm:
            x = layers.BatchNormalization(momentum=model_params.batch_norm_momentum, name=f"block{block}_bn")(x)
        x = layers.Activation("relu", name=f"block{block}_relu")(x)
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
        if model_params.dropout > 0:
            x = layers.Dropout(model_params.dropout, seed=seed + block, name=f"block{block}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(model_params.dense_units, activation="relu", kernel_initializer=initializer(100), name="head_dense")(x)
    if model_params.head_dropout > 0:
        x = layers.Dropout(model_params.head_dropout, seed=seed + 100, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", kernel_initializer=initializer(101), name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cassava_cnn")


def model_summary(model: "keras.Model") -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    return "\n".join(lines)
