"""Atomic stage outputs: a stage writes into a staging folder and its outputs replace the old ones only when
the stage has succeeded; whatever fails or is killed, the last good outputs stay, never half of each.

    with staged_outputs(root, "train", [MODEL_DIR, HISTORY_FILE, TRAIN_POINTER]) as staged, stage_run(...) as run:
        save_model(staged.path(MODEL_DIR))     # the new outputs, out of sight
        staged.publish()                       # swapped in; the old ones are kept aside
        run.complete(record)                   # logs from the final paths
    # the run ended FINISHED: the old outputs are dropped. Any exception: the old outputs come back.

Every target (file or folder, relative to `root`) is swapped with `os.replace`, a rename within one file
system: the staging folder `<root>/.staging/<stage>/` sits in the workspace for that reason. Targets with no
staged version (the run pointer, written by `tracking.stage_run` itself) are set aside at `publish` too, so a
failure after it also brings back the old pointer: a failed run never claims the outputs.

A SIGKILL leaves the staging folder behind. `publish` writes a journal first; the next `staged_outputs` of
the same stage finds it and rolls the interrupted swap back, so the outputs are again the last good ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger(__name__)
STAGING_DIR = Path(".staging")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class StagedOutputs:
    """The staging area of one stage run (see the module doc)."""

    def __init__(self, root: Path, stage: str, targets: Sequence[Path]) -> None:
        self.root = root
        self.targets = [Path(target) for target in targets]
        self.area = root / STAGING_DIR / stage
        self.new = self.area / "new"
        self.old = self.area / "old"
        self.journal = self.area / "journal.json"
        self.published = False

    def path(self, target: Path) -> Path:
        """Where to write `target`'s new version (its parent folder exists; the path itself does not)."""
        if Path(target) not in self.targets:
            raise ValueError(f"{target} is not one of this stage's outputs ({', '.join(map(str, self.targets))})")
        staged = self.new / target
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def recover(self) -> None:
        """Undo a swap a killed run left half done (journal present), then clear the staging area."""
        if self.journal.exists():
            existed = set(json.loads(self.journal.read_text())["existed"])
            log.warning("staging: rolling back the interrupted swap of %s", ", ".join(existed) or "new outputs")
            self._roll_back(existed)
        self._clear()

    def publish(self) -> None:
        """Swap the staged versions in; set the current outputs aside until the stage ends."""
        existed = [target.as_posix() for target in self.targets if (self.root / target).exists()]
        self.area.mkdir(parents=True, exist_ok=True)
        temporary = self.journal.with_suffix(".tmp")
        temporary.write_text(json.dumps({"existed": existed}))
        temporary.replace(self.journal)  # from here on, a kill is rolled back by the next run
        self.published = True
        for target in self.targets:
            final = self.root / target
            if target.as_posix() in existed:
                (self.old / target).parent.mkdir(parents=True, exist_ok=True)
                os.replace(final, self.old / target)
            if (self.new / target).exists() or (self.new / target).is_symlink():
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.new / target, final)

    def commit(self) -> None:
        if not self.published:
            self.publish()
        self.journal.unlink()  # the commit point: the new outputs are the good ones now
        self._clear()

    def roll_back(self) -> None:
        if self.published and self.journal.exists():
            self._roll_back(set(json.loads(self.journal.read_text())["existed"]))
        self._clear()

    def _clear(self) -> None:
        shutil.rmtree(self.area, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.area.parent.rmdir()  # only when no other stage is staging

    def _roll_back(self, existed: set[str]) -> None:
        for target in self.targets:
            final, kept = self.root / target, self.old / target
            if target.as_posix() not in existed:
                _remove(final)  # the failed run's own output: nothing was there before
            elif kept.exists() or kept.is_symlink():
                _remove(final)
                os.replace(kept, final)


@contextlib.contextmanager
def staged_outputs(root: Path, stage: str, targets: Sequence[Path]) -> Iterator[StagedOutputs]:
    """Stage `targets` (paths relative to `root`): commit on success, roll back on any exception (also
    KeyboardInterrupt and SIGTERM); `publish()` inside the block swaps early so later steps see the final paths."""
    staged = StagedOutputs(root, stage, targets)
    staged.recover()
    try:
        yield staged
    except BaseException:
        staged.roll_back()
        raise
    staged.commit()
