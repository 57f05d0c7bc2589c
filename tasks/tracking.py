"""The only module that talks to MLflow: one run per pipeline execution, lineage tags, never a run left RUNNING.

Every stage works inside `stage_run(...)`. It finds the execution's run: the run id handed over explicitly
(the Prefect flow), or the run named in the upstream stage's pointer file (`dvc repro`, one process per
stage). That run is resumed when it is finished, has the same params and lacks this stage; otherwise
(say `dvc repro` re-runs only evaluation) a new run is started and the upstream stages' records, which
the pointer files carry, are logged into it again from their recorded outputs, with a link to the run
they came from. So whichever way the pipeline ran, one run tells the whole story. A training killed outright
(`kill -9`) leaves a marker naming its run: the next execution with the same params continues that run, and
every epoch is logged in it exactly once (`EpochLog`).

Runs are named after the params that differ from the defaults (`bn=off sgd lr=0.01`), unique within their
experiment; experiments are tagged as model-training experiments so MLflow's UI opens on their runs table.

A stage's results are described by a `StageRecord` (metrics, tags, artifacts, per-epoch series, model);
the same record is logged when the stage runs and when a later run carries it over.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, RunStatus

from tasks.names import DATA_VERSION_TAG, FAILURE_TAG, NAME_KEY_TAG, TAG_PREFIX, stage_done_tag
from tasks.params import Params, code_root, flatten_params, tracking_root, workspace_root

# MLflow 3's UI opens an experiment on its GenAI overview unless this tag names another kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
EPOCH_MARKER = "loss"  # a per-epoch metric every training logs: its steps are the epochs a run holds
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
    """Handle a stage gets inside `stage_run`: the run id, a way to log its record, and a logging thread for
    work that need not hold up the stage (writing and logging a report while training runs)."""

    run_id: str
    stage: str
    records: list[StageRecord]
    _pending: list[Future] = field(default_factory=list)
    _worker: ThreadPoolExecutor | None = None

    def in_background(self, work: Callable[[], None]) -> None:
        """Run `work` on this run's logging thread, in submission order. The stage waits for it before its
        outputs are published (`wait_for_background`) and the run never ends FINISHED before it is done;
        if it fails, the stage fails and the run ends FAILED. Log with the explicit run id: MLflow's active
        run belongs to the main thread."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"{self.stage}-logging")
        self._pending.append(self._worker.submit(work))

    def wait_for_background(self) -> None:
        """Wait until the background work is done; raise its first failure."""
        pending, self._pending = self._pending, []
        failures = [future.exception() for future in pending]  # each waits for its work to end
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        failure = next((error for error in failures if error is not None), None)
        if failure is not None:
            raise failure

    def complete(self, record: StageRecord) -> None:
        self.wait_for_background()
        record.run_id = self.run_id
        log_record(self.run_id, record, replay_series=False)
        self.records.append(record)


def default_tracking_uri() -> str:
    return f"sqlite:///{tracking_root() / 'mlflow.db'}"


def configure_tracking() -> str:
    """Point MLflow at MLFLOW_TRACKING_URI, else at the SQLite store at the repository root (absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)  # (MLflow also exports it as MLFLOW_TRACKING_URI to child processes)
    _initialise_store(uri)
    return uri


_initialised_stores: set[str] = set()


def _initialise_store(uri: str) -> None:
    """Create or migrate a SQLite store under a file lock, once per process.

    MLflow creates its tables on first use without a lock: several processes starting together on a
    brand-new store race through the migrations (`No such constraint: 'uq_experiments_name'`). Here the
    first one migrates while the others wait, and then find every table in place.
    """
    if uri in _initialised_stores or not uri.startswith("sqlite:///"):
        return
    from filelock import FileLock

    # In the temporary folder, keyed by the store's path (as MLflow's own init lock): no clutter next to it.
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"cassava-mlflow-init-{digest}.lock"):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates/migrates if needed
    _initialised_stores.add(uri)


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
    """The experiment's id, creating it if needed, tagged as a model-training experiment (also when it was
    created without the tag). With the default store its artifacts go to an absolute folder next to mlflow.db:
    MLflow's default, ./mlruns under the working directory, would put a queued experiment's artifacts in
    DVC's temporary copy and lose them with it. Safe when several processes create it at once."""
    client = MlflowClient()
    artifact_location = None
    if mlflow.get_tracking_uri() == default_tracking_uri():
        artifact_location = (tracking_root() / "mlartifacts").as_uri()
    for attempt in range(5):
        existing = client.get_experiment_by_name(name)
        if existing:
            if existing.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return existing.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:
            # Most likely another process created it in the meantime (unique name): look again.
            time.sleep(0.2 * (attempt + 1))
    raise mlflow.exceptions.MlflowException(f"could not create or find the MLflow experiment {name!r}")


