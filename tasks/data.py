"""Data stages: `acquire` (any source → `data/raw/<class>/<file>`) and `prepare` (validate, deduplicate,
split, resize → `data/prepared/`).

Both sources of real data (the iCassava 2019 class folders and the Kaggle 2020 CSV layout) and both embedded
ones (synthetic leaves, scikit-learn's digits) end in the same raw layout, so one preparation path serves all.
Preparation streams one image at a time into memory-mapped arrays: memory stays bounded whatever the size
of the data set.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tasks.errors import DataError
from tasks.images import UnreadableImage, blur_score, content_hash, list_image_files, load_rgb_image
from tasks.names import CLASSES_TAG
from tasks.params import CASSAVA_CLASSES, DataParams, Params, workspace_root
from tasks.prepared import MANIFEST_COLUMNS, SPLITS, PreparedData

log = logging.getLogger(__name__)
ACQUIRE_REPORT_NAME = ".acquire_report.json"  # a dot-file: never mistaken for an image of some class


# --------------------------------------------------------------------------------------------- acquire


@dataclass
class AcquireReport:
    source: str
    root: str | None
    files_per_class: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}


def acquire(data: DataParams, raw_dir: Path) -> AcquireReport:
    """Write the chosen source into raw_dir (emptied first) as `<class>/<file>` and report what was found or
    missing. The stage entry hands it a staging folder, so a failure never touches the current data/raw."""
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    raw_dir.mkdir(parents=True)
    report = AcquireReport(source=data.source, root=data.root)
    if data.source == "synthetic":
        from tasks.synthetic import generate_synthetic_dataset

        counts = generate_synthetic_dataset(
            raw_dir,
            images_per_class=data.synthetic.images_per_class,
            image_size=data.synthetic.render_size,
            seed=data.seed,
            blur_fraction=data.synthetic.blur_fraction,
        )
        report.files_per_class = dict(counts)
    elif data.source == "digits":
        report.files_per_class = _export_digits(raw_dir)
    elif data.source == "folder":
        _link_class_folders(_existing_root(data), raw_dir, report)
    else:
        _link_csv_layout(_existing_root(data), raw_dir, report)
    (raw_dir / ACQUIRE_REPORT_NAME).write_text(json.dumps(report.__dict__, indent=2, sort_keys=True) + "\n")
    return report


def _existing_root(data: DataParams) -> Path:
    from tasks.preflight import check_data_source  # the check every entry also makes before anything slow

    return check_data_source(data)


def _place(source: Path, target: Path) -> None:
    """Hard-link when possible (no copy of a 2 GB photo set), else copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        try:
            shutil.copy2(source, target)
        except OSError as error:  # vanished, unreadable, disk full: name the file, not a traceback
            raise DataError(f"cannot copy {source} into data/raw ({error.strerror or error}); "
                            "check that data.root is complete and readable, then run acquire again") from None


def _export_digits(raw_dir: Path) -> dict[str, int]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: Counter[str] = Counter()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        class_dir = raw_dir / str(label)
        class_dir.mkdir(exist_ok=True)
        grey = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)  # digits are 0..16 intensities
        Image.fromarray(grey, mode="L").save(class_dir / f"digit_{index:05d}.png")
        counts[str(label)] += 1
    return dict(sorted(counts.items()))


def _link_class_folders(root: Path, raw_dir: Path, report: AcquireReport) -> None:
    class_dirs = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    for stray in sorted(path for path in root.iterdir() if path.is_file()):
        report.skipped.append({"path": str(stray), "reason": "file outside any class folder"})
    for class_dir in class_dirs:
        files = list_image_files(class_dir)
        for file in files:
            _place(file, raw_dir / class_dir.name / file.relative_to(class_dir).as_posix().replace("/", "__"))
        report.files_per_class[class_dir.name] = len(files)


