"""One home for the names other tools see: MLflow tag keys, the logged model's name, registry names.

Every `cassava.*` tag a stage sets or reads, and the model and alias names that prediction and the registry
gate share, are spelled here once, so a reader (the MLflow UI, `mlflow.search_runs(filter_string=...)`, the
tests) and a writer can never disagree.
"""

TAG_PREFIX = "cassava."

# Set on pipeline runs.
CLASSES_TAG = TAG_PREFIX + "classes"  # comma-separated class names (prepare stage); also on model versions
DATA_VERSION_TAG = TAG_PREFIX + "data_version"  # DVC hash of data/prepared; also on model versions
SHIFT_VERDICT_TAG = TAG_PREFIX + "shift_verdict"  # evaluate: train/test distribution shift
INIT_VERDICT_TAG = TAG_PREFIX + "init_verdict"  # train: initialization diagnostics (healthy / bad)
INIT_REASON_TAG = TAG_PREFIX + "init_reason"
GRADIENT_FLAG_TAG = TAG_PREFIX + "gradient_flag"
FAILURE_TAG = TAG_PREFIX + "failure"  # why a run ended FAILED or KILLED
NAME_KEY_TAG = TAG_PREFIX + "name_key"  # hash of the params part of the run name: runs that share it are numbered

# The registry gate (register stage), on the gated run.
GATE_DECISION_TAG = TAG_PREFIX + "gate.decision"  # registered | rejected | disabled
GATE_REASON_TAG = TAG_PREFIX + "gate.reason"
GATE_MODEL_VERSION_TAG = TAG_PREFIX + "gate.model_version"  # the version registered, when it was
GATE_CHAMPION_METRIC_TAG = TAG_PREFIX + "gate.champion_metric"  # the champion's metric on the same test split

# The MLflow model every training run logs, and where the registry keeps the best one.
MODEL_ARTIFACT = "model"  # runs:/<run id>/model
DEFAULT_MODEL_NAME = "cassava-classifier"  # registry.model_name's default
CHAMPION_ALIAS = "champion"  # models:/<name>@champion: the version prediction and serving use by default


def metric_tag(metric_name: str) -> str:
    """The model-version tag holding `metric_name` as measured on the version's own data version."""
    return f"{TAG_PREFIX}metric.{metric_name}"


def stage_done_tag(stage: str) -> str:
    """The run tag a stage sets to "done" when it finished in that run."""
    return f"{TAG_PREFIX}stage.{stage}"