def experiment_name(params: Params) -> str:
    return params.tracking.experiment_name or f"cassava-{params.data.source}"


# ------------------------------------------------------------------------------------------- run names

# Flat param key -> its label in run names ("" = the value alone), in the order parts appear; params not
# listed here are named by their last key (or section.key where that is ambiguous), after these.
RUN_NAME_LABELS: dict[str, str] = {
    "model.conv_filters": "cnn",
    "model.batch_norm": "bn",
    "model.dropout": "do",
    "model.head_dropout": "head_do",
    "model.l2": "l2",
    "model.initializer": "",
    "train.optimizer": "",
    "train.learning_rate": "lr",
    "train.lr_schedule": "sched",
    "train.epochs": "ep",
    "train.batch_size": "bs",
    "train.class_weight": "cw",
    "data.image_size": "img",
}
# Never in a name: the experiment (one per data source) already says these.
UNNAMED_PARAMS = ("data.source", "tracking.experiment_name", "tracking.run_name")
DEFAULT_RUN_NAME = "defaults"  # every param at its default
MAX_NAMED_PARAMS_LENGTH = 90


def describe_run(params: Params, data_version: str | None) -> str:
    """A run name that says what differs: the params that differ from the defaults, abbreviated
    (`bn=off sgd lr=0.01 ep=15`), and the data version's first 8 characters (`data=2365d17f`).

    The defaults are the schema's (tasks/params.py, which the committed params.yaml mirrors), not the
    params.yaml of the moment: `dvc exp run -S` rewrites params.yaml itself, so a name against it would
    say nothing, and the same params always get the same name whatever the checkout.
    """
    if params.tracking.run_name:
        return params.tracking.run_name
    flat, defaults = flatten_params(params), _default_params()
    differing = [key for key in flat if flat[key] != defaults.get(key) and key not in UNNAMED_PARAMS]
    differing.sort(key=lambda key: list(RUN_NAME_LABELS).index(key) if key in RUN_NAME_LABELS else len(RUN_NAME_LABELS))
    parts = [_name_part(key, flat[key], defaults) for key in differing]
    shown: list[str] = []
    for part in parts:
        if len(" ".join([*shown, part])) > MAX_NAMED_PARAMS_LENGTH:
            shown.append(f"+{len(parts) - len(shown)} more")
            break
        shown.append(part)
    name = " ".join(shown) or DEFAULT_RUN_NAME
    return f"{name} data={data_version[:8]}" if data_version else name


@functools.cache
def _default_params() -> dict[str, str]:
    # Validated, so that defaults are typed as parsed values are (the schema's [0, 15] becomes [0.0, 15.0]).
    return flatten_params(Params.model_validate(Params().model_dump()))


def _name_part(key: str, value: str, defaults: dict[str, str]) -> str:
    if key in RUN_NAME_LABELS:
        label = RUN_NAME_LABELS[key]
    else:
        leaf = key.rsplit(".", 1)[-1]
        ambiguous = sum(other.rsplit(".", 1)[-1] == leaf for other in defaults) > 1
        label = f"{key.split('.', 1)[0]}.{leaf}" if ambiguous else leaf
    shown = _short_value(key, value)
    return f"{label}={shown}" if label else shown


def _short_value(key: str, value: str) -> str:
    """Booleans as on/off, lists as a-b-c, paths by their last part."""
    words = {"true": "on", "false": "off"}
    if value.startswith("[") and value.endswith("]"):
        items = [item.strip() for item in value[1:-1].split(",") if item.strip()]
        return "-".join(words.get(item.lower(), item) for item in items)
    if "/" in value:  # a data root, a backbone .keras file: its last part
        return Path(value).name or value
    return words.get(value.lower(), value)


