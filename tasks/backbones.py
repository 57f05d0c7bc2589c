"""Backbones for transfer learning: Keras applications, a local `.keras` model, or the backbone of one of our
own MLflow runs, each wrapped as one nested Keras model named `backbone` that takes raw RGB values in 0..255.

Everything an image needs before the backbone (resizing to its input size, its own preprocessing) happens
inside that model, so the classifier built on it, its MLflow model and the serving endpoint take exactly the
prepared uint8 arrays, as the scratch CNN does. The lineage of the starting weights (file hash, or the source
run) is described without TensorFlow, so it can be logged and used as a cache key cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import UserError
from tasks.params import BACKBONE_APPLICATIONS, ModelParams, is_mlflow_source, resolve_path

if TYPE_CHECKING:
    import keras

BACKBONE_LAYER = "backbone"  # the nested model's name in every transfer classifier
IMAGENET_WEIGHTS_HOST = "storage.googleapis.com"  # where keras.applications downloads its weights from
NETWORK_CHECK_SECONDS = 3.0
# The start of the file names Keras gives each application's ImageNet weights (without the classifier top).
IMAGENET_FILE_PREFIX = {
    "mobilenet_v2": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_",
    "efficientnet_b0": "efficientnetb0_notop",
    "resnet50_v2": "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop",
}
TAG_BACKBONE = "cassava.backbone"
TAG_WEIGHTS = "cassava.backbone_weights"
TAG_SHA256 = "cassava.backbone_sha256"  # of the .keras backbone file, or of the weights file
TAG_WEIGHTS_SHA256 = "cassava.backbone_weights_sha256"  # a .keras backbone with a separate weights file
TAG_SOURCE_RUN = "cassava.backbone_source_run"  # the MLflow run whose model's backbone this run started from
TAG_SOURCE_URI = "cassava.backbone_source_uri"


class BackboneError(UserError):
    """The backbone or its weights cannot be had; str() is one line saying what to do instead."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights (`$KERAS_HOME/models`, default ~/.keras/models)."""
    return Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "models"


def _host_reachable(host: str, port: int, timeout: float) -> bool:
    """A TCP connect in a daemon thread: name resolution has no timeout of its own and may hang offline."""
    reached: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(reached)


def imagenet_unavailable_message(application: str) -> str:
    return (
        f"model.backbone_weights = imagenet: cannot download the {application} ImageNet weights "
        f"({IMAGENET_WEIGHTS_HOST} is not reachable from here) and none are in {keras_cache_dir()}; "
        f"download the file on a machine with internet (e.g. keras.applications.{_constructor_name(application)}"
        f"(include_top=False) fetches it into ~/.keras/models) and give its path: "
        f"-S model.backbone_weights=/path/to/{IMAGENET_FILE_PREFIX[application]}...h5"
    )


def check_imagenet_weights_available(model_params: ModelParams) -> None:
    """Fail at once, in one line, when `imagenet` weights are neither cached by Keras nor downloadable.

    Costs milliseconds (a cache look-up, then a connect with a short timeout): no hang, no TensorFlow import."""
    if model_params.backbone_weights != "imagenet" or model_params.backbone not in BACKBONE_APPLICATIONS:
        return
    cached = keras_cache_dir().glob(IMAGENET_FILE_PREFIX[model_params.backbone] + "*")
    if any(cached) or _host_reachable(IMAGENET_WEIGHTS_HOST, 443, NETWORK_CHECK_SECONDS):
        return
    raise BackboneError(imagenet_unavailable_message(model_params.backbone))


# ----------------------------------------------------------------------------------------------- lineage


@dataclass(frozen=True)
class SourceModel:
    """An MLflow model of one of our runs, resolved: its run and the params it was trained with."""

    uri: str
    run_id: str
    backbone: str  # the source run's model.backbone


def model_uri(weights: str) -> str:
    """`runs:/...` and `models:/...` as given; a bare run id means that run's model."""
    return weights if weights.startswith(("runs:/", "models:/")) else f"runs:/{weights}/model"


def resolve_source(model_params: ModelParams) -> SourceModel | None:
    """The MLflow source of the backbone weights (None unless backbone_weights names one); checks that it has
    the backbone model.backbone names."""
    if not is_mlflow_source(model_params.backbone_weights):
        return None
    source = describe_source(model_params.backbone_weights)
    if source.backbone != model_params.backbone:
        raise BackboneError(
            f"model.backbone_weights = {model_params.backbone_weights!r}: run {source.run_id} trained backbone "
            f"{source.backbone!r}, but model.backbone = {model_params.backbone!r}; set -S model.backbone={source.backbone}"
        )
    return source


