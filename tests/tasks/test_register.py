"""The registry gate against a real SQLite MLflow store, with tiny real Keras models whose answers are known.

Two hand-weighted models stand in for trained ones: the "oracle" reads the class off the image's grey level
(always right on `grey_test_split()`), the "constant" always answers the first class (macro F1 1/6 there). The
helpers here are shared with the prediction tests.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tasks.params import tracking_root
from tasks.register import CHAMPION_ALIAS, GateDecision, decide, gate_and_register, metric_tag
from tasks.tracking import configure_tracking, ensure_experiment, log_keras_model

if TYPE_CHECKING:
    import keras

CLASS_NAMES = ["cbb", "cmd", "healthy"]
CLASS_LEVELS = (0, 100, 200)  # the grey level of an image of each class, as the oracle model reads it
IMAGE_SIZE = 8
METRIC = "test_macro_f1"


# ---- shared helpers: models with known answers, logged as the pipeline logs them -------------------------------


def _grey_level_model(kernel_row: list[float], bias: list[float]) -> "keras.Model":
    """Softmax over (mean grey level x kernel_row + bias): a classifier with hand-set weights."""
    import keras

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    channel_means = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(len(bias), activation="softmax", name="probabilities")(channel_means)
    model = keras.Model(inputs, outputs)
    kernel = np.tile(np.asarray(kernel_row, dtype=np.float32) / 3, (3, 1))  # the three channels share the mean
    model.get_layer("probabilities").set_weights([kernel, np.asarray(bias, dtype=np.float32)])
    return model


def oracle_model() -> "keras.Model":
    # Logits at grey 0 / 100 / 200: [10, 0, -30] / [-10, 0, -10] / [-30, 0, 10]: always the right class.
    return _grey_level_model([-0.2, 0.0, 0.2], [10.0, 0.0, -30.0])


def constant_model() -> "keras.Model":
    return _grey_level_model([0.0, 0.0, 0.0], [5.0, 0.0, 0.0])


def save_model_dir(model: "keras.Model", folder: Path) -> Path:
    """The folder layout `tracking.log_keras_model` reads: model.keras and input_example.npy."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    np.save(folder / "input_example.npy", grey_test_split()[0][:2].astype(np.float32))
    return folder


def log_model_run(model_dir: Path, experiment_id: str, metric: float, data_version: str) -> str:
    """A finished run as the evaluate stage leaves it: model "model", test metric, data version and classes."""
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tags({"cassava.data_version": data_version, "cassava.classes": ",".join(CLASS_NAMES)})
        mlflow.log_metric(METRIC, metric)
        log_keras_model(model_dir)
    return run.info.run_id