def unique_run_name(base: str, taken: Iterable[str], current: str | None = None) -> str:
    """`base`, or `base #2`, `base #3`, ... whichever no other run has; a run already named so keeps its name."""
    taken = set(taken)
    if current and current not in taken and re.fullmatch(re.escape(base) + r"( #\d+)?", current):
        return current
    if base not in taken:
        return base
    number = 2
    while f"{base} #{number}" in taken:
        number += 1
    return f"{base} #{number}"


def name_key(params: Params) -> str:
    """What runs numbered `#2`, `#3`... share: the params part of their name (set as a tag when a run is created)."""
    return hashlib.sha256(describe_run(params, None).encode()).hexdigest()[:16]


def _name_run(client: MlflowClient, run_id: str, params: Params, data_version: str | None) -> None:
    """Name the run after its params, unique in its experiment: the n-th run (by start time, then id) with
    the same name key is `base #n`. The rank depends only on when runs were created, not on which name
    another process has written yet, so runs started at the same instant cannot pick the same name; a name
    already held otherwise (e.g. by a run from before name keys) falls back to the next free number."""
    run = client.get_run(run_id)
    experiment = run.info.experiment_id
    base = describe_run(params, data_version)
    order = (run.info.start_time or 0, run_id)
    rank = 1 + sum(
        1 for other in client.search_runs(
            [experiment], filter_string=f"tags.`{NAME_KEY_TAG}` = '{name_key(params)}'", max_results=5000
        ) if (other.info.start_time or 0, other.info.run_id) < order
    )
    name = base if rank == 1 else f"{base} #{rank}"
    prefix = re.split(r"['\\]", base)[0]  # quotes cannot be escaped in a filter: match on what precedes them
    taken = {
        other.info.run_name for other in client.search_runs(
            [experiment], filter_string=f"attributes.run_name LIKE '{prefix}%'", max_results=5000
        ) if other.info.run_id != run_id
    }
    if name in taken:
        name = unique_run_name(base, taken, run.info.run_name)
    if name != run.info.run_name:
        client.update_run(run_id, name=name)


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


# --------------------------------------------------------------------------------------------- lineage

# Not code: written by the pipeline (dvc.lock) or logged in full with every run (params.yaml, which
# `dvc exp run -S` rewrites). Together with dvc.yaml's outputs they never make the tree "dirty".
NOT_CODE = ("dvc.lock", "params.yaml")


def _git(*args: str, repo: Path | None = None) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=repo or code_root(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def pipeline_outputs(dvc_yaml: Path) -> list[str]:
    """Every path a stage of `dvc_yaml` writes (outs, metrics, plots), as dvc.yaml spells it."""
    import yaml

    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}) if dvc_yaml.exists() else {}
    return [
        next(iter(entry)) if isinstance(entry, dict) else str(entry)
        for stage in stages.values()
        for section in ("outs", "metrics", "plots")
        for entry in stage.get(section) or []
    ]


def code_state(repo: Path) -> tuple[str, bool] | None:
    """(commit, dirty) of the checkout at `repo`, or None outside git. Dirty means a tracked file that is
    code differs from the commit: the pipeline's own outputs (run pointers, metrics, history, dvc.lock)
    and params.yaml do not count, so the flag says whether the commit alone reproduces the run."""
    commit = _git("rev-parse", "HEAD", repo=repo)
    if not commit:
        return None
    excluded = [f":(top,exclude){path}" for path in [*NOT_CODE, *pipeline_outputs(repo / "dvc.yaml")]]
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":/", *excluded, repo=repo)
    return commit, bool(status)


def code_state_tags() -> dict[str, str]:
    """The code a run starts from: recorded once, when the run is created."""
    state = code_state(code_root())
    if state is None:
        return {}
    commit, dirty = state
    return {"mlflow.source.git.commit": commit, TAG_PREFIX + "git_commit": commit,
            TAG_PREFIX + "git_dirty": str(dirty).lower()}