def class_name_from_disease(disease: str) -> str:
    """'Cassava Bacterial Blight (CBB)' → 'cbb', 'Healthy' → 'healthy': both real layouts share class names."""
    abbreviation = re.search(r"\(([^)]+)\)", disease)
    name = abbreviation.group(1) if abbreviation else disease
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _csv_class_names(root: Path, labels: set[str]) -> dict[str, str]:
    mapping_file = root / "label_num_to_disease_map.json"
    if mapping_file.exists():
        return {str(key): class_name_from_disease(value) for key, value in json.loads(mapping_file.read_text()).items()}
    if labels <= {str(index) for index in range(len(CASSAVA_CLASSES))}:
        # Kaggle 2020 numbers the classes in this order; without the map file the names are still known.
        return {str(index): name for index, name in enumerate(CASSAVA_CLASSES)}
    return {label: label for label in labels}


def _link_csv_layout(root: Path, raw_dir: Path, report: AcquireReport) -> None:
    table, images_dir = root / "train.csv", root / "train_images"
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"image_id", "label"} <= set(rows[0]):
        raise DataError(f"{table}: expected columns image_id,label; found {','.join(rows[0])}")
    names = _csv_class_names(root, {row["label"].strip() for row in rows})
    counts: Counter[str] = Counter()
    for row in rows:
        image_id, label = row["image_id"].strip(), row["label"].strip()
        source = images_dir / image_id
        if label not in names:
            report.skipped.append({"path": str(source), "reason": f"label {label!r} not in the label map"})
        elif not source.is_file():
            report.skipped.append({"path": str(source), "reason": "listed in train.csv but missing"})
        else:
            _place(source, raw_dir / names[label] / image_id)
            counts[names[label]] += 1
    report.files_per_class = dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------- prepare


@dataclass
class DataReport:
    """Everything preparation found; written as data_report.json (deterministic: no times, relative paths)."""

    source: str
    image_size: int
    classes: list[str]
    files_seen: int = 0
    images_kept: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "kind", "reason"}
    skipped_by_kind: dict[str, int] = field(default_factory=dict)
    flagged: list[dict[str, str]] = field(default_factory=list)  # kept, but worth a look: {"path", "kind", "note"}
    flagged_by_kind: dict[str, int] = field(default_factory=dict)
    duplicates: list[dict[str, str]] = field(default_factory=list)
    converted_to_rgb: dict[str, int] = field(default_factory=dict)
    dropped_classes: dict[str, int] = field(default_factory=dict)
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    blur_score_quantiles: dict[str, float] = field(default_factory=dict)


def prepare_dataset(data: DataParams, raw_dir: Path, prepared_dir: Path) -> DataReport:
    """Validate, deduplicate, split (stratified, seeded) and resize raw_dir into prepared_dir.

    prepared_dir is emptied first; the stage entry hands it a staging folder (tasks/staging.py), so an
    interrupted or failed preparation never leaves a half-written data set behind.
    """
    files = list_image_files(raw_dir)
    if not files:
        raise DataError(f"{raw_dir} holds no files: run the acquire stage first")
    log.info("prepare: validating, de-duplicating and resizing %d files", len(files))
    shutil.rmtree(prepared_dir, ignore_errors=True)
    prepared_dir.mkdir(parents=True)
    try:
        return _prepare_into(data, files, raw_dir, prepared_dir)
    except BaseException:
        shutil.rmtree(prepared_dir, ignore_errors=True)  # never half a data set, also for direct callers
        raise


