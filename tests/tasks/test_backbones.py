"""Backbones: every Keras application builds offline with every weights option that works offline, a `.keras`
file and a `runs:/` source work and record their lineage, the offline ImageNet error is one immediate line,
and freezing / unfreezing touch exactly the intended layers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from tasks import backbones
from tasks.analysis import last_conv_layer_name, saliency_maps
from tasks.backbones import BACKBONE_LAYER, BackboneError, build_backbone, file_sha256, leaf_layers, lineage_tags
from tasks.model import build_classifier
from tasks.params import ParamsError, code_root, load_params, validate_params
from tasks.transfer import freeze_backbone, unfreeze_top_layers
from tests.conftest import tiny_params_tree

SIZE = 32  # the smallest size the applications accept: keeps every build here in about a second


def _params(*overrides: str):
    return validate_params(tiny_params_tree(list(overrides)))


def _raw_images(count: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("application", ["mobilenet_v2", "efficientnet_b0", "resnet50_v2"])
def test_each_application_builds_with_random_weights_and_takes_raw_pixels(application: str) -> None:
    params = _params(f"model.backbone={application}", "model.backbone_alpha=0.35")
    model = build_classifier(params.model, SIZE, num_classes=3, seed=0)
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.output_shape == (None, 3)
    assert BACKBONE_LAYER in [layer.name for layer in model.layers]
    probabilities = model.predict(_raw_images(), verbose=0)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_a_local_weights_file_is_loaded_into_the_application_and_hashed(tmp_path: Path) -> None:
    donor = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), alpha=0.35)
    donor.save_weights(tmp_path / "donor.weights.h5")
    params = _params("model.backbone=mobilenet_v2", "model.backbone_alpha=0.35",
                     f"model.backbone_weights={tmp_path / 'donor.weights.h5'}")
    backbone = build_backbone(params.model, SIZE)
    core = [layer for layer in backbone.layers if isinstance(layer, keras.Model)][0]
    for mine, theirs in zip(core.get_weights(), donor.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    assert lineage_tags(params.model)[backbones.TAG_SHA256] == file_sha256(tmp_path / "donor.weights.h5")


def _save_tiny_backbone(path: Path, input_size: int | None, pooled: bool) -> Path:
    """Any image model taking raw 0..255 pixels: here rescaling, two convolutions with batch norm."""
    inputs = keras.Input((input_size, input_size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, name="tiny_conv1")(x)
    x = keras.layers.BatchNormalization(name="tiny_bn")(x)
    x = keras.layers.Conv2D(6, 3, name="tiny_conv2")(x)
    if pooled:
        x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, x).save(path)
    return path


@pytest.mark.parametrize(("input_size", "pooled"), [(None, False), (16, True)])
def test_a_keras_file_is_a_backbone_of_fixed_or_free_size(tmp_path: Path, input_size: int | None, pooled: bool) -> None:
    file = _save_tiny_backbone(tmp_path / "tiny.keras", input_size, pooled)
    params = _params(f"model.backbone={file}")
    model = build_classifier(params.model, SIZE, num_classes=3, seed=0)
    assert model.input_shape == (None, SIZE, SIZE, 3)
    backbone_names = [layer.name for layer in model.get_layer(BACKBONE_LAYER).layers]
    assert ("to_backbone_size" in backbone_names) == (input_size is not None)  # resized inside the model
    assert model.predict(_raw_images(), verbose=0).shape == (2, 3)
    assert lineage_tags(params.model)[backbones.TAG_SHA256] == file_sha256(file)
    # Frozen (as after phase 1), saved and loaded as evaluation loads it, Grad-CAM still explains a spatial
    # layer of the model's own graph.
    freeze_backbone(model)
    model.save(tmp_path / "classifier.keras")
    loaded = keras.saving.load_model(tmp_path / "classifier.keras")
    assert last_conv_layer_name(loaded) == ("backbone_input" if pooled else "backbone_features")
    assert saliency_maps(loaded, _raw_images(), [0, 1]).shape == (2, SIZE, SIZE)


def test_freezing_and_unfreezing_touch_exactly_the_intended_layers() -> None:
    params = _params("model.backbone=mobilenet_v2", "model.backbone_alpha=0.35")
    model = build_classifier(params.model, SIZE, num_classes=3, seed=0)
    head_weights = sum(len(model.get_layer(name).trainable_weights) for name in ("head_dense", "probabilities"))

    freeze_backbone(model)
    assert len(model.trainable_weights) == head_weights == 4

    leaves = leaf_layers(model.get_layer(BACKBONE_LAYER))
    top = 12
    unfreeze_top_layers(model, top)
    expected = sum(len(layer.weights) for layer in leaves[-top:] if not isinstance(layer, keras.layers.BatchNormalization))
    assert expected > 0
    assert len(model.trainable_weights) == head_weights + expected
    assert not any(layer.trainable_weights for layer in leaves[:-top])
    assert not any(layer.trainable_weights for layer in leaves if isinstance(layer, keras.layers.BatchNormalization))

    unfreeze_top_layers(model, "all")
    all_but_norms = sum(len(layer.weights) for layer in leaves if not isinstance(layer, keras.layers.BatchNormalization))
    assert len(model.trainable_weights) == head_weights + all_but_norms
    freeze_backbone(model)
    assert len(model.trainable_weights) == head_weights


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.backbone=vgg16", "model.backbone = 'vgg16': expected none, mobilenet_v2, efficientnet_b0, resnet50_v2"),
        ("model.backbone=missing.keras", "model.backbone = 'missing.keras': file not found"),
        ("model.backbone_weights=weights.bin", "model.backbone_weights = 'weights.bin': expected none, imagenet"),
        ("model.backbone_weights=missing.weights.h5", "model.backbone_weights = 'missing.weights.h5': file not found"),
        ("model.backbone_weights=imagenet", "needs a Keras application as model.backbone"),
        ("transfer.fine_tune_layers=top", "transfer.fine_tune_layers = 'top': expected a number of layers"),
    ],
)
def test_bad_backbone_params_are_one_line_errors(override: str, expected: str) -> None:
    with pytest.raises(ParamsError) as raised:
        validate_params(tiny_params_tree([override]))
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_backbone_needs_32_pixels() -> None:
    with pytest.raises(ParamsError, match="needs images of at least 32 pixels"):
        validate_params(tiny_params_tree(["model.backbone=mobilenet_v2", "data.image_size=16"]))


OFFLINE_HOST = "keras-weights.invalid"  # RFC 6761: a .invalid name never resolves, as offline


def test_offline_imagenet_fails_at_once_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "IMAGENET_WEIGHTS_HOST", OFFLINE_HOST)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    params = _params("model.backbone=efficientnet_b0", "model.backbone_weights=imagenet")
    started = time.perf_counter()
    with pytest.raises(BackboneError) as raised:
        backbones.check_imagenet_weights_available(params.model)
    assert time.perf_counter() - started < backbones.NETWORK_CHECK_SECONDS + 1
    message = str(raised.value)
    assert "\n" not in message and "-S model.backbone_weights=/path/to/efficientnetb0_notop" in message
    # Weights Keras already holds in its cache need no network.
    (tmp_path / "keras" / "models").mkdir(parents=True)
    (tmp_path / "keras" / "models" / "efficientnetb0_notop.h5").write_bytes(b"")
    backbones.check_imagenet_weights_available(params.model)


def test_offline_imagenet_stops_the_train_command_with_exit_2_before_tensorflow(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "import tasks.backbones\n"
        f"tasks.backbones.IMAGENET_WEIGHTS_HOST = {OFFLINE_HOST!r}\n"
        "from tasks.cli import main\n"
        "sys.argv = ['cli', 'train', '-S', 'model.backbone=mobilenet_v2', '-S', 'model.backbone_weights=imagenet']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        "    print('tensorflow' in sys.modules, exit.code)\n"
    )
    environment = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "CASSAVA_WORKSPACE": str(tmp_path)}
    (tmp_path / "params.yaml").write_text((code_root() / "params.yaml").read_text())
    result = subprocess.run([sys.executable, "-c", script], cwd=code_root(), capture_output=True, text=True, timeout=120,
                            env=environment)
    assert result.stdout.split() == ["False", "2"]
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: model.backbone_weights = imagenet: cannot download the mobilenet_v2")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]  # no store, no run, no output


def test_the_real_photos_profile_is_one_flag_and_the_same_as_dvc_exp_run_arguments() -> None:
    profiled = load_params(profile="real-photos")
    assert profiled.model.backbone in ("mobilenet_v2", "efficientnet_b0") and profiled.train.class_weight == "balanced"
    assert profiled.data.image_size >= 128 and profiled.model.augmentation.flip != "none"
    printed = subprocess.run([sys.executable, "-m", "tasks.cli", "profile", "real-photos"], cwd=code_root(),
                             capture_output=True, text=True, check=True).stdout.split()
    as_arguments = [value for flag, value in zip(printed[::2], printed[1::2]) if flag == "-S"]
    assert load_params(overrides=as_arguments) == profiled
    assert load_params(profile="real-photos", overrides=["data.image_size=160"]).data.image_size == 160  # -S wins
    with pytest.raises(ParamsError, match="profile 'nope': no profiles/nope.yaml"):
        load_params(profile="nope")


@pytest.mark.slow
def test_a_registered_model_or_a_run_id_is_a_source_and_a_wrong_one_is_one_line(workspace: Path) -> None:
    from tests.helpers import IMAGE_SIZE, log_model_run, open_store, save_model_dir
    from tests.tasks.test_predict import register_champion

    cnn = build_classifier(_params().model, IMAGE_SIZE, num_classes=3, seed=0)  # a scratch CNN, as logged by a run
    source_run = log_model_run(save_model_dir(cnn, workspace / "cnn"), open_store(), 0.5, "v1")
    register_champion(source_run, "source-cnn")

    for weights in ("models:/source-cnn@champion", source_run):
        params = _params(f"model.backbone_weights={weights}")
        assert lineage_tags(params.model, backbones.resolve_source(params.model))[backbones.TAG_SOURCE_RUN] == source_run
        model = build_classifier(params.model, SIZE, num_classes=3, seed=0)
        conv = model.get_layer(BACKBONE_LAYER).get_layer("source_features").get_layer("block2_conv")
        np.testing.assert_array_equal(conv.get_weights()[0], cnn.get_layer("block2_conv").get_weights()[0])
        assert model.predict(_raw_images(), verbose=0).shape == (2, 3)  # resized to the source's 8 px inside

    with pytest.raises(BackboneError, match="trained backbone 'none', but model.backbone = 'mobilenet_v2'"):
        backbones.resolve_source(_params("model.backbone=mobilenet_v2", f"model.backbone_weights={source_run}").model)
    with pytest.raises(BackboneError, match="no such model in the tracking store") as raised:
        backbones.resolve_source(_params("model.backbone_weights=models:/no-such-model@champion").model)
    assert "\n" not in str(raised.value)