def lineage_tags() -> dict[str, str]:
    """Everything else needed to recreate a run (set by every stage): trigger, libraries, where it ran."""
    tags: dict[str, str] = {
        TAG_PREFIX + "host": socket.gethostname(),
        TAG_PREFIX + "pid": str(os.getpid()),
        TAG_PREFIX + "python": sys.version.split()[0],
    }
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


def counter_tags(counts: dict[str, int]) -> dict[str, str]:
    """Bookkeeping counts (files found, duplicates, images per split) as `cassava.data.<name>` tags: shown
    with the run, never as metrics, so the charts and the compare view lead with learning curves and
    test metrics."""
    return {f"{TAG_PREFIX}data.{name}": str(int(count)) for name, count in counts.items()}


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
        and stage_done_tag(stage) not in run.data.tags
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
        client.set_tag(run.info.run_id, FAILURE_TAG, f"process {pid} died without ending the run")
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
    """SIGTERM raises Terminated in the main thread. An exception raised by a signal handler is lost when the
    handler happens to run inside a weakref callback or a `__del__` (Python prints "Exception ignored in ..."
    and goes on): seen in a sweep point that trained on after its SIGTERM. So once one has come, the signal is
    sent again every second until its Terminated has left this block."""
    import threading

    if not _in_main_thread():
        yield
        return
    received = threading.Event()
    settled = threading.Event()

    def send_again() -> None:
        while not settled.wait(1.0):
            os.kill(os.getpid(), signal.SIGTERM)

    resender = threading.Thread(target=send_again, name="sigterm-again", daemon=True)

    def handler(signum: int, frame: Any) -> None:
        if settled.is_set():
            return  # the first one got through: the run is being ended
        if not received.is_set():
            received.set()
            resender.start()
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
        if received.is_set():  # every raise was swallowed, yet the work ended: the stop request still stands
            raise Terminated(f"signal {signal.SIGTERM.value}")
    finally:
        settled.set()
        if resender.is_alive():
            resender.join()
        signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------ an interrupted training


def _interrupted_run_file() -> Path:
    from tasks.layout import INTERRUPTED_RUN_FILE

    return workspace_root() / INTERRUPTED_RUN_FILE


def _params_digest(flat_params: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(flat_params, sort_keys=True).encode()).hexdigest()


def _read_interrupted_run() -> dict[str, str] | None:
    """{"run_id", "params", "training"} of the training in progress or killed, or None."""
    try:
        return json.loads(_interrupted_run_file().read_text())
    except (OSError, ValueError):
        return None


def _mark_training(run_id: str, flat_params: dict[str, str], training_fingerprint: str) -> None:
    marker = _interrupted_run_file()
    marker.parent.mkdir(parents=True, exist_ok=True)
    temporary = marker.with_suffix(".tmp")
    temporary.write_text(json.dumps({"run_id": run_id, "params": _params_digest(flat_params),
                                     "training": training_fingerprint}) + "\n")
    temporary.replace(marker)


def _unmark_training(run_id: str) -> None:
    marked = _read_interrupted_run()
    if marked and marked.get("run_id") == run_id:
        _interrupted_run_file().unlink(missing_ok=True)


def _run_status(client: MlflowClient, run_id: str) -> str | None:
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return run.info.status if run.info.lifecycle_stage == "active" else None