def describe_source(weights: str) -> SourceModel:
    """The run behind an MLflow model URI or run id, and the backbone it trained."""
    from tasks.tracking import logged_model_source

    uri = model_uri(weights)
    try:
        run_id, source_params = logged_model_source(uri)
    except Exception as error:  # MLflow raises several types for a missing run, model, alias or artifact
        raise BackboneError(
            f"model.backbone_weights = {weights!r}: no such model in the tracking store "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from None
    return SourceModel(uri=uri, run_id=run_id, backbone=source_params.get("model.backbone", "none"))


def lineage_tags(model_params: ModelParams, source: SourceModel | None = None) -> dict[str, str]:
    """What the run started from: backbone, weights, file hashes, or the source run (tag linking to it)."""
    tags = {TAG_BACKBONE: model_params.backbone, TAG_WEIGHTS: model_params.backbone_weights}
    if model_params.backbone.endswith(".keras"):
        tags[TAG_SHA256] = file_sha256(resolve_path(model_params.backbone))
    if model_params.backbone_weights.endswith(".h5"):
        key = TAG_WEIGHTS_SHA256 if model_params.backbone.endswith(".keras") else TAG_SHA256
        tags[key] = file_sha256(resolve_path(model_params.backbone_weights))
    if source:
        tags[TAG_SOURCE_RUN] = source.run_id
        tags[TAG_SOURCE_URI] = source.uri
    return tags


def backbone_identity(model_params: ModelParams, seed: int, source: SourceModel | None = None) -> str:
    """A stable string naming exactly which backbone, with which weights (features depend on nothing else
    but the input images and their size)."""
    identity = {
        **lineage_tags(model_params, source),
        "alpha": model_params.backbone_alpha if model_params.backbone == "mobilenet_v2" else None,
        "input_size": model_params.backbone_input_size,
    }
    identity.pop(TAG_SOURCE_URI, None)  # models:/name@champion moves; the run it resolved to does not
    if model_params.backbone in BACKBONE_APPLICATIONS and model_params.backbone_weights == "none":
        identity["random_seed"] = seed  # random weights differ by seed
    return json.dumps(identity, sort_keys=True)


# ------------------------------------------------------------------------------------------------ building


def _constructor_name(application: str) -> str:
    return {"mobilenet_v2": "MobileNetV2", "efficientnet_b0": "EfficientNetB0", "resnet50_v2": "ResNet50V2"}[application]


def _application(model_params: ModelParams, size: int) -> "keras.Model":
    """The Keras application without its classifier top, with its weights, and the layers that bring raw
    0..255 pixels to what it expects (EfficientNet carries its own; MobileNetV2 and ResNet50V2 want -1..1)."""
    import keras

    application = model_params.backbone
    weights = model_params.backbone_weights
    if weights == "imagenet":
        check_imagenet_weights_available(model_params)
    elif weights == "none":
        weights = None
    else:
        weights = str(resolve_path(weights))
    constructor = getattr(keras.applications, _constructor_name(application))
    options = {"alpha": model_params.backbone_alpha} if application == "mobilenet_v2" else {}
    try:
        return constructor(include_top=False, weights=weights, input_shape=(size, size, 3), **options)
    except Exception as error:
        if model_params.backbone_weights == "imagenet" and "URL fetch failure" in str(error):
            raise BackboneError(imagenet_unavailable_message(application)) from None
        if model_params.backbone_weights.endswith(".h5"):
            raise BackboneError(
                f"model.backbone_weights = {model_params.backbone_weights!r}: not weights of {application} "
                f"(alpha {model_params.backbone_alpha:g}, include_top=False): {str(error).splitlines()[0][:200]}"
            ) from None
        raise


def _fixed_input_size(model: "keras.Model") -> int | None:
    height, width = tuple(model.inputs[0].shape)[1:3]
    if height is None or width is None:
        return None
    if height != width:
        raise BackboneError(f"model.backbone: input {height}x{width} is not square; expected S x S x 3 images")
    return int(height)


def _source_backbone(source: SourceModel) -> "keras.Model":
    """The backbone part of a source run's model: its `backbone` layer (a transfer model), or everything up to
    global pooling (the scratch CNN: rescaling and conv blocks)."""
    from tasks.tracking import load_logged_keras_model

    model = load_logged_keras_model(source.uri)
    names = {layer.name for layer in model.layers}
    if BACKBONE_LAYER in names:
        return model.get_layer(BACKBONE_LAYER)
    if "pool" in names:
        import keras

        return keras.Model(model.inputs, model.get_layer("pool").input, name="source_features")
    raise BackboneError(f"model.backbone_weights = {source.uri!r}: the model has neither a backbone nor a pool layer")


def build_backbone(model_params: ModelParams, image_size: int, source: SourceModel | None = None) -> "keras.Model":
    """The nested `backbone` model: (image_size x image_size x 3, raw 0..255) -> feature map or vector."""
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 3), name="backbone_image")
    preprocessing: list[keras.Layer] = []  # a source's or a .keras backbone takes raw 0..255 itself
    if source:  # the backbone a run of ours trained (an application or the CNN), as it was saved
        core = _source_backbone(source)
        size = model_params.backbone_input_size or _fixed_input_size(core) or image_size
    elif model_params.backbone in BACKBONE_APPLICATIONS:
        size = model_params.backbone_input_size or image_size
        core = _application(model_params, size)
        if model_params.backbone != "efficientnet_b0":  # EfficientNet rescales inside itself
            preprocessing.append(layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_minus_one_one"))
    else:
        core = keras.saving.load_model(resolve_path(model_params.backbone), compile=False)
        if model_params.backbone_weights.endswith(".h5"):
            core.load_weights(resolve_path(model_params.backbone_weights))
        size = model_params.backbone_input_size or _fixed_input_size(core) or image_size
    x = inputs
    if size != image_size:
        x = layers.Resizing(size, size, name="to_backbone_size")(x)
    for layer in preprocessing:
        x = layer(x)
    outputs = core(x)
    if len(outputs.shape) not in (2, 4):
        raise BackboneError(f"model.backbone: output shape {tuple(outputs.shape)}: expected a feature map or a vector")
    return keras.Model(inputs, outputs, name=BACKBONE_LAYER)


def leaf_layers(model: "keras.Layer") -> list["keras.Layer"]:
    """The layers of a (nested) model in order, nested models expanded: what fine-tuning counts from the top."""
    import keras

    if not isinstance(model, keras.Model):
        return [model]
    return [leaf for layer in model.layers if not isinstance(layer, keras.layers.InputLayer) for leaf in leaf_layers(layer)]
