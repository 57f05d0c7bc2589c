"""The explaining evaluation: metrics against hand-computed cases, transforms, and a tiny trained model whose
failure modes are known by construction (it reads fine stripes inside a small patch, so rotation and blur must
break it and Grad-CAM must point at the patch)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tasks.analysis import (
    NO_SHIFT_DETECTED,
    SHIFT_DETECTED,
    accuracy_by_sharpness,
    blur_images,
    confidently_wrong_indices,
    distribution_shift,
    embedding_function,
    expected_calibration_error,
    extra_classification_metrics,
    flip_images,
    last_conv_layer_name,
    learning_curve_fractions,
    manifest_blur_scores,
    plot_confidently_wrong,
    plot_learning_curve,
    plot_normalised_confusion,
    plot_reliability_diagram,
    plot_robustness_curves,
    plot_saliency_grid,
    prediction_function,
    robustness_curve,
    robustness_table,
    rotate_images,
    row_normalised_confusion,
    sample_per_class,
    saliency_maps,
)
from tasks.images import blur_score
from tasks.report import REPORT_HEADINGS, ReportSection, write_html_report

PNG_MAGIC = b"\x89PNG"


def _with_top_confidence(confidence: float, predicted: int, classes: int = 5) -> np.ndarray:
    """A probability row whose top class is `predicted` with `confidence`, the rest shared evenly."""
    row = np.full(classes, (1.0 - confidence) / (classes - 1))
    row[predicted] = confidence
    return row


# --------------------------------------------------------------------------------------------- metrics


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # Ten predictions of class 0 at confidence 0.8, eight of them right.
    probabilities = np.stack([_with_top_confidence(0.8, 0)] * 10)
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_overconfident_model() -> None:
    # Confidence 0.9, half right: gap 0.4 in the one filled bin.
    probabilities = np.stack([_with_top_confidence(0.9, 2)] * 10)
    labels = np.array([2] * 5 + [3] * 5)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.4)


def test_ece_weights_bins_by_their_share() -> None:
    # 6 images at 0.95 all right (gap 0.05), 4 at 0.55 all wrong (gap 0.55): 0.6 x 0.05 + 0.4 x 0.55 = 0.25.
    probabilities = np.stack([_with_top_confidence(0.95, 1)] * 6 + [_with_top_confidence(0.55, 1)] * 4)
    labels = np.array([1] * 6 + [0] * 4)
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(0.25)


# Four images, three classes; predicted = [0, 1, 1, 2].
METRIC_PROBABILITIES = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1], [0.1, 0.2, 0.7]])
METRIC_LABELS = np.array([0, 0, 1, 2])


def test_weighted_f1_and_one_vs_rest_auc_on_a_hand_made_case() -> None:
    metrics = extra_classification_metrics(METRIC_PROBABILITIES, METRIC_LABELS, ["cbb", "cmd", "healthy"])
    # F1: cbb 2/3 (support 2), cmd 2/3 (support 1), healthy 1 (support 1) -> (2 x 2/3 + 2/3 + 1) / 4.
    assert metrics["test_weighted_f1"] == pytest.approx((4 / 3 + 2 / 3 + 1) / 4)
    # AUC = share of (positive, negative) pairs ranked right. cbb: {0.8, 0.2} vs {0.4, 0.1} -> 3/4;
    # cmd: {0.5} vs {0.1, 0.7, 0.2} -> 2/3; healthy: {0.7} vs {0.1, 0.1, 0.1} -> 1.
    assert metrics["test_roc_auc.cbb"] == pytest.approx(0.75)
    assert metrics["test_roc_auc.cmd"] == pytest.approx(2 / 3)
    assert metrics["test_roc_auc.healthy"] == pytest.approx(1.0)
    assert metrics["test_roc_auc_ovr"] == pytest.approx((0.75 + 2 / 3 + 1) / 3)
    # The same number scikit-learn's multi-class one-vs-rest macro AUC gives when every class is present.
    assert metrics["test_roc_auc_ovr"] == pytest.approx(
        roc_auc_score(METRIC_LABELS, METRIC_PROBABILITIES, multi_class="ovr", average="macro")
    )


def test_auc_skips_a_class_absent_from_the_labels() -> None:
    probabilities = np.hstack([METRIC_PROBABILITIES * 0.9, np.full((4, 1), 0.1)])  # a fourth class, never true
    metrics = extra_classification_metrics(probabilities, METRIC_LABELS, ["cbb", "cmd", "healthy", "cgm"])
    assert "test_roc_auc.cgm" not in metrics
    # Scaling every score by 0.9 keeps each class's ranking, so the three scorable AUCs are unchanged.
    assert metrics["test_roc_auc_ovr"] == pytest.approx((0.75 + 2 / 3 + 1) / 3)
    single_class = extra_classification_metrics(METRIC_PROBABILITIES, np.zeros(4, int), ["a", "b", "c"])
    assert np.isnan(single_class["test_roc_auc_ovr"])


def test_row_normalised_confusion() -> None:
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    normalised = row_normalised_confusion(confusion)
    assert normalised[0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert normalised[[0, 2]].sum(axis=1) == pytest.approx([1.0, 1.0])
    assert normalised[1].tolist() == [0.0, 0.0, 0.0]  # a class with no test images: zeros, not NaN


def test_confidently_wrong_are_misclassified_most_confident_first() -> None:
    probabilities = np.stack(
        [_with_top_confidence(c, p, 3) for c, p in [(0.9, 0), (0.6, 1), (0.95, 2), (0.7, 1), (0.99, 0)]]
    )
    labels = np.array([0, 0, 1, 1, 2])  # wrong: 1 (0.6), 2 (0.95), 4 (0.99)
    assert confidently_wrong_indices(probabilities, labels, count=2) == [4, 2]
    assert confidently_wrong_indices(probabilities, labels) == [4, 2, 1]


def test_accuracy_by_sharpness_splits_at_the_median() -> None:
    predicted = np.array([0, 1, 1, 0, 0, 0])
    labels = np.array([0, 1, 1, 1, 1, 0])
    scores = np.array([50.0, 40.0, 30.0, 3.0, 2.0, 1.0])  # the first three are the sharp half
    split = accuracy_by_sharpness(predicted, labels, scores)
    assert split["threshold"] == pytest.approx(16.5)
    assert (split["sharp_count"], split["blurry_count"]) == (3, 3)
    assert split["sharp_accuracy"] == pytest.approx(1.0) and split["blurry_accuracy"] == pytest.approx(1 / 3)
    assert accuracy_by_sharpness(predicted, labels, scores, threshold=35.0)["blurry_count"] == 4


def test_manifest_blur_scores_keep_the_split_order(tmp_path: Path) -> None:
    manifest = tmp_path / "split_manifest.csv"
    manifest.write_text("path,label,split,blur_score\na,cbb,train,1.5\nb,cmd,test,9.25\nc,cbb,test,0.5\n")
    assert manifest_blur_scores(manifest).tolist() == [9.25, 0.5]


# --------------------------------------------------------------------------------------------- transforms


def _textured_images(count: int = 3, size: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_transforms_keep_shape_and_dtype() -> None:
    images = _textured_images()
    for transformed in (rotate_images(images, 30), flip_images(images), blur_images(images, 1.5)):
        assert transformed.shape == images.shape and transformed.dtype == np.uint8


def test_rotation_by_zero_is_identity_and_by_ninety_turns_counter_clockwise() -> None:
    images = _textured_images()
    assert np.array_equal(rotate_images(images, 0), images)
    assert np.array_equal(rotate_images(images, 90), np.rot90(images, k=1, axes=(1, 2)))
    # No black fill: the corners of a 45-degree turn of a bright image stay bright.
    bright = np.full((1, 24, 24, 3), 200, np.uint8)
    assert rotate_images(bright, 45).min() == 200


def test_flip_mirrors_left_to_right() -> None:
    images = _textured_images()
    assert np.array_equal(flip_images(images)[:, :, 0], images[:, :, -1])
    assert np.array_equal(flip_images(flip_images(images)), images)


def test_blur_lowers_the_blur_score_and_zero_sigma_changes_nothing() -> None:
    images = _textured_images()
    assert np.array_equal(blur_images(images, 0), images)
    sharp = [blur_score(image) for image in images]
    blurred = [blur_score(image) for image in blur_images(images, 2.0)]
    assert all(after < before / 10 for before, after in zip(sharp, blurred))
    # Channels and images are blurred apart: a flat red image stays exactly that.
    red = np.zeros((2, 16, 16, 3), np.uint8)
    red[..., 0] = 180
    assert np.array_equal(blur_images(red, 3.0), red)


# --------------------------------------------------------------------------------------------- a tiny trained model

SIZE, PATCH = 32, 12


def striped_patches(count: int, seed: int, brightness: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat noisy background with one 12-px patch of fine stripes at a random place: horizontal stripes are
    class 0, vertical class 1. Only the patch carries the class, and only through orientation and fine detail.

    Returns images (uint8), labels and each patch's (top, left).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = 110.0 + brightness + rng.normal(0.0, 8.0, (count, SIZE, SIZE, 3))
    corners = rng.integers(0, SIZE - PATCH + 1, (count, 2))
    stripes = np.where((np.arange(PATCH) + rng.integers(0, 4, count)[:, None]) % 4 < 2, 230.0, 20.0)  # period 4
    for index, ((top, left), label) in enumerate(zip(corners, labels)):
        profile = stripes[index]
        pattern = np.repeat(profile[:, None], PATCH, 1) if label == 0 else np.repeat(profile[None, :], PATCH, 0)
        images[index, top : top + PATCH, left : left + PATCH] = pattern[..., None] + brightness
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int32), corners


@pytest.fixture(scope="module")
def trained_model():
    import keras

    from tasks.model import build_classifier
    from tasks.params import ModelParams

    keras.utils.set_random_seed(0)
    model_params = ModelParams(conv_filters=[8, 16], batch_norm=False, dropout=0.0, head_dropout=0.0, dense_units=16)
    model = build_classifier(model_params, image_size=SIZE, num_classes=2, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    images, labels, _ = striped_patches(192, seed=1)
    model.fit(images.astype(np.float32), labels, epochs=5, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def striped_test_set() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return striped_patches(96, seed=2)


@pytest.mark.slow
def test_robustness_curves_fall_under_rotation_and_blur(trained_model, striped_test_set, tmp_path: Path) -> None:
    images, labels, _ = striped_test_set
    predict = prediction_function(trained_model, batch_size=64)
    rotation = robustness_curve(predict, images, labels, rotate_images, [0, 45, 90], batch_size=40)
    blur = robustness_curve(predict, images, labels, blur_images, [0, 1, 3], batch_size=40)
    assert [point["strength"] for point in rotation] == [0.0, 45.0, 90.0]
    assert rotation[0]["accuracy"] == blur[0]["accuracy"] >= 0.9  # it did learn the stripes
    # A quarter turn swaps horizontal and vertical: the class cue is inverted, not just weakened.
    assert rotation[-1]["accuracy"] < 0.3
    # sigma 3 wipes out a 4-pixel period: no better than a coin.
    assert blur[-1]["accuracy"] < rotation[0]["accuracy"] - 0.25
    table = robustness_table({"rotation": rotation, "blur": blur})
    assert len(table) == 6 and table[0]["change"] == 0.0 and table[2]["change"] < -0.6
    figure = plot_robustness_curves({"rotation": rotation, "blur": blur}, tmp_path / "r.png")
    assert figure.read_bytes()[:4] == PNG_MAGIC


@pytest.mark.slow
def test_grad_cam_points_at_the_patch(trained_model, striped_test_set, tmp_path: Path) -> None:
    images, labels, corners = striped_test_set
    assert last_conv_layer_name(trained_model) == "block2_relu"
    chosen = sample_per_class(labels, per_class=12, seed=0)
    heatmaps = saliency_maps(trained_model, images[chosen], labels[chosen], batch_size=10)
    assert heatmaps.shape == (len(chosen), SIZE, SIZE) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0 and heatmaps.max() == pytest.approx(1.0)
    ratios = []
    for heatmap, (top, left) in zip(heatmaps, corners[chosen]):
        inside = np.zeros((SIZE, SIZE), bool)
        inside[top : top + PATCH, left : left + PATCH] = True
        ratios.append(heatmap[inside].mean() / max(heatmap[~inside].mean(), 1e-6))
    # The patch is 14% of the image; a map that ignored it would give ratios around 1.
    assert np.median(ratios) > 2.0 and np.mean(np.array(ratios) > 1.0) >= 0.8
    few = chosen[:3] + chosen[-3:]  # a small grid: matplotlib, not Grad-CAM, is the slow part
    titles = [f"class {labels[index]}" for index in few]
    grid = plot_saliency_grid(images[few], heatmaps[[0, 1, 2, -3, -2, -1]], titles, tmp_path / "s.png")
    assert grid.read_bytes()[:4] == PNG_MAGIC


def test_grad_cam_uses_the_score_before_a_saturated_softmax() -> None:
    """A hand-wired model (no block names, so the last 4-D layer is found by scanning) so sure of itself that
    its softmax output is exactly [1, 0]: gradients of that probability are zero, so the map would be blank if
    Grad-CAM differentiated the probability rather than the logit."""
    import keras

    inputs = keras.Input((8, 8, 3))
    feature = keras.layers.Conv2D(1, 1, use_bias=False, activation="relu", name="brightness")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(feature))
    model = keras.Model(inputs, outputs)
    model.get_layer("brightness").set_weights([np.ones((1, 1, 3, 1), np.float32)])
    model.layers[-1].set_weights([np.array([[50.0, -50.0]], np.float32), np.zeros(2, np.float32)])
    image = np.zeros((1, 8, 8, 3), np.uint8)
    image[0, :3, :3] = 255  # the only evidence, top left
    assert model.predict(image.astype(np.float32), verbose=0)[0].tolist() == [1.0, 0.0]
    assert last_conv_layer_name(model) == "brightness"
    heatmap = saliency_maps(model, image, [0])[0]
    assert heatmap.max() == pytest.approx(1.0)
    assert heatmap[:3, :3].mean() > 0.5 > heatmap[5:, 5:].max()


def test_sample_per_class_is_seeded_and_balanced() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    first = sample_per_class(labels, per_class=4, seed=5)
    assert first == sample_per_class(labels, per_class=4, seed=5)
    assert first != sample_per_class(labels, per_class=4, seed=6)
    assert np.bincount(labels[first]).tolist() == [4, 3, 4]  # a small class gives all it has


@pytest.mark.slow
def test_distribution_shift_two_sample_test(trained_model) -> None:
    embed = embedding_function(trained_model, "pool")
    # 300 a side: under no shift the out-of-fold AUC then varies by about 0.025 around 0.5.
    reference, _, _ = striped_patches(300, seed=3)
    same, _, _ = striped_patches(300, seed=4)
    brighter, _, _ = striped_patches(300, seed=4, brightness=60)
    assert embed(reference[:5]).shape == (5, 16)

    unchanged = distribution_shift(reference, same, embed, seed=0)
    assert unchanged["verdict"] == NO_SHIFT_DETECTED and abs(unchanged["classifier_auc"] - 0.5) < 0.12
    assert np.abs(unchanged["channel_mean_difference"]).max() < 3

    shifted = distribution_shift(reference, brighter, embed, seed=0)
    assert shifted["verdict"] == SHIFT_DETECTED and shifted["classifier_auc"] > 0.9
    assert np.array(shifted["channel_mean_difference"]) == pytest.approx([55, 55, 55], abs=8)  # some clip at 255
    # The threshold is the caller's: nothing counts as a shift at 1.01.
    strict = distribution_shift(reference[:60], brighter[:60], embed, seed=0, auc_threshold=1.01)
    assert strict["verdict"] == NO_SHIFT_DETECTED and strict["reference_count"] == 60


# --------------------------------------------------------------------------------------------- limited data


def test_learning_curve_fractions_are_nested_stratified_and_seeded() -> None:
    labels = np.array([0] * 40 + [1] * 20 + [2] * 3)
    subsets = learning_curve_fractions(labels, fractions=(0.5, 0.1, 1.0, 0.25), seed=7)
    assert list(subsets) == [0.1, 0.25, 0.5, 1.0]
    # Per class ceil(fraction x size): 0.1 -> 4 + 2 + 1, 0.25 -> 10 + 5 + 1, 0.5 -> 20 + 10 + 2.
    assert [np.bincount(labels[indices], minlength=3).tolist() for indices in subsets.values()] == [
        [4, 2, 1], [10, 5, 1], [20, 10, 2], [40, 20, 3]
    ]
    ordered = list(subsets.values())
    assert all(set(small) <= set(large) for small, large in zip(ordered, ordered[1:]))
    assert np.array_equal(subsets[1.0], np.arange(len(labels)))
    assert np.array_equal(learning_curve_fractions(labels, (0.25,), seed=7)[0.25], subsets[0.25])
    assert not np.array_equal(learning_curve_fractions(labels, (0.25,), seed=8)[0.25], subsets[0.25])
    with pytest.raises(ValueError):
        learning_curve_fractions(labels, (0.0, 0.5))


# --------------------------------------------------------------------------------------------- report


def test_html_report_is_one_self_contained_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(8) % 3
    probabilities = rng.dirichlet(np.ones(3), size=8)
    names = ["cbb", "cmd", "healthy"]
    figures = {
        "Confusion matrix": plot_normalised_confusion(np.array([[2, 1, 0], [0, 2, 1], [1, 0, 1]]), names,
                                                      tmp_path / "confusion.png"),
        "Calibration": plot_reliability_diagram(probabilities, labels, tmp_path / "reliability.png", bins=5),
        "Robustness": plot_robustness_curves({"rotation": [{"strength": 0, "accuracy": 0.9}]}, tmp_path / "r.png"),
        "Learning curve": plot_learning_curve(
            [{"fraction": 0.5, "test_accuracy": 0.6, "train_images": 10}, {"fraction": 1.0, "test_accuracy": 0.7}],
            tmp_path / "learning.png",
        ),
    }
    wrong = plot_confidently_wrong(images, probabilities, labels, names, tmp_path / "wrong.png", count=4)
    assert 0 < len(wrong) <= 4
    sections = [
        ReportSection("Confusion matrix", image=figures["Confusion matrix"]),
        ReportSection("Calibration", text="ECE <0.1> & fine", image=figures["Calibration"]),
        ReportSection("Robustness", image=figures["Robustness"],
                      table=robustness_table({"rotation": [{"strength": 0, "accuracy": 0.9}]})),
        ReportSection("Sharp vs blurry", table={"sharp_accuracy": 0.9, "blurry_accuracy": 0.5}),
        ReportSection("Most confidently wrong", image=tmp_path / "wrong.png"),
        ReportSection("Saliency", text="Grad-CAM."),
        ReportSection("Distribution shift", table={"verdict": "no shift detected", "classifier_auc": 0.51}),
        ReportSection("Learning curve", image=figures["Learning curve"]),
    ]
    report = write_html_report(tmp_path / "out" / "report.html", "Cassava <evaluation>",
                               {"test_accuracy": 0.875, "test_roc_auc_ovr": 0.9}, sections)
    page = report.read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings == list(REPORT_HEADINGS)
    assert page.count('src="data:image/png;base64,') == 5
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing fetched from elsewhere
    assert "<link" not in page and "<script" not in page
    assert "Cassava &lt;evaluation&gt;" in page and "ECE &lt;0.1&gt; &amp; fine" in page  # text is escaped
    assert "<td>test_accuracy</td><td>0.875</td>" in page
    assert "<td>rotation</td><td>0</td><td>0.9</td>" in page
    with pytest.raises(ValueError):
        write_html_report(tmp_path / "bad.html", "x", {}, [ReportSection("x", image=tmp_path / "r.txt")])
