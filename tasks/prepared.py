"""The prepared-data format, shared by the stage that writes it and the stages that read it.

A prepared folder holds one uint8 array per split (`<split>_images.npy`, N x S x S x 3) with its labels
(`<split>_labels.npy`), `classes.json`, `split_manifest.csv` and `data_report.json`. The arrays are opened
memory-mapped, so reading a split never needs it all in memory, and `batched_dataset` streams batches
through tf.data with parallel reads and prefetching.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "split", "content_hash", "blur_score", "original_mode", "width", "height")


@dataclass(frozen=True)
class PreparedData:
    """Fixed file names inside a prepared-data folder."""

    root: Path

    def images_file(self, split: str) -> Path:
        return self.root / f"{split}_images.npy"

    def labels_file(self, split: str) -> Path:
        return self.root / f"{split}_labels.npy"

    @property
    def classes_file(self) -> Path:
        return self.root / "classes.json"

    @property
    def manifest_file(self) -> Path:
        return self.root / "split_manifest.csv"

    @property
    def report_file(self) -> Path:
        return self.root / "data_report.json"

    def class_names(self) -> list[str]:
        return json.loads(self.classes_file.read_text())

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of one split; images memory-mapped read-only, labels int32."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
        if not self.images_file(split).exists():
            raise FileNotFoundError(f"{self.images_file(split)} is missing: run the prepare stage first")
        images = np.load(self.images_file(split), mmap_mode="r")
        labels = np.load(self.labels_file(split)).astype(np.int32)
        return images, labels


def batched_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    epochs: range | None = None,
) -> "tf.data.Dataset":
    """Batches of (float32 images in [0, 255], int32 labels) streamed from (memory-mapped) arrays.

    Only indices are shuffled in TensorFlow; pixels are gathered per batch by numpy in parallel map calls,
    so memory stays bounded by a few batches whatever the split's size. With `epochs` (training), the
    batches of those epochs follow each other and epoch e's order is a pure function of (seed, e): a
    training resumed at epoch e sees exactly the batches an uninterrupted one would (use with
    `steps_per_epoch`). Without it, shuffling reorders each time the data set is iterated.
    """
    import tensorflow as tf

    image_shape = tuple(images.shape[1:])
    count = len(labels)

    def gather(batch_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.sort(batch_indices)  # ascending reads are sequential on disk
        return images[order].astype(np.float32), labels[order]

    def load_batch(batch_indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch_images, batch_labels = tf.numpy_function(gather, [batch_indices], (tf.float32, tf.int32))
        batch_images.set_shape((None, *image_shape))
        batch_labels.set_shape((None,))
        return batch_images, batch_labels

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    if shuffle and epochs is not None:
        batches = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_batches)
    else:
        indices = tf.data.Dataset.range(count)
        if shuffle:
            indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
        batches = indices.batch(batch_size)
    return batches.map(load_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` images of every class (all of a class that has fewer), drawn by `seed`."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen))
