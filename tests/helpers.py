"""Shared test helpers: Keras models with known answers, logged as the pipeline logs them, and MLflow stores
that start as a copy of an empty one (creating MLflow's schema runs ~40 migrations, 5 to 15 s here)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tasks.names import CLASSES_TAG, DATA_VERSION_TAG
from tasks.params import code_root, tracking_root
from tasks.tracking import configure_tracking, ensure_experiment, log_keras_model

if TYPE_CHECKING:
    import keras

CLASS_NAMES = ["cbb", "cmd", "healthy"]
CLASS_LEVELS = (0, 100, 200)  # the grey level of an image of each class, as the oracle model reads it
IMAGE_SIZE = 8
METRIC = "test_macro_f1"


def _grey_level_model(kernel_row: list[float], bias: list[float], image_size: int = IMAGE_SIZE) -> "keras.Model":
    """Softmax over (mean grey level x kernel_row + bias): a classifier with hand-set weights."""
    import keras

    inputs = keras.Input((image_size, image_size, 3), name="image")
    channel_means = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(len(bias), activation="softmax", name="probabilities")(channel_means)
    model = keras.Model(inputs, outputs)
    kernel = np.tile(np.asarray(kernel_row, dtype=np.float32) / 3, (3, 1))  # the three channels share the mean
    model.get_layer("probabilities").set_weights([kernel, np.asarray(bias, dtype=np.float32)])
    return model


def oracle_model(image_size: int = IMAGE_SIZE) -> "keras.Model":
    # Logits at grey 0 / 100 / 200: [10, 0, -30] / [-10, 0, -10] / [-30, 0, 10]: always the right class.
    return _grey_level_model([-0.2, 0.0, 0.2], [10.0, 0.0, -30.0], image_size)


def constant_model(image_size: int = IMAGE_SIZE) -> "keras.Model":
    return _grey_level_model([0.0, 0.0, 0.0], [5.0, 0.0, 0.0], image_size)


def save_model_dir(model: "keras.Model", folder: Path) -> Path:
    """The folder layout `tracking.log_keras_model` reads: model.keras and input_example.npy."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    np.save(folder / "input_example.npy", grey_test_split(model.input_shape[1])[0][:2].astype(np.float32))
    return folder


def log_model_run(model_dir: Path, experiment_id: str, metric: float, data_version: str) -> str:
    """A finished run as the evaluate stage leaves it: model "model", test metric, data version and classes."""
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tags({DATA_VERSION_TAG: data_version, CLASSES_TAG: ",".join(CLASS_NAMES)})
        mlflow.log_metric(METRIC, metric)
        log_keras_model(model_dir)
    return run.info.run_id


def grey_test_split(image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Two uniform grey images per class, uint8 like the prepared arrays."""
    labels = np.repeat(np.arange(len(CLASS_NAMES)), 2)
    images = np.stack([np.full((image_size, image_size, 3), CLASS_LEVELS[label], dtype=np.uint8) for label in labels])
    return images, labels.astype(np.int32)


@functools.cache
def empty_store() -> Path:
    """An mlflow.db with MLflow's schema, made once per test session (and removed at its end)."""
    folder = Path(tempfile.mkdtemp(prefix="cassava-empty-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # runs the migrations
    return folder / "mlflow.db"


def open_store() -> str:
    """Point MLflow at the workspace's SQLite store; the id of a test experiment in it.

    The store starts as a copy of an empty one: creating MLflow's schema runs ~40 migrations, 5 to 15 s here.
    """
    store = tracking_root() / "mlflow.db"
    if not store.exists():
        shutil.copyfile(empty_store(), store)
    configure_tracking()
    return ensure_experiment("cassava-test")


@contextlib.contextmanager
def module_workspace(root: Path) -> Iterator[str]:
    """As the `workspace` fixture, for a module's tests to share one store (logging a model costs seconds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASSAVA_WORKSPACE", str(root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # configure_tracking exports it; undone on exit
        patch.delenv("DVC_ROOT", raising=False)
        patch.chdir(root)
        yield open_store()


def clone_project(root: Path, params_tree: dict) -> Path:
    """A fresh clone-like copy of this project at `root` (tracked files only, no tests or benchmarks) with
    `params_tree` as params.yaml, committed in a new git repository."""
    import yaml

    tracked = subprocess.run(["git", "ls-files"], cwd=code_root(), capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        source = code_root() / name
        if source.is_file() and not name.startswith(("tests/", "bench/")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params_tree, sort_keys=False))
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(["git", *command], cwd=root, check=True, capture_output=True)
    return root
