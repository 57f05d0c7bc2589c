"""Data stages: every source lands in one layout; validation skips and reports bad files; splits never leak."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from tasks.data import ACQUIRE_REPORT_NAME, DataError, acquire, class_name_from_disease, prepare_dataset, run_acquire
from tasks.layout import ACQUIRE_POINTER, RAW_DIR
from tasks.params import Params, code_root, load_params, validate_params
from tasks.tracking import configure_tracking
from tasks.prepared import SPLITS, PreparedData
from tests.conftest import tiny_params_tree


def _photo(seed: int, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "P":
        return image.quantize(colors=16)
    return image.convert(mode)


def _folder_dataset(root: Path, per_class: int = 8) -> None:
    """Two classes of distinct random photos, as the iCassava 2019 `<root>/<class>/*.jpg` layout."""
    for class_index, name in enumerate(("cbb", "healthy")):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            _photo(1000 * class_index + index).save(root / name / f"{name}_{index}.png")


def _params(*overrides: str) -> Params:
    return validate_params(tiny_params_tree(list(overrides)))


def test_folder_source_reports_and_skips_bad_files(tmp_path: Path) -> None:
    source = tmp_path / "icassava"
    _folder_dataset(source)
    (source / "cbb" / "empty.jpg").write_bytes(b"")
    (source / "cbb" / "notes.jpg").write_text("not an image at all")
    buffer = io.BytesIO()
    _photo(77).save(buffer, format="JPEG")
    (source / "healthy" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (source / "README.txt").write_text("stray file beside the class folders")
    params = _params("data.source=folder", f"data.root={source}", "data.min_images_per_class=4")

    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    acquired = acquire(params.data, raw)
    assert acquired.files_per_class == {"cbb": 10, "healthy": 9}
    assert [entry["reason"] for entry in acquired.skipped] == ["file outside any class folder"]

    report = prepare_dataset(params.data, raw, prepared)
    reasons = {entry["path"]: entry["reason"] for entry in report.skipped}
    assert reasons["cbb/empty.jpg"] == "zero-byte file"
    assert reasons["cbb/notes.jpg"].startswith("not an image")
    assert reasons["healthy/truncated.jpg"].startswith("truncated image")
    assert report.images_kept == 16
    written = json.loads(PreparedData(prepared).report_file.read_text())
    assert len(written["skipped"]) == 3


def test_colour_modes_become_rgb_and_are_counted(tmp_path: Path) -> None:
    source = tmp_path / "modes"
    _folder_dataset(source)
    _photo(501, "L").save(source / "cbb" / "grey.png")
    _photo(502, "RGBA").save(source / "cbb" / "alpha.png")
    _photo(503, "P").save(source / "healthy" / "palette.png")
    _photo(504, "CMYK").save(source / "healthy" / "cmyk.jpg")
    params = _params("data.source=folder", f"data.root={source}", "data.min_images_per_class=4")
    acquire(params.data, tmp_path / "raw")
    report = prepare_dataset(params.data, tmp_path / "raw", tmp_path / "prepared")
    assert report.converted_to_rgb == {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1}
    images, _ = PreparedData(tmp_path / "prepared").split("train")
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)


def test_exact_duplicates_are_kept_once_before_splitting(tmp_path: Path) -> None:
    source = tmp_path / "dupes"
    _folder_dataset(source)
    original = (source / "cbb" / "cbb_0.png").read_bytes()
    (source / "cbb" / "copy_of_0.png").write_bytes(original)
    (source / "healthy" / "mislabelled_copy.png").write_bytes(original)
    params = _params("data.source=folder", f"data.root={source}", "data.min_images_per_class=4")
    acquire(params.data, tmp_path / "raw")
    report = prepare_dataset(params.data, tmp_path / "raw", tmp_path / "prepared")
    conflicts = {entry["path"]: entry["label_conflict"] for entry in report.duplicates}
    assert conflicts == {"cbb/copy_of_0.png": "false", "healthy/mislabelled_copy.png": "true"}
    with PreparedData(tmp_path / "prepared").manifest_file.open() as handle:
        hashes = [row["content_hash"] for row in csv.DictReader(handle)]
    assert len(hashes) == len(set(hashes)) == 16


def test_small_class_is_a_clear_error_or_a_reported_drop(tmp_path: Path) -> None:
    source = tmp_path / "small"
    _folder_dataset(source)
    (source / "cgm").mkdir()
    for index in range(2):
        _photo(900 + index).save(source / "cgm" / f"cgm_{index}.png")
    params = _params("data.source=folder", f"data.root={source}", "data.min_images_per_class=4")
    acquire(params.data, tmp_path / "raw")
    with pytest.raises(DataError, match=r"too few images to split in class\(es\) cgm \(2\)"):
        prepare_dataset(params.data, tmp_path / "raw", tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()  # nothing half-written

    dropping = _params("data.source=folder", f"data.root={source}", "data.min_images_per_class=4",
                       "data.small_class_policy=drop")
    report = prepare_dataset(dropping.data, tmp_path / "raw", tmp_path / "prepared")
    assert report.dropped_classes == {"cgm": 2}
    assert PreparedData(tmp_path / "prepared").class_names() == ["cbb", "healthy"]


def test_csv_layout_with_and_without_label_map(tmp_path: Path) -> None:
    source = tmp_path / "kaggle"
    (source / "train_images").mkdir(parents=True)
    rows = []
    for index in range(12):
        label = index % 2 * 3  # 0 = CBB, 3 = CMD
        _photo(index).save(source / "train_images" / f"{index}.jpg")
        rows.append(f"{index}.jpg,{label}")
    rows.append("missing.jpg,0")
    (source / "train.csv").write_text("image_id,label\n" + "\n".join(rows) + "\n")
    params = _params("data.source=csv", f"data.root={source}")

    report = acquire(params.data, tmp_path / "raw")  # no map file: Kaggle's class order is known
    assert report.files_per_class == {"cbb": 6, "cmd": 6}
    assert report.skipped == [{"path": str(source / "train_images" / "missing.jpg"), "reason": "listed in train.csv but missing"}]

    (source / "label_num_to_disease_map.json").write_text(json.dumps(
        {"0": "Cassava Bacterial Blight (CBB)", "3": "Cassava Mosaic Disease (CMD)", "4": "Healthy"}))
    assert acquire(params.data, tmp_path / "raw").files_per_class == {"cbb": 6, "cmd": 6}
    assert class_name_from_disease("Healthy") == "healthy"


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    params = _params("data.source=folder", f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="no such folder"):
        acquire(params.data, tmp_path / "raw")


def test_digits_source_exports_real_data_in_the_same_layout(tmp_path: Path) -> None:
    report = acquire(_params("data.source=digits").data, tmp_path / "raw")
    assert sorted(report.files_per_class) == [str(digit) for digit in range(10)]
    assert sum(report.files_per_class.values()) == 1797


@pytest.fixture(scope="module")
def prepared_synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedData, Params]:
    root = tmp_path_factory.mktemp("synthetic")
    params = _params("data.synthetic.images_per_class=20")
    acquire(params.data, root / "raw")
    prepare_dataset(params.data, root / "raw", root / "prepared")
    return PreparedData(root / "prepared"), params


def test_no_image_is_in_two_splits_and_every_class_is_in_every_split(prepared_synthetic) -> None:
    prepared, _ = prepared_synthetic
    with prepared.manifest_file.open() as handle:
        rows = list(csv.DictReader(handle))
    hashes_by_split = {split: {row["content_hash"] for row in rows if row["split"] == split} for split in SPLITS}
    assert not hashes_by_split["train"] & hashes_by_split["val"]
    assert not hashes_by_split["train"] & hashes_by_split["test"]
    assert not hashes_by_split["val"] & hashes_by_split["test"]
    assert prepared.class_names() == ["cbb", "cbsd", "cgm", "cmd", "healthy"]
    for split in SPLITS:
        images, labels = prepared.split(split)
        assert len(images) == len(labels) == len(hashes_by_split[split])
        assert set(labels.tolist()) == set(range(5))


def test_preparation_is_deterministic(prepared_synthetic, tmp_path: Path) -> None:
    prepared, params = prepared_synthetic
    acquire(params.data, tmp_path / "raw")
    prepare_dataset(params.data, tmp_path / "raw", tmp_path / "prepared")
    again = PreparedData(tmp_path / "prepared")
    for split in SPLITS:
        assert np.array_equal(prepared.split(split)[0], again.split(split)[0])
    assert prepared.manifest_file.read_text() == again.manifest_file.read_text()
    assert prepared.report_file.read_text() == again.report_file.read_text()


def test_tf_dataset_streams_every_example_once_per_epoch(prepared_synthetic) -> None:
    from tasks.prepared import batched_dataset

    prepared, _ = prepared_synthetic
    images, labels = prepared.split("train")
    dataset = batched_dataset(images, labels, batch_size=7, shuffle=True, seed=3)
    seen_labels = np.concatenate([batch_labels.numpy() for _, batch_labels in dataset])
    assert sorted(seen_labels.tolist()) == sorted(labels.tolist())
    first, second = ([b.numpy().sum() for b, _ in dataset] for _ in range(2))
    assert first != second  # reshuffled each epoch



def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.reliability
def test_an_acquire_failing_halfway_keeps_the_last_good_raw_data(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = workspace / "photos"
    _folder_dataset(source)
    (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_params_tree(["data.source=folder", f"data.root={source}"])))
    params = load_params()
    good_run = run_acquire(params)
    raw_before, pointer_before = _snapshot(workspace / RAW_DIR), (workspace / ACQUIRE_POINTER).read_bytes()
    assert len(raw_before) == 17  # 16 photos and the acquire report

    for index in range(8):  # the user adds photos; some vanish while acquire copies them (a flaky mount)
        _photo(5000 + index).save(source / "cbb" / f"new_{index}.png")
    real_link, linked = os.link, []

    def link_then_vanish(source_file: str, target_file: str) -> None:
        linked.append(source_file)
        if len(linked) > 10:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), source_file)
        real_link(source_file, target_file)

    def vanished(source_file: str, target_file: str) -> None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), source_file)

    monkeypatch.setattr(os, "link", link_then_vanish)
    monkeypatch.setattr(shutil, "copy2", vanished)
    with pytest.raises(DataError, match=r"cannot copy .*photos/.* into data/raw \(No such file or directory\)"):
        run_acquire(params)
    monkeypatch.undo()

    assert _snapshot(workspace / RAW_DIR) == raw_before
    assert (workspace / ACQUIRE_POINTER).read_bytes() == pointer_before  # still names the good run
    assert not (workspace / ".staging").exists()
    client = MlflowClient()
    experiment = client.get_run(good_run).info.experiment_id
    failed = [run for run in client.search_runs([experiment]) if run.info.run_id != good_run]
    assert [run.info.status for run in failed] == ["FAILED"]
    assert "DataError: cannot copy" in failed[0].data.tags["cassava.failure"]


def _complete_raw_files(raw: Path) -> int:
    """The number of images in raw when it is a complete acquisition (its report matches its files)."""
    report = json.loads((raw / ACQUIRE_REPORT_NAME).read_text())
    images = [path for path in raw.rglob("*") if path.is_file() and path.name != ACQUIRE_REPORT_NAME]
    assert len(images) == sum(report["files_per_class"].values()), "data/raw is half written"
    return len(images)


@pytest.mark.reliability
def test_a_killed_acquire_leaves_the_old_or_the_new_complete_raw_data(workspace: Path) -> None:
    environment = {**os.environ, "CASSAVA_WORKSPACE": str(workspace), "PYTHONPATH": str(code_root())}
    command = [sys.executable, "-m", "tasks.cli", "acquire"]
    subprocess.run([*command, "-S", "data.synthetic.images_per_class=10"], env=environment, check=True,
                   capture_output=True)
    old = _snapshot(workspace / RAW_DIR)
    bigger = [*command, "-S", "data.synthetic.images_per_class=100"]
    staged_raw = workspace / ".staging" / "acquire" / "new" / RAW_DIR
    outcomes = []
    for attempt in range(2):  # once mid-copy for sure, then at a random moment (random.Random(1))
        acquiring = subprocess.Popen(bigger, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 300
        if attempt == 0:
            while sum(1 for _ in staged_raw.rglob("*.png")) < 100 and time.monotonic() < deadline:
                assert acquiring.poll() is None, "acquire ended before it could be killed"
                time.sleep(0.05)
        else:
            time.sleep(random.Random(attempt).uniform(2.0, 10.0))
        os.killpg(acquiring.pid, signal.SIGKILL)  # as a power cut: no handler, no rollback runs
        acquiring.wait()
        files = _complete_raw_files(workspace / RAW_DIR)
        assert files in (50, 500)
        assert files == 500 or _snapshot(workspace / RAW_DIR) == old
        outcomes.append(files)
    assert outcomes[0] == 50  # killed mid-copy: the old data set, untouched
    print(f"acquire killed {len(outcomes)} times: data/raw held {outcomes} images (old 50, new 500)")

    finished = subprocess.run(bigger, env=environment, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert _complete_raw_files(workspace / RAW_DIR) == 500
    assert not (workspace / ".staging").exists()
    configure_tracking()
    client = MlflowClient()
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    statuses = [run.info.status for run in runs]
    assert "RUNNING" not in statuses and statuses.count("FINISHED") >= 2  # killed runs were marked KILLED
