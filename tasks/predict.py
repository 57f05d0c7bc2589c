"""Batch prediction: classify a folder of images with a logged or registered MLflow model, into a CSV.

The model is the logged MLflow model (`models:/cassava-classifier@champion` or `runs:/<run id>/model`), loaded
as the Keras model MLflow serves, fed the float32 N x S x S x 3 pixels its signature declares. Images go through `tasks.images.load_rgb_image` at the size
the model's signature declares: the same preprocessing as preparation, by construction. Class names come from
the `cassava.classes` tag of the run that logged the model.

    python -m tasks.predict photos/                                   # champion of cassava-classifier
    python -m tasks.predict photos/ --model runs:/<run id>/model --output photos.csv

Writes `predictions.csv` (file, class, confidence, p_<class>...) and, next to it, `predictions.skipped.csv`
(file, reason) for files that could not be read and entries that are not files (a folder named `y.jpg`); both are replaced atomically, so a failed prediction never
leaves half a CSV. Importing this module loads neither TensorFlow nor MLflow: `--help` answers at once.
"""

from __future__ import annotations

import contextlib
import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Sequence

import typer

from tasks.errors import run_command_line
from tasks.names import CHAMPION_ALIAS, DEFAULT_MODEL_NAME
from tasks.scoring import PredictionError

if TYPE_CHECKING:
    from tasks.scoring import LoggedKerasModel

log = logging.getLogger("tasks.predict")  # also under `python -m tasks.predict`, where __name__ is __main__

DEFAULT_MODEL_URI = f"models:/{DEFAULT_MODEL_NAME}@{CHAMPION_ALIAS}"
SKIPPED_COLUMNS = ("file", "reason")


@dataclass(frozen=True)
class SkippedFile:
    file: str  # relative to the predicted folder
    reason: str


@dataclass
class PredictionSummary:
    model_uri: str
    run_id: str  # the run that logged the model (its class names)
    class_names: list[str]
    image_size: int
    output_csv: Path
    skipped_csv: Path
    predicted: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)


def skipped_csv_for(output_csv: Path) -> Path:
    """Where the skipped files of `output_csv` are listed: `<name>.skipped.csv` next to it."""
    return output_csv.with_name(f"{output_csv.stem}.skipped.csv")


def prediction_columns(class_names: Sequence[str]) -> list[str]:
    return ["file", "class", "confidence", *(f"p_{name}" for name in class_names)]


def load_model(model_uri: str) -> "LoggedKerasModel":
    """The logged Keras model, from the tracking store `configure_tracking` points at."""
    from tasks.scoring import load_logged_model

    with _missing_model_is_an_error(model_uri):
        return load_logged_model(model_uri)