# ----------------------------------------------------------------------------------------- the stage run


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    upstream_pointer: Path | None,
    pointer_out: Path,
    run_id: str | None = None,
    training_fingerprint: str | None = None,
) -> Iterator[StageRun]:
    """Open the execution's run for `stage` (see the module doc), and end it FINISHED, FAILED or KILLED.

    A resumable training passes its `training_fingerprint`: the run is then marked as holding that training
    until it ends FINISHED or FAILED. If it is killed instead, the next execution with the same params (its
    first stage, whichever way it runs) continues that same run; a training whose data changed in between
    goes to a new run rather than mix two trainings' epochs in one.
    """
    configure_tracking()
    client = MlflowClient()
    experiment_id = ensure_experiment(experiment_name(params))
    reap_orphaned_runs(client, experiment_id)
    flat_params = flatten_params(params)
    upstream_run_id, upstream_records = read_pointer(upstream_pointer)
    records = list(upstream_records)

    stale_run = None
    interrupted = _read_interrupted_run()
    if interrupted and interrupted.get("params") == _params_digest(flat_params):
        if training_fingerprint and interrupted.get("training") != training_fingerprint:
            stale_run = interrupted["run_id"]  # it holds epochs of another training (the data changed)
        elif not run_id and _run_status(client, interrupted["run_id"]) == "KILLED":
            run_id = interrupted["run_id"]
    if run_id and not _run_exists(client, run_id):
        run_id = None  # e.g. a run deleted from the store
    candidate = run_id or upstream_run_id
    carried_over = (
        not (candidate and (run_id or _resumable(client, candidate, stage, flat_params)))
        or candidate == stale_run
    )
    active = mlflow.start_run(run_id=None if carried_over else candidate, experiment_id=experiment_id,
                              tags={NAME_KEY_TAG: name_key(params)} if carried_over else None)
    current = active.info.run_id
    try:
        with _sigterm_raises():
            resumed = client.get_run(current)
            if carried_over or "mlflow.source.git.commit" not in resumed.data.tags:
                mlflow.set_tags(code_state_tags())  # the code as the run starts, not as later stages find it
            mlflow.set_tags(lineage_tags())
            if carried_over:
                _name_run(client, current, params, None)
                mlflow.log_params(flat_params)
                if candidate:
                    mlflow.set_tag(TAG_PREFIX + "carried_over_from", candidate)
                for record in upstream_records:
                    log_record(current, record, replay_series=True)
            else:
                if not resumed.data.params:
                    mlflow.log_params(flat_params)
                if FAILURE_TAG in resumed.data.tags:  # continuing a killed stage: it is not failed now
                    client.delete_tag(current, FAILURE_TAG)
                    mlflow.set_tag(TAG_PREFIX + "resumed_after", resumed.data.tags[FAILURE_TAG][:500])
            mlflow.set_tag(TAG_PREFIX + "stage", stage)
            if training_fingerprint:
                _mark_training(current, flat_params, training_fingerprint)
            handle = StageRun(current, stage, records)
            try:
                yield handle
            except BaseException:
                with contextlib.suppress(Exception):  # the stage's own error is the reason the run ends
                    handle.wait_for_background()  # nothing may log into the run after it has ended
                raise
            handle.wait_for_background()
            mlflow.set_tag(stage_done_tag(stage), "done")
            _tag_data_version(client, current, params)
            write_pointer(pointer_out, current, handle.records)
    except (KeyboardInterrupt, Terminated) as interruption:
        mlflow.set_tag(FAILURE_TAG, f"{stage}: interrupted ({interruption or 'KeyboardInterrupt'})")
        mlflow.end_run(status=RunStatus.to_string(RunStatus.KILLED))  # still marked: the next execution resumes
        raise
    except BaseException as error:
        mlflow.set_tag(FAILURE_TAG, f"{stage}: {type(error).__name__}: {error}"[:5000])
        mlflow.end_run(status=RunStatus.to_string(RunStatus.FAILED))
        if training_fingerprint:
            _unmark_training(current)  # a failed training is not continued: its next attempt starts a new run
        raise
    else:
        mlflow.end_run(status=RunStatus.to_string(RunStatus.FINISHED))
        if training_fingerprint:
            _unmark_training(current)


def _tag_data_version(client: MlflowClient, run_id: str, params: Params) -> None:
    """Tag the DVC hash of the prepared data, log it as the run's dataset, and name the run after it."""
    from tasks.layout import PREPARED_DIR

    version = dvc_data_version(workspace_root() / PREPARED_DIR)
    if not version:
        return
    run = client.get_run(run_id)
    if run.data.tags.get(DATA_VERSION_TAG) != version:
        client.set_tag(run_id, DATA_VERSION_TAG, version)
        _log_dataset(workspace_root() / PREPARED_DIR, params, version)
    _name_run(client, run_id, params, version)


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


