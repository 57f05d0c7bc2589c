"""Lessons 1-4: every knob reaches the Keras objects; schedules give the expected rates; diagnostics judge."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tasks.diagnostics import judge_initialization, probe_initialization
from tasks.model import build_classifier
from tasks.params import Params, validate_params
from tasks.train import _callbacks, Progress, balanced_class_weight, build_optimizer, learning_rate_schedule
from tests.conftest import tiny_params_tree


def _params(*overrides: str) -> Params:
    return validate_params(tiny_params_tree(list(overrides)))


def _rate(schedule, step: int) -> float:
    return float(schedule(step)) if callable(schedule) else float(schedule)


@pytest.mark.parametrize(
    ("overrides", "kind", "expected"),
    [
        (["train.optimizer=sgd", "train.momentum=0.8", "train.nesterov=true"], keras.optimizers.SGD,
         {"momentum": 0.8, "nesterov": True}),
        (["train.optimizer=adam", "train.beta_1=0.8", "train.beta_2=0.95"], keras.optimizers.Adam,
         {"beta_1": 0.8, "beta_2": 0.95}),
        (["train.optimizer=adamw", "train.weight_decay=0.01"], keras.optimizers.AdamW, {"weight_decay": 0.01}),
        (["train.optimizer=rmsprop", "train.rho=0.8", "train.momentum=0.5"], keras.optimizers.RMSprop,
         {"rho": 0.8, "momentum": 0.5}),
        (["train.gradients.clip=norm", "train.gradients.clip_value=2.5"], keras.optimizers.Adam, {"global_clipnorm": 2.5}),
        (["train.gradients.clip=value", "train.gradients.clip_value=0.5"], keras.optimizers.Adam, {"clipvalue": 0.5}),
    ],
)
def test_optimizer_knobs_reach_the_optimizer(overrides: list[str], kind: type, expected: dict) -> None:
    optimizer = build_optimizer(_params(*overrides).train, steps_per_epoch=10)
    assert type(optimizer) is kind
    for key, value in expected.items():
        assert getattr(optimizer, key) == pytest.approx(value)


def test_step_decay_halves_every_step_epochs() -> None:
    train = _params("train.lr_schedule=step", "train.learning_rate=0.1", "train.epochs=9",
                    "train.schedule.step_epochs=3", "train.schedule.step_factor=0.5").train
    schedule = learning_rate_schedule(train, steps_per_epoch=10)
    assert [_rate(schedule, step) for step in (0, 29, 31, 61, 89)] == pytest.approx([0.1, 0.1, 0.05, 0.025, 0.025])


def test_cosine_warms_up_linearly_then_decays_to_its_floor() -> None:
    train = _params("train.lr_schedule=cosine", "train.learning_rate=0.1", "train.epochs=10",
                    "train.schedule.warmup_epochs=2", "train.schedule.min_lr_fraction=0.1").train
    schedule = learning_rate_schedule(train, steps_per_epoch=10)
    assert _rate(schedule, 0) == pytest.approx(0.0)
    assert _rate(schedule, 10) == pytest.approx(0.05)  # half-way through the warm-up
    assert _rate(schedule, 20) == pytest.approx(0.1)  # peak
    assert _rate(schedule, 60) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))  # half-way through the decay
    assert _rate(schedule, 100) == pytest.approx(0.01)


def test_exponential_and_constant_schedules() -> None:
    exponential = learning_rate_schedule(
        _params("train.lr_schedule=exponential", "train.learning_rate=0.1", "train.epochs=4",
                "train.schedule.decay_rate=0.25").train, steps_per_epoch=10)
    assert _rate(exponential, 20) == pytest.approx(0.05)
    assert _rate(exponential, 40) == pytest.approx(0.025)
    assert learning_rate_schedule(_params("train.lr_schedule=constant").train, 10) == pytest.approx(0.002)


def test_plateau_schedule_adds_reduce_on_plateau(tmp_path) -> None:
    params = _params("train.lr_schedule=plateau", "train.schedule.plateau_factor=0.2", "train.schedule.plateau_patience=3")
    callbacks = _callbacks(params, Progress("x"), tmp_path, tmp_path / "best.keras", [], None)
    (plateau,) = [callback for callback in callbacks if isinstance(callback, keras.callbacks.ReduceLROnPlateau)]
    assert plateau.factor == pytest.approx(0.2) and plateau.patience == 3
    assert not callable(learning_rate_schedule(params.train, 10))  # a plain rate the callback can lower
    (stopping,) = [callback for callback in callbacks if isinstance(callback, keras.callbacks.EarlyStopping)]
    assert stopping.monitor == "val_loss" and stopping.patience == params.train.early_stopping.patience


def test_model_knobs_reach_the_layers() -> None:
    params = _params(
        "model.batch_norm=[true, false]", "model.dropout=[0.2, 0.4]", "model.head_dropout=0.5", "model.l2=0.001",
        "model.batch_norm_momentum=0.8", "model.initializer=lecun_normal",
        "model.augmentation.flip=horizontal", "model.augmentation.rotation=0.1", "model.augmentation.zoom=0.2",
        "model.augmentation.contrast=0.3", "model.augmentation.brightness=0.15",
    )
    model = build_classifier(params.model, image_size=32, num_classes=5, seed=3)
    layers = {layer.name: layer for layer in model.layers}
    assert "block1_bn" in layers and "block2_bn" not in layers
    assert layers["block1_bn"].momentum == pytest.approx(0.8)
    assert layers["block1_dropout"].rate == 0.2 and layers["block2_dropout"].rate == 0.4
    assert layers["head_dropout"].rate == 0.5
    assert isinstance(layers["block1_conv"].kernel_initializer, keras.initializers.LecunNormal)
    assert layers["block2_conv"].kernel_regularizer.l2 == pytest.approx(0.001)
    assert layers["augment_flip"].mode == "horizontal"
    assert layers["augment_rotation"].factor == pytest.approx((-0.1, 0.1))
    assert layers["augment_zoom"].height_factor == pytest.approx(0.2)
    assert layers["augment_contrast"].factor[-1] == pytest.approx(0.3)
    assert layers["augment_brightness"].factor == pytest.approx((-0.15, 0.15))
    # Augmentation is inactive at inference: predictions are repeatable.
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    assert np.array_equal(model.predict(images, verbose=0), model.predict(images, verbose=0))


def test_bad_initializations_are_flagged_and_good_ones_pass() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 5, 32).astype(np.int32)

    def verdict(*overrides: str):
        params = _params("model.conv_filters=[8, 16, 32]", *overrides)
        model = build_classifier(params.model, image_size=32, num_classes=5, seed=1)
        return judge_initialization(probe_initialization(model, images, labels))

    assert verdict("model.initializer=he_normal").healthy
    assert verdict("model.initializer=glorot_uniform").healthy
    exploding = verdict("model.initializer=random_normal", "model.init_stddev=1.0")
    assert not exploding.healthy and "between layers" in exploding.reason
    zeros = verdict("model.initializer=zeros")
    assert not zeros.healthy and "zero activation variance" in zeros.reason and "all gradients are zero" in zeros.reason


def test_balanced_class_weights_favour_rare_classes() -> None:
    labels = np.array([0] * 8 + [1] * 2)
    weights = balanced_class_weight(labels, num_classes=3)
    assert weights[0] == pytest.approx(10 / (2 * 8)) and weights[1] == pytest.approx(10 / (2 * 2))
    assert weights[2] == 1.0  # absent from this split: left neutral


def test_per_block_lists_must_match_the_block_count() -> None:
    from tasks.params import ParamsError

    with pytest.raises(ParamsError, match=r"model.dropout = \[0.1\]: a list needs one entry per conv block \(2"):
        _params("model.dropout=[0.1]")
