"""Scoring a classifier on a test split: metrics from probabilities, and the models that produce them.

Shared by the evaluate stage (the trained Keras model), the register stage (re-scoring the registry's champion
on the candidate's test split) and batch prediction (a logged MLflow model), so all three compute the same
numbers the same way and none imports another's internals.

Console and speed: Keras's `model.predict` builds a tf.data pipeline and a progress bar per call, and every
model's predict function is a new `tf.function` that TensorFlow counts against one shared retracing budget
(five traces in ten calls print a "triggered tf.function retracing" warning). `KerasPredictor` compiles one
function per model with a fixed input signature (any batch size), so it traces exactly once and prints nothing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from tasks.errors import UserError

if TYPE_CHECKING:
    import keras
    import mlflow

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # flat, stable names: test_accuracy, test_macro_f1, test_precision.cbb, ...
    confusion: np.ndarray  # counts, rows = true class, columns = predicted class
    class_names: list[str]
    predicted: np.ndarray
    actual: np.ndarray


def score_predictions(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str], top_k: int) -> Evaluation:
    """Accuracy, macro F1, top-k accuracy, per-class precision/recall/F1, confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    class_ids = np.arange(len(class_names))
    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=class_ids, zero_division=0
    )
    metrics = {
        "test_accuracy": float(accuracy_score(labels, predicted)),
        "test_macro_f1": float(f1_score(labels, predicted, labels=class_ids, average="macro", zero_division=0)),
        f"test_top{top_k}_accuracy": float(
            top_k_accuracy_score(labels, probabilities, k=min(top_k, len(class_names)), labels=class_ids)
        ),
    }
    for index, name in enumerate(class_names):
        metrics[f"test_precision.{name}"] = float(precision[index])
        metrics[f"test_recall.{name}"] = float(recall[index])
        metrics[f"test_f1.{name}"] = float(f1[index])
        metrics[f"test_support.{name}"] = float(support[index])
    return Evaluation(metrics, confusion_matrix(labels, predicted, labels=class_ids), class_names, predicted, labels)


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray) -> tuple[int, float]:
    """(class, test accuracy) of always answering the training split's most frequent class (ties: lowest id).

    The floor any useful model must beat: on imbalanced data (CMD is ~60% of Kaggle 2020) it is far above
    1 / number of classes.
    """
    majority = int(np.bincount(np.asarray(train_labels)).argmax())
    test_labels = np.asarray(test_labels)
    return majority, float(np.mean(test_labels == majority)) if len(test_labels) else float("nan")


# --------------------------------------------------------------------------------------------- Keras models


class KerasPredictor:
    """`model(images)` batch by batch through one compiled function: uint8 (or float) N x H x W x C images
    in [0, 255] in, the model's output as numpy out; memory bounded by one batch on a memory-mapped split."""

    def __init__(self, model: "keras.Model", batch_size: int = 128) -> None:
        import tensorflow as tf

        self.batch_size = batch_size
        # Batch dimension left open: one trace serves every batch size, including the last, shorter one.
        signature = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        self._forward = tf.function(lambda images: model(images, training=False), input_signature=[signature])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        outputs = [
            self._forward(np.asarray(images[start : start + self.batch_size], dtype=np.float32)).numpy()
            for start in range(0, len(images), self.batch_size)
        ]
        if not outputs:
            raise ValueError("no images to predict")
        return np.concatenate(outputs)


def predict_probabilities(model: "keras.Model", images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities of a Keras classifier on N x S x S x 3 images."""
    return KerasPredictor(model, batch_size)(images)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 N x H x W x 3 images resized to size x size, as preparation resizes photos (bilinear, Pillow)."""
    from PIL import Image

    images = np.asarray(images)
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([
        np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))
        for image in images
    ])


# --------------------------------------------------------------------------------------------- MLflow models


class PredictionError(UserError, RuntimeError):
    """No such model or folder, or the model cannot be used for prediction (no signature, unknown class names);
    str() says why and what to do."""


@contextlib.contextmanager
def keras_progress_bars_off() -> Iterator[None]:
    """A Keras pyfunc calls model.predict() with its default progress bar: one `1/1 ━━━━` line per call."""
    import keras

    enabled = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()
    try:
        yield
    finally:
        if enabled:
            keras.config.enable_interactive_logging()


