"""Evaluation that explains the model: where it fails, how sure it is, what it looks at, what it was tested on.

Pure functions over arrays and a Keras model; the evaluate stage wires them together and logs the files. The
pieces answer the questions a plain accuracy cannot:

* extra metrics: weighted F1 and one-vs-rest ROC-AUC (threshold-free, robust to class imbalance);
* calibration: expected calibration error and a reliability diagram (is 90% confidence right 90% of the time?);
* failure cases: a gallery of the most confidently wrong test images;
* robustness: accuracy as test images are rotated ("unfamiliar poses") or blurred ("poor focus"), and accuracy
  on sharp vs blurry test images split by the prepared manifest's variance-of-Laplacian `blur_score`;
* explainability: Grad-CAM heatmaps on the last convolutional block;
* train/test mismatch: channel statistics and a classifier two-sample test on the model's embeddings;
* limited data: nested, stratified training subsets for a learning curve over the amount of data.

The HTML report that holds all of it is written by `tasks.report`.

Images are uint8 arrays N x H x W x 3 throughout, as the prepared data holds them; the model takes them as
float32 in [0, 255]. TensorFlow, Keras and matplotlib are imported inside the functions that need them, so
importing this module stays cheap.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras
    from matplotlib.figure import Figure

# (images uint8 N x H x W x 3) -> class probabilities N x C
PredictFunction = Callable[[np.ndarray], np.ndarray]
# (images uint8 N x H x W x 3) -> embeddings N x D
EmbedFunction = Callable[[np.ndarray], np.ndarray]
# (images uint8, strength) -> images uint8 of the same shape; strength 0 leaves them unchanged
ImageTransform = Callable[[np.ndarray, float], np.ndarray]

SHIFT_DETECTED = "shift detected"
NO_SHIFT_DETECTED = "no shift detected"


# --------------------------------------------------------------------------------------------- metrics


def extra_classification_metrics(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    """Weighted F1 and macro one-vs-rest ROC-AUC, plus each class's one-vs-rest ROC-AUC.

    Keys: `test_weighted_f1`, `test_roc_auc_ovr`, `test_roc_auc.<class>`. A class absent from `labels` has no
    positives, so its AUC is undefined: it is left out of the macro average (and gets no per-class key) instead
    of failing the evaluation, as scikit-learn's multi-class `roc_auc_score` would. With no scorable class at
    all (a single-class test set) `test_roc_auc_ovr` is NaN.
    """
    from sklearn.metrics import f1_score, roc_auc_score

    labels = np.asarray(labels)
    class_ids = np.arange(len(class_names))
    predicted = np.asarray(probabilities).argmax(axis=1)
    metrics = {
        "test_weighted_f1": float(f1_score(labels, predicted, labels=class_ids, average="weighted", zero_division=0))
    }
    # One-vs-rest macro AUC is the mean of binary AUCs (what scikit-learn computes), so scoring class by class
    # gives the same number while letting a class with no positives (or no negatives) be skipped.
    per_class: dict[str, float] = {}
    for index, name in enumerate(class_names):
        is_class = labels == index
        if is_class.any() and not is_class.all():
            per_class[name] = float(roc_auc_score(is_class, probabilities[:, index]))
    metrics["test_roc_auc_ovr"] = float(np.mean(list(per_class.values()))) if per_class else math.nan
    metrics.update({f"test_roc_auc.{name}": value for name, value in per_class.items()})
    return metrics


def row_normalised_confusion(confusion: np.ndarray) -> np.ndarray:
    """Each row (true class) divided by its count: the diagonal is per-class recall. Empty rows stay all zero."""
    counts = np.asarray(confusion, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def plot_normalised_confusion(confusion: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """Heatmap of the row-normalised confusion matrix (recall on the diagonal), counts would hide small classes."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    size = 1.2 * len(class_names) + 2
    figure, axis = plt.subplots(figsize=(size, size - 0.5))
    ConfusionMatrixDisplay(row_normalised_confusion(confusion), display_labels=list(class_names)).plot(
        ax=axis, colorbar=False, cmap="Greens", values_format=".2f"
    )
    axis.set_title("Test confusion matrix, rows normalised (recall on the diagonal)")
    return _save(figure, path)