def grey_test_split(image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Two uniform grey images per class, uint8 like the prepared arrays."""
    labels = np.repeat(np.arange(len(CLASS_NAMES)), 2)
    images = np.stack([np.full((image_size, image_size, 3), CLASS_LEVELS[label], dtype=np.uint8) for label in labels])
    return images, labels.astype(np.int32)


@functools.cache
def _empty_store() -> Path:
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
        shutil.copyfile(_empty_store(), store)
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


# ---- the pure rule ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "champion", "expected", "reason"),
    [
        (0.5, None, True, "test_macro_f1 0.5000 reaches the minimum 0.3000; no champion yet"),
        (0.6, 0.5, True, "test_macro_f1 0.6000 beats the champion's 0.5000"),
        (0.4, 0.5, False, "test_macro_f1 0.4000 does not beat the champion's 0.5000"),
        (0.5, 0.5, False, "test_macro_f1 0.5000 does not beat the champion's 0.5000"),  # a tie keeps the champion
        (0.2, None, False, "test_macro_f1 0.2000 is below the minimum 0.3000"),
        (0.2, 0.1, False, "test_macro_f1 0.2000 is below the minimum 0.3000"),
        (math.nan, None, False, "test_macro_f1 is nan: not a number"),
    ],
)
def test_decide(candidate: float, champion: float | None, expected: bool, reason: str) -> None:
    assert decide(candidate, champion, 0.3, METRIC) == GateDecision(expected, reason)


# ---- the gate against a real registry ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Run ids of three evaluated runs; each test registers under its own model name."""
    root = tmp_path_factory.mktemp("registry")
    with module_workspace(root) as experiment_id:
        constant_dir = save_model_dir(constant_model(), root / "constant")
        oracle_dir = save_model_dir(oracle_model(), root / "oracle")
        yield {
            "constant": log_model_run(constant_dir, experiment_id, 0.8, "v1"),  # v1: a split where it looked good
            "oracle": log_model_run(oracle_dir, experiment_id, 0.9, "v1"),
            "oracle_v2": log_model_run(oracle_dir, experiment_id, 0.7, "v2"),
        }


def _gate(run_id: str, model_name: str, minimum: float = 0.3, image_size: int = IMAGE_SIZE):
    images, labels = grey_test_split(image_size)
    return gate_and_register(run_id, model_name, METRIC, minimum, images, labels, CLASS_NAMES, batch_size=4)


def _champion_version(model_name: str) -> int:
    return int(MlflowClient().get_model_version_by_alias(model_name, CHAMPION_ALIAS).version)


def _gate_tags(run_id: str) -> tuple[str, str]:
    tags = MlflowClient().get_run(run_id).data.tags
    return tags["cassava.gate.decision"], tags["cassava.gate.reason"]


def test_first_model_is_registered_and_becomes_champion(runs: dict[str, str]) -> None:
    result = _gate(runs["constant"], "first")
    assert result.decision.register and result.registered_version == 1 and result.champion_version is None
    assert _champion_version("first") == 1
    version = MlflowClient().get_model_version("first", "1")
    assert version.run_id == runs["constant"]
    assert version.tags["cassava.data_version"] == "v1"
    assert float(version.tags[metric_tag(METRIC)]) == pytest.approx(0.8)
    assert version.tags["cassava.classes"] == "cbb,cmd,healthy"
    assert _gate_tags(runs["constant"]) == (
        "registered", "test_macro_f1 0.8000 reaches the minimum 0.3000; no champion yet"
    )


def test_better_model_is_registered_and_takes_the_alias(runs: dict[str, str]) -> None:
    _gate(runs["constant"], "better")
    result = _gate(runs["oracle"], "better")
    assert result.decision.register and result.registered_version == 2 and result.champion_version == 1
    assert _champion_version("better") == 2
    decision, reason = _gate_tags(runs["oracle"])
    assert decision == "registered"
    assert reason == "test_macro_f1 0.9000 beats the champion's 0.8000 (champion: version 1)"


def test_worse_model_is_rejected_and_the_alias_stays(runs: dict[str, str]) -> None:
    _gate(runs["oracle"], "worse")
    result = _gate(runs["constant"], "worse")
    assert not result.decision.register and result.registered_version is None
    assert _champion_version("worse") == 1
    assert [version.version for version in MlflowClient().search_model_versions("name = 'worse'")] == [1]
    decision, reason = _gate_tags(runs["constant"])
    assert decision == "rejected"
    assert reason == "test_macro_f1 0.8000 does not beat the champion's 0.9000 (champion: version 1)"


def test_model_below_the_minimum_is_rejected_and_not_registered(runs: dict[str, str]) -> None:
    result = _gate(runs["oracle"], "strict", minimum=0.95)
    assert not result.decision.register
    assert _gate_tags(runs["oracle"]) == ("rejected", "test_macro_f1 0.9000 is below the minimum 0.9500")
    assert MlflowClient().search_registered_models("name = 'strict'") == []


def test_champion_of_another_data_version_is_rescored_on_the_candidates_split(runs: dict[str, str]) -> None:
    _gate(runs["constant"], "rescored")  # 0.8 on v1; on the v2 split it always answers cbb: macro F1 1/6
    result = _gate(runs["oracle_v2"], "rescored")  # 0.7 < 0.8 recorded, but > 1/6 on the same split
    assert result.decision.register and _champion_version("rescored") == 2
    assert result.champion_metric == pytest.approx(1 / 6)
    decision, reason = _gate_tags(runs["oracle_v2"])
    assert decision == "registered"
    assert reason.startswith("test_macro_f1 0.7000 beats the champion's 0.1667 (champion: version 1, re-scored")
    assert MlflowClient().get_run(runs["oracle_v2"]).data.tags["cassava.gate.champion_metric"].startswith("0.1666")


def test_champion_that_cannot_take_the_test_images_is_not_replaced(runs: dict[str, str]) -> None:
    _gate(runs["constant"], "resized")
    result = _gate(runs["oracle_v2"], "resized", image_size=16)  # the new data version is 16x16
    assert not result.decision.register and _champion_version("resized") == 1
    assert _gate_tags(runs["oracle_v2"]) == (
        "rejected", "cannot compare with champion version 1: the champion takes 8x8 images, the test split holds 16x16"
    )
