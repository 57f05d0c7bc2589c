"""The CNN is built from params: every knob reaches the Keras objects."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tasks.model import build_classifier, model_summary
from tasks.params import Params


def _layers_of(model: keras.Model, kind: type) -> list:
    return [layer for layer in model.layers if isinstance(layer, kind)]


def test_blocks_follow_params(tiny_params: Params) -> None:
    model = build_classifier(tiny_params.model, image_size=32, num_classes=5, seed=1)
    convolutions = _layers_of(model, keras.layers.Conv2D)
    assert [layer.filters for layer in convolutions] == [8, 16]
    assert all(layer.kernel_size == (3, 3) for layer in convolutions)
    assert all(isinstance(layer.kernel_initializer, keras.initializers.GlorotUniform) for layer in convolutions)
    assert all(not layer.use_bias for layer in convolutions)  # batch norm's offset replaces the bias
    norms = _layers_of(model, keras.layers.BatchNormalization)
    assert len(norms) == 2 and all(layer.momentum == pytest.approx(0.9) for layer in norms)
    rates = [layer.rate for layer in _layers_of(model, keras.layers.Dropout)]
    assert rates == [0.1, 0.1, 0.3]
    assert model.output_shape == (None, 5)
    assert "block2_conv" in model_summary(model)


def test_without_batch_norm_and_dropout_with_another_initializer(tiny_params: Params) -> None:
    model_params = tiny_params.model.model_copy(
        update={"batch_norm": False, "dropout": 0.0, "head_dropout": 0.0, "initializer": "he_normal", "kernel_size": 5}
    )
    model = build_classifier(model_params, image_size=32, num_classes=3, seed=1)
    assert not _layers_of(model, keras.layers.BatchNormalization)
    assert not _layers_of(model, keras.layers.Dropout)
    convolutions = _layers_of(model, keras.layers.Conv2D)
    assert all(layer.use_bias and layer.kernel_size == (5, 5) for layer in convolutions)
    assert all(isinstance(layer.kernel_initializer, keras.initializers.HeNormal) for layer in convolutions)


def test_model_takes_raw_pixel_values_and_returns_probabilities(tiny_params: Params) -> None:
    model = build_classifier(tiny_params.model, image_size=32, num_classes=5, seed=1)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (4, 5)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_same_seed_same_weights(tiny_params: Params) -> None:
    first = build_classifier(tiny_params.model, image_size=32, num_classes=5, seed=7).get_weights()
    second = build_classifier(tiny_params.model, image_size=32, num_classes=5, seed=7).get_weights()
    other = build_classifier(tiny_params.model, image_size=32, num_classes=5, seed=8).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