# --------------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label confidence histogram: per equal-width bin over [0, 1], NaN where a bin is empty."""

    edges: np.ndarray  # bins + 1 edges, 0 .. 1
    counts: np.ndarray  # images whose top-label confidence falls in the bin
    confidence: np.ndarray  # their mean confidence
    accuracy: np.ndarray  # the share of them predicted correctly


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> ReliabilityBins:
    """Bin each prediction by its top-label confidence; bins are (lo, hi] as in Guo et al. (2017)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.digitize(confidence, edges[1:-1], right=True)  # edges[i] < confidence <= edges[i + 1]
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
    return ReliabilityBins(edges, counts.astype(np.int64), mean_confidence, accuracy)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: sum over bins of (share of images) x |accuracy - mean confidence| (Naeini et al., 2015)."""
    binned = reliability_bins(probabilities, labels, bins)
    filled = binned.counts > 0
    weights = binned.counts[filled] / binned.counts.sum()
    return float(np.sum(weights * np.abs(binned.accuracy[filled] - binned.confidence[filled])))


def plot_reliability_diagram(probabilities: np.ndarray, labels: np.ndarray, path: Path, bins: int = 15) -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with the confidence histogram."""
    plt = _pyplot()
    binned = reliability_bins(probabilities, labels, bins)
    ece = expected_calibration_error(probabilities, labels, bins)
    centres = (binned.edges[:-1] + binned.edges[1:]) / 2
    width = 1.0 / bins
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    filled = binned.counts > 0
    top.bar(centres[filled], binned.accuracy[filled], width=width, edgecolor="black", color="tab:blue",
            label="accuracy")
    # The gap bars show over-confidence (accuracy below the diagonal) or under-confidence (above it).
    top.bar(centres[filled], binned.confidence[filled] - binned.accuracy[filled], bottom=binned.accuracy[filled],
            width=width, fill=False, hatch="//", edgecolor="tab:red", label="gap to mean confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="black", label="perfect calibration", zorder=3)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {ece:.3f}, {bins} bins)")
    top.legend(loc="upper left")
    bottom.bar(centres, binned.counts, width=width, edgecolor="black", color="grey")
    bottom.set_xlabel("top-label confidence")
    bottom.set_ylabel("images")
    return _save(figure, path)


# --------------------------------------------------------------------------------------------- failure cases


def confidently_wrong_indices(probabilities: np.ndarray, labels: np.ndarray, count: int = 12) -> list[int]:
    """Indices of misclassified images, most confident first (ties keep test order)."""
    probabilities = np.asarray(probabilities)
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != np.asarray(labels))
    order = np.argsort(-probabilities[wrong].max(axis=1), kind="stable")
    return [int(index) for index in wrong[order][:count]]


def plot_confidently_wrong(
    images: np.ndarray,
    probabilities: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    count: int = 12,
) -> list[int]:
    """Gallery of the `count` most confidently wrong images titled true / predicted (confidence); their indices."""
    plt = _pyplot()
    selected = confidently_wrong_indices(probabilities, labels, count)
    columns = max(1, min(len(selected), 6))
    rows = max(1, math.ceil(len(selected) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.8 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, selected):
        predicted = int(np.argmax(probabilities[index]))
        axis.imshow(np.asarray(images[index]))
        axis.set_title(
            f"true {class_names[int(labels[index])]}\npred {class_names[predicted]} "
            f"({probabilities[index][predicted]:.2f})",
            fontsize=8,
        )
    if not selected:
        axes[0, 0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    figure.suptitle("Most confidently wrong test images")
    _save(figure, path)
    return selected


# --------------------------------------------------------------------------------------------- robustness


def rotate_images(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise about the centre, same size; corners are filled by reflecting the image.

    Reflection (not black) fill keeps the corners looking like leaf and background, so the accuracy drop
    measures the unfamiliar pose, not the new black triangles.
    """
    from scipy import ndimage

    pixels = np.asarray(images, dtype=np.float32)
    # axes=(2, 1): the (column, row) plane of every image at once; positive angles turn as np.rot90 does.
    rotated = ndimage.rotate(pixels, degrees, axes=(2, 1), reshape=False, order=1, mode="reflect")
    return _to_uint8(rotated)


def flip_images(images: np.ndarray) -> np.ndarray:
    """Mirror left to right (a leaf seen from the other side of the plant)."""
    return np.ascontiguousarray(np.asarray(images)[:, :, ::-1, :])