def _prepare_into(data: DataParams, files: list[Path], raw_dir: Path, prepared_dir: Path) -> DataReport:
    all_images = np.lib.format.open_memmap(
        prepared_dir / "all_images.tmp.npy", mode="w+", dtype=np.uint8, shape=(len(files), data.image_size, data.image_size, 3)
    )
    report = DataReport(source=data.source, image_size=data.image_size, classes=[], files_seen=len(files))
    rows = _validate_and_load(files, raw_dir, data, all_images, report)

    rows = _apply_class_policy(rows, data, report)
    report.classes = sorted({row["label"] for row in rows})
    _assign_splits(rows, data)
    layout = PreparedData(prepared_dir)
    class_index = {name: index for index, name in enumerate(report.classes)}
    for split in SPLITS:
        split_rows = [row for row in rows if row["split"] == split]
        images = np.lib.format.open_memmap(
            layout.images_file(split), mode="w+", dtype=np.uint8, shape=(len(split_rows), *all_images.shape[1:])
        )
        for position, row in enumerate(split_rows):
            images[position] = all_images[row["slot"]]
        images.flush()
        del images
        np.save(layout.labels_file(split), np.array([class_index[row["label"]] for row in split_rows], dtype=np.int32))
        report.split_counts[split] = dict(sorted(Counter(row["label"] for row in split_rows).items()))
    del all_images
    (prepared_dir / "all_images.tmp.npy").unlink()

    report.images_kept = len(rows)
    scores = np.array([row["blur_score"] for row in rows])
    report.blur_score_quantiles = {f"p{q}": round(float(np.percentile(scores, q)), 3) for q in (5, 25, 50, 75, 95)}
    _write_manifest(layout.manifest_file, rows)
    layout.classes_file.write_text(json.dumps(report.classes) + "\n")
    layout.report_file.write_text(json.dumps(report.__dict__, indent=2, sort_keys=True) + "\n")
    return report


def _validate_and_load(
    files: list[Path], raw_dir: Path, data: DataParams, all_images: np.ndarray, report: DataReport
) -> list[dict]:
    """Decode every file once: skip unusable ones (with the reason) and exact duplicates, flag the ones worth
    a look, store pixels, return manifest rows."""
    first_seen: dict[str, dict] = {}
    rows: list[dict] = []
    converted: Counter[str] = Counter()
    for file in tqdm(files, desc="prepare: validating images", unit="img", mininterval=1.0, disable=None):
        relative = file.relative_to(raw_dir).as_posix()
        label = relative.split("/", 1)[0]
        if "/" not in relative:
            report.skipped.append({"path": relative, "kind": "outside-class-folder",
                                   "reason": "file outside any class folder"})
            continue
        try:
            digest = content_hash(file)
            if digest in first_seen:
                kept = first_seen[digest]
                report.duplicates.append(
                    {"path": relative, "duplicate_of": kept["path"], "label_conflict": str(kept["label"] != label).lower()}
                )
                continue
            loaded = load_rgb_image(file, data.image_size, data.min_image_side, data.large_image_megapixels)
        except UnreadableImage as reason:
            report.skipped.append({"path": relative, "kind": reason.kind, "reason": str(reason)})
            continue
        report.flagged.extend({"path": relative, "kind": kind, "note": note} for kind, note in loaded.notes)
        if loaded.original_mode != "RGB":
            converted[loaded.original_mode] += 1
        all_images[len(rows)] = loaded.pixels
        row = {
            "path": relative,
            "label": label,
            "split": "",
            "content_hash": digest,
            "blur_score": round(blur_score(loaded.pixels), 3),
            "original_mode": loaded.original_mode,
            "width": loaded.original_size[0],
            "height": loaded.original_size[1],
            "slot": len(rows),
        }
        first_seen[digest] = row
        rows.append(row)
    report.converted_to_rgb = dict(sorted(converted.items()))
    report.skipped_by_kind = dict(sorted(Counter(skipped["kind"] for skipped in report.skipped).items()))
    report.flagged_by_kind = dict(sorted(Counter(flagged["kind"] for flagged in report.flagged).items()))
    for skipped in report.skipped:
        log.warning("skipped %s: %s", skipped["path"], skipped["reason"])
    if report.duplicates:
        log.warning("kept %d exact duplicate image(s) once (see data_report.json)", len(report.duplicates))
    return rows


def _apply_class_policy(rows: list[dict], data: DataParams, report: DataReport) -> list[dict]:
    counts = Counter(row["label"] for row in rows)
    small = {label: count for label, count in sorted(counts.items()) if count < data.min_images_per_class}
    if small and data.small_class_policy == "error":
        listed = ", ".join(f"{label} ({count})" for label, count in small.items())
        raise DataError(
            f"too few images to split in class(es) {listed}: data.min_images_per_class = "
            f"{data.min_images_per_class}; add images, lower it, or set data.small_class_policy=drop"
        )
    if small:
        log.warning("dropping class(es) with too few images: %s", small)
        report.dropped_classes = small
        rows = [row for row in rows if row["label"] not in small]
    if len({row["label"] for row in rows}) < 2:
        raise DataError(f"need at least 2 classes with >= {data.min_images_per_class} images each; found {dict(counts)}")
    return rows


