"""The only module that talks to MLflow: one run per pipeline execution, lineage tags, never a run left RUNNING.

Every stage works inside `stage_run(...)`. It finds the execution's run: the run id handed over explicitly
(the Prefect flow), or the run named in the upstream stage's pointer file (`dvc repro`, one process per
stage). That run is resumed when it is finished, has the same params and lacks this stage; otherwise
(say `dvc repro` re-runs only evaluation) a new run is started and the upstream stages' records, which
the pointer files carry, are logged into it again from their recorded outputs, with a link to the run
they came from. So whichever way the pipeline ran, one run tells the whole story.

A stage's results are described by a `StageRecord` (metrics, tags, artifacts, per-epoch series, model);
the same record is logged when the stage runs and when a later run carries it over.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, RunStatus

from tasks.params import Params, code_root, flatten_params, tracking_root, workspace_root

TAG_PREFIX = "cassava."
TRACKED_LIBRARIES = ("tensorflow-cpu", "tensorflow", "keras", "mlflow", "prefect", "dvc", "scikit-learn", "numpy")


@dataclass
class StageRecord:
    """What one stage contributes to the run, as data (paths relative to the repository root)."""

    stage: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (file, artifact folder in the run)
    series_csv: str | None = None  # per-epoch metrics, one column per metric, "epoch" as the step
    model_dir: str | None = None  # a saved Keras model with its input example, logged as MLflow model "model"
    run_id: str = ""  # the run that first logged this record

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageRecord":
        data = dict(data)
        data["artifacts"] = [tuple(pair) for pair in data.get("artifacts", [])]
        return cls(**data)


@dataclass
class StageRun:
    """Handle a stage gets inside `stage_run`: the run id and a way to log its record."""

    run_id: str
    stage: str
    records: list[StageRecord]

    def complete(self, record: StageRecord) -> None:
        record.run_id = self.run_id
        log_record(self.run_id, record, replay_series=False)
        self.records.append(record)


def default_tracking_uri() -> str:
    return f"sqlite:///{tracking_root() / 'mlflow.db'}"


def configure_tracking() -> str:
    """Point MLflow at MLFLOW_TRACKING_URI, else at the SQLite store at the repository root (absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)  # (MLflow also exports it as MLFLOW_TRACKING_URI to child processes)
    return uri