@contextlib.contextmanager
def _missing_model_is_an_error(model_uri: str) -> Iterator[None]:
    """Point MLflow at the tracking store; a model URI that names nothing there becomes a PredictionError."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import configure_tracking

    store = configure_tracking()
    try:
        yield
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise PredictionError(
            f"model {model_uri}: {error.message} in {store}; train and register one (python3 dev.py run), or pass "
            "--model runs:/<run id>/model or models:/<name>/<version>"
        ) from None


def _folder_entries(folder: Path) -> tuple[list[Path], list[SkippedFile]]:
    """(files to predict, entries that look like images but are not files), everything under `folder`, sorted.

    A folder named like an image (`y.jpg/`) or a broken link would otherwise vanish without a word; files
    inside such a folder are still predicted.
    """
    from tasks.images import IMAGE_SUFFIXES

    files, not_files = [], []
    for path in sorted(folder.rglob("*")):
        if path.name.startswith("."):
            continue  # hidden entries (.DS_Store), as preparation skips them
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                not_files.append(SkippedFile(path.relative_to(folder).as_posix(),
                                             "a folder, not an image file (the files inside it are predicted)"))
        else:
            reason = "a broken link" if path.is_symlink() else "not a regular file"
            not_files.append(SkippedFile(path.relative_to(folder).as_posix(), reason))
    for skipped in not_files:
        log.warning("predict: skipped %s: %s", skipped.file, skipped.reason)
    return files, not_files


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextlib.contextmanager
def _atomic_csv(path: Path) -> Iterator[Any]:
    """A csv.writer on a temporary file that replaces `path` only once everything was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("w", newline="") as handle:
            yield csv.writer(handle)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def predict_folder(model_uri: str, folder: Path, output_csv: Path, batch_size: int = 64) -> PredictionSummary:
    """Classify every file under `folder` (recursively); unreadable files are skipped with their reason.

    Rows are written as batches are predicted, so memory stays bounded by one batch whatever the folder's size.
    """
    import numpy as np

    from tasks.images import UnreadableImage, load_rgb_image
    from tasks.scoring import model_class_names, model_image_size, predict_batches

    folder, output_csv = Path(folder), Path(output_csv)
    require_folder(folder)
    model = load_model(model_uri)
    image_size = model_image_size(model)
    run_id, class_names = model_class_names(model)
    summary = PredictionSummary(model_uri, run_id, class_names, image_size, output_csv, skipped_csv_for(output_csv))
    # The outputs may be written inside the folder; a second prediction must not read them as images.
    own_files = {summary.output_csv.resolve(), summary.skipped_csv.resolve()}
    files, not_files = _folder_entries(folder)
    files = [path for path in files if path.resolve() not in own_files]
    summary.skipped.extend(not_files)
    log.info("predict: %d files in %s, model %s (run %s), %dx%d input", len(files), folder, model_uri, run_id,
             image_size, image_size)

    with _atomic_csv(output_csv) as rows:
        rows.writerow(prediction_columns(class_names))
        for chunk in _chunks(files, batch_size):
            names, pixels = [], []
            for path in chunk:
                name = path.relative_to(folder).as_posix()
                try:
                    pixels.append(load_rgb_image(path, image_size).pixels)
                except UnreadableImage as reason:
                    log.warning("predict: skipped %s: %s", name, reason)
                    summary.skipped.append(SkippedFile(name, str(reason)))
                    continue
                names.append(name)
            if not names:
                continue
            probabilities = predict_batches(model, np.stack(pixels), batch_size)
            if probabilities.shape[1] != len(class_names):
                raise PredictionError(
                    f"the model outputs {probabilities.shape[1]} probabilities but its run names "
                    f"{len(class_names)} classes ({', '.join(class_names)})"
                )
            for name, row in zip(names, probabilities):
                best = int(row.argmax())
                rows.writerow([name, class_names[best], f"{row[best]:.6f}", *(f"{value:.6f}" for value in row)])
            summary.predicted += len(names)

    with _atomic_csv(summary.skipped_csv) as rows:
        rows.writerow(SKIPPED_COLUMNS)
        rows.writerows((skipped.file, skipped.reason) for skipped in summary.skipped)
    log.info("predict: %d predicted → %s; %d skipped → %s", summary.predicted, output_csv, len(summary.skipped),
             summary.skipped_csv)
    return summary


def require_folder(folder: Path) -> None:
    if not Path(folder).is_dir():
        raise PredictionError(f"{folder} is not a folder: give a folder of images")


def check_prediction_inputs(folder: Path, model_uri: str) -> None:
    """Before TensorFlow or Prefect load: the folder exists, the tracking store answers, the model exists (its
    metadata only is read)."""
    from tasks.preflight import cap_mlflow_http_retries, check_tracking_store, tracking_uri
    from tasks.scoring import quiet_model_downloads

    require_folder(folder)
    quiet_model_downloads()
    cap_mlflow_http_retries()
    check_tracking_store(tracking_uri())
    from mlflow.models import get_model_info

    with _missing_model_is_an_error(model_uri):
        get_model_info(model_uri)


def check_prediction_command_line(argv: Sequence[str]) -> None:
    """`check_prediction_inputs` for a command line (`FOLDER [--model URI]`), for an entry to call before it
    imports Prefect; anything else (and --help) is left to the entry's own parser."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("folder", nargs="?")
    parser.add_argument("-m", "--model", default=DEFAULT_MODEL_URI)
    known, _ = parser.parse_known_args(list(argv))
    if known.folder and not {"-h", "--help"} & set(argv):
        check_prediction_inputs(Path(known.folder), known.model)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m",
            help="MLflow model URI: models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/model.",
        ),
    ] = DEFAULT_MODEL_URI,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Predictions CSV; skipped files go to <name>.skipped.csv next to it.")
    ] = Path("predictions.csv"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per prediction batch.")] = 64,
) -> None:
    """Classify a folder of leaf images with an MLflow model (the tracking store: MLFLOW_TRACKING_URI, else
    mlflow.db at the repository root)."""
    from tasks.cli import configure_logging

    check_prediction_inputs(folder, model)
    configure_logging()
    summary = predict_folder(model, folder, output, batch_size)
    typer.echo(f"predicted {summary.predicted} images → {summary.output_csv}")
    if summary.skipped:
        typer.echo(f"skipped {len(summary.skipped)} unreadable files → {summary.skipped_csv}")


if __name__ == "__main__":
    run_command_line(app, "python -m tasks.predict")
