"""Fixed paths of the pipeline's files, relative to the repository root (dvc.yaml declares the same ones).

Each stage also writes a small pointer file (`<stage>.mlflow.json`) naming the MLflow run it logged into and
the records of the stages before it, so the next stage, in another process under `dvc repro`, continues
the same run or carries the story over into a new one.
"""

from pathlib import Path

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
TRAIN_SUMMARY_FILE = MODELS_DIR / "train_summary.json"

METRICS_FILE = REPORTS_DIR / "metrics.json"
PREDICTIONS_FILE = REPORTS_DIR / "test_predictions.csv"  # actual,predicted: dvc plots' confusion matrix
BACKUP_DIR = MODELS_DIR / "backup"  # resumable training state; not a DVC output, removed after success
INIT_DIAGNOSTICS_FILE = MODELS_DIR / "init_diagnostics.csv"
INIT_DIAGNOSTICS_PLOT = MODELS_DIR / "init_diagnostics.png"
EVALUATION_REPORT = REPORTS_DIR / "evaluation.html"  # the evaluate stage's report, the gate row still pending
REPORT_FILE = REPORTS_DIR / "report.html"  # the same with the registry gate's decision (register stage)
REGISTRY_FILE = REPORTS_DIR / "registry.json"  # the gate's decision, as data
REGISTER_POINTER = REPORTS_DIR / "register.mlflow.json"