class EpochLog:
    """Per-epoch metrics, logged live, each epoch exactly once in the run, also across a kill and a resume:
    epochs the run already holds (the killed attempt logged them, then died before backing them up, so
    they are trained again) are not logged twice, and the epochs a resumed training restores from its
    backup that the run lacks are logged first (`history`: rows with an "epoch" column)."""

    def __init__(self, run_id: str, history: Iterable[dict[str, float]] = ()) -> None:
        self.run_id = run_id
        self.logged = {point.step for point in MlflowClient().get_metric_history(run_id, EPOCH_MARKER)}
        for row in history:
            self(int(row["epoch"]), {key: value for key, value in row.items() if key != "epoch"})

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        if epoch not in self.logged:
            log_epoch_metrics(self.run_id, epoch, values)
            self.logged.add(epoch)


# What the end of a stage imports for the first time (model logging, the data version, the dataset input): about
# a second on 2 cores. A stage with time to spare (training) imports them on its logging thread beforehand.
END_OF_STAGE_MODULES = ("mlflow.keras", "mlflow.pyfunc", "mlflow.models.signature", "mlflow.types",
                        "mlflow.data.pandas_dataset", "pandas", "dvc_data.hashfile.build", "dvc_data.hashfile.db",
                        "dvc_objects.fs.local")


def import_end_of_stage_modules() -> None:
    for name in END_OF_STAGE_MODULES:
        importlib.import_module(name)


def log_keras_model(model_dir: Path) -> None:
    """Log `model_dir/model.keras` as MLflow model "model" with its signature and input example.

    The model file is copied into the MLflow model as it is, not loaded and serialized again, and the signature
    comes from the shapes the training recorded (`signature.json`), not from a prediction. MLflow's check of
    the serving input (reload as pyfunc, predict the example) is skipped: the example is the model's own
    validation images, and tests load every logged model and predict it (about 3 s saved per run).
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    example = np.load(model_dir / "input_example.npy")
    shapes = _recorded_shapes(model_dir)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(shapes["input_dtype"]), tuple(shapes["input_shape"]))]),
        outputs=Schema([TensorSpec(np.dtype(shapes["output_dtype"]), tuple(shapes["output_shape"]))]),
    )
    mlflow.models.Model.log(
        artifact_path=None,
        name="model",
        flavor=_KerasFlavor,
        model=_SavedKerasFile(model_dir / "model.keras"),
        signature=signature,
        input_example=example,
        validate_serving_input=False,
        # Explicit requirements: inferring them runs a pip resolution that costs ~7 s per run.
        pip_requirements=[f"{name}=={metadata.version(name)}" for name in _model_requirements()],
    )


def keras_signature_shapes(model: Any) -> dict[str, Any]:
    """The model's input and output dtypes and shapes, batch dimension -1, as `signature.json` holds them."""
    return {
        "input_dtype": model.inputs[0].dtype, "input_shape": [-1, *model.input_shape[1:]],
        "output_dtype": model.outputs[0].dtype, "output_shape": [-1, *model.output_shape[1:]],
    }


def _recorded_shapes(model_dir: Path) -> dict[str, Any]:
    recorded = model_dir / "signature.json"
    if recorded.exists():
        return json.loads(recorded.read_text())
    import keras  # a model folder written before signature.json existed (a carried-over record)

    return keras_signature_shapes(keras.saving.load_model(model_dir / "model.keras"))


class _SavedKerasFile:
    """A Keras model already saved as a .keras file, in the one role MLflow's keras flavor gives the model
    object: `model.save(path)`, which becomes a copy of that file."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def save(self, path: str, **kwargs: Any) -> None:
        shutil.copyfile(self.file, path)


class _KerasFlavor:
    """mlflow.keras, saving into a folder it first creates.

    MLflow 3.17's keras flavor writes the input example before it creates the model folder, so
    `mlflow.keras.log_model(..., input_example=...)` fails with FileNotFoundError; everything else is its own.
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(model: Any, path: str, validate_serving_input: bool = True, **kwargs: Any) -> None:
        # (`validate_serving_input` is Model.log's option, handed on to the flavor too: not the flavor's.)
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
            client.set_tag(run.info.run_id, FAILURE_TAG, reason[:5000])
            client.set_terminated(run.info.run_id, status="FAILED")
            failed.append(run.info.run_id)
    return failed
