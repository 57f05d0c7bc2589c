"""Training core: schedules, optimizers, determinism, and final metrics from the restored best epoch."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import pytest

from tasks.data import acquire, prepare_dataset
from tasks.model import build_classifier
from tasks.params import AugmentationParams, Params
from tasks.prepared import PreparedData, batched_dataset
from tasks.train import build_optimizer, compile_classifier, learning_rate_schedule, seed_everything, train_classifier


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    from tests.conftest import tiny_params_tree
    from tasks.params import validate_params

    root = tmp_path_factory.mktemp("train")
    params = validate_params(tiny_params_tree())
    acquire(params.data, root / "raw")
    prepare_dataset(params.data, root / "raw", root / "prepared")
    return PreparedData(root / "prepared")


@pytest.mark.parametrize(
    ("schedule", "at_start", "at_end"),
    [("constant", 0.01, 0.01), ("exponential", 0.01, 0.001)],
)
def test_learning_rate_schedules(tiny_params: Params, schedule: str, at_start: float, at_end: float) -> None:
    train = tiny_params.train.model_copy(update={"lr_schedule": schedule, "learning_rate": 0.01, "epochs": 4})
    rate = learning_rate_schedule(train, steps_per_epoch=10)
    value_at = (lambda step: float(rate(step))) if callable(rate) else (lambda step: rate)
    assert value_at(0) == pytest.approx(at_start)
    assert value_at(40) == pytest.approx(at_end, rel=1e-4)
    assert at_end <= value_at(20) <= at_start


def test_optimizers_get_their_hyper_parameters(tiny_params: Params) -> None:
    sgd = build_optimizer(tiny_params.train.model_copy(update={"optimizer": "sgd", "momentum": 0.8}), 10)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == pytest.approx(0.8)
    rmsprop = build_optimizer(tiny_params.train.model_copy(update={"optimizer": "rmsprop"}), 10)
    assert isinstance(rmsprop, keras.optimizers.RMSprop)
    assert isinstance(build_optimizer(tiny_params.train, 10), keras.optimizers.Adam)


def test_determinism_and_xla_knobs_reach_tensorflow_and_keras(tiny_params: Params) -> None:
    from tensorflow.python.framework.config import is_op_determinism_enabled

    seed_everything(0, deterministic=False)
    assert not is_op_determinism_enabled()
    seed_everything(0, tiny_params.train.deterministic)  # the default turns it back on, process-wide
    assert is_op_determinism_enabled()

    # Keras' random augmentation layers cannot be XLA-compiled (Keras then falls back, with a warning).
    no_augmentation = tiny_params.model.model_copy(update={"augmentation": AugmentationParams()})
    model = build_classifier(no_augmentation, tiny_params.data.image_size, 3, 0)
    seed_everything(0, deterministic=False)  # Keras compiles with XLA only without op determinism
    compile_classifier(model, tiny_params.train.model_copy(update={"jit_compile": True, "deterministic": False}), 4)
    assert model.jit_compile is True
    seed_everything(0, tiny_params.train.deterministic)
    compile_classifier(model, tiny_params.train, 4)
    assert model.jit_compile is False


@pytest.mark.slow
def test_training_is_deterministic_and_reports_the_restored_epoch(
    tiny_params: Params, prepared: PreparedData, tmp_path: Path
) -> None:
    logged: list[tuple[int, dict]] = []
    outcome = train_classifier(
        tiny_params, prepared, tmp_path / "best.keras", tmp_path / "backup",
        on_epoch=lambda epoch, values: logged.append((epoch, values)),
    )
    summary, history = outcome.summary, outcome.history
    again = train_classifier(tiny_params, prepared, tmp_path / "again.keras", tmp_path / "backup2")
    summary_again, history_again = again.summary, again.history
    assert history == history_again
    assert summary.best_val_loss == summary_again.best_val_loss

    assert [epoch for epoch, _ in logged] == [row["epoch"] for row in history] == list(range(1, summary.epochs_run + 1))
    expected = {"loss", "val_loss", "accuracy", "val_accuracy", "learning_rate", "grad_norm", "gap_accuracy", "gap_loss"}
    assert all(expected <= set(values) for _, values in logged)
    assert all(values["gap_accuracy"] == pytest.approx(values["accuracy"] - values["val_accuracy"]) for _, values in logged)
    best = min(history, key=lambda row: row["val_loss"])
    assert summary.best_epoch == best["epoch"]
    # Final metrics are the restored model's, recomputed: they match the best epoch, not the last one.
    assert summary.best_val_loss == pytest.approx(best["val_loss"], rel=1e-4)
    assert (tmp_path / "best.keras").exists()
    # They are read from that epoch's validation, not evaluated again: evaluating the final model gives them.
    val_images, val_labels = prepared.split("val")
    val_loss, val_accuracy = outcome.model.evaluate(
        batched_dataset(val_images, val_labels, tiny_params.train.batch_size), verbose=0
    )
    assert (summary.best_val_loss, summary.best_val_accuracy) == (pytest.approx(val_loss, rel=1e-5), val_accuracy)


def test_the_train_stage_run_holds_everything_and_a_loadable_model(workspace: Path) -> None:
    """Nothing lost for speed: the diagnostics are drawn and logged while training runs, the model file is
    copied into the MLflow model rather than saved again, and its signature comes from recorded shapes."""
    import mlflow
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from tasks.data import run_acquire, run_prepare
    from tasks.layout import INIT_DIAGNOSTICS_FILE, MODEL_DIR, TRAIN_SUMMARY_FILE
    from tasks.params import flatten_params, load_params
    from tasks.train import run_train

    params = load_params()
    run_id = run_train(params, run_prepare(params, run_acquire(params)))
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten_params(params)
    epochs = json.loads((workspace / TRAIN_SUMMARY_FILE).read_text())["epochs_run"]
    assert [point.step for point in client.get_metric_history(run_id, "val_loss")] == list(range(1, epochs + 1))
    assert {"train.best_val_loss", "train.train_accuracy", "train.best_epoch", "init.variance_ratio"} <= set(
        run.data.metrics)
    assert {"cassava.init_verdict", "cassava.init_reason", "cassava.gradient_flag"} <= set(run.data.tags)
    artifacts = {item.path for folder in ("diagnostics", "training") for item in client.list_artifacts(run_id, folder)}
    assert artifacts == {"diagnostics/init_diagnostics.csv", "diagnostics/init_diagnostics.png",
                         "training/history.csv", "training/train_summary.json", "training/model_summary.txt"}
    logged_table = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="diagnostics/init_diagnostics.csv"))
    assert logged_table.read_text() == (workspace / INIT_DIAGNOSTICS_FILE).read_text()
    assert len(logged_table.read_text().splitlines()) == 1 + len(params.model.conv_filters) + 2  # header, conv, dense

    model_uri = f"runs:/{run_id}/model"
    example = np.load(workspace / MODEL_DIR / "input_example.npy")
    expected = keras.saving.load_model(workspace / MODEL_DIR / "model.keras").predict(example, verbose=0)
    # The signature from recorded shapes is the one MLflow infers from a real prediction.
    assert mlflow.models.get_model_info(model_uri).signature == infer_signature(example, expected)
    local = mlflow.artifacts.download_artifacts(model_uri)
    assert np.array_equal(mlflow.models.Model.load(local).load_input_example(local), example)
    predicted = mlflow.pyfunc.load_model(model_uri).predict(example)
    assert np.allclose(predicted, expected, atol=1e-6)