def _assign_splits(rows: list[dict], data: DataParams) -> None:
    """Stratified, seeded train/val/test assignment (scikit-learn), written into each row's "split"."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(rows))
    labels = np.array([row["label"] for row in rows])
    held_out = data.val_fraction + data.test_fraction
    try:
        train, rest = train_test_split(positions, test_size=held_out, stratify=labels, random_state=data.seed)
        val, test = train_test_split(
            rest, test_size=data.test_fraction / held_out, stratify=labels[rest], random_state=data.seed
        )
    except ValueError as error:
        raise DataError(
            f"cannot stratify {len(rows)} images into train/val/test with data.val_fraction = {data.val_fraction} "
            f"and data.test_fraction = {data.test_fraction} ({error}); raise data.min_images_per_class or the fractions"
        ) from None
    for split, members in zip(SPLITS, (train, val, test)):
        for position in sorted(members):
            rows[position]["split"] = split
    # Keep each split in a seeded, shuffled-but-fixed order (the manifest order), not in class order.
    rows.sort(key=lambda row: (SPLITS.index(row["split"]), row["content_hash"]))


def _write_manifest(manifest_file: Path, rows: list[dict]) -> None:
    with manifest_file.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------- entries


def run_acquire(params: Params, run_id: str | None = None) -> str:
    """Stage entry (DVC command and Prefect task): acquire the source into data/raw, log its report."""
    from tasks.layout import ACQUIRE_POINTER, RAW_DIR
    from tasks.staging import staged_outputs
    from tasks.tracking import StageRecord, counter_tags, stage_run

    root = workspace_root()
    with staged_outputs(root, "acquire", [RAW_DIR, ACQUIRE_POINTER]) as staged, \
            stage_run("acquire", params, None, root / ACQUIRE_POINTER, run_id) as run:
        report = acquire(params.data, staged.path(RAW_DIR))
        staged.publish()
        log.info("acquire: %d files in %d classes from %s", sum(report.files_per_class.values()),
                 len(report.files_per_class), params.data.source)
        run.complete(
            StageRecord(
                "acquire",
                tags=counter_tags({"raw_files": sum(report.files_per_class.values()),
                                   "acquire_skipped": len(report.skipped)}),
                artifacts=[((RAW_DIR / ACQUIRE_REPORT_NAME).as_posix(), "data")],
            )
        )
    return run.run_id


def run_prepare(params: Params, run_id: str | None = None) -> str:
    """Stage entry: validate and split data/raw into data/prepared, log the data report."""
    from tasks.layout import ACQUIRE_POINTER, PREPARE_POINTER, PREPARED_DIR, RAW_DIR
    from tasks.staging import staged_outputs
    from tasks.tracking import StageRecord, counter_tags, stage_run

    root = workspace_root()
    with staged_outputs(root, "prepare", [PREPARED_DIR, PREPARE_POINTER]) as staged, \
            stage_run("prepare", params, root / ACQUIRE_POINTER, root / PREPARE_POINTER, run_id) as run:
        report = prepare_dataset(params.data, root / RAW_DIR, staged.path(PREPARED_DIR))
        staged.publish()
        log.info("prepare: kept %d of %d files; %d skipped, %d duplicates; splits %s", report.images_kept,
                 report.files_seen, len(report.skipped), len(report.duplicates),
                 {split: sum(counts.values()) for split, counts in report.split_counts.items()})
        layout = PreparedData(PREPARED_DIR)
        run.complete(
            StageRecord(
                "prepare",
                tags={
                    CLASSES_TAG: ",".join(report.classes),
                    **counter_tags({
                        "images_kept": report.images_kept,
                        "skipped": len(report.skipped),
                        "duplicates": len(report.duplicates),
                        **{f"{split}_images": sum(c.values()) for split, c in report.split_counts.items()},
                    }),
                },
                artifacts=[(layout.report_file.as_posix(), "data"), (layout.manifest_file.as_posix(), "data")],
            )
        )
    return run.run_id