def quiet_model_downloads() -> None:
    """No tqdm bar per artifact MLflow fetches from the store (a model is several files): set before fetching."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class LoggedKerasModel:
    """An MLflow model of the keras flavor (what the train stage logs), loaded as Keras: its MLmodel metadata
    (signature, run id) and `predict` through one compiled function.

    `mlflow.pyfunc.load_model` gives the same model behind its pyfunc layer, whose predict() calls Keras'
    `model.predict`: a tf.data pipeline, a progress bar and a function trace per call (0.1-0.2 s of start-up
    for a handful of images, bench/predict_startup.py). Here one `KerasPredictor` serves every batch. The input
    check pyfunc does (float32, N x S x S x 3 as the signature says) is the caller's: the images are read at
    the signature's size."""

    def __init__(self, metadata: "mlflow.models.Model", model: "keras.Model") -> None:
        self.metadata = metadata
        self.model = model
        self._predict = KerasPredictor(model)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self._predict(images)


def load_logged_model(model_uri: str) -> LoggedKerasModel:
    """The model at an MLflow model URI, from the tracking store `configure_tracking` points at.

    MLflow's pyfunc requirement check (about 2 s: it resolves every pinned package's metadata) is replaced by
    a check of the one version that decides whether the saved model loads right: Keras.
    """
    quiet_model_downloads()
    import mlflow
    from keras import __version__ as keras_version

    from tasks.tracking import configure_tracking

    configure_tracking()
    metadata = mlflow.models.Model.load(model_uri)  # the MLmodel file only
    flavor = metadata.flavors.get("keras")
    if flavor is None:
        raise PredictionError(f"{model_uri} is not a Keras model (its flavors: {', '.join(metadata.flavors)}); "
                              "this project predicts with the Keras models its train stage logs")
    saved_with = flavor.get("keras_version")
    if saved_with and saved_with != keras_version:
        log.warning("%s was saved with Keras %s, this environment has %s: predictions may differ",
                    model_uri, saved_with, keras_version)
    return LoggedKerasModel(metadata, mlflow.keras.load_model(model_uri))


def model_image_size(model: LoggedKerasModel) -> int:
    """S of the model's N x S x S x 3 input, from its signature."""
    schema = model.metadata.get_input_schema()
    shape = tuple(schema.inputs[0].shape) if schema and schema.is_tensor_spec() else ()
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or shape[1] <= 0:
        raise PredictionError(f"the model's input signature is {shape or 'missing'}: expected (-1, S, S, 3)")
    return int(shape[1])


def model_class_names(model: LoggedKerasModel) -> tuple[str, list[str]]:
    """(run id, class names) of the run that logged the model.

    A model's metadata names its run whichever URI loaded it (for `models:/name@alias`, the version's run).
    """
    from mlflow import MlflowClient

    from tasks.names import CLASSES_TAG

    run_id = model.metadata.run_id
    if not run_id:
        raise PredictionError("the model was not logged in an MLflow run, so its class names are unknown")
    classes = MlflowClient().get_run(run_id).data.tags.get(CLASSES_TAG)
    if not classes:
        raise PredictionError(f"run {run_id} has no {CLASSES_TAG} tag, so the model's class names are unknown")
    return run_id, classes.split(",")


def predict_batches(model: LoggedKerasModel, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities of N x S x S x 3 images (any numeric dtype, values in [0, 255]), batch by batch, so
    a memory-mapped split is never loaded whole."""
    outputs = [model.predict(np.asarray(images[start : start + batch_size], dtype=np.float32))
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


def align_to_classes(probabilities: np.ndarray, model_classes: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Probability columns reordered to `class_names`; a class the model does not know gets 0.

    A champion trained on another data version may know other classes, or the same in another order.
    """
    if list(model_classes) == list(class_names):
        return probabilities
    aligned = np.zeros((len(probabilities), len(class_names)), dtype=probabilities.dtype)
    for column, name in enumerate(class_names):
        if name in model_classes:
            aligned[:, column] = probabilities[:, list(model_classes).index(name)]
    return aligned


def rescore_model(
    model: LoggedKerasModel, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], top_k: int,
    batch_size: int,
) -> Evaluation:
    """Score an MLflow model on a test split whatever input size it was trained at: the images are resized to
    its own input size (from its signature), a batch at a time, and its classes aligned to `class_names`."""
    from mlflow.exceptions import MlflowException

    size = model_image_size(model)
    try:
        _, model_classes = model_class_names(model)
    except (PredictionError, MlflowException):  # registered by hand, its run untagged or deleted: same classes
        model_classes = list(class_names)
    outputs = [
        predict_batches(model, resize_images(images[start : start + batch_size], size), batch_size)
        for start in range(0, len(images), batch_size)
    ]
    probabilities = align_to_classes(np.concatenate(outputs), model_classes, class_names)
    return score_predictions(probabilities, np.asarray(labels), list(class_names), top_k)
