"""Atomic stage outputs: new outputs replace the old ones only on success; a failure or a kill leaves the
last good ones, never a mix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.staging import STAGING_DIR, StagedOutputs, staged_outputs

FOLDER, FILE, POINTER = Path("data/raw"), Path("models/summary.json"), Path("models/stage.mlflow.json")


def _old_outputs(root: Path) -> None:
    (root / FOLDER).mkdir(parents=True)
    (root / FOLDER / "old.png").write_text("old image")
    (root / FILE).parent.mkdir(parents=True)
    (root / FILE).write_text("old summary")
    (root / POINTER).write_text("old run")


def _state(root: Path) -> dict[str, str]:
    files = sorted(path for path in root.rglob("*") if path.is_file())
    return {path.relative_to(root).as_posix(): path.read_text() for path in files}


def _write_new(staged: StagedOutputs, root: Path) -> None:
    (staged.path(FOLDER)).mkdir()
    (staged.path(FOLDER) / "new.png").write_text("new image")
    staged.path(FILE).write_text("new summary")


def test_success_swaps_every_output_and_leaves_no_staging(tmp_path: Path) -> None:
    _old_outputs(tmp_path)
    with staged_outputs(tmp_path, "stage", [FOLDER, FILE, POINTER]) as staged:
        _write_new(staged, tmp_path)
        assert (tmp_path / FILE).read_text() == "old summary"  # unseen until published
        staged.publish()
        (tmp_path / POINTER).write_text("new run")  # as tracking.stage_run writes it, after publish
    assert _state(tmp_path) == {"data/raw/new.png": "new image", "models/summary.json": "new summary",
                                "models/stage.mlflow.json": "new run"}


@pytest.mark.parametrize("fail_after_publish", [False, True])
def test_a_failure_keeps_the_last_good_outputs_and_pointer(tmp_path: Path, fail_after_publish: bool) -> None:
    _old_outputs(tmp_path)
    before = _state(tmp_path)
    with pytest.raises(RuntimeError, match="stage failed"):
        with staged_outputs(tmp_path, "stage", [FOLDER, FILE, POINTER, Path("models/extra.csv")]) as staged:
            _write_new(staged, tmp_path)
            staged.path(Path("models/extra.csv")).write_text("an output the old run did not have")
            if fail_after_publish:
                staged.publish()  # e.g. logging to MLflow fails after the swap
            raise RuntimeError("stage failed")
    assert _state(tmp_path) == before
    assert not (tmp_path / STAGING_DIR).exists()


def test_an_interrupted_swap_is_rolled_back_by_the_next_run(tmp_path: Path) -> None:
    _old_outputs(tmp_path)
    before = _state(tmp_path)
    # A SIGKILL between publish and the end of the stage: no handler runs, the journal stays.
    staged = StagedOutputs(tmp_path, "stage", [FOLDER, FILE, POINTER])  # what staged_outputs drives
    _write_new(staged, tmp_path)
    staged.publish()
    assert (tmp_path / FILE).read_text() == "new summary" and not (tmp_path / POINTER).exists()

    with staged_outputs(tmp_path, "stage", [FOLDER, FILE, POINTER]) as again:
        assert _state(tmp_path) == before  # rolled back before the new run starts
        _write_new(again, tmp_path)
        again.publish()
        (tmp_path / POINTER).write_text("new run")
    assert _state(tmp_path) == {"data/raw/new.png": "new image", "models/summary.json": "new summary",
                                "models/stage.mlflow.json": "new run"}
    assert not (tmp_path / STAGING_DIR).exists()


def test_only_declared_outputs_can_be_staged(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not one of this stage's outputs"):
        with staged_outputs(tmp_path, "stage", [FILE]) as staged:
            staged.path(Path("elsewhere.txt"))
