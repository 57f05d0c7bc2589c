"""Fixed paths of the pipeline's files, relative to the repository root (dvc.yaml declares the same ones),
and which numbers go into DVC's metrics files.

Each stage also writes a small pointer file (`<stage>.mlflow.json`) naming the MLflow run it logged into and
the records of the stages before it, so the next stage, in another process under `dvc repro`, continues
the same run or carries the story over into a new one.
"""

import fnmatch
import json
from pathlib import Path
from typing import Mapping

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
REPORTS_DIR = Path("reports")

ACQUIRE_POINTER = Path("data/acquire.mlflow.json")
PREPARE_POINTER = Path("data/prepare.mlflow.json")
TRAIN_POINTER = MODELS_DIR / "train.mlflow.json"
EVALUATE_POINTER = REPORTS_DIR / "evaluate.mlflow.json"

MODEL_DIR = MODELS_DIR / "model"  # model.keras, input_example.npy, model_summary.txt
CHECKPOINT_FILE = MODELS_DIR / "checkpoints" / "best.keras"
HISTORY_FILE = MODELS_DIR / "history.csv"  # per-epoch metrics: dvc plots' learning curves
TRAIN_SUMMARY_FILE = MODELS_DIR / "train_summary.json"  # everything the training reports (a plain output)
TRAIN_METRICS_FILE = MODELS_DIR / "train_metrics.json"  # its headline numbers: a DVC metrics file

METRICS_FILE = REPORTS_DIR / "metrics.json"  # the test headline numbers: a DVC metrics file
ALL_METRICS_FILE = REPORTS_DIR / "all_metrics.json"  # every test metric (per class, calibration, robustness...)
PREDICTIONS_FILE = REPORTS_DIR / "test_predictions.csv"  # actual,predicted: dvc plots' confusion matrix
BACKUP_DIR = MODELS_DIR / "backup"  # resumable training state; not a DVC output, removed after success
# Names the MLflow run of a training in progress (and what it trains), so that the next execution after a
# kill continues that run; not a DVC output, removed when the training ends (see tracking.stage_run).
INTERRUPTED_RUN_FILE = MODELS_DIR / "training.run.json"
INIT_DIAGNOSTICS_FILE = MODELS_DIR / "init_diagnostics.csv"
INIT_DIAGNOSTICS_PLOT = MODELS_DIR / "init_diagnostics.png"
EVALUATION_REPORT = REPORTS_DIR / "evaluation.html"  # the evaluate stage's report, the gate row still pending
REPORT_FILE = REPORTS_DIR / "report.html"  # the same with the registry gate's decision (register stage)
REGISTRY_FILE = REPORTS_DIR / "registry.json"  # the gate's decision, as data
REGISTER_POINTER = REPORTS_DIR / "register.mlflow.json"

# The numbers `dvc metrics show` / `dvc exp show` compare (shell-style patterns: top-k follows evaluate.top_k).
# Everything else is in ALL_METRICS_FILE / TRAIN_SUMMARY_FILE and in the MLflow run: a table of 140 columns
# compares nothing.
HEADLINE_METRICS = (
    "test_accuracy", "test_macro_f1", "test_top*_accuracy",  # reports/metrics.json
    "best_epoch", "best_val_accuracy",  # models/train_metrics.json
)  # `dvc metrics show` prints one column per name: these five fit in 120 columns


def headline(metrics: Mapping[str, float]) -> dict[str, float]:
    """The headline numbers among `metrics`, in HEADLINE_METRICS order."""
    return {
        name: metrics[name]
        for pattern in HEADLINE_METRICS
        for name in sorted(fnmatch.filter(metrics, pattern))
    }


def write_metrics(metrics: Mapping[str, float], headline_file: Path, full_file: Path | None = None) -> None:
    """The one writer of DVC's metrics files: the headline numbers to `headline_file`, all of them (if asked)
    to `full_file`."""
    headline_file.parent.mkdir(parents=True, exist_ok=True)
    headline_file.write_text(json.dumps(headline(metrics), indent=2) + "\n")
    if full_file is not None:
        full_file.write_text(json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")