def blur_images(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation `sigma` pixels within each image and channel (poor focus)."""
    from scipy import ndimage

    if sigma <= 0:
        return np.array(images, dtype=np.uint8, copy=True)
    pixels = np.asarray(images, dtype=np.float32)
    # Zero sigma on the image and channel axes: never mix images or colours.
    return _to_uint8(ndimage.gaussian_filter(pixels, sigma=(0, sigma, sigma, 0), mode="reflect"))


def robustness_curve(
    predict_fn: PredictFunction,
    images: np.ndarray,
    labels: np.ndarray,
    transform: ImageTransform,
    strengths: Sequence[float],
    batch_size: int = 256,
) -> list[dict[str, float]]:
    """Accuracy at each transform strength: [{"strength": s, "accuracy": a}, ...] in the given order.

    Images are transformed and predicted a batch at a time, so memory stays bounded on a large (memory-mapped)
    test split.
    """
    labels = np.asarray(labels)
    curve = []
    for strength in strengths:
        correct = 0
        for start in range(0, len(labels), batch_size):
            batch = transform(np.asarray(images[start : start + batch_size]), strength)
            predicted = np.asarray(predict_fn(batch)).argmax(axis=1)
            correct += int(np.sum(predicted == labels[start : start + batch_size]))
        curve.append({"strength": float(strength), "accuracy": correct / max(len(labels), 1)})
    return curve


def robustness_table(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> list[dict[str, Any]]:
    """Rows (transform, strength, accuracy, change from the first strength) for the report and MLflow tables."""
    rows = []
    for name, curve in curves.items():
        baseline = curve[0]["accuracy"] if curve else math.nan
        rows.extend(
            {"transform": name, "strength": point["strength"], "accuracy": point["accuracy"],
             "change": point["accuracy"] - baseline}
            for point in curve
        )
    return rows


def plot_robustness_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> Path:
    """One panel per transform (their strengths have different units): accuracy against strength."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, max(len(curves), 1), figsize=(4.5 * max(len(curves), 1), 3.6), squeeze=False)
    for axis, (name, curve) in zip(axes.flat, curves.items()):
        axis.plot([point["strength"] for point in curve], [point["accuracy"] for point in curve], marker="o")
        axis.set_ylim(0, 1.02)
        axis.set_xlabel(name)
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
    figure.suptitle("Robustness: accuracy under test-time transforms")
    return _save(figure, path)


def accuracy_by_sharpness(
    predicted: np.ndarray, labels: np.ndarray, blur_scores: np.ndarray, threshold: float | None = None
) -> dict[str, float]:
    """Accuracy on sharp vs blurry images, split at `threshold` of the variance-of-Laplacian blur score.

    A low score means poor focus, so images below the threshold are "blurry". The default threshold is the
    median score, which halves the test set. Accuracy is NaN for an empty group.
    """
    scores = np.asarray(blur_scores, dtype=np.float64)
    correct = np.asarray(predicted) == np.asarray(labels)
    cut = float(np.median(scores)) if threshold is None else float(threshold)
    blurry = scores < cut
    return {
        "threshold": cut,
        "sharp_accuracy": float(correct[~blurry].mean()) if (~blurry).any() else math.nan,
        "blurry_accuracy": float(correct[blurry].mean()) if blurry.any() else math.nan,
        "sharp_count": int((~blurry).sum()),
        "blurry_count": int(blurry.sum()),
    }


def manifest_blur_scores(manifest_file: Path, split: str = "test") -> np.ndarray:
    """The manifest's blur scores of one split, in that split's array order (the manifest keeps it)."""
    with Path(manifest_file).open(newline="") as handle:
        return np.array([float(row["blur_score"]) for row in csv.DictReader(handle) if row["split"] == split])


# --------------------------------------------------------------------------------------------- model helpers


def prediction_function(model: "keras.Model", batch_size: int = 128) -> PredictFunction:
    """A callable uint8 images -> probabilities, batch by batch through one compiled function (traced once,
    whatever the batch sizes: no tf.data set-up or retracing per call)."""
    from tasks.scoring import KerasPredictor

    return KerasPredictor(model, batch_size)


def embedding_function(model: "keras.Model", layer_name: str = "pool", batch_size: int = 128) -> EmbedFunction:
    """A callable uint8 images -> the output of `layer_name` (spatial outputs are averaged to one vector)."""
    import keras

    from tasks.scoring import KerasPredictor

    embedder = KerasPredictor(keras.Model(model.inputs, model.get_layer(layer_name).output), batch_size)

    def embed(images: np.ndarray) -> np.ndarray:
        features = embedder(images)
        return features.reshape(len(features), -1, features.shape[-1]).mean(axis=1)

    return embed


# --------------------------------------------------------------------------------------------- explainability


def last_conv_layer_name(model: "keras.Model") -> str:
    """The layer Grad-CAM explains: the highest `block{n}_relu`, else the last layer with a 4-D output."""
    blocks = []
    for layer in model.layers:
        name = layer.name
        if name.startswith("block") and name.endswith("_relu") and name[5:-5].isdigit():
            blocks.append((int(name[5:-5]), name))
    if blocks:
        return max(blocks)[1]
    for layer in reversed(model.layers[1:]):  # layers[0] is the input layer, also 4-D
        if len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"model {model.name!r} has no layer with a spatial (4-D) output to explain")


