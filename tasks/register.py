"""Registry gate: a run's model enters the MLflow model registry only if it is good enough and beats the champion.

The rule (`decide`, pure): the candidate's test metric must reach a minimum and be strictly better than the
champion's (the version holding the `champion` alias) measured on the SAME test split. A tie keeps the
champion. The champion's metric is the one recorded on its model version when that was measured on the same
data version (`cassava.data_version`); otherwise the champion model is loaded and re-scored on the current
test split, so two models are never compared on different data.

A registered candidate becomes a new version tagged with its data version, classes and metric, and takes the
`champion` alias. Either way the run gets `cassava.gate.decision` (registered | rejected) and
`cassava.gate.reason`. A rejection is an outcome, not an error: nothing is raised.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "cassava-classifier"
CHAMPION_ALIAS = "champion"
CLASSES_TAG = "cassava.classes"  # comma-separated class names, on pipeline runs (prepare stage) and model versions
DATA_VERSION_TAG = "cassava.data_version"
DECISION_TAG = "cassava.gate.decision"
REASON_TAG = "cassava.gate.reason"
VERSION_TAG = "cassava.gate.model_version"
CHAMPION_METRIC_TAG = "cassava.gate.champion_metric"
MODEL_ARTIFACT = "model"  # the name tracking.log_keras_model logs the model under


@dataclass(frozen=True)
class GateDecision:
    register: bool
    reason: str


@dataclass(frozen=True)
class GateResult:
    decision: GateDecision
    candidate_metric: float
    champion_version: int | None  # the champion before the gate
    champion_metric: float | None  # on the candidate's test split (recorded or re-scored)
    registered_version: int | None  # the new version, now champion, when registered


def metric_tag(metric_name: str) -> str:
    """The model-version tag holding the metric measured on the version's data version."""
    return f"cassava.metric.{metric_name}"


def decide(candidate_metric: float, champion_metric: float | None, minimum: float, metric_name: str) -> GateDecision:
    """Register when the candidate reaches `minimum` and beats the champion (strictly); None: no champion.

    Higher is better, as for every metric the evaluate stage reports (accuracy, macro F1, top-k, per class).
    """
    if not math.isfinite(candidate_metric):
        return GateDecision(False, f"{metric_name} is {candidate_metric}: not a number")
    if candidate_metric < minimum:
        return GateDecision(False, f"{metric_name} {candidate_metric:.4f} is below the minimum {minimum:.4f}")
    if champion_metric is None:
        return GateDecision(
            True, f"{metric_name} {candidate_metric:.4f} reaches the minimum {minimum:.4f}; no champion yet"
        )
    if candidate_metric > champion_metric:
        return GateDecision(True, f"{metric_name} {candidate_metric:.4f} beats the champion's {champion_metric:.4f}")
    return GateDecision(
        False, f"{metric_name} {candidate_metric:.4f} does not beat the champion's {champion_metric:.4f}"
    )


def current_champion(client: "MlflowClient", model_name: str) -> "ModelVersion | None":
    """The version holding the champion alias; None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    version = registered.aliases.get(CHAMPION_ALIAS)
    return client.get_model_version(model_name, str(version)) if version is not None else None


def logged_model_uri(run: "Run") -> str:
    """`models:/<model id>` of the model the run logged as "model" (the newest, if logged twice).

    Registering this URI rather than `runs:/<id>/model` spares MLflow 3 a lookup it warns about every time.
    """
    import mlflow

    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{MODEL_ARTIFACT}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
        output_format="list",
    )
    if not found:
        raise ValueError(f"run {run.info.run_id} logged no model named {MODEL_ARTIFACT!r}: train it first")
    return found[0].model_uri


def align_to_classes(
    probabilities: "np.ndarray", model_classes: Sequence[str], class_names: Sequence[str]
) -> "np.ndarray":
    """Probability columns reordered to `class_names`; a class the model does not know gets 0.

    A champion trained on another data version may know other classes, or the same in another order.
    """
    import numpy as np

    if list(model_classes) == list(class_names):
        return probabilities
    aligned = np.zeros((len(probabilities), len(class_names)), dtype=probabilities.dtype)
    for column, name in enumerate(class_names):
        if name in model_classes:
            aligned[:, column] = probabilities[:, list(model_classes).index(name)]
    return aligned


class IncomparableChampion(ValueError):
    """The champion cannot be scored on the candidate's test split; str() says why."""


