"""Frozen-backbone features, computed once per prepared-data version and reused by every phase-1 training.

Phase 1 of transfer learning trains only the head on a frozen backbone, so the backbone's output for an image
never changes: computing it once turns a head epoch into milliseconds. The cache is keyed by what the
features depend on (the DVC hash of `data/prepared`, the backbone and its exact weights, the image size), so
new data, another backbone or other weights build a new entry, and the same ones reuse it. Entries live under
`data/features/<key>/` (not a DVC output: a cache that can be deleted any time), the few most recent kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.prepared import PreparedData, batched_dataset

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)
FEATURES_DIR = Path("data/features")
KEPT_ENTRIES = 4  # most recently used cache entries kept; older ones are removed
FEATURE_SPLITS = ("train", "val")


def feature_cache_key(data_version: str, backbone_identity: str, image_size: int) -> str:
    payload = json.dumps({"data": data_version, "backbone": backbone_identity, "image_size": image_size}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _entry_files(folder: Path) -> dict[str, Path]:
    return {split: folder / f"{split}_features.npy" for split in FEATURE_SPLITS}


def extract_features(feature_model: "keras.Model", images: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's output for every image, in order (inference mode), as float32."""
    labels = np.zeros(len(images), dtype=np.int32)  # batched_dataset streams (images, labels); labels unused
    return np.asarray(feature_model.predict(batched_dataset(images, labels, batch_size), verbose=0), dtype=np.float32)


def cached_features(
    feature_model: "keras.Model",
    prepared: PreparedData,
    key: str,
    cache_root: Path,
    batch_size: int,
    description: dict[str, str] | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """({split: features} for train and val, whether they came from the cache). Written atomically (a
    folder renamed into place), so a killed extraction never leaves a half entry that looks complete."""
    folder = cache_root / key
    files = _entry_files(folder)
    if all(file.exists() for file in files.values()):
        os.utime(folder)  # most recently used
        log.info("features: reusing cached backbone features %s", folder)
        return {split: np.load(file) for split, file in files.items()}, True
    log.info("features: computing backbone features once for this data version and backbone (%s)", folder)
    partial = cache_root / f"{key}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    features = {}
    for split, file in _entry_files(partial).items():
        images, _ = prepared.split(split)
        features[split] = extract_features(feature_model, images, batch_size)
        np.save(file, features[split])
    (partial / "key.json").write_text(json.dumps({"key": key, **(description or {})}, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    _prune(cache_root)
    return features, False


def _prune(cache_root: Path) -> None:
    entries = sorted((entry for entry in cache_root.iterdir() if entry.is_dir() and ".partial-" not in entry.name),
                     key=lambda entry: entry.stat().st_mtime, reverse=True)
    for stale in entries[KEPT_ENTRIES:]:
        shutil.rmtree(stale, ignore_errors=True)
