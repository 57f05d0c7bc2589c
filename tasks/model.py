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


def kernel_initializer(model_params: ModelParams, seed: int) -> "keras.initializers.Initializer":
    """The configured initializer; each layer gets its own seed, or all kernels would start alike."""
    import keras

    if model_params.initializer == "random_normal":
        return keras.initializers.RandomNormal(stddev=model_params.init_stddev, seed=seed)
    if model_params.initializer == "zeros":
        return keras.initializers.Zeros()
    return keras.initializers.get({"class_name": model_params.initializer, "config": {"seed": seed}})


def augmentation_layers(model_params: ModelParams, seed: int) -> list["keras.layers.Layer"]:
    """Random augmentation, active only in training (Keras skips these layers at inference)."""
    from keras import layers

    settings = model_params.augmentation
    augmentations: list[layers.Layer] = []
    if settings.flip != "none":
        augmentations.append(layers.RandomFlip(settings.flip, seed=seed, name="augment_flip"))
    if settings.rotation > 0:
        augmentations.append(layers.RandomRotation(settings.rotation, fill_mode="reflect", seed=seed + 1, name="augment_rotation"))
    if settings.zoom > 0:
        augmentations.append(layers.RandomZoom(settings.zoom, fill_mode="reflect", seed=seed + 2, name="augment_zoom"))
    if settings.contrast > 0:
        augmentations.append(layers.RandomContrast(settings.contrast, value_range=(0, 1), seed=seed + 3, name="augment_contrast"))
    if settings.brightness > 0:
        augmentations.append(
            layers.RandomBrightness(settings.brightness, value_range=(0, 1), seed=seed + 4, name="augment_brightness")
        )
    return augmentations


def build_classifier(model_params: ModelParams, image_size: int, num_classes: int, seed: int) -> "keras.Model":
    """Augmentation, conv blocks (conv → [batch norm] → ReLU → max-pool → [dropout]), global average
    pooling, a dense head; with `model.backbone` / `model.backbone_weights` set, a backbone and that head. Layer names are stable (`block2_conv`, `head_dense`, ...): diagnostics and
    saliency maps look layers up by name."""
    import keras
    from keras import layers

    if model_params.is_transfer:
        return build_transfer_classifier(model_params, image_size, num_classes, seed)
    regularizer = keras.regularizers.L2(model_params.l2) if model_params.l2 > 0 else None
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for augmentation in augmentation_layers(model_params, seed):
        x = augmentation(x)
    for block, filters in enumerate(model_params.conv_filters, start=1):
        batch_norm = model_params.block_batch_norm(block - 1)
        x = layers.Conv2D(
            filters,
            model_params.kernel_size,
            padding="same",
            use_bias=not batch_norm,  # batch norm's beta replaces the bias
            kernel_initializer=kernel_initializer(model_params, seed + block),
            kernel_regularizer=regularizer,
            name=f"block{block}_conv",
        )(x)
        if batch_norm:
            x = layers.BatchNormalization(momentum=model_params.batch_norm_momentum, name=f"block{block}_bn")(x)
        x = layers.Activation("relu", name=f"block{block}_relu")(x)
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
        dropout = model_params.block_dropout(block - 1)
        if dropout > 0:
            x = layers.Dropout(dropout, seed=seed + 10 * block, name=f"block{block}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, classification_head(x, model_params, num_classes, seed), name="cassava_cnn")


def classification_head(features: "keras.KerasTensor", model_params: ModelParams, num_classes: int, seed: int) -> "keras.KerasTensor":
    """Pooled features → dense → ReLU → [dropout] → softmax (`head_dense`, `head_relu`, `head_dropout`,
    `probabilities`): the same head on the CNN and on a backbone."""
    import keras
    from keras import layers

    regularizer = keras.regularizers.L2(model_params.l2) if model_params.l2 > 0 else None
    x = layers.Dense(
        model_params.dense_units,
        kernel_initializer=kernel_initializer(model_params, seed + 100),
        kernel_regularizer=regularizer,
        name="head_dense",
    )(features)
    x = layers.Activation("relu", name="head_relu")(x)
    if model_params.head_dropout > 0:
        x = layers.Dropout(model_params.head_dropout, seed=seed + 100, name="head_dropout")(x)
    return layers.Dense(
        num_classes,
        activation="softmax",
        kernel_initializer=kernel_initializer(model_params, seed + 101),
        kernel_regularizer=regularizer,
        name="probabilities",
    )(x)


def build_transfer_classifier(model_params: ModelParams, image_size: int, num_classes: int, seed: int) -> "keras.Model":
    """[augmentation] → `backbone` (always in inference mode: its batch-norm layers keep their statistics, also
    while fine-tuning) → `pool` → the classification head. Takes raw 0..255 pixels, like the CNN."""
    import keras
    from keras import layers

    from tasks.backbones import build_backbone, resolve_source

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    augmentations = augmentation_layers(model_params, seed)
    if augmentations:  # the augmentation layers work on 0..1 values (contrast and brightness clip to it)
        x = layers.Rescaling(1.0 / 255.0, name="augment_in")(x)
        for augmentation in augmentations:
            x = augmentation(x)
        x = layers.Rescaling(255.0, name="augment_out")(x)
    backbone = build_backbone(model_params, image_size, resolve_source(model_params))
    if len(backbone.output.shape) == 2:
        # Grad-CAM explains the last 4-D layer of this model's own graph (a nested model's output is its inner
        # graph's): with a vector backbone that is the backbone's input, i.e. gradient-weighted pixels. (A
        # Rescaling by 1, not Identity: Identity hands on the input tensor itself, which has no gradient.)
        x = layers.Rescaling(1.0, name="backbone_input")(x)
    x = backbone(x, training=False)
    if len(x.shape) == 4:
        x = layers.Identity(name="backbone_features")(x)  # the feature map Grad-CAM explains
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    else:
        x = layers.Identity(name="pool")(x)
    return keras.Model(inputs, classification_head(x, model_params, num_classes, seed), name="cassava_transfer")


def model_summary(model: "keras.Model") -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    return "\n".join(lines)