def allow_concurrent_writers(uri: str) -> None:
    """Put a SQLite store in write-ahead-log mode, once (the mode is stored in the file), before several
    processes log into it at once (a sweep's children).

    MLflow already waits up to 20 s for a lock (busy_timeout, per session), which is what keeps concurrent
    writers from failing with "database is locked" (tests/flows/test_sweep.py: 4 concurrent writers, no
    error, also without WAL). WAL adds that readers (the parent's queries, the MLflow UI) and the writer no
    longer block each other, so those waits are shorter and rarer. Other stores: nothing to do.
    """
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3

    connection = sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=60)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it if needed. With the default store its artifacts go to an absolute
    folder next to mlflow.db: MLflow's default, ./mlruns under the working directory, would put a queued
    experiment's artifacts in DVC's temporary copy and lose them with it."""
    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing:
        return existing.experiment_id
    artifact_location = None
    if mlflow.get_tracking_uri() == default_tracking_uri():
        artifact_location = (tracking_root() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        # Another stage process created it in the meantime.
        return client.get_experiment_by_name(name).experiment_id


def experiment_name(params: Params) -> str:
    return params.tracking.experiment_name or f"cassava-{params.data.source}"


def describe_run(params: Params, data_version: str | None) -> str:
    """A run name that says what differs: model, optimizer, learning rate, data version."""
    if params.tracking.run_name:
        return params.tracking.run_name
    architecture = "cnn" + "-".join(str(filters) for filters in params.model.conv_filters)
    if params.model.is_transfer:  # e.g. mobilenet_v2-transfer, cnn-transfer (a pretrained run's CNN)
        backbone = Path(params.model.backbone).stem if params.model.backbone.endswith(".keras") else params.model.backbone
        architecture = f"{'cnn' if backbone == 'none' else backbone}-transfer"
    data_tag = data_version[:8] if data_version else "nodata"
    return f"{architecture}-{params.train.optimizer}-lr{params.train.learning_rate:g}-{data_tag}"


def dvc_data_version(prepared_dir: Path) -> str | None:
    """The DVC hash (md5 .dir) of the prepared data, as `dvc.lock` records it, or None before preparation."""
    if not prepared_dir.is_dir():
        return None
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    filesystem = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, tree = build(HashFileDB(filesystem, scratch), str(prepared_dir), filesystem, "md5", dry_run=True)
    return tree.hash_info.value


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=code_root(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def lineage_tags() -> dict[str, str]:
    """Everything needed to recreate a run: code version, trigger, libraries, where it ran."""
    tags: dict[str, str] = {
        TAG_PREFIX + "host": socket.gethostname(),
        TAG_PREFIX + "pid": str(os.getpid()),
        TAG_PREFIX + "python": sys.version.split()[0],
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        tags["mlflow.source.git.commit"] = commit
        tags[TAG_PREFIX + "git_commit"] = commit
        tags[TAG_PREFIX + "git_dirty"] = str(bool(status)).lower()
    for library in TRACKED_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"{TAG_PREFIX}version.{library}"] = metadata.version(library)
    trigger, prefect_ids = _trigger()
    tags[TAG_PREFIX + "trigger"] = trigger
    tags.update({TAG_PREFIX + key: value for key, value in prefect_ids.items()})
    for variable in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        if os.environ.get(variable):
            tags[TAG_PREFIX + variable.lower()] = os.environ[variable]
    return tags


def _trigger() -> tuple[str, dict[str, str]]:
    """What started the run ("schedule": a deployment's schedule, "prefect", "dvc", "cli") and its Prefect ids."""
    # Prefect is only consulted when already imported: the DVC and CLI paths must not pay its import time.
    if "prefect" in sys.modules:
        from prefect.context import FlowRunContext
        from prefect.runtime import deployment, flow_run

        if flow_run.id:
            ids = {"prefect_flow_run_id": str(flow_run.id)}
            if deployment.id:
                ids["prefect_deployment_id"] = str(deployment.id)
            context = FlowRunContext.get()
            scheduled = bool(context and context.flow_run and context.flow_run.auto_scheduled)
            return ("schedule" if scheduled else "prefect"), ids
    if os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT"):
        return "dvc", {}
    return "cli", {}


def read_pointer(pointer_file: Path | None) -> tuple[str | None, list[StageRecord]]:
    """(run id, stage records) from a stage's pointer file; (None, []) when absent."""
    if pointer_file is None or not pointer_file.exists():
        return None, []
    data = json.loads(pointer_file.read_text())
    return data["run_id"], [StageRecord.from_json(record) for record in data["records"]]


def write_pointer(pointer_file: Path, run_id: str, records: list[StageRecord]) -> None:
    pointer_file.parent.mkdir(parents=True, exist_ok=True)
    payload = {"run_id": run_id, "records": [asdict(record) for record in records]}
    temporary = pointer_file.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    temporary.replace(pointer_file)  # atomic: a killed stage never leaves half a pointer


def _resumable(client: MlflowClient, run_id: str, stage: str, params: dict[str, str]) -> bool:
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return (
        run.info.status == "FINISHED"
        and run.info.lifecycle_stage == "active"
        and f"{TAG_PREFIX}stage.{stage}" not in run.data.tags
        and run.data.params == params
    )


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def reap_orphaned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by a process of this host that no longer exists (SIGKILL, power loss)."""
    host = socket.gethostname()
    reaped = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500):
        pid = run.data.tags.get(TAG_PREFIX + "pid")
        if run.data.tags.get(TAG_PREFIX + "host") != host or not pid or _process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, TAG_PREFIX + "failure", f"process {pid} died without ending the run")
        client.set_terminated(run.info.run_id, status="KILLED")
        reaped.append(run.info.run_id)
    return reaped


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Terminated(BaseException):
    """SIGTERM turned into an exception, so the run is ended KILLED instead of left RUNNING."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    upstream_pointer: Path | None,
    pointer_out: Path,
    run_id: str | None = None,
) -> Iterator[StageRun]:
    """Open the execution's run for `stage` (see the module doc), and end it FINISHED, FAILED or KILLED."""
    configure_tracking()
    client = MlflowClient()
    experiment_id = ensure_experiment(experiment_name(params))
    reap_orphaned_runs(client, experiment_id)
    flat_params = flatten_params(params)
    upstream_run_id, upstream_records = read_pointer(upstream_pointer)
    records = list(upstream_records)

    if run_id and not _run_exists(client, run_id):
        run_id = None  # e.g. a training backup whose run was deleted from the store
    candidate = run_id or upstream_run_id
    carried_over = not (candidate and (run_id or _resumable(client, candidate, stage, flat_params)))
    active = mlflow.start_run(
        run_id=None if carried_over else candidate,
        experiment_id=experiment_id,
        run_name=describe_run(params, None) if carried_over else None,
    )
    try:
        with _sigterm_raises():
            current = active.info.run_id
            mlflow.set_tags(lineage_tags())
            if carried_over:
                mlflow.log_params(flat_params)
                if upstream_run_id:
                    mlflow.set_tag(TAG_PREFIX + "carried_over_from", upstream_run_id)
                for record in upstream_records:
                    log_record(current, record, replay_series=True)
            else:
                resumed = client.get_run(current)
                if not resumed.data.params:
                    mlflow.log_params(flat_params)
                if TAG_PREFIX + "failure" in resumed.data.tags:  # continuing a killed stage: it is not failed now
                    client.delete_tag(current, TAG_PREFIX + "failure")
                    mlflow.set_tag(TAG_PREFIX + "resumed_after", resumed.data.tags[TAG_PREFIX + "failure"][:500])
            mlflow.set_tag(TAG_PREFIX + "stage", stage)
            handle = StageRun(current, stage, records)
            yield handle
            mlflow.set_tag(f"{TAG_PREFIX}stage.{stage}", "done")
            _tag_data_version(client, current, params)
            write_pointer(pointer_out, current, handle.records)
    except (KeyboardInterrupt, Terminated) as interruption:
        mlflow.set_tag(TAG_PREFIX + "failure", f"{stage}: interrupted ({interruption or 'KeyboardInterrupt'})")
        mlflow.end_run(status=RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as error:
        mlflow.set_tag(TAG_PREFIX + "failure", f"{stage}: {type(error).__name__}: {error}"[:5000])
        mlflow.end_run(status=RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(status=RunStatus.to_string(RunStatus.FINISHED))


def _tag_data_version(client: MlflowClient, run_id: str, params: Params) -> None:
    """Tag the DVC hash of the prepared data, log it as the run's dataset, and name the run after it."""
    from tasks.layout import PREPARED_DIR

    version = dvc_data_version(workspace_root() / PREPARED_DIR)
    if not version:
        return
    run = client.get_run(run_id)
    if run.data.tags.get(TAG_PREFIX + "data_version") != version:
        client.set_tag(run_id, TAG_PREFIX + "data_version", version)
        _log_dataset(workspace_root() / PREPARED_DIR, params, version)
    if not params.tracking.run_name:
        client.update_run(run_id, name=describe_run(params, version))


def _log_dataset(prepared_dir: Path, params: Params, version: str) -> None:
    import pandas as pd

    from tasks.prepared import PreparedData

    manifest = pd.read_csv(PreparedData(prepared_dir).manifest_file)
    with warnings.catch_warnings():
        # MLflow hints about integer columns and ambiguous local sources: neither applies to a manifest.
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            manifest, source=str(prepared_dir), targets="label", name=f"cassava-{params.data.source}", digest=version[:32]
        )
        mlflow.log_input(dataset, context="training")


def log_record(run_id: str, record: StageRecord, replay_series: bool) -> None:
    """Log a stage's record into a run; `replay_series` re-logs per-epoch metrics that were logged live."""
    root = workspace_root()
    if record.metrics:
        mlflow.log_metrics(record.metrics)
    tags = dict(record.tags)
    if record.run_id and record.run_id != run_id:
        tags[f"{TAG_PREFIX}{record.stage}_run_id"] = record.run_id
    if tags:
        mlflow.set_tags(tags)
    for file, artifact_folder in record.artifacts:
        log_artifacts(run_id, [root / file], artifact_folder)
    if replay_series and record.series_csv:
        log_series(run_id, root / record.series_csv)
    if record.model_dir:
        log_keras_model(root / record.model_dir)


def log_series(run_id: str, series_csv: Path) -> None:
    """Per-epoch metrics from a CSV with an `epoch` column, one MLflow metric per other column."""
    with series_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    metrics = [
        Metric(key, float(value), 0, int(row["epoch"]))
        for row in rows
        for key, value in row.items()
        if key != "epoch" and value not in ("", None)
    ]
    for start in range(0, len(metrics), 1000):
        MlflowClient().log_batch(run_id, metrics=metrics[start : start + 1000])


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    """Tags set at once, while the stage still runs (e.g. the initialization verdict before any epoch)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_artifacts(run_id: str, files: list[Path], folder: str) -> None:
    client = MlflowClient()
    for file in files:
        client.log_artifact(run_id, str(file), folder)


def log_epoch_metrics(run_id: str, epoch: int, values: dict[str, float]) -> None:
    """Log one epoch's metrics live (explicit run id: Prefect runs tasks in threads)."""
    metrics = [Metric(key, float(value), 0, epoch) for key, value in values.items()]
    MlflowClient().log_batch(run_id, metrics=metrics)


def log_keras_model(model_dir: Path) -> None:
    """Log `model_dir/model.keras` as MLflow model "model" with its signature and input example."""
    import keras
    import numpy as np
    from mlflow.models import infer_signature

    model = keras.saving.load_model(model_dir / "model.keras")
    example = np.load(model_dir / "input_example.npy")
    signature = infer_signature(example, model.predict(example, verbose=0))
    mlflow.models.Model.log(
        artifact_path=None,
        name="model",
        flavor=_KerasFlavor,
        model=model,
        signature=signature,
        input_example=example,
        # Explicit requirements: inferring them runs a pip resolution that costs ~7 s per run.
        pip_requirements=[f"{name}=={metadata.version(name)}" for name in _model_requirements()],
    )


class _KerasFlavor:
    """mlflow.keras, saving into a folder it first creates.

    MLflow 3.17's keras flavor writes the input example before it creates the model folder, so
    `mlflow.keras.log_model(..., input_example=...)` fails with FileNotFoundError; everything else is its own.
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(model: Any, path: str, **kwargs: Any) -> None:
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(model, path, **kwargs)


def _model_requirements() -> list[str]:
    names = []
    for name in ("tensorflow-cpu", "keras", "mlflow", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            metadata.version(name)
            names.append(name)
    return names


def logged_model_source(model_uri: str) -> tuple[str, dict[str, str]]:
    """(run id, params) of the run that logged the MLflow model at `model_uri` (runs:/…, models:/…@alias)."""
    configure_tracking()
    run_id = mlflow.models.get_model_info(model_uri).run_id
    if not run_id:
        raise mlflow.exceptions.MlflowException(f"{model_uri} was not logged in a run")
    return run_id, MlflowClient().get_run(run_id).data.params


def load_logged_keras_model(model_uri: str) -> Any:
    """The Keras model behind an MLflow model URI (e.g. to start a new model from its backbone)."""
    configure_tracking()
    return mlflow.keras.load_model(model_uri)


def log_summary_run(experiment: str, run_name: str, params: dict[str, str], metrics: dict[str, float],
                    tags: dict[str, str], files: list[Path], folder: str) -> str:
    """One finished run holding an experiment flow's result (e.g. a comparison table and plot); its id."""
    configure_tracking()
    with mlflow.start_run(experiment_id=ensure_experiment(experiment), run_name=run_name) as run:
        mlflow.set_tags({**lineage_tags(), **tags})
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        log_artifacts(run.info.run_id, files, folder)
    return run.info.run_id


def fail_runs_of_flow_run(flow_run_id: str, reason: str) -> list[str]:
    """End FAILED, with `reason`, the runs of a failed or crashed Prefect flow run that are not ended as such.

    A stage that raised has already ended its run FAILED (or KILLED, if interrupted) with its own reason, which
    is kept; this catches the rest: a run left RUNNING by a crash, or FINISHED before the flow failed later.
    """
    configure_tracking()
    client = MlflowClient()
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{TAG_PREFIX}prefect_flow_run_id` = '{flow_run_id}'")
    failed = []
    for run in runs:
        if run.info.status in ("RUNNING", "FINISHED", "SCHEDULED"):
            client.set_tag(run.info.run_id, TAG_PREFIX + "failure", reason[:5000])
            client.set_terminated(run.info.run_id, status="FAILED")
            failed.append(run.info.run_id)
    return failed