def rescore_champion(
    model_name: str, version: str, metric_name: str, test_images: "np.ndarray", test_labels: "np.ndarray",
    class_names: Sequence[str], top_k: int, batch_size: int,
) -> float:
    """The `metric_name` of a version of `model_name` on the given test split, scored by the evaluation code."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.evaluate import score_predictions
    from tasks.predict import PredictionError, model_class_names, model_image_size, predict_batches

    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
    image_size = model_image_size(model)
    if tuple(test_images.shape[1:]) != (image_size, image_size, 3):
        # Resizing the prepared arrays again would score it on degraded images, not on the same split.
        raise IncomparableChampion(
            f"the champion takes {image_size}x{image_size} images, the test split holds "
            f"{test_images.shape[1]}x{test_images.shape[2]}"
        )
    try:
        _, model_classes = model_class_names(model)
    except (PredictionError, MlflowException):  # registered by hand, its run untagged or deleted: same classes
        model_classes = list(class_names)
    probabilities = align_to_classes(predict_batches(model, test_images, batch_size), model_classes, class_names)
    evaluation = score_predictions(probabilities, test_labels, list(class_names), top_k)
    if metric_name not in evaluation.metrics:
        raise ValueError(f"metric {metric_name!r} is not one evaluation computes ({', '.join(evaluation.metrics)})")
    return evaluation.metrics[metric_name]


def gate_and_register(
    run_id: str,
    model_name: str,
    metric_name: str,
    minimum: float,
    test_images: "np.ndarray",
    test_labels: "np.ndarray",
    class_names: Sequence[str],
    *,
    data_version: str | None = None,
    top_k: int = 2,
    batch_size: int = 128,
) -> GateResult:
    """Gate the run's model "model": register it as a new version of `model_name` and move the champion alias
    to it when it passes, and tag the run with the decision and its reason either way.

    `run_id` must already hold `metric_name` (the evaluate stage's metrics) on the test split given here.
    `data_version` defaults to the run's `cassava.data_version` tag; pass it when the tag is not set yet (inside
    `stage_run`, the tag is written when the stage ends).
    """
    from mlflow import MlflowClient

    from tasks.tracking import configure_tracking

    configure_tracking()
    client = MlflowClient()
    run = client.get_run(run_id)
    if metric_name not in run.data.metrics:
        raise ValueError(f"run {run_id} has no metric {metric_name!r}: evaluate it before gating")
    candidate_metric = run.data.metrics[metric_name]
    data_version = data_version or run.data.tags.get(DATA_VERSION_TAG)
    model_uri = logged_model_uri(run)  # before deciding: a run without a model is an error, not a rejection

    champion = current_champion(client, model_name)
    champion_metric: float | None = None
    context = ""
    if champion is not None:
        recorded = champion.tags.get(metric_tag(metric_name))
        if data_version and champion.tags.get(DATA_VERSION_TAG) == data_version and recorded is not None:
            champion_metric = float(recorded)
            context = f" (champion: version {champion.version})"
        else:
            try:
                champion_metric = rescore_champion(
                    model_name, champion.version, metric_name, test_images, test_labels, class_names, top_k, batch_size
                )
            except IncomparableChampion as why:
                decision = GateDecision(False, f"cannot compare with champion version {champion.version}: {why}")
                return _record(client, run_id, decision, candidate_metric, champion, None, None)
            context = (f" (champion: version {champion.version}, re-scored on data version {data_version or 'unknown'};"
                       f" it was evaluated on {champion.tags.get(DATA_VERSION_TAG, 'an unknown data version')})")

    verdict = decide(candidate_metric, champion_metric, minimum, metric_name)
    decision = GateDecision(verdict.register, verdict.reason + context)
    registered_version = None
    if decision.register:
        registered_version = _register_champion(client, model_uri, model_name, data_version, class_names,
                                                metric_name, candidate_metric)
    return _record(client, run_id, decision, candidate_metric, champion, champion_metric, registered_version)


def _register_champion(
    client: "MlflowClient", model_uri: str, model_name: str, data_version: str | None,
    class_names: Sequence[str], metric_name: str, metric_value: float,
) -> int:
    """A new version of `model_name` (the registered model is created with the first one), made champion."""
    import mlflow

    tags = {CLASSES_TAG: ",".join(class_names), metric_tag(metric_name): repr(metric_value)}
    if data_version:
        # Without a data version the recorded metric is never reused: a later gate re-scores this model instead.
        tags[DATA_VERSION_TAG] = data_version
    version = mlflow.register_model(model_uri, model_name, tags=tags)
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
    return int(version.version)


def _record(
    client: "MlflowClient", run_id: str, decision: GateDecision, candidate_metric: float,
    champion: "ModelVersion | None", champion_metric: float | None, registered_version: int | None,
) -> GateResult:
    """Tag the run with the decision and say it in the log."""
    from mlflow.entities import RunTag

    tags = {DECISION_TAG: "registered" if decision.register else "rejected", REASON_TAG: decision.reason}
    if champion_metric is not None:
        tags[CHAMPION_METRIC_TAG] = repr(champion_metric)
    if registered_version is not None:
        tags[VERSION_TAG] = str(registered_version)
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    outcome = f"registered as version {registered_version}" if decision.register else "rejected"
    log.info("gate: %s: %s", outcome, decision.reason)
    return GateResult(decision, candidate_metric, int(champion.version) if champion else None, champion_metric,
                      registered_version)
