"""Register stage: a run's model enters the MLflow model registry only if it is good enough and beats the champion.

The rule (`decide`, pure): the candidate's test metric must reach a minimum and be strictly better than the
champion's (the version holding the `champion` alias) measured on the SAME test split. A tie keeps the
champion. The champion's metric is the one recorded on its model version when that was measured on the same
data version (`cassava.data_version`); otherwise the champion model is loaded and re-scored on the current
test split, its images resized to the champion's own input size, so two models are never compared on different
data and a better model trained at a new image size can still win.

A registered candidate becomes a new version tagged with its data version, classes and metric, and takes the
`champion` alias. Either way the run gets `cassava.gate.decision` (registered | rejected | disabled) and
`cassava.gate.reason` through the stage's record, so a run that carries this stage over holds them too. A
rejection is an outcome, not an error: nothing is raised.

The stage (`run_register`) runs after evaluate and reads only what evaluate wrote (the run's metrics, the
report) and the prepared test split: changing `registry.*` re-runs this stage alone.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

from tasks.names import (
    CHAMPION_ALIAS,
    CLASSES_TAG,
    DATA_VERSION_TAG,
    GATE_CHAMPION_METRIC_TAG,
    GATE_DECISION_TAG,
    GATE_MODEL_VERSION_TAG,
    GATE_REASON_TAG,
    MODEL_ARTIFACT,
    metric_tag,
)

if TYPE_CHECKING:
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

    from tasks.params import Params

log = logging.getLogger(__name__)


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

    def tags(self) -> dict[str, str]:
        """The run tags that record the decision."""
        tags = {GATE_DECISION_TAG: "registered" if self.decision.register else "rejected",
                GATE_REASON_TAG: self.decision.reason}
        if self.champion_metric is not None:
            tags[GATE_CHAMPION_METRIC_TAG] = repr(self.champion_metric)
        if self.registered_version is not None:
            tags[GATE_MODEL_VERSION_TAG] = str(self.registered_version)
        return tags


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



def rescore_champion(
    model_name: str, version: str, metric_name: str, test_images: "np.ndarray", test_labels: "np.ndarray",
    class_names: Sequence[str], top_k: int, batch_size: int,
) -> tuple[float, int]:
    """(`metric_name`, input size) of a version of `model_name` on the given test split, its images resized to
    the version's own input size."""
    from tasks.scoring import load_logged_model, model_image_size, rescore_model

    model = load_logged_model(f"models:/{model_name}/{version}")
    evaluation = rescore_model(model, test_images, test_labels, class_names, top_k, batch_size)
    if metric_name not in evaluation.metrics:
        raise ValueError(f"metric {metric_name!r} is not one evaluation computes ({', '.join(evaluation.metrics)})")
    return evaluation.metrics[metric_name], model_image_size(model)


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
    to it when it passes. The decision is returned (its `tags()` are for the run), not logged here.

    `run_id` must already hold `metric_name` (the evaluate stage's metrics) on the test split given here.
    `data_version` defaults to the run's `cassava.data_version` tag; pass it when the tag is not set yet (inside
    `stage_run`, the tag is written when the stage ends).
    """
    from mlflow import MlflowClient

    from tasks.scoring import PredictionError
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
    champion_version = int(champion.version) if champion else None
    champion_metric: float | None = None
    context = ""
    if champion is not None:
        recorded = champion.tags.get(metric_tag(metric_name))
        if data_version and champion.tags.get(DATA_VERSION_TAG) == data_version and recorded is not None:
            champion_metric = float(recorded)
            context = f" (champion: version {champion.version})"
        else:
            try:
                champion_metric, size = rescore_champion(
                    model_name, champion.version, metric_name, test_images, test_labels, class_names, top_k, batch_size
                )
            except PredictionError as why:
                decision = GateDecision(False, f"cannot compare with champion version {champion.version}: {why}")
                return GateResult(decision, candidate_metric, champion_version, None, None)
            context = (f" (champion: version {champion.version}, re-scored on data version {data_version or 'unknown'}"
                       f" at its {size}x{size} input; it was evaluated on "
                       f"{champion.tags.get(DATA_VERSION_TAG, 'an unknown data version')})")

    verdict = decide(candidate_metric, champion_metric, minimum, metric_name)
    decision = GateDecision(verdict.register, verdict.reason + context)
    registered_version = None
    if decision.register:
        registered_version = _register_champion(client, model_uri, model_name, data_version, class_names,
                                                metric_name, candidate_metric)
    outcome = f"registered as version {registered_version}" if decision.register else "rejected"
    log.info("register: %s: %s", outcome, decision.reason)
    return GateResult(decision, candidate_metric, champion_version, champion_metric, registered_version)


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


def withdraw_registration(model_name: str, result: GateResult) -> None:
    """Undo what a gate registered: the champion alias back where it was (or gone), the new version deleted.
    For a register stage that fails after the gate, so the registry never points at a model whose stage failed."""
    from mlflow import MlflowClient

    if result.registered_version is None:
        return
    client = MlflowClient()
    if result.champion_version is not None:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, str(result.champion_version))
    else:
        client.delete_registered_model_alias(model_name, CHAMPION_ALIAS)
    client.delete_model_version(model_name, str(result.registered_version))
    log.info("register: withdrew version %d of %s after the stage failed", result.registered_version, model_name)


def run_register(params: "Params", run_id: str | None = None) -> str:
    """Stage entry (DVC command and Prefect task): gate the evaluated run's model, record the decision in the
    run (through the stage's record), in `reports/registry.json`, and in the report's header."""
    from tasks import layout
    from tasks.params import workspace_root
    from tasks.prepared import PreparedData
    from tasks.report import GATE_ROW, fill_header_row
    from tasks.staging import staged_outputs
    from tasks.tracking import StageRecord, dvc_data_version, stage_run

    root = workspace_root()
    settings = params.registry
    outputs = [layout.REPORT_FILE, layout.REGISTRY_FILE, layout.REGISTER_POINTER]
    with staged_outputs(root, "register", outputs) as staged, \
            stage_run("register", params, root / layout.EVALUATE_POINTER, root / layout.REGISTER_POINTER, run_id) as run:
        outcome: dict[str, object] = {"run_id": run.run_id, "model_name": settings.model_name,
                                      "metric": settings.metric, "minimum": settings.minimum}
        result: GateResult | None = None
        if settings.enabled:
            prepared = PreparedData(root / layout.PREPARED_DIR)
            test_images, test_labels = prepared.split("test")
            log.info("register: gating the model on %s >= %s against the %s of %s", settings.metric,
                     settings.minimum, CHAMPION_ALIAS, settings.model_name)
            result = gate_and_register(
                run.run_id, settings.model_name, settings.metric, settings.minimum, test_images, test_labels,
                prepared.class_names(), data_version=dvc_data_version(root / layout.PREPARED_DIR),
                top_k=params.evaluate.top_k, batch_size=params.evaluate.batch_size,
            )
            tags = result.tags()
            outcome.update({key: value for key, value in asdict(result).items() if key != "decision"})
        else:
            tags = {GATE_DECISION_TAG: "disabled", GATE_REASON_TAG: "registry.enabled is false: nothing registered"}
            log.info("register: %s", tags[GATE_REASON_TAG])
        outcome.update(decision=tags[GATE_DECISION_TAG], reason=tags[GATE_REASON_TAG])
        try:
            staged.path(layout.REGISTRY_FILE).write_text(json.dumps(outcome, indent=2) + "\n")
            page = (root / layout.EVALUATION_REPORT).read_text(encoding="utf-8")
            gate_text = f"{tags[GATE_DECISION_TAG]}: {tags[GATE_REASON_TAG]}"
            staged.path(layout.REPORT_FILE).write_text(fill_header_row(page, GATE_ROW, gate_text), encoding="utf-8")
            staged.publish()
            run.complete(StageRecord(
                "register",
                tags=tags,
                artifacts=[(layout.REPORT_FILE.as_posix(), "evaluation"), (layout.REGISTRY_FILE.as_posix(), "registry")],
            ))
        except BaseException:  # the registry must not name a champion whose register stage failed
            if result is not None:
                withdraw_registration(settings.model_name, result)
            raise
    return run.run_id