def saliency_maps(
    model: "keras.Model",
    images: np.ndarray,
    class_indices: Sequence[int] | np.ndarray,
    layer_name: str | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Grad-CAM heatmaps (Selvaraju et al., 2017), N x H x W float32 in [0, 1], one per image and class.

    The class score is taken before the softmax when the last layer is a softmax Dense: softmax gradients
    vanish on confident predictions, which would leave exactly the images we most want to explain blank.
    Each map is scaled by its own maximum; a map with no positive evidence stays all zero.
    """
    import keras
    import tensorflow as tf

    target = model.get_layer(layer_name or last_conv_layer_name(model))
    head = model.layers[-1]
    from_logits = isinstance(head, keras.layers.Dense) and head.activation is keras.activations.softmax
    explained = keras.Model(model.inputs, [target.output, head.input if from_logits else model.output])
    classes = np.asarray(class_indices, dtype=np.int32)
    height, width = images.shape[1:3]
    maps = []
    for start in range(0, len(classes), batch_size):
        batch = tf.convert_to_tensor(np.asarray(images[start : start + batch_size], dtype=np.float32))
        wanted = tf.constant(classes[start : start + batch_size])
        with tf.GradientTape() as tape:
            # Watched, so the explained activations are recorded even when no trainable weight precedes them
            # (a frozen backbone).
            tape.watch(batch)
            activations, scores = explained(batch, training=False)
            if from_logits:
                scores = tf.matmul(scores, head.kernel) + head.bias
            class_scores = tf.gather(scores, wanted, axis=1, batch_dims=1)
        gradients = tape.gradient(class_scores, activations)
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # global-average the gradients
        cam = tf.nn.relu(tf.reduce_sum(channel_weights * activations, axis=-1))
        resized = tf.image.resize(cam[..., tf.newaxis], (height, width), method="bilinear")[..., 0]
        # Scaled after resizing, so each map's peak is exactly 1 at image resolution.
        peak = tf.reduce_max(resized, axis=(1, 2), keepdims=True)
        maps.append(np.clip(tf.math.divide_no_nan(resized, peak).numpy(), 0.0, 1.0))
    return np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, height, width), np.float32)


def sample_per_class(labels: np.ndarray, per_class: int, seed: int) -> list[int]:
    """A fixed, seeded sample of up to `per_class` indices of each class present, grouped by class, ascending."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    chosen: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        picked = rng.choice(members, size=min(per_class, len(members)), replace=False)
        chosen.extend(int(index) for index in np.sort(picked))
    return chosen


def plot_saliency_grid(images: np.ndarray, heatmaps: np.ndarray, titles: Sequence[str], path: Path) -> Path:
    """Each image next to its Grad-CAM heatmap overlaid, three pairs to a row."""
    plt = _pyplot()
    pairs_per_row = 3
    rows = max(1, math.ceil(len(heatmaps) / pairs_per_row))
    figure, axes = plt.subplots(rows, 2 * pairs_per_row, figsize=(2 * 2 * pairs_per_row, 2.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for position, (image, heatmap, title) in enumerate(zip(images, heatmaps, titles)):
        row, column = divmod(position, pairs_per_row)
        plain, overlay = axes[row, 2 * column], axes[row, 2 * column + 1]
        plain.imshow(np.asarray(image))
        plain.set_title(title, fontsize=8)
        overlay.imshow(np.asarray(image))
        overlay.imshow(heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        overlay.set_title("Grad-CAM", fontsize=8)
    figure.suptitle("Where the model looks (Grad-CAM, last conv block)")
    return _save(figure, path)


# --------------------------------------------------------------------------------------------- distribution shift


def distribution_shift(
    reference_images: np.ndarray,
    other_images: np.ndarray,
    embed_fn: EmbedFunction,
    seed: int,
    auc_threshold: float = 0.6,
    max_images: int = 1000,
    folds: int = 5,
) -> dict[str, Any]:
    """Per-channel pixel statistics of both sets and a classifier two-sample test on their embeddings.

    A logistic regression learns to tell `other_images` from `reference_images` (e.g. test from train) on
    `embed_fn` features; its out-of-fold ROC-AUC (stratified k-fold) is ~0.5 when the sets come from one
    distribution and rises as they differ (Lopez-Paz & Oquab, 2017). The verdict is "shift detected" when the
    AUC reaches `auc_threshold`. At most `max_images` seeded random images of each set are used.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    reference = _subsample(reference_images, max_images, rng)
    other = _subsample(other_images, max_images, rng)
    reference_mean, reference_std = _channel_moments(reference)
    other_mean, other_std = _channel_moments(other)

    features = np.concatenate([embed_fn(reference), embed_fn(other)])
    is_other = np.concatenate([np.zeros(len(reference), np.int32), np.ones(len(other), np.int32)])
    splits = StratifiedKFold(n_splits=max(2, min(folds, len(reference), len(other))), shuffle=True, random_state=seed)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    out_of_fold = cross_val_predict(classifier, features, is_other, cv=splits, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(is_other, out_of_fold))
    return {
        "reference_count": len(reference),
        "other_count": len(other),
        "reference_channel_mean": reference_mean.tolist(),
        "other_channel_mean": other_mean.tolist(),
        "channel_mean_difference": (other_mean - reference_mean).tolist(),
        "reference_channel_std": reference_std.tolist(),
        "other_channel_std": other_std.tolist(),
        "channel_std_difference": (other_std - reference_std).tolist(),
        "classifier_auc": auc,
        "auc_threshold": float(auc_threshold),
        "verdict": SHIFT_DETECTED if auc >= auc_threshold else NO_SHIFT_DETECTED,
    }


# --------------------------------------------------------------------------------------------- limited data


def learning_curve_fractions(
    labels: np.ndarray, fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0), seed: int = 0
) -> dict[float, np.ndarray]:
    """Nested, stratified, seeded training subsets: fraction -> sorted indices into `labels`.

    Each class is shuffled once and every subset takes the first ceil(fraction x class size) of it, so smaller
    subsets are contained in larger ones (the curve measures data, not luck of the draw) and every class is
    kept at least once.
    """
    if not fractions or any(not 0.0 < fraction <= 1.0 for fraction in fractions):
        raise ValueError(f"fractions {list(fractions)}: each must be in (0, 1]")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    shuffled = {label: rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)}
    subsets = {}
    for fraction in sorted(fractions):
        taken = [members[: math.ceil(fraction * len(members))] for members in shuffled.values()]
        subsets[float(fraction)] = np.sort(np.concatenate(taken))
    return subsets


def plot_learning_curve(points: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Test accuracy against the fraction of training data; points hold "fraction" and "test_accuracy"."""
    plt = _pyplot()
    ordered = sorted(points, key=lambda point: point["fraction"])
    figure, axis = plt.subplots(figsize=(5, 3.6))
    axis.plot([point["fraction"] for point in ordered], [point["test_accuracy"] for point in ordered], marker="o")
    for point in ordered:
        if "train_images" in point:
            axis.annotate(f"{int(point['train_images'])}", (point["fraction"], point["test_accuracy"]),
                          textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    axis.set_xlim(0, 1.05)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("fraction of the training split")
    axis.set_ylabel("test accuracy")
    axis.set_title("Learning curve over the amount of data")
    axis.grid(alpha=0.3)
    return _save(figure, path)


# --------------------------------------------------------------------------------------------- internals


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    # Round rather than truncate, or every transform would darken the image by half a level on average.
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _subsample(images: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(images) <= limit:
        return np.asarray(images)
    # Sorted indices: ascending reads of a memory-mapped split are sequential on disk.
    return np.asarray(images[np.sort(rng.choice(len(images), size=limit, replace=False))])


def _channel_moments(images: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over all pixels, accumulated a chunk at a time in float64."""
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        pixels = np.asarray(images[start : start + chunk], dtype=np.float64).reshape(-1, images.shape[-1])
        total += pixels.sum(axis=0)
        squares += np.square(pixels).sum(axis=0)
    count = max(images.size // images.shape[-1], 1)
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean**2, 0.0))


def _pyplot():  # noqa: ANN202 - the matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on build machines
    import matplotlib.pyplot as plt

    return plt


def _save(figure: "Figure", path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
